"""Energy and state gradients by a hand-written vector-Jacobian product: no autograd graph.

The third implementation of the PC-ViT maths, beside `plain` and `parallel` in model.py. An inference
step needs only dE/dh, and dE/dh is local (design.md, "The model, and why it can be fast"):

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
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import LN_EPS, PCViT, patchify

ATTENTION_BACKENDS = ("auto", "math", "fused")


@torch.no_grad()  # the weights require grad; nothing here may record a graph through them
def energy_and_state_grads(model: PCViT, x: Tensor, top: Tensor, hidden: Tensor, *,
                           attention: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Total energy (summed over nodes and batch) and dE/dh0 (B, N, P), dE/dh_{1..L+1} (L+1, B, N, H).

    Same contract as `pcvit.inference.state_grads`: gradients are not divided by the batch size.
    x (B, C, S, S), top (B, N, P), hidden (L+1, B, N, H); nothing is written into the inputs.
    """
    c = model.config
    L1, B, N, H = hidden.shape  # L1 = L + 1 hidden nodes
    L, BN = L1 - 1, hidden.shape[1] * hidden.shape[2]
    nh, d = c.num_heads, c.head_dim
    r = model._residual - 1.0  # u = r*z + z1 + m with z1 = z + attn: double residual r = 1, single r = 0
    mm = _Products(c.precision)
    backend = resolve_attention(attention, hidden.device, nh, d, c.precision)

    # --- forward: what each hidden state passes on, then every prediction ------------------------
    if c.use_vode_state_layernorm:
        state_hat, state_mu, state_rs = torch.native_layer_norm(hidden, (H,), None, None, LN_EPS)
        g = torch.addcmul(model.state_ln_b[:, None, None], state_hat, model.state_ln_w[:, None, None])
    else:
        g = hidden
    z = g[:L].reshape(L, BN, H)  # block inputs
    hat1, mu1, rs1 = torch.native_layer_norm(z, (H,), None, None, LN_EPS)
    a_in = torch.addcmul(model.ln1_b[:, None], hat1, model.ln1_w[:, None])  # (L, BN, H)
    w_qkv = torch.cat([model.attn_q, model.attn_k, model.attn_v], dim=2)  # (L, H, 3H)
    qkv = mm.bmm(a_in, w_qkv)  # (L, BN, 3H)
    att_out, saved = _attention_forward(backend, qkv, L, B, N, nh, d, mm)  # (L, BN, H)
    z1 = mm.baddbmm(z, att_out, model.attn_o)  # z + attn, (L, BN, H)
    hat2, mu2, rs2 = torch.native_layer_norm(z1, (H,), None, None, LN_EPS)
    m_in = torch.addcmul(model.ln2_b[:, None], hat2, model.ln2_w[:, None])
    pre = mm.baddbmm(model.fc1_b[:, None], m_in, model.fc1_w)  # (L, BN, M), before the GELU
    act = F.gelu(pre, approximate="tanh")
    # e_{l+2} = h_{l+2} - (r*z + z1 + act @ W2 + b2)
    rest = (hidden[1:].reshape(L, BN, H) - z1).sub_(z, alpha=r).sub_(model.fc2_b[:, None])
    e_blocks = mm.baddbmm(rest, act, model.fc2_w, alpha=-1.0)  # (L, BN, H)
    # e_1 = h_1 - (h0 @ Wp + bp + PE)
    e_first = mm.addmm((hidden[0] - model.pos_embed - model.patch_proj_b).reshape(BN, H),
                       top.reshape(BN, -1), model.patch_proj_w, alpha=-1.0)  # (BN, H)
    # sensory error x - u_s, in patch layout: (BN, P)
    e_sense = mm.addmm(patchify(x, model.patch).reshape(BN, -1) - model.out_proj_b, g[L].reshape(BN, H),
                       model.out_proj_w, alpha=-1.0)
    energy = 0.5 * (_sumsq(e_blocks) + _sumsq(e_first) + _sumsq(e_sense))
    if c.intermediate_l1_coeff:
        energy = energy + c.intermediate_l1_coeff * hidden.abs().sum()
    if c.intermediate_l2_coeff:
        energy = energy + c.intermediate_l2_coeff * _sumsq(hidden)

    # --- backward: J^T e_below for every block at once (cotangent e_blocks; dE/dz = -J^T e) -------
    d_act = mm.bmm(e_blocks, model.fc2_w.transpose(1, 2))  # (L, BN, M)
    d_pre = torch.ops.aten.gelu_backward(d_act, pre, approximate="tanh")
    d_m_in = mm.bmm(d_pre, model.fc1_w.transpose(1, 2))  # (L, BN, H)
    d_z1 = _layer_norm_backward(d_m_in, model.ln2_w[:, None], z1, mu2, rs2).add_(e_blocks)
    d_att = mm.bmm(d_z1, model.attn_o.transpose(1, 2))
    d_qkv = _attention_backward(backend, d_att, saved, L, B, N, nh, d, mm)  # (L, BN, 3H)
    d_a_in = mm.bmm(d_qkv, w_qkv.transpose(1, 2))
    pulled = _layer_norm_backward(d_a_in, model.ln1_w[:, None], z, mu1, rs1).add_(d_z1).add_(e_blocks, alpha=r)
    d_last = mm.mm(e_sense, model.out_proj_w.t())  # (x - u_s) pulled back to g_{L+1}: (BN, H)
    pulled = torch.cat([pulled.reshape(L, B, N, H), d_last.reshape(1, B, N, H)])  # (L+1, B, N, H) = -dE/dg
    if c.use_vode_state_layernorm:
        pulled = torch.ops.aten.native_layer_norm_backward(
            pulled * model.state_ln_w[:, None, None], hidden, (H,), state_mu, state_rs, None, None,
            [True, False, False])[0]
    e = torch.cat([e_first.reshape(1, B, N, H), e_blocks.reshape(L, B, N, H)])
    g_hidden = e.sub_(pulled)
    if c.intermediate_l1_coeff:
        g_hidden.add_(hidden.sign(), alpha=c.intermediate_l1_coeff)
    if c.intermediate_l2_coeff:
        g_hidden.add_(hidden, alpha=2.0 * c.intermediate_l2_coeff)
    g_top = mm.mm(e_first, model.patch_proj_w.t()).neg_().reshape(top.shape)
    return energy, g_top, g_hidden


def resolve_attention(attention: str, device: torch.device, num_heads: int, head_dim: int, precision: str) -> str:
    """`math` or `fused` for this device and shape. `auto` = `fused` where a kernel applies, overridable
    with PCVIT_VJP_ATTENTION=math|fused (to compare on a new card without editing code)."""
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention: must be one of {', '.join(ATTENTION_BACKENDS)}, got {attention!r}")
    if attention == "auto":
        attention = os.environ.get("PCVIT_VJP_ATTENTION", "auto")
    if attention == "math":
        return "math"
    # the CUDA memory-efficient kernel needs 16-byte aligned rows: head_dim % 4 (float32) or % 8 (bf16)
    aligned = head_dim % (8 if precision == "bf16" else 4) == 0
    fused_ok = device.type == "cpu" or (device.type == "cuda" and aligned)
    if attention == "fused" and not fused_ok:
        raise ValueError(f"attention='fused' has no kernel for head_dim {head_dim} on {device.type} ({precision})")
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
                        mm: "_Products") -> Tensor:
    """d(attention output) (L, BN, H) -> d(q, k, v) packed like qkv, (L, BN, 3H)."""
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
    packed = torch.stack([dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)], dim=2)  # (LB, N, 3, nh, d)
    return packed.reshape(L, B * N, 3 * nh * d).to(d_out.dtype)


# --- small pieces ----------------------------------------------------------------------------------------
def _layer_norm_backward(d_y: Tensor, weight: Tensor, z: Tensor, mu: Tensor, rs: Tensor) -> Tensor:
    """d/dz of LayerNorm(z)*weight + b given d(output); weight broadcasts (per-layer gains)."""
    return torch.ops.aten.native_layer_norm_backward(d_y * weight, z, (z.shape[-1],), mu, rs, None, None,
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

    def mm(self, a: Tensor, b: Tensor) -> Tensor:
        if self.low is None:
            return torch.mm(a, b)
        return torch.mm(a.to(self.low), b.to(self.low)).to(a.dtype)

    def baddbmm(self, c: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
        """c + alpha * a @ b, batched over the first axis."""
        if self.low is None:
            return torch.baddbmm(c, a, b, alpha=alpha)
        return torch.add(c, self.bmm(a, b), alpha=alpha)

    def addmm(self, c: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
        if self.low is None:
            return torch.addmm(c, a, b, alpha=alpha)
        return torch.add(c, self.mm(a, b), alpha=alpha)
