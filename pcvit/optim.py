"""Learning-rate schedules and the weight step (grad/B, one global-norm clip, AdamW)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import Config


def lr_at(step: int, peak: float, warmup: int, total: int, min_factor: float) -> float:
    """Linear warm-up to `peak`, then half a cosine down to min_factor*peak at `total` (the original's S)."""
    if warmup > 0 and step < warmup:
        return peak * step / warmup  # the very first step has lr 0
    floor = min_factor * peak
    progress = min(max((step - warmup) / max(total - warmup, 1e-8), 0.0), 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def hidden_lr(config: Config, t: int, total: int) -> float:
    """State lr at inference step t of a batch. The original re-creates the state optimiser every batch,
    so its schedule restarts at t = 0: with warm-up >= T the first step has lr 0 and the largest is
    peak*(T-1)/warmup. Reproduced on purpose."""
    if not config.use_lr_schedule_h:
        return config.peak_lr_hidden
    return lr_at(t, config.peak_lr_hidden, config.warmup_steps, total, config.lr_schedule_min_lr_factor)


def weight_lr(config: Config, global_step: int, total: int) -> float:
    """Weight lr at the global weight step (0-based, counted from the run start, never reset)."""
    if not config.use_lr_schedule_w:
        return config.peak_lr_weights
    return lr_at(global_step, config.peak_lr_weights, config.warmup_steps, total, config.lr_schedule_min_lr_factor)


def make_weight_optimizer(model: nn.Module, config: Config) -> torch.optim.AdamW:
    """AdamW on every weight, biases and LayerNorm gains included (optax adamw's defaults)."""
    return torch.optim.AdamW(model.parameters(), lr=config.peak_lr_weights, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=config.weight_decay)


def scale_and_clip_grads(params: list[Tensor], batch_size: int, max_norm: float) -> tuple[Tensor, Tensor]:
    """grad <- grad / B, then one global-norm clip (no epsilon): returns (norm after /B, clipped?)."""
    grads = [p.grad for p in params if p.grad is not None]
    torch._foreach_div_(grads, float(batch_size))
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    clipped = norm >= max_norm
    factor = torch.where(clipped, max_norm / norm, torch.ones_like(norm))
    torch._foreach_mul_(grads, factor)
    return norm, clipped


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
