"""Every hyperparameter of a PC-ViT run, in one frozen dataclass.

Field names are the original's (its config files and W&B sweep parameters), so that study files,
W&B sweeps and `--set KEY=VALUE` all speak the same words. Defaults are the original 12-block sweep's
fixed values plus its base config; sampled parameters default to a value inside the sweep's range.
`Config(...)` validates itself and names the bad field; derive variants with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

DATASETS = ("cifar10", "fashion-mnist", "synthetic")
IMPLEMENTATIONS = ("plain", "parallel", "vjp")
RESIDUALS = ("double", "single")
PRECISIONS = ("auto", "float32", "tf32", "bf16")  # auto: resolve_precision(), once the device is known
BRANCH_SCALES = ("1", "1/sqrt(L)", "1/L")
ENERGY_WEIGHTINGS = ("sum", "mean")
PROBE_SOLVERS = ("adamw", "lbfgs")
INFERENCE_VARIABLES = ("states", "errors")
TOP_LATENTS = ("patches", "image", "image_positional")
NODE_PRECISIONS = ("none", "dynamic")
EARLY_STOPPING_METRICS = ("train_mse", "val_mse", "probe_accuracy")


class ConfigError(ValueError):
    """A hyperparameter has an impossible value; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Config:
    # --- model -------------------------------------------------------------------------------
    num_blocks: int = 12  # L transformer blocks, so L+3 state nodes ("vodes"); 0: top latent -> patch node -> image
    hidden_size: int = 64  # H, width of every hidden state
    num_heads: int = 1  # attention heads; H must divide evenly
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * H
    patch_size: int = 4  # 32x32 CIFAR -> 8x8 = 64 patches of 48; 28x28 F-MNIST -> 49 of 16
    theta: float = 10000.0  # base of the fixed 2-D sinusoidal positional encoding
    residual: str = "double"  # double: u = h + Block(h) = 2h + attn + mlp (the original); single: u = Block(h) =
    #                           h + attn + mlp (the pcx block alone, without the decoder's outer residual)
    use_vode_state_layernorm: bool = False  # LayerNorm on each state before it feeds the next layer
    use_noise: bool = True  # top latent starts as 0.01*N(0,1) (else zeros)
    top_latent: str = "patches"  # patches: one P-wide latent per patch (the original); image: one P-wide latent
    #                              per image, shared by every patch (u_1 = h0 Wp + bp + PE_n): a global code;
    #                              image_positional: the same, projected by each patch's own weights
    #                              (u_1[n] = h0 Wp[n] + bp + PE_n), so that the code can say where things are
    top_latent_prior: float = 0.0  # > 0: a zero-mean Gaussian prior of this precision on the top latent,
    #                                E_0 = prior/2 * sum h0^2 (the original's top latent has no energy: 0)
    residual_branch_scale: str = "1"  # a in u = r*h + z1 + a*mlp, z1 = h + a*attn: "1" (the original), "1/sqrt(L)",
    #                                   "1/L" (depth-scaled branches, muPC: Innocenti et al. 2025)
    energy_weighting: str = "sum"  # sum: E = sum of node energies (the original); mean: each node's energy per element,
    #                                times the image's element count (the sensory term unchanged, nodes rebalanced)
    node_precision: str = "none"  # none: fixed node weights (energy_weighting); dynamic: at the start of every
    #                               inference each node's energy is weighted by the inverse of its mean squared
    #                               error, scaled to keep the total (precision weighting, Qi et al. 2025)

    # --- inference (state updates) -------------------------------------------------------------
    inference_steps: int = 20  # T, per training batch and per probe batch
    eval_inference_steps: int = 20  # T of validation (fixed in the original, whatever inference_steps is)
    inference_steps_per_block: int = 0  # > 0: training and probe T = this x num_blocks instead of inference_steps
    #                                     (T that grows with depth, as muPC's T = number of layers)
    inference_variables: str = "states"  # states: gradient steps on the states (the original); errors: on the
    #                                      top latent and the prediction errors, states rebuilt by the forward
    #                                      chain (error-based inference, ePC: Goemaere et al. 2025)
    peak_lr_hidden: float = 0.095  # SGD lr of the states; see use_lr_schedule_h for its quirk
    hidden_momentum: float = 0.4  # SGD momentum of the states (no dampening, no Nesterov)
    h_grad_clip_norm: float = 2000.0  # ONE global norm over all states and the whole batch
    use_inference_lr_scaling: bool = True  # scale dE/dh_i by base^(L+1-i)
    inference_lr_scale_base: float = 1.25
    intermediate_l1_coeff: float = 0.0  # lambda1 * sum|h_i| on nodes 1..L+1
    intermediate_l2_coeff: float = 0.0  # lambda2 * sum h_i^2 (no 1/2), nodes 1..L+1
    use_lr_schedule_h: bool = True  # quirk: schedule evaluated at the inference-step index t
    use_vode_grad_norm: bool = False  # rescale each node's layer-scaled dE/dh (whole batch) to norm
    vode_grad_norm_target: float = 1.0  # <- this before the global clip (the original's switch and default)
    hidden_lr_inference: float = 0.095  # constant state lr of the probe's feature extraction

    # --- weights -------------------------------------------------------------------------------
    peak_lr_weights: float = 1e-3  # AdamW peak lr
    w_grad_clip_norm: float = 500.0  # global norm over all weight grads (after grad/B)
    weight_decay: float = 2e-4  # decoupled AdamW decay, on every weight incl. biases and LN
    use_lr_schedule_w: bool = True  # warm-up + cosine over epochs x batches (else constant)
    warmup_steps: int = 0  # shared by weights (global steps) and states (inference steps)
    lr_schedule_min_lr_factor: float = 0.5  # cosine floor = factor * peak

    # --- data ----------------------------------------------------------------------------------
    dataset: str = "cifar10"  # cifar10 | fashion-mnist | synthetic
    data_dir: str = ""  # "" = the dataset's default folder
    download: bool = False  # allow torchvision to download CIFAR-10
    use_cifar10_norm: bool = True  # per-dataset mean/std (the name is the original's); else 0.5/0.5
    batch_size: int = 200
    train_subset: int = 50000  # first n training images
    test_subset: int = 1000  # first n test images: probe test set and reconstruction image
    validation_subset: int = 2000  # first n test images: validation
    seed: int = 10  # weights, top-latent noise and shuffling

    # --- schedule of the run -------------------------------------------------------------------
    epochs: int = 100  # also the lr horizon: epochs x batches per epoch
    use_early_stopping: bool = True
    early_stopping_metric: str = "train_mse"  # train_mse: checked every epoch; val_mse: at every validation (its
    #   patience counts validations); probe_accuracy: never stops (the original has no branch for it)
    early_stopping_patience: int = 5
    early_stopping_min_delta: float = 0.001  # absolute
    validation_every_n_epochs: int = 25
    reconstruction_every_n_epochs: int = 25
    save_reconstruction_images: bool = True
    divergence_check_every: int = 10  # batches between NaN/inf checks (one GPU sync each)
    reconstruction_steps: int = 20  # T of the reconstruction image (the original's reconstruction_steps [20])
    num_images: int = 1  # reconstruction image: the first n test images, tiled over the batch (the original: 1)

    # --- linear probe --------------------------------------------------------------------------
    linear_probe_every_n_epochs: int = 1  # 0 = never
    linear_probe_vode_indices: tuple[int, ...] = (0,)  # nodes whose patch-averaged states are features
    linear_probe_inference_steps: int = 0  # 0 = inference_steps
    linear_probe_lr: float = 1e-3
    linear_probe_wd: float = 1e-4
    linear_probe_epochs: int = 1
    linear_probe_batch_size: int = 200
    linear_probe_seed: int = 123
    linear_probe_solver: str = "adamw"  # adamw: linear_probe_epochs of minibatch AdamW (the original);
    #                                     lbfgs: full-batch L-BFGS on the same loss until it converges
    linear_probe_converged_change: float = 0.01  # AdamW head: converged when its mean loss over the last tenth of
    # the steps differs from the tenth before by at most this fraction of the first tenth's (else probe_converged
    # false)

    # --- the original's fresh-state switches (pcx STATUS.INIT: h0 redrawn, every other state := its prediction) --
    use_status_init_in_training: bool = False  # every training batch starts from fresh states (else: carried over)
    use_status_init_in_unmasking: bool = False  # validation, reconstruction and probe batches start fresh too

    # --- more of the original's switches (false in its 12-block sweep), as its code behaves ---
    use_ssl_augmentations: bool = False  # training batches: random resized crop, flip, colour jitter, grayscale,
    #                                      blur, drawn per image on the device (pcvit/augment.py)
    update_weights_every_inference_step: bool = False  # a weight step after every state step (T per batch), without
    #   layer scaling or per-node norm of the state gradient, and the weight lr schedule counting weight steps
    use_adamw_for_hidden_optimizer: bool = False  # AdamW (wd 1e-4) on the states of the probe's feature extraction
    #   only: the original's training, validation and reconstruction overwrite it with SGD
    reinitialize_model_for_each_epoch: bool = False  # every epoch starts from fresh states (STATUS.INIT: h0
    #                                                  redrawn, every other state := its prediction); weights kept

    # --- how to compute (same maths) -----------------------------------------------------------
    implementation: str = "vjp"  # vjp: all blocks at once + hand-written state gradient (pcvit/energy_vjp.py);
    #                              parallel: all blocks at once, autograd; plain: block after block (reference)
    precision: str = "auto"  # auto = tf32 on CUDA (what the original's JAX ran there), float32 on the CPU;
    #                          float32 | tf32 | bf16 matmuls (states and updates stay float32)
    device: str = "auto"  # auto = cuda if available, else cpu
    node_diagnostics: bool = True  # per-node energy, state RMS, top-latent movement each epoch (no extra passes)

    def __post_init__(self) -> None:
        _validate(self)

    # derived quantities ----------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def branch_scale(self) -> float:
        """The residual branch multiplier a for `residual_branch_scale`."""
        L = self.num_blocks
        if L == 0 or self.residual_branch_scale == "1":  # no blocks: no branches to scale
            return 1.0
        return 1.0 / math.sqrt(L) if self.residual_branch_scale == "1/sqrt(L)" else 1.0 / L

    @property
    def grad_norm_target(self) -> float | None:
        """The per-node gradient norm of use_vode_grad_norm, None when it is off."""
        return self.vode_grad_norm_target if self.use_vode_grad_norm else None

    @property
    def train_steps(self) -> int:
        """T of a training batch: inference_steps, or inference_steps_per_block x num_blocks."""
        return self.inference_steps_per_block * self.num_blocks or self.inference_steps

    @property
    def probe_steps(self) -> int:
        return self.linear_probe_inference_steps or self.train_steps

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["linear_probe_vode_indices"] = list(self.linear_probe_vode_indices)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Build a config from plain values (YAML, JSON, CLI), converting types and naming bad keys."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(unknown[0], f"unknown config field (known: {', '.join(sorted(known))})")
        return cls(**{k: coerce(k, v) for k, v in values.items()})


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def resolve_precision(precision: str, device_type: str) -> str:
    """The matmul precision a run uses on a device of this type ("cuda", "cpu").

    `auto` is the original's: it never set a precision, so on the A100/H100-class GPUs it ran on, JAX computed
    float32 matrix products in TF32 (its default there); on the CPU, float32. TF32 exists on CUDA only.
    """
    if precision in ("auto", "tf32"):
        return "tf32" if device_type == "cuda" else "float32"
    return precision


def coerce(name: str, value: Any) -> Any:
    """Convert `value` (from YAML, JSON or a `--set` string) to the type of field `name`."""
    default = getattr(Config, name, None) if name != "linear_probe_vode_indices" else (0,)
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("true", "1", "yes", "on"):
                    return True
                if lowered in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if kind is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(value)
                return int(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if kind is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split()]
            if isinstance(value, int) and not isinstance(value, bool):
                value = [value]
            return tuple(int(v) for v in value)
        if kind is str:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)  # `--set residual_branch_scale=1` reads 1 as a number
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise ConfigError(name, f"expected {kind.__name__}, got {value!r}") from None
    return value


def _validate(c: Config) -> None:
    def need(ok: bool, field: str, message: str) -> None:
        if not ok:
            raise ConfigError(field, message)

    # types first: a wrong type would make every later check confusing
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, bool):
            need(isinstance(value, bool), f.name, f"must be true or false, got {value!r}")
        elif isinstance(default, int):
            need(isinstance(value, int) and not isinstance(value, bool), f.name, f"must be an integer, got {value!r}")
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            need(ok, f.name, f"must be a finite number, got {value!r}")
        elif isinstance(default, str):
            need(isinstance(value, str), f.name, f"must be a string, got {value!r}")

    need(c.num_blocks >= 0, "num_blocks",
         f"must be >= 0 (0: the top latent and the patch node only), got {c.num_blocks}")
    for name in ("hidden_size", "num_heads", "patch_size", "inference_steps", "eval_inference_steps",
                 "batch_size", "train_subset", "test_subset", "validation_subset", "epochs",
                 "linear_probe_epochs", "linear_probe_batch_size", "divergence_check_every"):
        need(getattr(c, name) >= 1, name, f"must be >= 1, got {getattr(c, name)}")
    need(c.reconstruction_steps >= 1, "reconstruction_steps", f"must be >= 1, got {c.reconstruction_steps}")
    need(1 <= c.num_images <= min(c.batch_size, c.test_subset), "num_images",
         f"must be between 1 and min(batch_size, test_subset) = {min(c.batch_size, c.test_subset)}, got {c.num_images}")
    for name in ("peak_lr_hidden", "peak_lr_weights", "hidden_lr_inference", "h_grad_clip_norm", "w_grad_clip_norm",
                 "theta", "mlp_ratio", "inference_lr_scale_base", "linear_probe_lr", "vode_grad_norm_target"):
        need(getattr(c, name) > 0, name, f"must be > 0, got {getattr(c, name)}")
    for name in ("hidden_momentum", "weight_decay", "intermediate_l1_coeff", "intermediate_l2_coeff",
                 "early_stopping_min_delta", "linear_probe_wd"):
        need(getattr(c, name) >= 0, name, f"must be >= 0, got {getattr(c, name)}")
    for name in ("warmup_steps", "early_stopping_patience", "validation_every_n_epochs",
                 "reconstruction_every_n_epochs", "linear_probe_every_n_epochs", "linear_probe_inference_steps"):
        need(getattr(c, name) >= 0, name, f"must be >= 0, got {getattr(c, name)}")
    need(c.hidden_momentum < 1, "hidden_momentum", f"must be < 1, got {c.hidden_momentum}")
    need(0 <= c.lr_schedule_min_lr_factor <= 1, "lr_schedule_min_lr_factor",
         f"must be in [0, 1], got {c.lr_schedule_min_lr_factor}")
    need(c.hidden_size % c.num_heads == 0, "num_heads",
         f"hidden_size {c.hidden_size} is not divisible by num_heads {c.num_heads}")
    need(c.hidden_size % 4 == 0, "hidden_size",
         f"must be divisible by 4 (2-D sinusoidal encoding: sin/cos pairs per axis), got {c.hidden_size}")
    need(c.mlp_hidden >= 1 and float(c.mlp_hidden) == c.hidden_size * c.mlp_ratio, "mlp_ratio",
         f"hidden_size * mlp_ratio must be a whole number, got {c.hidden_size * c.mlp_ratio}")
    need(c.dataset in DATASETS, "dataset", f"unknown dataset {c.dataset!r} (known: {', '.join(DATASETS)})")
    need(c.implementation in IMPLEMENTATIONS, "implementation",
         f"unknown implementation {c.implementation!r} (known: {', '.join(IMPLEMENTATIONS)})")
    choices = {"residual": RESIDUALS, "residual_branch_scale": BRANCH_SCALES, "energy_weighting": ENERGY_WEIGHTINGS,
               "top_latent": TOP_LATENTS, "inference_variables": INFERENCE_VARIABLES, "node_precision": NODE_PRECISIONS,
               "linear_probe_solver": PROBE_SOLVERS, "precision": PRECISIONS,
               "early_stopping_metric": EARLY_STOPPING_METRICS}
    for name, known in choices.items():
        value = getattr(c, name)
        need(value in known, name, f"must be one of {', '.join(known)}, got {value!r}")
    need(c.top_latent_prior >= 0, "top_latent_prior", f"must be >= 0, got {c.top_latent_prior}")
    need(c.inference_steps_per_block >= 0, "inference_steps_per_block",
         f"must be >= 0, got {c.inference_steps_per_block}")
    need(not (c.inference_variables == "errors" and c.use_vode_grad_norm), "inference_variables",
         "errors cannot be combined with use_vode_grad_norm (it rescales per-state gradients; an error-based "
         "step has no state gradients)")
    need(c.linear_probe_converged_change > 0, "linear_probe_converged_change",
         f"must be > 0, got {c.linear_probe_converged_change}")
    need(c.device == "auto" or c.device == "cpu" or c.device.startswith("cuda"), "device",
         f"must be auto, cpu or cuda[:N], got {c.device!r}")
    image_side = 28 if c.dataset == "fashion-mnist" else 32
    need(image_side % c.patch_size == 0, "patch_size",
         f"{c.patch_size} does not divide the {image_side}x{image_side} images of {c.dataset}")
    need(len(c.linear_probe_vode_indices) >= 1, "linear_probe_vode_indices", "needs at least one node index")
    for i in c.linear_probe_vode_indices:
        need(0 <= i <= c.num_blocks + 1, "linear_probe_vode_indices",
             f"node {i} is out of range: probe nodes are 0..{c.num_blocks + 1} for {c.num_blocks} blocks "
             "(0 = top latent; the sensory node is the image itself)")
