"""The one correspondence between the golden files (`tests/golden/data/`, README sections 2-3) and the core.

The golden files store every linear map as an (in, out) matrix, one array per block; the core stores the
same (in, out) matrices stacked over depth, so block l of a golden array is index l of a core parameter:

| golden name (after a prefix `w.`, `w_after.`, `adam.mu.`, ...) | golden shape   | core parameter                  |
|----------------------------------------------------------------|----------------|---------------------------------|
| `patch_proj.weight`, `patch_proj.bias`                         | (P, H), (H,)   | `patch_proj_w`, `patch_proj_b`  |
| `block{l}.ln1.weight`, `block{l}.ln1.bias`                     | (H,), (H,)     | `ln1_w[l]`, `ln1_b[l]`          |
| `block{l}.attn.q`, `.k`, `.v`, `.o` (no biases)                | (H, H) each    | `attn_q[l]` ... `attn_o[l]`     |
| `block{l}.ln2.weight`, `block{l}.ln2.bias`                     | (H,), (H,)     | `ln2_w[l]`, `ln2_b[l]`          |
| `block{l}.mlp.fc1.weight`, `block{l}.mlp.fc1.bias`             | (H, 4H), (4H,) | `fc1_w[l]`, `fc1_b[l]`          |
| `block{l}.mlp.fc2.weight`, `block{l}.mlp.fc2.bias`             | (4H, H), (H,)  | `fc2_w[l]`, `fc2_b[l]`          |
| `out_proj.weight`, `out_proj.bias`                             | (H, P), (P,)   | `out_proj_w`, `out_proj_b`      |
| `state_ln{i}.weight`, `state_ln{i}.bias`, i = 1..L+1 (*)       | (H,), (H,)     | `state_ln_w[i-1]`, `_b[i-1]`    |

(*) only with `use_vode_state_layernorm` (`train_step_layernorm.npz`).

No transposes anywhere: both sides apply `y = x @ W + b`. The positional encoding is a constant buffer
(`pos_embed`), not a weight.

States: golden `h0` (B, N, P) is `States.top`; golden `h{i}` (B, N, H), i = 1..L+1, is `States.hidden[i-1]`.
Predictions: golden `u1` is `predict(...)[0]`, `u{l+2}` is `predict(...)[1][l]`, `u_s` is `predict(...)[2]`.
Energies: golden `E_node` (B, L+2) is `node_energies`, `E_total` is `energy`.

AdamW state (optax `adamw` -> torch `AdamW`): `adam.mu.<name>` -> `state[param]["exp_avg"]`,
`adam.nu.<name>` -> `state[param]["exp_avg_sq"]` (per-block arrays to index l of the stacked moment, like the
weights), `adam.count` -> `state[param]["step"]` (number of updates done; the same for every parameter).

Hyper-parameters: golden `meta.json` uses the original's names, which are `Config`'s field names;
`config_from_meta` lists the few that differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from pcvit.config import Config
from pcvit.data import NORMALISATION, ImageData
from pcvit.inference import States
from pcvit.model import PCViT


# golden name inside block l (without "block{l}.") -> core parameter stacked over the L blocks
BLOCK_PARAMS = {
    "ln1.weight": "ln1_w", "ln1.bias": "ln1_b",
    "attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v", "attn.o": "attn_o",
    "ln2.weight": "ln2_w", "ln2.bias": "ln2_b",
    "mlp.fc1.weight": "fc1_w", "mlp.fc1.bias": "fc1_b",
    "mlp.fc2.weight": "fc2_w", "mlp.fc2.bias": "fc2_b",
}
# golden name -> core parameter that is not stacked
SINGLE_PARAMS = {
    "patch_proj.weight": "patch_proj_w", "patch_proj.bias": "patch_proj_b",
    "out_proj.weight": "out_proj_w", "out_proj.bias": "out_proj_b",
}
# golden "state_ln{i}.<suffix>" (i = 1..L+1) -> core parameter stacked over the L+1 states, index i-1
STATE_LN_PARAMS = {"weight": "state_ln_w", "bias": "state_ln_b"}


# --- the golden files --------------------------------------------------------------------------------
GOLDEN_DIR = Path(__file__).resolve().parent / "data"  # numbers computed by running the original (README.md there)


def load_case(name: str) -> tuple[Mapping[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) of `tests/golden/data/<name>.npz`. A missing file is an error, never a skip."""
    with np.load(GOLDEN_DIR / f"{name}.npz") as z:  # no pickle needed
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(str(arrays["meta.json"]))


# --- hyper-parameters ----------------------------------------------------------------------------------
def config_from_meta(meta: dict[str, Any], implementation: str) -> Config:
    """The core's Config for a golden case, on the CPU in float32.

    Names that differ: `inference_steps_T` -> `inference_steps`; `double_residual` -> `residual`;
    `mlp_hidden` -> `mlp_ratio` (= mlp_hidden / hidden_size); `probe.hidden_lr`/`probe.steps` ->
    `hidden_lr_inference`/`linear_probe_inference_steps`. The schedules' horizon `total_train_steps`
    becomes `epochs` with one batch per epoch (a `Run` over the case's B images: total_steps = epochs x 1).
    """
    same = ("num_blocks", "hidden_size", "num_heads", "patch_size", "use_vode_state_layernorm", "peak_lr_hidden",
            "hidden_momentum", "h_grad_clip_norm", "use_inference_lr_scaling", "inference_lr_scale_base",
            "intermediate_l1_coeff", "intermediate_l2_coeff", "use_lr_schedule_h", "peak_lr_weights",
            "w_grad_clip_norm", "weight_decay", "use_lr_schedule_w", "warmup_steps", "lr_schedule_min_lr_factor",
            "batch_size")
    values: dict[str, Any] = {k: meta[k] for k in same}
    values.update(
        theta=float(meta["theta"]),
        mlp_ratio=meta["mlp_hidden"] / meta["hidden_size"],
        residual="double" if meta["double_residual"] else "single",
        inference_steps=meta["inference_steps_T"],
        epochs=meta["total_train_steps"],
        use_noise=True,  # README section 6: top-latent init 0.01*N(0,1)
        implementation=implementation, precision="float32", device="cpu",
    )
    if "probe" in meta:
        probe = meta["probe"]
        assert probe["schedule"].startswith("none") and probe["vode"] == 0 and probe["gap"]
        assert (probe["momentum"], probe["h_grad_clip_norm"], probe["layer_scaling"]) == (
            meta["hidden_momentum"], meta["h_grad_clip_norm"], meta["inference_lr_scale_base"])
        values.update(hidden_lr_inference=probe["hidden_lr"], linear_probe_inference_steps=probe["steps"],
                      linear_probe_vode_indices=(probe["vode"],))
    # what Config cannot express must be what the core hard-codes
    assert meta["adam"] == {"b1": 0.9, "b2": 0.999, "eps": 1e-08}, "make_weight_optimizer hard-codes these"
    mean, std = NORMALISATION["cifar10"]
    assert tuple(meta["input_normalisation"]["mean"]) == mean and tuple(meta["input_normalisation"]["std"]) == std
    config = Config(**values)
    assert config.mlp_hidden == meta["mlp_hidden"]
    return config


def make_model(config: Config) -> PCViT:
    """A CIFAR-shaped model (3x32x32 images, N = 64 patches of P = 48) for the golden cases."""
    return PCViT(config, channels=3, image_size=32)


def image_data(images_uint8: np.ndarray) -> ImageData:
    """A dataset holding just these uint8 images (train and test), normalised with the CIFAR-10 statistics.

    A `Run` over one batch of B images has one batch per epoch, so its schedules' horizon is `epochs`.
    """
    images = torch.as_tensor(images_uint8)
    labels = torch.zeros(len(images), dtype=torch.int64)
    mean, std = NORMALISATION["cifar10"]
    return ImageData("golden", images, labels, images.clone(), labels.clone(),
                     torch.tensor(mean).reshape(1, 3, 1, 1), torch.tensor(std).reshape(1, 3, 1, 1))


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Recover the raw image of a normalised golden batch (every golden image was a uint8 image)."""
    mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in NORMALISATION["cifar10"])
    raw = (x * std + mean) * 255.0
    assert np.abs(raw - raw.round()).max() < 1e-3, "not a normalised uint8 image"
    return raw.round().astype(np.uint8)


# --- weights -------------------------------------------------------------------------------------------
def param_slots(model: PCViT) -> dict[str, tuple[str, int | None]]:
    """golden name -> (core parameter name, index into its depth axis or None), for every weight of `model`."""
    c = model.config
    slots: dict[str, tuple[str, int | None]] = {g: (p, None) for g, p in SINGLE_PARAMS.items()}
    for l in range(c.num_blocks):
        slots.update({f"block{l}.{g}": (p, l) for g, p in BLOCK_PARAMS.items()})
    if c.use_vode_state_layernorm:
        for i in range(1, c.num_blocks + 2):
            slots.update({f"state_ln{i}.{g}": (p, i - 1) for g, p in STATE_LN_PARAMS.items()})
    covered = {p for p, _ in slots.values()}
    assert covered == {n for n, _ in model.named_parameters()}, "the table misses a core parameter"
    return slots


def _slot(tensor: Tensor, index: int | None) -> Tensor:
    return tensor if index is None else tensor[index]


def _golden_names(npz: Mapping[str, np.ndarray], prefix: str) -> set[str]:
    return {k[len(prefix):] for k in npz if k.startswith(prefix)}


def load_weights(model: PCViT, npz: Mapping[str, np.ndarray], prefix: str = "w.") -> None:
    """Copy the golden weights `<prefix><name>` into the model, in place (an optimiser keeps its parameters)."""
    slots = param_slots(model)
    assert _golden_names(npz, prefix) == set(slots), f"golden weights {prefix}* do not match the model's"
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (param, index) in slots.items():
            target = _slot(params[param], index)
            assert tuple(target.shape) == npz[prefix + name].shape, name
            target.copy_(torch.as_tensor(npz[prefix + name]))


def weights_from_model(model: PCViT) -> dict[str, np.ndarray]:
    """The model's weights under their golden names and shapes."""
    params = dict(model.named_parameters())
    return {name: _slot(params[p], i).detach().cpu().numpy().copy() for name, (p, i) in param_slots(model).items()}


def grads_from_model(model: PCViT) -> dict[str, np.ndarray]:
    """The weights' `.grad` under their golden names and shapes (`wgrad.raw.*` / `wgrad.clipped.*`)."""
    params = dict(model.named_parameters())
    return {name: _slot(params[p].grad, i).detach().cpu().numpy().copy()
            for name, (p, i) in param_slots(model).items()}


def set_grads(model: PCViT, npz: Mapping[str, np.ndarray], prefix: str) -> None:
    """Set every parameter's `.grad` from the golden arrays `<prefix><name>` (e.g. `wgrad.clipped.`)."""
    slots = param_slots(model)
    assert _golden_names(npz, prefix) == set(slots)
    params = dict(model.named_parameters())
    for param in params.values():
        param.grad = torch.zeros_like(param)
    for name, (param, index) in slots.items():
        _slot(params[param].grad, index).copy_(torch.as_tensor(npz[prefix + name]))


# --- optimiser state -----------------------------------------------------------------------------------
def load_adam(optimizer: torch.optim.Optimizer, model: PCViT, npz: Mapping[str, np.ndarray]) -> None:
    """optax adamw state (`adam.mu.*`, `adam.nu.*`, `adam.count`) -> torch AdamW `exp_avg`, `exp_avg_sq`, `step`."""
    slots = param_slots(model)
    assert _golden_names(npz, "adam.mu.") == set(slots) == _golden_names(npz, "adam.nu.")
    params = dict(model.named_parameters())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in params.values()}, "the optimiser must hold exactly the model's parameters"
    for param in params.values():
        optimizer.state[param] = {"step": torch.tensor(float(npz["adam.count"])),  # torch keeps a float32 tensor
                                  "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}
    for name, (param, index) in slots.items():
        state = optimizer.state[params[param]]
        _slot(state["exp_avg"], index).copy_(torch.as_tensor(npz["adam.mu." + name]))
        _slot(state["exp_avg_sq"], index).copy_(torch.as_tensor(npz["adam.nu." + name]))


def adam_from_optimizer(optimizer: torch.optim.Optimizer, model: PCViT) -> dict[str, np.ndarray]:
    """The inverse of `load_adam`: {"adam.mu.<name>", "adam.nu.<name>", "adam.count"} as golden arrays."""
    params = dict(model.named_parameters())
    out: dict[str, np.ndarray] = {}
    steps = set()
    for name, (param, index) in param_slots(model).items():
        state = optimizer.state[params[param]]
        out["adam.mu." + name] = _slot(state["exp_avg"], index).detach().cpu().numpy().copy()
        out["adam.nu." + name] = _slot(state["exp_avg_sq"], index).detach().cpu().numpy().copy()
        steps.add(int(state["step"]))
    assert len(steps) == 1, f"parameters disagree on the step count: {steps}"
    out["adam.count"] = np.asarray(steps.pop(), dtype=np.int32)
    return out


# --- states ----------------------------------------------------------------------------------------------
def states_from_npz(npz: Mapping[str, np.ndarray], prefix: str = "") -> States:
    """Golden `<prefix>h0 .. <prefix>h{L+1}` -> States(top=h0, hidden=stack(h1..h{L+1}))."""
    nodes = []
    while f"{prefix}h{len(nodes)}" in npz:
        nodes.append(torch.as_tensor(npz[f"{prefix}h{len(nodes)}"]).clone())
    assert len(nodes) >= 2, f"no states {prefix}h0, {prefix}h1, ..."
    return States(nodes[0], torch.stack(nodes[1:]))


def states_as_golden(states: States) -> dict[str, np.ndarray]:
    """States -> {"h0": ..., "h1": ..., ...} in the golden layout."""
    return {f"h{i}": t.detach().cpu().numpy() for i, t in enumerate(states.as_list())}


# --- comparisons (README section 8) ----------------------------------------------------------------------
def _np(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)


def assert_rel(actual: Any, expected: Any, tol: float, what: str) -> None:
    """max|a - b| <= tol * max|b|: relative to the reference array's own scale, not element-wise."""
    a, b = _np(actual).astype(np.float64), _np(expected).astype(np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != golden {b.shape}"
    err, scale = np.abs(a - b).max(), np.abs(b).max()
    assert err <= tol * scale, f"{what}: max error {err:.3g} = {err / scale:.3g} of scale {scale:.3g} > {tol:g}"


def assert_abs(actual: Any, expected: Any, tol: float, what: str) -> None:
    a, b = _np(actual).astype(np.float64), _np(expected).astype(np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != golden {b.shape}"
    err = np.abs(a - b).max()
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:g}"


def assert_exact(actual: Any, expected: Any, what: str) -> None:
    """Bit for bit (clip flags, counters, index maps, weights that must not move)."""
    a, b = _np(actual), _np(expected)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != golden {b.shape}"
    if not np.array_equal(a, b):
        if a.size <= 8:
            raise AssertionError(f"{what}: {a.tolist()} != golden {b.tolist()}")
        differ = a != b
        raise AssertionError(f"{what}: {differ.sum()} of {a.size} entries differ, e.g. {a[differ][:3].tolist()} "
                             f"!= golden {b[differ][:3].tolist()}")


def assert_states_rel(states: States, npz: Mapping[str, np.ndarray], prefix: str, tol: float) -> None:
    for name, value in states_as_golden(states).items():
        assert_rel(value, npz[prefix + name], tol, prefix + name)


def assert_weights(model: PCViT, npz: Mapping[str, np.ndarray], prefix: str, tol: float) -> None:
    """Absolute comparison of every weight with `<prefix><name>` (weights move ~1e-3 of their scale per step)."""
    for name, value in weights_from_model(model).items():
        assert_abs(value, npz[prefix + name], tol, prefix + name)


# --- a case, loaded ----------------------------------------------------------------------------------------
def model_for(case: tuple[Mapping[str, np.ndarray], dict[str, Any]], implementation: str,
              weights: str = "w.") -> tuple[Config, PCViT]:
    """The case's config and a model holding its weights `<weights><name>`."""
    npz, meta = case
    config = config_from_meta(meta, implementation)
    model = make_model(config)
    load_weights(model, npz, weights)
    return config, model
