"""Energy and state gradients by a hand-written vector-Jacobian product: no autograd graph.

The third implementation of the PC-ViT maths, beside `plain` and `parallel` in model.py. An inference
step needs only dE/dh, which is local (only a node and the node it predicts enter it):

    dE/dh_i = e_i + l1*sign(h_i) + 2*l2*h_i - (du_below/dh_i)^T e_below,      e_i = h_i - u_i

with e_below the error of the node that h_i predicts: the next block's for h_1..h_L, the sensory
error x - u_s for h_{L+1}, and for the top latent only the first term, dE/dh0 = -(du_1/dh0)^T e_1.
So one step is one wide forward over all L blocks at once (weights stacked over depth, as
`PCViT.blocks_parallel`) that keeps what the backward needs, and one wide hand-written backward
through the block (LayerNorm, softmax attention, tanh-GELU MLP, residual), the optional state
LayerNorm, the patch projection and the output projection. The sensory error is taken in patch
layout (patchify(x) - out), which holds the same numbers as x - unpatchify(out).

Attention is either explicit (`math`: scores, softmax and its backward written out; any device) or
`fused`: the memory-efficient kernel on CUDA, the flash kernel on the CPU, forward and backward called
directly so that the (L, B, heads, N, N) scores never reach memory. Both are torch ops, usable under
`torch.compile`. Weight gradients are not computed here: the one weight step per batch uses autograd.

`state_step_` is a whole inference step (gradient, layer scaling, global clip, momentum, update) in place,
one graph for `torch.compile`; `settle_states_inplace` runs T of them. `inference.settle_states` runs it for
`implementation: vjp` whenever no hook (`before_step`, `record`) is asked for, which it does not have.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import LN_EPS, PCViT, patchify

ATTENTION_BACKENDS = ("auto", "math", "fused")
VODE_GRAD_NORM_EPS = 1e-8  # use_vode_grad_norm: g / (||g|| + eps) * target, as the original


@torch.no_grad()  # the weights require grad; nothing here may record a graph through them
def energy_and_state_grads(model: PCViT, x: Tensor, top: Tensor, hidden: Tensor, *,
                           attention: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Total energy (summed over nodes and batch) and dE/dh0 (B, N or 1, P), dE/dh_{1..L+1} (L+1, B, N, H).

    Same contract as `pcvit.inference.state_grads`: gradients are not divided by the batch size.
    x (B, C, S, S), top (B, N, P), hidden (L+1, B, N, H); nothing is written into the inputs.
    """
    c = model.config
    L1, B, N, H = hidden.shape  # L1 = L + 1 hidden nodes
    L, BN = L1 - 1, hidden.shape[1] * hidden.shape[2]
    nh, d = c.num_heads, c.head_dim
    r = model.residual_adds - 1.0  # u = r*z + z1 + m with z1 = z + attn: double residual r = 1, single r = 0
    mm = _Products(c.precision)
    backend = resolve_attention(attention, hidden.device, nh, d, c.precision, hidden.dtype)

    # --- forward: what each hidden state passes on, then every prediction ------------------------
    if c.use_vode_state_layernorm:
        state_hat, state_mu, state_rs = torch.native_layer_norm(hidden, (H,), None, None, LN_EPS)
        g = torch.addcmul(model.state_ln_b[:, None, None], state_hat, model.state_ln_w[:, None, None])
    else:
        g = hidden
    z = g[:L].reshape(L, BN, H)  # block inputs
    # LN gains/biases are folded into the next product: (hat*w + b) @ W = hat @ (w*W) + b @ W, which also gives
    # the LN backward its d(hat) straight from the transposed product.
    hat1, mu1, rs1 = torch.native_layer_norm(z, (H,), None, None, LN_EPS)
    w_qkv = torch.cat([model.attn_q, model.attn_k, model.attn_v], dim=2)  # (L, H, 3H)
    w_qkv_ln = model.ln1_w[:, :, None] * w_qkv
    qkv = mm.baddbmm(torch.bmm(model.ln1_b[:, None], w_qkv), hat1, w_qkv_ln)  # (L, BN, 3H)
    att_out, saved = _attention_forward(backend, qkv, L, B, N, nh, d, mm)  # (L, BN, H)
    # depth-scaled branches: a*(attn @ Wo) and a*(act @ W2 + b2) are products with a*Wo, a*W2 and the bias a*b2
    a = model.branch_scale
    w_o, w_fc2, b_fc2 = (model.attn_o, model.fc2_w, model.fc2_b) if a == 1 else \
        (a * model.attn_o, a * model.fc2_w, a * model.fc2_b)
    z1 = mm.baddbmm(z, att_out, w_o)  # z + a*attn, (L, BN, H)
    hat2, mu2, rs2 = torch.native_layer_norm(z1, (H,), None, None, LN_EPS)
    w_fc1_ln = model.ln2_w[:, :, None] * model.fc1_w
    b_fc1_ln = torch.baddbmm(model.fc1_b[:, None], model.ln2_b[:, None], model.fc1_w)
    pre = mm.baddbmm(b_fc1_ln, hat2, w_fc1_ln)  # (L, BN, M), before the GELU
    act = F.gelu(pre, approximate="tanh")
    e = hidden.new_empty(L1, BN, H)  # errors of nodes 1..L+1, written in place (no concatenation)
    # e_1 = h_1 - (h0 @ Wp + bp + PE)
    positional = model.patch_proj_w.dim() == 3  # `top_latent: image_positional`: a projection per patch
    if positional:
        e_first = torch.sub(hidden[0], model.project_top(top), out=e[0].view(B, N, H)).view(BN, H)
    else:
        e_first = mm.addmm((hidden[0] - model.pos_embed - model.patch_proj_b).reshape(BN, H),
                           top.expand(B, N, -1).reshape(BN, -1), model.patch_proj_w, alpha=-1.0, out=e[0])  # (BN, H)
    # e_{l+2} = h_{l+2} - (r*z + z1 + act @ W2 + b2)
    rest = (hidden[1:].reshape(L, BN, H) - z1).sub_(b_fc2[:, None])
    if r:
        rest.sub_(z, alpha=r)
    e_blocks = mm.baddbmm(rest, act, w_fc2, alpha=-1.0, out=e[1:])  # (L, BN, H)
    # sensory error x - u_s, in patch layout: (BN, P)
    e_sense = mm.addmm(patchify(x, model.patch).reshape(BN, -1) - model.out_proj_b, g[L].reshape(BN, H),
                       model.out_proj_w, alpha=-1.0)
    # node weights (`energy_weighting`): every hidden node has the same weight w, the image 1. dE/dh is then
    # w * (the unweighted gradient with the sensory error divided by w): one scale at the end.
    w = model.hidden_node_weight
    per_node = model.node_weights  # precision weighting: a weight per node, applied to the errors below
    if per_node is not None:
        w = 1.0
        energy, e_sense = _weighted_energy(c, e, e_sense, hidden, per_node.to(e.dtype))
    else:
        hidden_energy = 0.5 * _sumsq(e)
        if c.intermediate_l1_coeff:
            hidden_energy = hidden_energy + c.intermediate_l1_coeff * torch.linalg.vector_norm(hidden, 1)
        if c.intermediate_l2_coeff:
            hidden_energy = hidden_energy + c.intermediate_l2_coeff * _sumsq(hidden)
        energy = w * hidden_energy + 0.5 * _sumsq(e_sense)
        if w != 1:
            e_sense = e_sense / w

    # --- backward: J^T e_below for every block at once (cotangent e_blocks; dE/dz = -J^T e) -------
    d_act = mm.bmm(e_blocks, w_fc2.transpose(1, 2))  # (L, BN, M)
    d_pre = torch.ops.aten.gelu_backward(d_act, pre, approximate="tanh")
    d_hat2 = mm.bmm(d_pre, w_fc1_ln.transpose(1, 2))  # (L, BN, H)
    d_z1 = _layer_norm_backward(d_hat2, z1, mu2, rs2).add_(e_blocks)
    d_att = mm.bmm(d_z1, w_o.transpose(1, 2))
    d_q, d_k, d_v = _attention_backward(backend, d_att, saved, L, B, N, nh, d, mm)  # each (LB, nh, N, d)
    d_hat1 = _qkv_grads_times(d_q, d_k, d_v, w_qkv_ln.transpose(1, 2), L, BN, mm)  # d(qkv) @ W^T, (L, BN, H)
    pulled = torch.empty_like(e)  # -dE/dg for g_1..g_{L+1}: (L+1, BN, H)
    torch.add(_layer_norm_backward(d_hat1, z, mu1, rs1).add_(e_blocks, alpha=r), d_z1, out=pulled[:L])
    mm.mm(e_sense, model.out_proj_w.t(), out=pulled[L])  # (x - u_s) pulled back to g_{L+1}
    pulled = pulled.reshape(L1, B, N, H)
    if c.use_vode_state_layernorm:
        pulled = _layer_norm_backward(pulled * model.state_ln_w[:, None, None], hidden, state_mu, state_rs)
    if positional:  # dE/dh0 = -sum_n e_1[n] Wp[n]^T, before e is overwritten
        g_top = mm.mm(e_first.reshape(B, N * H), model.positional_projection().t()).neg_().reshape(B, 1, -1)
    else:
        g_top = mm.mm(e_first, model.patch_proj_w.t()).neg_().reshape(B, N, -1)  # before e is overwritten
        if top.shape[1] != N:  # `top_latent: image`: one latent feeds every patch, its gradient sums theirs
            g_top = g_top.sum(dim=1, keepdim=True)
    g_hidden = e.reshape(L1, B, N, H).sub_(pulled)
    node_w = 1.0 if per_node is None else per_node[:L1, None, None, None].to(e.dtype)
    if c.intermediate_l1_coeff:
        g_hidden.add_(node_w * hidden.sign(), alpha=c.intermediate_l1_coeff)
    if c.intermediate_l2_coeff:
        g_hidden.add_(node_w * hidden, alpha=2.0 * c.intermediate_l2_coeff)
    if w != 1:
        g_top.mul_(w)
        g_hidden.mul_(w)
    if c.top_latent_prior:  # E_0 = prior/2 sum h0^2: the top latent's own energy
        energy = energy + 0.5 * c.top_latent_prior * _sumsq(top)
        g_top.add_(top, alpha=c.top_latent_prior)
    return energy, g_top, g_hidden


def _weighted_energy(c, e: Tensor, e_sense: Tensor, hidden: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """The energy with a weight per node (E_1..E_{L+1}, E_s), and the errors scaled by their node's weight in
    place (e) or anew (e_sense): the backward then yields dE/dh = w_i e_i - J^T (w_below e_below) as it is."""
    L1 = e.shape[0]
    per_node = 0.5 * e.square().sum(dim=(1, 2))  # (L+1,)
    if c.intermediate_l1_coeff:
        per_node = per_node + c.intermediate_l1_coeff * hidden.abs().sum(dim=(1, 2, 3))
    if c.intermediate_l2_coeff:
        per_node = per_node + c.intermediate_l2_coeff * hidden.square().sum(dim=(1, 2, 3))
    energy = (weights[:L1] * per_node).sum() + weights[L1] * 0.5 * _sumsq(e_sense)
    e.mul_(weights[:L1, None, None])
    return energy, e_sense * weights[L1]


def state_step_(model: PCViT, x: Tensor, top: Tensor, hidden: Tensor, m_top: Tensor, m_hidden: Tensor, lr: Tensor,
                momentum: float, clip_norm: float, scale_top: float, scale_hidden: Tensor,
                grad_norm_target: float | None = None) -> tuple[Tensor, Tensor]:
    """One inference step of `inference.settle_states`, in place on the states and momentum buffers.

    g = layer-scaled dE/dh (each node's rescaled to norm `grad_norm_target` when given: use_vode_grad_norm),
    clipped by ONE global norm; m <- g + momentum*m; h <- h - lr*m. Momentum buffers start as zeros, which gives
    settle_states' first step (m = g) exactly. `lr` is a 0-d tensor so that a compiled step is not re-specialised
    for every value of the schedule. Returns (energy before, norm).
    """
    energy, g_top, g_hidden = energy_and_state_grads(model, x, top, hidden)
    # ||scaled g||^2 from per-node sums: no scaled copy of g is ever written
    node_sq = torch.linalg.vector_norm(g_hidden, dim=(1, 2, 3)).square()  # (L+1,)
    top_sq = _sumsq(g_top)
    mult_top, mult_hidden = scale_top, scale_hidden  # what multiplies each node's raw gradient
    if grad_norm_target is not None:
        mult_top = scale_top * grad_norm_target / (scale_top * top_sq.sqrt() + VODE_GRAD_NORM_EPS)
        mult_hidden = scale_hidden * grad_norm_target / (scale_hidden * node_sq.sqrt().reshape(-1, 1, 1, 1)
                                                         + VODE_GRAD_NORM_EPS)
    norm = torch.sqrt(mult_top ** 2 * top_sq + (node_sq * mult_hidden.reshape(-1).square()).sum())
    factor = torch.where(norm >= clip_norm, clip_norm / norm, torch.ones_like(norm))  # no epsilon, as optax
    m_top.mul_(momentum).add_(g_top.mul_(factor * mult_top))
    m_hidden.mul_(momentum).addcmul_(g_hidden, mult_hidden * factor)
    top.addcmul_(m_top, lr, value=-1.0)
    hidden.addcmul_(m_hidden, lr, value=-1.0)
    return energy, norm


def settle_states_inplace(model: PCViT, x: Tensor, states, steps: int, lr_at, momentum: float, clip_norm: float,
                          scales: Tensor, step=state_step_, grad_norm_target: float | None = None):
    """`inference.settle_states` without its hooks, on `state_step_`: the same states, fewer passes over memory.

    `step` may be a compiled `state_step_`. The input states are not modified; returns new `States`.
    """
    top, hidden = states.top.clone(), states.hidden.clone()
    m_top, m_hidden = torch.zeros_like(top), torch.zeros_like(hidden)
    scale_hidden = scales[1:].to(hidden.dtype).to(hidden.device)[:, None, None, None]
    lrs = torch.tensor([lr_at(t) for t in range(steps)], dtype=hidden.dtype).to(hidden.device)  # one copy
    for t in range(steps):
        step(model, x, top, hidden, m_top, m_hidden, lrs[t], momentum, clip_norm, float(scales[0]), scale_hidden,
             grad_norm_target)
    return type(states)(top, hidden)


def resolve_attention(attention: str, device: torch.device, num_heads: int, head_dim: int, precision: str,
                      dtype: torch.dtype = torch.float32) -> str:
    """`math` or `fused` for this device, shape and dtype. `auto` = `fused` where a kernel applies, overridable
    with PCVIT_VJP_ATTENTION=math|fused (to compare on a new card without editing code)."""
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention: must be one of {', '.join(ATTENTION_BACKENDS)}, got {attention!r}")
    if attention == "auto":
        attention = os.environ.get("PCVIT_VJP_ATTENTION", "auto")
    if attention == "math":
        return "math"
    # the CUDA memory-efficient kernel: float32 or bf16, rows and strides 16-byte aligned (q, k, v are views of
    # the packed (.., 3H) product, so head_dim % 4 for float32, % 8 for bf16 makes every stride aligned too)
    aligned = head_dim % (8 if precision == "bf16" else 4) == 0
    fused_ok = device.type == "cpu" or (device.type == "cuda" and aligned and dtype == torch.float32)
    if attention == "auto" and device.type == "cuda":
        # The CUDA kernels are private aten ops not yet run on a GPU by this project's tests: explicit
        # attention (public ops) until benchmarks/gpu_check.sh confirms them; PCVIT_VJP_ATTENTION=fused opts in.
        return "math"
    if attention == "fused" and not fused_ok:
        raise ValueError(f"attention='fused' has no kernel for head_dim {head_dim}, {dtype} on {device.type} "
                         f"({precision})")
    return "fused" if fused_ok else "math"


# --- attention over (L*B, heads, N, d) -----------------------------------------------------------------
def _split_heads(qkv: Tensor, L: int, B: int, N: int, nh: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
    """(L, BN, 3H) -> q, k, v as (L*B, nh, N, d) views (last axis contiguous, as the kernels want)."""
    parts = qkv.reshape(L * B, N, 3, nh, d).permute(2, 0, 3, 1, 4)  # (3, LB, nh, N, d)
    return parts[0], parts[1], parts[2]


def _merge_heads(o: Tensor, L: int, B: int, N: int, nh: int, d: int) -> Tensor:
    """(L*B, nh, N, d) -> (L, BN, H), heads concatenated in order."""
    return o.transpose(1, 2).reshape(L, B * N, nh * d)


def _attention_forward(backend: str, qkv: Tensor, L: int, B: int, N: int, nh: int, d: int,
                       mm: "_Products") -> tuple[Tensor, tuple]:
    """qkv (L, BN, 3H) -> softmax(q k^T / sqrt(d)) v, heads merged (L, BN, H), and what the backward needs."""
    q, k, v = _split_heads(qkv, L, B, N, nh, d)
    scale = 1.0 / math.sqrt(d)
    if backend == "math":
        probs = torch.softmax(mm.matmul(q, k.transpose(-1, -2)).mul_(scale), dim=-1)  # (LB, nh, N, N), over keys
        return _merge_heads(mm.matmul(probs, v), L, B, N, nh, d), (q, k, v, probs)
    q, k, v = mm.cast(q), mm.cast(k), mm.cast(v)
    if q.device.type == "cuda":
        o, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, False, scale=scale)
        saved = (q, k, v, o, lse, seed, offset)
    else:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        saved = (q, k, v, o, lse)
    return _merge_heads(o, L, B, N, nh, d).to(qkv.dtype), saved


def _attention_backward(backend: str, d_out: Tensor, saved: tuple, L: int, B: int, N: int, nh: int, d: int,
                        mm: "_Products") -> tuple[Tensor, Tensor, Tensor]:
    """d(attention output) (L, BN, H) -> d(q), d(k), d(v), each (L*B, nh, N, d) in the kernel's own layout."""
    d_o = d_out.reshape(L * B, N, nh, d).transpose(1, 2)  # (LB, nh, N, d)
    scale = 1.0 / math.sqrt(d)
    if backend == "math":
        q, k, v, probs = saved
        d_probs = mm.matmul(d_o, v.transpose(-1, -2))
        d_scores = torch.ops.aten._softmax_backward_data(d_probs, probs, -1, probs.dtype).mul_(scale)
        dq, dk = mm.matmul(d_scores, k), mm.matmul(d_scores.transpose(-1, -2), q)
        dv = mm.matmul(probs.transpose(-1, -2), d_o)
    elif d_o.device.type == "cuda":
        q, k, v, o, lse, seed, offset = saved
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            mm.cast(d_o), q, k, v, None, o, lse, seed, offset, 0.0, [True, True, True, False], False, scale=scale)
    else:
        q, k, v, o, lse = saved
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            mm.cast(d_o), q, k, v, o, lse, 0.0, False, scale=scale)
    return dq.to(d_out.dtype), dk.to(d_out.dtype), dv.to(d_out.dtype)


def _qkv_grads_times(dq: Tensor, dk: Tensor, dv: Tensor, w_t: Tensor, L: int, BN: int, mm: "_Products") -> Tensor:
    """[dq dk dv] @ w_t for grads (LB, nh, N, d) and w_t (L, 3H, H), without packing the grads where it can.

    The fused kernels write each grad as (LB, N, nh, d), which is (L, BN, H) as it is: three products accumulate.
    The explicit attention's (LB, nh, N, d) grads are packed by one copy, then one product.
    """
    LB, nh, N, d = dq.shape
    H = nh * d
    parts = [t.transpose(1, 2) for t in (dq, dk, dv)]  # (LB, N, nh, d)
    if all(p.is_contiguous() for p in parts):
        out = mm.bmm(parts[0].reshape(L, BN, H), w_t[:, :H])
        out = mm.baddbmm(out, parts[1].reshape(L, BN, H), w_t[:, H:2 * H])
        return mm.baddbmm(out, parts[2].reshape(L, BN, H), w_t[:, 2 * H:])
    return mm.bmm(torch.stack(parts, dim=2).reshape(L, BN, 3 * H), w_t)


# --- small pieces ----------------------------------------------------------------------------------------
def _layer_norm_backward(d_hat: Tensor, z: Tensor, mu: Tensor, rs: Tensor) -> Tensor:
    """d/dz given d(hat), hat = (z - mu) * rs the normalised z (the gain is applied by the caller)."""
    return torch.ops.aten.native_layer_norm_backward(d_hat, z, (z.shape[-1],), mu, rs, None, None,
                                                     [True, False, False])[0]


def _sumsq(t: Tensor) -> Tensor:
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


class _Products:
    """Matrix products in float32, or with bf16 operands and float32 accumulation and results (precision bf16).

    TF32 is the process-wide torch.backends switch (set by `train.Run`), not decided here.
    """

    def __init__(self, precision: str):
        self.low = torch.bfloat16 if precision == "bf16" else None

    def cast(self, t: Tensor) -> Tensor:
        return t if self.low is None else t.to(self.low)

    def matmul(self, a: Tensor, b: Tensor) -> Tensor:
        if self.low is None:
            return torch.matmul(a, b)
        return torch.matmul(a.to(self.low), b.to(self.low)).to(a.dtype)

    def bmm(self, a: Tensor, b: Tensor) -> Tensor:
        if self.low is None:
            return torch.bmm(a, b)
        return torch.bmm(a.to(self.low), b.to(self.low)).to(a.dtype)

    def mm(self, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
        if self.low is None:
            return torch.mm(a, b, out=out)
        product = torch.mm(a.to(self.low), b.to(self.low))
        return product.to(a.dtype) if out is None else out.copy_(product)

    def baddbmm(self, c: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0, out: Tensor | None = None) -> Tensor:
        """c + alpha * a @ b, batched over the first axis (into `out` when given)."""
        if self.low is None:
            return torch.baddbmm(c, a, b, alpha=alpha, out=out)
        return torch.add(c, self.bmm(a, b), alpha=alpha, out=out)

    def addmm(self, c: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0, out: Tensor | None = None) -> Tensor:
        if self.low is None:
            return torch.addmm(c, a, b, alpha=alpha, out=out)
        return torch.add(c, self.mm(a, b), alpha=alpha, out=out)
