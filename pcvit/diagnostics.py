"""Per-node diagnostics of a run: why a deep predictive-coding model does or does not learn.

For every training batch, from quantities the batch computes anyway (no extra forward or backward pass):

    node_energy[i]    mean per-sample energy of node i at the weight step   (E_1..E_{L+1}, then E_s)
    state_rms[i]      RMS of the settled state h_i                            (h_0..h_{L+1})
    grad_norm[i]      ||dE/dh_i|| over the batch at the settled states        (h_0..h_{L+1}; unscaled;
                      the epoch's last batch only: it needs the weight step's backward to reach the states)
    top_move_rms      RMS of h_0(end) - h_0(start): how far inference moved the top latent in T steps
    top_rms_start     RMS of h_0 at the start of the batch (so the move can be read relative to it)

Averaged over the epoch's batches as tensors; one GPU sync per epoch, in `summary()`. Measured cost:
`benchmarks/bench_diagnostics.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

NODE_LISTS = ("node_energy", "state_rms", "grad_norm")


def _rms(t: Tensor, dims: tuple[int, ...] | None = None) -> Tensor:
    return t.square().mean(dim=dims).sqrt() if dims else t.square().mean().sqrt()


class NodeDiagnostics:
    """Running sums over an epoch's batches; `summary()` returns the means and starts a new epoch."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.batches = 0
        self.last_grad_norm: Tensor | None = None

    def add(self, per_node: Tensor, start, final, g_top: Tensor | None, g_hidden: Tensor | None) -> None:
        """per_node (B, L+2) node energies; start/final the batch's `States`; g_* = dE/dh at the final states."""
        with torch.no_grad():
            values = {
                "node_energy": per_node.mean(dim=0),
                "state_rms": torch.cat([_rms(final.top)[None], _rms(final.hidden, (1, 2, 3))]),
                "top_move_rms": _rms(final.top - start.top),
                "top_rms_start": _rms(start.top),
            }
            for key, value in values.items():
                self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
            if g_top is not None and g_hidden is not None:  # a value of one batch, not summed
                self.last_grad_norm = torch.cat([torch.linalg.vector_norm(g_top)[None],
                                                 torch.linalg.vector_norm(g_hidden, dim=(1, 2, 3))])
        self.batches += 1

    def summary(self) -> dict[str, float | list[float]]:
        """Epoch means: lists per node for NODE_LISTS, floats otherwise (one GPU sync). Empty if nothing was added."""
        out: dict[str, float | list[float]] = {}
        for key, total in self.sums.items():
            out[key] = (total / self.batches).tolist()  # GPU sync
        if self.last_grad_norm is not None:
            out["grad_norm"] = self.last_grad_norm.tolist()
        self.sums, self.batches, self.last_grad_norm = {}, 0, None
        return out


def format_table(summary: dict, num_blocks: int) -> str:
    """The per-node diagnostics as a small fixed-width table (pcvit-train --diagnostics)."""
    if not summary:
        return ""
    names = ["h0"] + [f"h{i}" for i in range(1, num_blocks + 2)] + ["x"]
    rows = [f"{'node':>6} {'energy':>10} {'state_rms':>10} {'grad_norm':>10}"]
    energy = [float("nan")] + list(summary.get("node_energy", []))  # h0 has no energy of its own
    rms = list(summary.get("state_rms", [])) + [float("nan")]
    grad = list(summary.get("grad_norm", [])) + [float("nan")]
    for i, name in enumerate(names):
        rows.append(f"{name:>6} {energy[i]:>10.4g} {rms[i]:>10.4g} {grad[i]:>10.4g}")
    rows.append(f"top latent moved {summary.get('top_move_rms', float('nan')):.4g} (RMS) in a batch, "
                f"from RMS {summary.get('top_rms_start', float('nan')):.4g}")
    return "\n".join(rows)
