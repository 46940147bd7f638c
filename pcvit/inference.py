"""Predictive-coding inference: settle the states by gradient descent on the energy.

One inference step (the original's `train_on_batch`, step 3):

    g_i = dE/dh_i                           for every node i = 0..L+1 (the sensory node is clamped)
    g_i <- base^(L+1-i) * g_i               layer scaling: the top latent moves most
    g_i <- g_i / ||g_i|| * target           only with use_vode_grad_norm: every node the same step size
    g   <- g * c / ||g||   if ||g|| >= c    ONE global norm over all nodes and the whole batch
    m_i <- g_i + mu * m_i                   SGD momentum, buffers reset every batch
    h_i <- h_i - lr(t) * m_i                lr evaluated at the inference-step index t
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import Config
from .energy_vjp import VODE_GRAD_NORM_EPS, energy_and_state_grads, settle_states_inplace
from .model import PCViT

PRECISION_EPS = 1e-12  # node_precision: a node whose error is exactly zero gets a large, finite weight


@dataclass
class States:
    """The value nodes' states: the top latent h0 (B, N, P), or (B, 1, P) with `top_latent: image`, and
    h_1..h_{L+1} stacked, (L+1, B, N, H)."""

    top: Tensor
    hidden: Tensor

    @property
    def batch_size(self) -> int:
        return self.top.shape[0]

    def clone(self) -> "States":
        return States(self.top.clone(), self.hidden.clone())

    def head(self, n: int) -> "States":
        """The first n sample slots (a view): partial batches run on a slice of the carried state."""
        return States(self.top[:n], self.hidden[:, :n])

    def is_finite(self) -> Tensor:
        return torch.isfinite(self.top).all() & torch.isfinite(self.hidden).all()

    def as_list(self) -> list[Tensor]:
        """[h0, h1, ..., h_{L+1}], the golden files' node order."""
        return [self.top, *self.hidden.unbind(0)]


def init_states(model: PCViT, batch_size: int, use_noise: bool, generator: torch.Generator | None) -> States:
    """Run-start INIT: h0 ~ 0.01*N(0,1) (or zeros), then every hidden state := its feed-forward prediction."""
    device = model.pos_embed.device
    shape = (batch_size, model.top_tokens, model.patch_dim)
    top = 0.01 * torch.randn(shape, generator=generator) if use_noise else torch.zeros(shape)
    top = top.to(device=device, dtype=model.patch_proj_w.dtype)
    hidden, _ = model.feedforward(top)
    return States(top, hidden)


def layer_scales(config: Config, shared_by: int = 1) -> Tensor:
    """base^(L+1-i) for node i = 0..L+1 (ones without layer scaling): node L+1 x1, the top latent x base^(L+1).
    A top latent that feeds `shared_by` patches (`top_latent: image`) steps by the mean of their gradients,
    not their sum, so that its step is the size of a patch latent's."""
    L = config.num_blocks
    if not config.use_inference_lr_scaling:
        scales = torch.ones(L + 2, dtype=torch.float64)
    else:
        scales = config.inference_lr_scale_base ** torch.arange(L + 1, -1, -1, dtype=torch.float64)
    scales[0] /= shared_by
    return scales


def state_grads(model: PCViT, x: Tensor, states: States) -> tuple[Tensor, Tensor, Tensor]:
    """Total energy and its gradient w.r.t. every state (not divided by the batch size).

    Autograd through the configured forward, or, for `implementation: vjp`, the hand-written
    vector-Jacobian product of `energy_vjp.py` (same numbers, no graph)."""
    if model.config.implementation == "vjp":
        return energy_and_state_grads(model, x, states.top, states.hidden)
    top = states.top.detach().requires_grad_(True)
    hidden = states.hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        energy = model.energy(x, top, hidden)
        g_top, g_hidden = torch.autograd.grad(energy, (top, hidden))
    return energy.detach(), g_top, g_hidden


@dataclass
class StepRecord:
    """What one inference step saw, kept only when asked (tests, diagnostics): tensors, no GPU sync."""

    energy: Tensor  # total energy at the states before the step
    grad_norm: Tensor  # global norm of the layer-scaled gradient
    clipped: Tensor  # bool: norm >= clip
    lr: float
    states: States  # after the step


def settle_states(model: PCViT, x: Tensor, states: States, steps: int, lr_at: Callable[[int], float],
                  momentum: float, clip_norm: float, scales: Tensor,
                  before_step: Callable[[int, States], None] | None = None,
                  record: list[StepRecord] | None = None, grad_norm_target: float | None = None) -> States:
    """Run `steps` inference steps from `states` with a fresh momentum buffer; returns the new states.

    The input states are not modified. `before_step(t, states)` sees the states before update t
    (validation records its reconstruction there); `record` collects a StepRecord per step.
    `grad_norm_target` (use_vode_grad_norm; training and probe features only, as the original): every node's
    whole-batch gradient is rescaled to that norm before the global clip.
    With `implementation: vjp` and no hooks, the same step runs in place (`energy_vjp.settle_states_inplace`).
    """
    if model.config.inference_variables == "errors":
        return settle_errors(model, x, states, steps, lr_at, momentum, clip_norm, scales, before_step, record)
    if model.config.implementation == "vjp" and before_step is None and record is None:
        return settle_states_inplace(model, x, states, steps, lr_at, momentum, clip_norm, scales,
                                     grad_norm_target=grad_norm_target)
    top, hidden = states.top.clone(), states.hidden.clone()
    scale_hidden = scales[1:].to(hidden.dtype).to(hidden.device)[:, None, None, None]  # (L+1, 1, 1, 1)
    m_top = m_hidden = None
    for t in range(steps):
        if before_step is not None:
            before_step(t, States(top, hidden))
        energy, g_top, g_hidden = state_grads(model, x, States(top, hidden))
        g_top, g_hidden, norm, clipped = step_direction(g_top * float(scales[0]), g_hidden * scale_hidden,
                                                        clip_norm, grad_norm_target)
        m_top = g_top if m_top is None else g_top + momentum * m_top
        m_hidden = g_hidden if m_hidden is None else g_hidden + momentum * m_hidden
        lr = lr_at(t)
        top = top - lr * m_top
        hidden = hidden - lr * m_hidden
        if record is not None:
            record.append(StepRecord(energy, norm.detach(), clipped, lr, States(top.detach(), hidden.detach())))
    return States(top.detach(), hidden.detach())


def step_direction(g_top: Tensor, g_hidden: Tensor, clip_norm: float,
                   grad_norm_target: float | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The layer-scaled gradients made a step: optionally every node's whole-batch gradient to one norm
    (use_vode_grad_norm), then ONE global clip over everything (no epsilon, as optax). Returns both, the
    global norm before the clip and whether it clipped."""
    if grad_norm_target is not None:
        g_top = g_top / (g_top.norm() + VODE_GRAD_NORM_EPS) * grad_norm_target
        g_hidden = g_hidden / (torch.linalg.vector_norm(g_hidden, dim=(1, 2, 3), keepdim=True)
                               + VODE_GRAD_NORM_EPS) * grad_norm_target
    norm = torch.sqrt(g_top.square().sum() + g_hidden.square().sum())
    clipped = norm >= clip_norm
    factor = torch.where(clipped, clip_norm / norm, torch.ones_like(norm))
    return g_top * factor, g_hidden * factor, norm, clipped


# --- error-based inference (inference_variables: errors) --------------------------------------------------
def errors_of(model: PCViT, states: States) -> Tensor:
    """e_i = h_i - u_i(h_{i-1}) for nodes 1..L+1: (L+1, B, N, H)."""
    u1, u_blocks, _ = model.predict(states.top, states.hidden)
    return states.hidden - torch.cat([u1[None], u_blocks])


def settle_errors(model: PCViT, x: Tensor, states: States, steps: int, lr_at: Callable[[int], float],
                  momentum: float, clip_norm: float, scales: Tensor,
                  before_step: Callable[[int, States], None] | None = None,
                  record: list[StepRecord] | None = None) -> States:
    """`settle_states` with the top latent and the errors as the variables (ePC, Goemaere et al. 2025).

    The same energy, written as a function of (h0, e_1..e_{L+1}) through the forward chain
    h_{i+1} = u_{i+1}(h_i) + e_{i+1}, so that a step on the top latent reaches every layer at once instead of one
    layer per step. The same step rule (layer scales on the errors of the same nodes, global clip, momentum).
    Both parametrisations have the same minima; tests/test_levers.py checks that they settle to the same energy.
    """
    top = states.top.detach().clone()
    errors = errors_of(model, states).detach()
    scale_errors = scales[1:].to(errors.dtype).to(errors.device)[:, None, None, None]
    m_top = m_errors = None
    for t in range(steps):
        top.requires_grad_(True)
        errors.requires_grad_(True)
        with torch.enable_grad():
            hidden, _ = model.chain(top, errors)
            if before_step is not None:
                before_step(t, States(top.detach(), hidden.detach()))
            energy = model.energy(x, top, hidden)
            g_top, g_errors = torch.autograd.grad(energy, (top, errors))
        top, errors = top.detach(), errors.detach()
        g_top, g_errors, norm, clipped = step_direction(g_top * float(scales[0]), g_errors * scale_errors, clip_norm)
        m_top = g_top if m_top is None else g_top + momentum * m_top
        m_errors = g_errors if m_errors is None else g_errors + momentum * m_errors
        lr = lr_at(t)
        top, errors = top - lr * m_top, errors - lr * m_errors
        if record is not None:
            with torch.no_grad():
                settled = States(top, model.chain(top, errors)[0])
            record.append(StepRecord(energy.detach(), norm.detach(), clipped, lr, settled))
    with torch.no_grad():
        return States(top, model.chain(top, errors)[0])


PRECISION_MOMENTUM = 0.9  # node_precision: how slowly the running error estimate forgets earlier batches


@torch.no_grad()
def node_mse(model: PCViT, x: Tensor, states: States) -> Tensor:
    """(L+2,) mean squared error per element of nodes 1..L+1 and of the image, at `states`."""
    u1, u_blocks, u_s = model.predict(states.top, states.hidden)
    hidden = (states.hidden - torch.cat([u1[None], u_blocks])).square().mean(dim=(1, 2, 3))
    return torch.cat([hidden, (x - u_s).square().mean()[None]]).double()


@torch.no_grad()
def update_precision(model: PCViT, x: Tensor, states: States) -> None:
    """`node_precision: dynamic`, after a training batch's inference: fold this batch's settled errors into the
    running estimate of every node's error variance, and weight each node's energy by its precision (the
    inverse), scaled so that the weighted total at these states equals the total with the fixed weights (the
    step sizes keep their meaning). The next inferences, and this batch's weight update, use those weights.
    Qi et al. 2025 weight by such precisions so that the small errors of deep nodes are not drowned by the large
    ones near the image."""
    mse = node_mse(model, x, states)
    running = model.node_mse_estimate
    model.node_mse_estimate = mse if running is None else PRECISION_MOMENTUM * running + (1 - PRECISION_MOMENTUM) * mse
    model.node_weights = None
    per_node = model.node_energies(x, states.top, states.hidden).sum(dim=0).double()
    precision = 1.0 / (model.node_mse_estimate + PRECISION_EPS)
    fixed_total = model.total_energy(per_node[None].float()).double()
    model.node_weights = (precision * fixed_total / ((precision * per_node).sum() + PRECISION_EPS)).float()


ADAMW_STATES = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)  # optax.adamw's defaults, as the original built it


def settle_states_adamw(model: PCViT, x: Tensor, states: States, steps: int, lr: float, clip_norm: float,
                        scales: Tensor, grad_norm_target: float | None = None) -> States:
    """`steps` inference steps with AdamW on the states instead of SGD momentum (use_adamw_for_hidden_optimizer):
    the same layer scaling, per-node norm and global clip, then optax's adamw with a fresh state

        mu <- b1 mu + (1-b1) g,  nu <- b2 nu + (1-b2) g^2,  h <- h - lr (mu/(1-b1^k) / (sqrt(nu/(1-b2^k)) + eps) + wd h)

    with k the 1-based step. The original reaches this only in the probe's feature extraction (constant lr)."""
    b1, b2, eps, wd = (ADAMW_STATES[k] for k in ("b1", "b2", "eps", "weight_decay"))
    h = [states.top.clone(), states.hidden.clone()]
    scale = [float(scales[0]), scales[1:].to(h[1].dtype).to(h[1].device)[:, None, None, None]]
    mu = [torch.zeros_like(v) for v in h]
    nu = [torch.zeros_like(v) for v in h]
    for k in range(1, steps + 1):
        _, g_top, g_hidden = state_grads(model, x, States(*h))
        g = step_direction(g_top * scale[0], g_hidden * scale[1], clip_norm, grad_norm_target)[:2]
        for i in range(2):
            gi = g[i]
            mu[i] = b1 * mu[i] + (1 - b1) * gi
            nu[i] = b2 * nu[i] + (1 - b2) * gi.square()
            step = (mu[i] / (1 - b1 ** k)) / ((nu[i] / (1 - b2 ** k)).sqrt() + eps)
            h[i] = h[i] - lr * (step + wd * h[i])
    return States(h[0].detach(), h[1].detach())
