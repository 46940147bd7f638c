"""The training run: predictive-coding batches, schedules, validation, probe, images, early stopping.

Per batch (the original's `train_on_batch`): clamp the image on the sensory node, settle the states
carried over from the previous operation for T steps, take one AdamW step on the weights at the settled
states, then measure the train MSE of a pure top-down reconstruction with the updated weights.
Per epoch (the original's order): train, log, early-stop check, validation when due, probe when due,
reconstruction image when due. Listeners hear about each of these and may ask the run to stop.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from .augment import augment
from .config import Config, ConfigError, resolve_precision
from .data import ImageData, load_data
from .diagnostics import NODE_LISTS, NodeDiagnostics
from .images import save_reconstruction_grid
from .inference import States, init_states, layer_scales, settle_states, update_precision
from .listeners import Listener, RunResult, StopReason, jsonable
from .model import PCViT
from .optim import hidden_lr, make_weight_optimizer, scale_and_clip_grads, set_lr, weight_lr
from .probe import probe_accuracy, probe_features

AUGMENT_SEED_OFFSET = 7919  # the augmentations' generator: seeded from `seed`, a stream apart from the weights'
MILESTONE_TRAIN_MSE = 0.0008  # the original's save_model_train_mse_threshold: first crossing triggers val + image


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """TF32 matmuls on CUDA while a run trains when `precision` is tf32 (a process-wide switch: restored after)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def clipped_mse(xhat: Tensor, x: Tensor) -> Tensor:
    """mean((clip(xhat, 0, 1) - clip(x, 0, 1))^2) in normalised space: the original's train/val MSE."""
    return (xhat.clamp(0, 1) - x.clamp(0, 1)).square().mean()


class Run:
    """One training run: the model, its carried states, both optimisers' state and the bookkeeping."""

    def __init__(self, config: Config, data: ImageData, listeners: Iterable[Listener] = (),
                 out_dir: Path | str | None = None):
        self.config, self.data = config, data
        self.listeners = list(listeners)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = data.device
        self.precision = resolve_precision(config.precision, self.device.type)  # auto: tf32 on CUDA, as the original
        self.generator = torch.Generator().manual_seed(config.seed)  # weights, h0 noise, shuffling
        self.augment_generator = None  # use_ssl_augmentations: every draw on the data's device
        if config.use_ssl_augmentations:
            self.augment_generator = torch.Generator(device=data.device).manual_seed(config.seed + AUGMENT_SEED_OFFSET)
        self.model = PCViT(config, data.channels, data.image_size, generator=self.generator).to(self.device)
        self.optim_w = make_weight_optimizer(self.model, config)
        self.states = init_states(self.model, config.batch_size, config.use_noise, self.generator)
        self.scales = layer_scales(config, self.model.top_shared_by)
        self.diagnostics = NodeDiagnostics()
        self.batches_per_epoch = len(data.train_images) // config.batch_size  # the last partial batch is dropped
        if self.batches_per_epoch == 0:
            raise ConfigError("batch_size", f"{config.batch_size} is larger than the {len(data.train_images)} "
                                            "training images")
        self.total_steps = config.epochs * self.batches_per_epoch  # the schedules' horizon
        self.global_step = 0
        self.epoch = 0  # completed epochs
        self.result = RunResult(device=str(self.device), implementation=config.implementation,
                                precision=self.precision)
        self.early_best: float | None = None
        self.early_counter = 0
        self.milestone_reached = False
        self.stop_request: tuple[StopReason, str] | None = None  # (reason, detail), asked by a listener or signal
        self.last_probe_features: tuple[Tensor, Tensor] | None = None  # (train, test) of the last probe

    # --- listener API ---------------------------------------------------------------------------
    def request_stop(self, reason: StopReason = StopReason.STOPPED, detail: str = "") -> None:
        """Ask the run to stop after the current callback (pruning, a budget, ...)."""
        if not isinstance(reason, StopReason):
            raise TypeError(f"request_stop: reason must be a StopReason, got {reason!r}")
        self.stop_request = (reason, detail)

    def interrupt(self, detail: str = "") -> None:
        """Stop as soon as the current batch is done, without finishing the epoch (Ctrl-C, SIGTERM).

        Safe to call from a signal handler: it only sets the request that the batch loop reads."""
        self.stop_request = (StopReason.INTERRUPTED, detail)

    @property
    def interrupted(self) -> bool:
        return self.stop_request is not None and self.stop_request[0] is StopReason.INTERRUPTED

    # --- one batch ------------------------------------------------------------------------------
    def hidden_lr_at(self, t: int) -> float:
        return hidden_lr(self.config, t, self.total_steps)

    def settle(self, x: Tensor, states: States, steps: int, **kwargs: Any) -> States:
        c = self.config
        return settle_states(self.model, x, states, steps, self.hidden_lr_at, c.hidden_momentum, c.h_grad_clip_norm,
                             self.scales, **kwargs)

    def start_states(self, batch_size: int, fresh: bool) -> States:
        """Where a batch's inference starts: fresh states (pcx STATUS.INIT: h0 redrawn, every other state := its
        prediction from the top) when `fresh`, else the first slots of the states carried over from the previous
        operation."""
        if fresh:
            return init_states(self.model, batch_size, self.config.use_noise, self.generator)
        return self.states.head(batch_size)

    def train_on_batch(self, x: Tensor, last_of_epoch: bool = True) -> tuple[Tensor, Tensor]:
        """Settle, one weight step, reconstruct. Returns (energy at the weight step, train MSE) as tensors.

        With `update_weights_every_inference_step` (the original's "mode 1") a weight step follows every state
        step instead: T per batch, the state gradient neither layer-scaled nor normalised per node (the original's
        mode 1 skips both), and the weight lr schedule evaluated at the count of weight steps, which therefore
        runs T times faster than the horizon it was built for (the original's optax schedule counts updates).
        With `node_diagnostics`, every batch adds its node energies, state sizes and top-latent movement;
        the last batch of an epoch also its dE/dh at the settled states (the backward then also reaches them)."""
        c = self.config
        start = self.start_states(len(x), c.use_status_init_in_training)
        if c.update_weights_every_inference_step:
            T = c.train_steps

            def weight_step_before(t: int, states: States) -> None:  # the weight step after state step t - 1
                if t > 0:
                    self.weight_step(x, states, self.global_step * T + t - 1, False)

            final = settle_states(self.model, x, start, T, self.hidden_lr_at, c.hidden_momentum, c.h_grad_clip_norm,
                                  torch.ones_like(self.scales), before_step=weight_step_before)
            energy, per_node, grads = self.weight_step(x, final, self.global_step * T + T - 1, last_of_epoch)
        else:
            final = self.settle(x, start, c.train_steps, grad_norm_target=c.grad_norm_target)
            if c.node_precision == "dynamic":  # (a resumed run starts its estimate afresh)
                update_precision(self.model, x, final)
            energy, per_node, grads = self.weight_step(x, final, self.global_step, last_of_epoch)
        self.global_step += 1
        self.states = final
        if c.node_diagnostics:
            self.diagnostics.add(per_node, start, final, *grads)
        return energy, clipped_mse(self.model.reconstruct(final.top), x)

    def weight_step(self, x: Tensor, states: States, lr_step: int,
                    state_grads: bool) -> tuple[Tensor, Tensor, tuple[Tensor | None, Tensor | None]]:
        """One AdamW step on the weights at `states`, the lr at schedule step `lr_step`. Returns the energy at the
        step, its per-node energies and, when `state_grads` (diagnostics), dE/dh at the states."""
        c = self.config
        set_lr(self.optim_w, weight_lr(c, lr_step, self.total_steps))
        self.optim_w.zero_grad(set_to_none=True)
        want = c.node_diagnostics and state_grads
        top = states.top.detach().requires_grad_(want)
        hidden = states.hidden.detach().requires_grad_(want)
        with torch.enable_grad():
            per_node = self.model.node_energies(x, top, hidden)  # learning is local: each weight sees its node
            energy = self.model.total_energy(per_node)
            energy.backward()
        scale_and_clip_grads(list(self.model.parameters()), len(x), c.w_grad_clip_norm)
        self.optim_w.step()
        return energy.detach(), per_node.detach(), (top.grad, hidden.grad)

    # --- evaluation -------------------------------------------------------------------------------
    def settle_and_reconstruct(self, x: Tensor, slots: int, T: int) -> Tensor:
        """T steps of eval inference on the first `slots` state slots, written back (the original chains them), no
        weight step; returns the reconstruction recorded before the last of the T updates."""
        seen: dict[str, Tensor] = {}

        def record(t: int, states: States) -> None:
            if t == T - 1:
                seen["xhat"] = self.model.reconstruct(states.top)

        final = self.settle(x, self.start_states(slots, self.config.use_status_init_in_unmasking), T,
                            before_step=record)
        self.states.top[:slots], self.states.hidden[:, :slots] = final.top, final.hidden  # written back (the original)
        return seen["xhat"]

    def validate(self) -> dict[str, float]:
        """Mean over validation batches of MSE, L1 and PSNR (the original's full_* metrics)."""
        images = self.data.test_images[: self.config.validation_subset]
        B = self.config.batch_size
        mses, l1s, psnrs = [], [], []
        for start in range(0, len(images), B):
            x = self.data.normalise(images[start:start + B])
            xhat = self.settle_and_reconstruct(x, len(x), self.config.eval_inference_steps)
            mse = clipped_mse(xhat, x)
            mses.append(mse)
            l1s.append((xhat.clamp(0, 1) - x.clamp(0, 1)).abs().mean())
            psnrs.append(10 * torch.log10(1.0 / mse.clamp_min(1e-8)))
        mean = lambda v: torch.stack(v).mean().item()  # noqa: E731  (GPU sync)
        return {"val_mse": mean(mses), "val_l1": mean(l1s), "val_psnr": mean(psnrs)}

    def save_reconstruction(self, epoch: int) -> Path | None:
        """The first `num_images` test images tiled over the batch (the original: the first one, repeated); leaves
        the states at theirs, as the original does. The grid shows one row per image."""
        c = self.config
        n = c.num_images
        images = self.data.normalise(self.data.test_images[:n])  # (n, C, S, S)
        x = images[torch.arange(c.batch_size, device=images.device) % n]  # slot i holds image i mod n
        xhat = self.settle_and_reconstruct(x.contiguous(), c.batch_size, c.reconstruction_steps)
        if self.out_dir is None or not c.save_reconstruction_images:
            return None
        return save_reconstruction_grid(x[:n], x[:n], xhat[:n], self.out_dir / f"reconstruction_epoch{epoch:03d}.png")

    # --- early stopping -----------------------------------------------------------------------------
    def early_stop(self, value: float) -> bool:
        """The original's rule: improvement iff value < best - min_delta; the first value counts as none.

        Fed the epoch's train MSE (`early_stopping_metric: train_mse`) or each validation's MSE (`val_mse`)."""
        c = self.config
        if not c.use_early_stopping:
            return False
        if self.early_best is None:
            self.early_best, self.early_counter = value, 1
        elif value < self.early_best - c.early_stopping_min_delta:
            self.early_best, self.early_counter = value, 0
        else:
            self.early_counter += 1
        return self.early_counter >= c.early_stopping_patience

    def track_val_mse(self, val_mse: float) -> None:
        """min_val_mse: the lowest seen. best_val_mse: the original's, set by the first validation and then replaced
        only by an improvement of more than early_stopping_min_delta, and only with early stopping on."""
        r, c = self.result, self.config
        r.min_val_mse = min(r.min_val_mse, val_mse)
        if r.best_val_mse == math.inf and val_mse != math.inf:
            r.best_val_mse = val_mse
        elif c.use_early_stopping and val_mse < r.best_val_mse - c.early_stopping_min_delta:
            r.best_val_mse = val_mse

    # --- the loop ---------------------------------------------------------------------------------
    def run(self) -> RunResult:
        with matmul_precision(self.precision):
            return self._run()

    def _run(self) -> RunResult:
        start = time.perf_counter()
        wall_before = self.result.wall_time_s  # a resumed run keeps counting
        for listener in self.listeners:
            listener.on_start(self)
        try:
            while self.epoch < self.config.epochs and not self._finished():
                self.run_epoch()
        except KeyboardInterrupt:
            self._stop(StopReason.INTERRUPTED, "KeyboardInterrupt")
        self.result.wall_time_s = wall_before + time.perf_counter() - start
        for listener in self.listeners:
            listener.on_end(self, self.result)
        return self.result

    def _finished(self) -> bool:
        return self.result.stop_reason is not StopReason.COMPLETED

    def _stop(self, reason: StopReason, detail: str = "") -> None:
        self.result.stop_reason, self.result.stop_detail = reason, detail

    def _stop_as_requested(self) -> None:
        self._stop(*self.stop_request)

    def run_epoch(self) -> None:
        c, r = self.config, self.result
        epoch = self.epoch + 1  # 1-based, as the original logs it
        t0 = time.perf_counter()
        if c.reinitialize_model_for_each_epoch:  # the original: a STATUS.INIT forward at every epoch's start
            self.states = init_states(self.model, c.batch_size, c.use_noise, self.generator)
        order = torch.randperm(len(self.data.train_images), generator=self.generator).to(self.device)
        energy_sum = torch.zeros((), device=self.device)
        mse_sum = torch.zeros((), device=self.device)
        n_batches = 0
        for b in range(self.batches_per_epoch):
            x = self.data.normalise(self.data.train_images[order[b * c.batch_size:(b + 1) * c.batch_size]])
            if self.augment_generator is not None:  # the original augments the normalised training batch only
                x = augment(x, self.augment_generator)
            if self.interrupted:  # the partial epoch is dropped: epochs_run counts completed epochs
                return self._stop_as_requested()
            energy, mse = self.train_on_batch(x, last_of_epoch=b == self.batches_per_epoch - 1)
            energy_sum += energy
            mse_sum += mse
            n_batches += 1
            if (b + 1) % c.divergence_check_every == 0 and not torch.isfinite(energy_sum + mse_sum):  # GPU sync
                break  # NaN/inf poisons the epoch mean anyway: stop wasting batches
            for listener in self.listeners:
                if listener.wants_batches:  # 0-d tensors: .item() is the listener's choice (a GPU sync)
                    listener.on_batch(self, epoch, b + 1, {"energy": energy, "train_mse": mse})
        train_energy, train_mse = (energy_sum / n_batches).item(), (mse_sum / n_batches).item()  # GPU sync
        self.epoch = epoch
        metrics: dict[str, Any] = {
            "epoch": epoch, "train_mse": train_mse, "train_energy": train_energy,
            "lr_weights": weight_lr(c, (epoch - 1) * self.batches_per_epoch, self.total_steps),
            "lr_hidden_logged": hidden_lr(c, (epoch - 1) * self.batches_per_epoch, self.total_steps),
            "lr_hidden_max_used": max(self.hidden_lr_at(t) for t in range(c.train_steps)),
            **self.diagnostics.summary(),  # per-node energies, state sizes, top-latent movement (GPU sync)
        }
        r.epochs_run = epoch
        r.node_diagnostics = {k: metrics[k] for k in (*NODE_LISTS, "top_move_rms", "top_rms_start") if k in metrics}
        r.final_train_mse = train_mse
        if not (math.isfinite(train_mse) and math.isfinite(train_energy)) or not bool(self.states.is_finite()):
            r.diverged, r.divergence_epoch = True, epoch
            self._stop(StopReason.DIVERGED, f"non-finite train energy/MSE or states in epoch {epoch}")
            return self._end_epoch(epoch, metrics, t0)
        r.best_train_mse = min(r.best_train_mse, train_mse)
        if c.early_stopping_metric == "train_mse" and self.early_stop(train_mse):
            self._stop(StopReason.EARLY_STOPPED, f"train_mse did not improve by {c.early_stopping_min_delta} "
                                        f"for {c.early_stopping_patience} epochs")
            return self._end_epoch(epoch, metrics, t0)
        milestone = not self.milestone_reached and train_mse < MILESTONE_TRAIN_MSE
        self.milestone_reached |= milestone
        last = epoch == c.epochs
        if (c.validation_every_n_epochs and epoch % c.validation_every_n_epochs == 0) or last or milestone:
            metrics.update(self.validate())
            self.track_val_mse(metrics["val_mse"])
            # the original stops here, before the probe and the image, when val_mse is its metric (a NaN is skipped)
            if c.early_stopping_metric == "val_mse" and math.isfinite(metrics["val_mse"]) \
                    and self.early_stop(metrics["val_mse"]):
                self._stop(StopReason.EARLY_STOPPED, f"val_mse did not improve by {c.early_stopping_min_delta} "
                                            f"for {c.early_stopping_patience} validations")
                return self._end_epoch(epoch, metrics, t0)
        if c.linear_probe_every_n_epochs and epoch % c.linear_probe_every_n_epochs == 0:
            t_probe = time.perf_counter()
            self.last_probe_features = probe_features(self.model, self.states, self.data, c)
            fit = probe_accuracy(self.model, self.states, self.data, c, self.last_probe_features)
            accuracy = fit.accuracy
            metrics["probe_accuracy"], metrics["probe_time_s"] = accuracy, time.perf_counter() - t_probe
            metrics["probe_steps"], metrics["probe_converged"] = fit.steps, fit.converged
            r.probe_converged = r.probe_converged and fit.converged
            r.probe_accuracies.append(accuracy)
            r.best_probe_accuracy = max(r.best_probe_accuracy, accuracy)
            for listener in self.listeners:
                listener.on_probe(self, epoch, accuracy)
            if self.stop_request is not None:
                self._stop_as_requested()
                return self._end_epoch(epoch, metrics, t0)
        if (c.reconstruction_every_n_epochs and epoch % c.reconstruction_every_n_epochs == 0) or last or milestone:
            path = self.save_reconstruction(epoch)
            if path is not None:
                r.image_paths.append(str(path))
                for listener in self.listeners:
                    listener.on_images(self, epoch, path)
        self._end_epoch(epoch, metrics, t0)

    def _end_epoch(self, epoch: int, metrics: dict[str, Any], t0: float) -> None:
        metrics["epoch_time_s"] = time.perf_counter() - t0
        self.result.history.append(metrics)
        self._write_metrics([metrics], "a")
        for listener in self.listeners:
            listener.on_epoch(self, epoch, metrics)
        if self.stop_request is not None and not self._finished():
            self._stop_as_requested()

    def _write_metrics(self, epochs: list[dict[str, Any]], mode: str) -> None:
        """metrics.jsonl in out_dir: one line per epoch, appended as it ends (a resumed run first writes the
        epochs it inherited, so the file is always the whole run)."""
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", mode) as f:
            f.writelines(json.dumps(jsonable(metrics)) + "\n" for metrics in epochs)

    # --- checkpoints --------------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly where it is (torch.save-able, on the CPU)."""
        cpu = lambda t: t.detach().cpu().clone()  # noqa: E731
        return {
            "config": self.config.to_dict(),
            "epoch": self.epoch, "global_step": self.global_step,
            "model": {k: cpu(v) for k, v in self.model.state_dict().items()},
            "optim_w": self.optim_w.state_dict(),
            "states": {"top": cpu(self.states.top), "hidden": cpu(self.states.hidden)},
            "generator": self.generator.get_state(),
            "augment_generator": None if self.augment_generator is None else self.augment_generator.get_state(),
            "early_stopping": {"best": self.early_best, "counter": self.early_counter},
            "milestone_reached": self.milestone_reached,
            "result": self.result.to_dict(),
        }

    def load_checkpoint(self, ckpt: dict[str, Any]) -> None:
        mine, theirs = self.config.to_dict(), ckpt["config"]
        differing = sorted(k for k in mine if mine[k] != theirs.get(k) and k != "device")
        if differing:
            raise ConfigError(differing[0], "the checkpoint was made with a different config: "
                              + ", ".join(f"{k}={theirs.get(k)!r} (now {mine[k]!r})" for k in differing))
        self.epoch, self.global_step = ckpt["epoch"], ckpt["global_step"]
        self.model.load_state_dict(ckpt["model"])
        self.optim_w.load_state_dict(ckpt["optim_w"])
        self.states = States(ckpt["states"]["top"].to(self.device), ckpt["states"]["hidden"].to(self.device))
        self.generator.set_state(ckpt["generator"])
        if self.augment_generator is not None:
            self.augment_generator.set_state(ckpt["augment_generator"])
        self.early_best, self.early_counter = ckpt["early_stopping"]["best"], ckpt["early_stopping"]["counter"]
        self.milestone_reached = ckpt["milestone_reached"]
        saved = ckpt["result"]
        for key, value in saved.items():
            setattr(self.result, key, float(value) if value in ("inf", "-inf", "nan") else value)
        self.result.stop_reason = StopReason(saved["stop_reason"])
        self._write_metrics(self.result.history, "w")
        self.result.device, self.result.implementation = str(self.device), self.config.implementation
        self.result.precision = self.precision


def train(config: Config, data: ImageData | None = None, listeners: Iterable[Listener] = (),
          out_dir: Path | str | None = None, resume: dict[str, Any] | None = None) -> RunResult:
    """Train one PC-ViT as `config` says; listeners hear every epoch/probe; returns the run's result."""
    data = data if data is not None else load_data(config)
    run = Run(config, data, listeners, out_dir)
    if resume is not None:
        run.load_checkpoint(resume)
    return run.run()
