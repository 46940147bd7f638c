"""The PC-ViT decoder: weights, predictions and the predictive-coding energy.

The network is "cut" at every state node: each prediction u_i reads the *state* h_{i-1} of the node
above it, never a prediction. So, given the states, all L block predictions are independent and can be
computed at once. The block weights are therefore stored stacked over depth, (L, in, out), and two
implementations of the same maths read them:

* `plain`: the spec line by line, one block after another, explicit softmax attention;
* `parallel`: every block at once as batched matmuls over the depth axis, fused attention.

Weight matrices are (in, out), applied as `y = x @ W + b`, the layout of the original and of
`tests/golden/data/` (a torch nn.Linear stores W.T).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config

LN_EPS = 1e-5


def positional_encoding(grid: int, hidden_size: int, theta: float) -> Tensor:
    """Fixed 2-D sinusoidal encoding (grid*grid, H): row encoding in the first H/2 columns, column in the rest.

    Patch p = grid*r + c. Per axis, d = H/2 and w_k = theta^(-2k/d): enc[2k] = sin(pos*w_k), enc[2k+1] = cos.
    """
    d = hidden_size // 2
    k = torch.arange(d // 2, dtype=torch.float64)
    omega = torch.exp(2 * k * (-math.log(theta) / d))  # (d/2,)
    angles = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None, :]  # (grid, d/2)
    enc = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(grid, d)  # interleaved sin, cos
    rows = enc[:, None, :].expand(grid, grid, d)  # (r, c, d)
    cols = enc[None, :, :].expand(grid, grid, d)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, hidden_size).float()


def unpatchify(out: Tensor, channels: int, patch: int) -> Tensor:
    """(B, N, P) patch outputs -> (B, C, S, S) images; feature f = (a*patch + b)*C + c, channel fastest.

    image[c, patch*i + a, patch*j + b] = out[grid*i + j, (a*patch + b)*C + c].
    """
    B, N, _ = out.shape
    grid = math.isqrt(N)
    x = out.reshape(B, grid, grid, patch, patch, channels)  # (B, i, j, a, b, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, grid * patch, grid * patch)


def patchify(images: Tensor, patch: int) -> Tensor:
    """Inverse of `unpatchify`: (B, C, S, S) -> (B, N, P) in the same patch and feature order."""
    B, C, S, _ = images.shape
    grid = S // patch
    x = images.reshape(B, C, grid, patch, grid, patch)  # (B, c, i, a, j, b)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, grid * grid, patch * patch * C)


class PCViT(nn.Module):
    """Weights and forward maths of the PC-ViT. States live outside (see `inference.States`)."""

    def __init__(self, config: Config, channels: int, image_size: int, generator: torch.Generator | None = None):
        super().__init__()
        c = config
        self.config = c
        self.channels, self.image_size, self.patch = channels, image_size, c.patch_size
        self.grid = image_size // c.patch_size
        self.num_patches = self.grid * self.grid  # N
        self.top_tokens = self.num_patches if c.top_latent == "patches" else 1  # h0 is (B, top_tokens, P)
        self.top_shared_by = self.num_patches // self.top_tokens  # patches each top latent feeds
        self.patch_dim = c.patch_size * c.patch_size * channels  # P, also the width of the top latent
        L, H, M = c.num_blocks, c.hidden_size, c.mlp_hidden

        def linear(fan_in: int, *shape: int) -> nn.Parameter:
            # equinox / torch nn.Linear default: U(-1/sqrt(fan_in), +1/sqrt(fan_in)) for W and b
            bound = 1.0 / math.sqrt(fan_in)
            return nn.Parameter(torch.empty(shape).uniform_(-bound, bound, generator=generator))

        positional = c.top_latent == "image_positional"  # one projection per patch: (N, P, H)
        self.patch_proj_w = linear(self.patch_dim, *((self.num_patches,) if positional else ()), self.patch_dim, H)
        self.patch_proj_b = linear(self.patch_dim, H)
        self.ln1_w, self.ln1_b = nn.Parameter(torch.ones(L, H)), nn.Parameter(torch.zeros(L, H))
        self.attn_q, self.attn_k = linear(H, L, H, H), linear(H, L, H, H)  # attention has no biases
        self.attn_v, self.attn_o = linear(H, L, H, H), linear(H, L, H, H)
        self.ln2_w, self.ln2_b = nn.Parameter(torch.ones(L, H)), nn.Parameter(torch.zeros(L, H))
        self.fc1_w, self.fc1_b = linear(H, L, H, M), linear(H, L, M)
        self.fc2_w, self.fc2_b = linear(M, L, M, H), linear(M, L, H)
        self.out_proj_w, self.out_proj_b = linear(H, H, self.patch_dim), linear(H, self.patch_dim)
        if c.use_vode_state_layernorm:  # one LayerNorm per state that feeds a layer: nodes 1..L+1
            self.state_ln_w, self.state_ln_b = nn.Parameter(torch.ones(L + 1, H)), nn.Parameter(torch.zeros(L + 1, H))
        self.register_buffer("pos_embed", positional_encoding(self.grid, H, c.theta), persistent=False)
        self.residual_adds = 2.0 if c.residual == "double" else 1.0  # how often the outer residual adds h
        self.branch_scale = c.branch_scale  # a: each residual branch (attention, MLP) is multiplied by it
        # `energy_weighting`: weight of every hidden node's energy (the image's is 1); mean = image / node elements
        self.hidden_node_weight = 1.0 if c.energy_weighting == "sum" else \
            (channels * image_size ** 2) / (self.num_patches * H)
        # `node_precision: dynamic`: (L+2,) weights of E_1..E_{L+1}, E_s from a running estimate of each node's
        # error variance, updated after every training batch (inference.update_precision); None: fixed weights
        self.node_weights: Tensor | None = None
        self.node_mse_estimate: Tensor | None = None

    # --- pieces shared by both implementations ---------------------------------------------------
    def project_top(self, h0: Tensor) -> Tensor:
        """u_1 = h0 @ Wp + bp + PE: (B, N, P) -> (B, N, H); a (B, 1, P) image latent is broadcast to every patch."""
        if self.patch_proj_w.dim() == 3:  # `top_latent: image_positional`: u_1[n] = h0 Wp[n]
            B, (N, P, H) = h0.shape[0], self.patch_proj_w.shape
            per_patch = (h0.reshape(B, P) @ self.positional_projection()).reshape(B, N, H)
            return per_patch + self.patch_proj_b + self.pos_embed
        return h0 @ self.patch_proj_w + self.patch_proj_b + self.pos_embed

    def positional_projection(self) -> Tensor:
        """`top_latent: image_positional`: the N per-patch projections side by side, (P, N*H)."""
        N, P, H = self.patch_proj_w.shape
        return self.patch_proj_w.permute(1, 0, 2).reshape(P, N * H)

    def project_out(self, g: Tensor) -> Tensor:
        """u_s = unpatchify(g @ Wo + bo): (B, N, H) -> (B, C, S, S)."""
        return unpatchify(g @ self.out_proj_w + self.out_proj_b, self.channels, self.patch)

    def feed(self, hidden: Tensor) -> Tensor:
        """What each hidden state passes on: LN_state(h) with the state-LayerNorm option, else h. (L+1, B, N, H)."""
        if not self.config.use_vode_state_layernorm:
            return hidden
        return _layer_norm(hidden, self.state_ln_w[:, None, None], self.state_ln_b[:, None, None])

    # --- block predictions ------------------------------------------------------------------------
    def block_plain(self, l: int, z: Tensor) -> Tensor:
        """u = (r-1)*z + z1 + a*mlp(LN2(z1)), z1 = z + a*attn(LN1(z)), for block l, line by line. (B, N, H)."""
        B, N, H = z.shape
        nh, d = self.config.num_heads, self.config.head_dim
        a_in = _layer_norm(z, self.ln1_w[l], self.ln1_b[l])
        q = (a_in @ self.attn_q[l]).reshape(B, N, nh, d).transpose(1, 2)  # (B, nh, N, d)
        k = (a_in @ self.attn_k[l]).reshape(B, N, nh, d).transpose(1, 2)
        v = (a_in @ self.attn_v[l]).reshape(B, N, nh, d).transpose(1, 2)
        weights = torch.softmax((q / math.sqrt(d)) @ k.transpose(-1, -2), dim=-1)  # (B, nh, N, N), over keys
        a = (weights @ v).transpose(1, 2).reshape(B, N, H) @ self.attn_o[l]  # heads concatenated in order
        z1 = z + self.branch_scale * a
        m = F.gelu(_layer_norm(z1, self.ln2_w[l], self.ln2_b[l]) @ self.fc1_w[l] + self.fc1_b[l], approximate="tanh")
        m = m @ self.fc2_w[l] + self.fc2_b[l]
        return (self.residual_adds - 1.0) * z + z1 + self.branch_scale * m

    def blocks_parallel(self, z: Tensor) -> Tensor:
        """All L blocks at once on their own inputs: (L, B, N, H) -> (L, B, N, H)."""
        L, B, N, H = z.shape
        nh, d = self.config.num_heads, self.config.head_dim
        a_in = _layer_norm(z, self.ln1_w[:, None, None], self.ln1_b[:, None, None]).reshape(L, B * N, H)
        qkv = torch.stack([a_in @ self.attn_q, a_in @ self.attn_k, a_in @ self.attn_v])  # (3, L, B*N, H)
        qkv = qkv.reshape(3, L * B, N, nh, d).transpose(2, 3)  # (3, L*B, nh, N, d): 4-D gets the fused kernels
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale 1/sqrt(d), no mask
        a = a.transpose(1, 2).reshape(L, B * N, H) @ self.attn_o  # (L, B*N, H), heads concatenated in order
        z1 = z + self.branch_scale * a.reshape(L, B, N, H)
        m_in = _layer_norm(z1, self.ln2_w[:, None, None], self.ln2_b[:, None, None]).reshape(L, B * N, H)
        m = F.gelu(torch.baddbmm(self.fc1_b[:, None], m_in, self.fc1_w), approximate="tanh")
        m = torch.baddbmm(self.fc2_b[:, None], m, self.fc2_w).reshape(L, B, N, H)
        return (self.residual_adds - 1.0) * z + z1 + self.branch_scale * m

    def predict(self, h0: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Predictions of every node from the states above it.

        h0 (B, N, P), hidden (L+1, B, N, H) = h_1..h_{L+1}  ->  u_1 (B, N, H), u_2..u_{L+1} (L, B, N, H), u_s image.
        """
        with self._autocast():
            g = self.feed(hidden)
            u1 = self.project_top(h0)
            if self.config.implementation == "plain" and self.config.num_blocks:
                u_blocks = torch.stack([self.block_plain(l, g[l]) for l in range(self.config.num_blocks)])
            else:
                u_blocks = self.blocks_parallel(g[:-1])
            u_s = self.project_out(g[-1])
        dtype = hidden.dtype  # bf16 matmuls come back to the states' precision
        return u1.to(dtype), u_blocks.to(dtype), u_s.to(dtype)

    def node_energies(self, x: Tensor, h0: Tensor, hidden: Tensor) -> Tensor:
        """Per-sample energy of every node with one: (B, L+2), columns E_1..E_{L+1}, E_s.

        E_i = sum 1/2 (h_i - u_i)^2 + l1 sum|h_i| + l2 sum h_i^2 for i = 1..L+1;  E_s = sum 1/2 (x - u_s)^2.
        """
        c = self.config
        u1, u_blocks, u_s = self.predict(h0, hidden)
        u = torch.cat([u1[None], u_blocks])  # (L+1, B, N, H)
        e = hidden - u
        per_node = 0.5 * e.square().sum(dim=(2, 3))  # (L+1, B)
        if c.intermediate_l1_coeff:
            per_node = per_node + c.intermediate_l1_coeff * hidden.abs().sum(dim=(2, 3))
        if c.intermediate_l2_coeff:
            per_node = per_node + c.intermediate_l2_coeff * hidden.square().sum(dim=(2, 3))
        sensory = 0.5 * (x - u_s).square().sum(dim=(1, 2, 3))  # (B,)
        return torch.cat([per_node.T, sensory[:, None]], dim=1)

    def total_energy(self, per_node: Tensor) -> Tensor:
        """(B, L+2) node energies -> the total over nodes and batch: the hidden nodes' energies weighted by
        `hidden_node_weight` (1 for `energy_weighting: sum`, the original), the image's by 1; with precision
        weighting, each node by its `node_weights` entry."""
        if self.node_weights is not None:
            return (per_node * self.node_weights.to(per_node.dtype)).sum()
        if self.hidden_node_weight == 1.0:
            return per_node.sum()
        return self.hidden_node_weight * per_node[:, :-1].sum() + per_node[:, -1].sum()

    def energy(self, x: Tensor, h0: Tensor, hidden: Tensor) -> Tensor:
        """Total energy: summed over nodes AND over the batch (not a mean), a scalar; with `top_latent_prior`,
        plus the top latent's prior energy (not among the per-node energies)."""
        energy = self.total_energy(self.node_energies(x, h0, hidden))
        if self.config.top_latent_prior:
            energy = energy + 0.5 * self.config.top_latent_prior * h0.square().sum()
        return energy

    @torch.no_grad()
    def feedforward(self, h0: Tensor) -> tuple[Tensor, Tensor]:
        """Pure top-down pass from h0, chaining predictions: z_1 = u_1(h0), z_{i+1} = u_{i+1}(z_i).

        Returns the chained hidden predictions (L+1, B, N, H) and the predicted image (B, C, S, S).
        Used for the run-start INIT (states := predictions) and for every reconstruction. The chain is
        sequential by nature, so both implementations run it block after block.
        """
        return self.chain(h0)

    def chain(self, h0: Tensor, errors: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """States from the top latent and the nodes' errors: h_1 = u_1(h0) + e_1, h_{i+1} = u_{i+1}(h_i) + e_{i+1}
        (errors (L+1, B, N, H); None: all zero, the feed-forward pass). Returns the states and the predicted image.
        Differentiable: error-based inference (`inference_variables: errors`) steps through it."""
        with self._autocast():
            z = self.project_top(h0)
            zs = [z if errors is None else z + errors[0]]
            for l in range(self.config.num_blocks):
                z = self.block_plain(l, self.feed_node(l, zs[-1]))
                zs.append(z if errors is None else z + errors[l + 1])
            hidden = torch.stack(zs).to(h0.dtype)
            return hidden, self.project_out(self.feed_node(self.config.num_blocks, hidden[-1])).to(h0.dtype)

    def feed_node(self, i: int, z: Tensor) -> Tensor:
        """`feed` for one state, hidden index i (node i+1): (B, N, H) -> (B, N, H)."""
        if not self.config.use_vode_state_layernorm:
            return z
        return _layer_norm(z, self.state_ln_w[i], self.state_ln_b[i])

    def reconstruct(self, h0: Tensor) -> Tensor:
        return self.feedforward(h0)[1]

    def _autocast(self):
        if self.config.precision != "bf16":
            return nullcontext()
        return torch.autocast(device_type=self.pos_embed.device.type, dtype=torch.bfloat16)


def _layer_norm(z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """LayerNorm over the last axis (biased variance, eps 1e-5) with gains that may differ per layer."""
    return F.layer_norm(z, z.shape[-1:], eps=LN_EPS) * weight + bias
