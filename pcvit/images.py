"""Reconstruction grids as PNG: original | input seen by the model | reconstruction, clipped to [0, 1].

Values are shown in normalised space clipped to [0, 1], as the original saves them (no de-normalisation).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def save_reconstruction_grid(original: Tensor, masked: Tensor, reconstruction: Tensor, path: Path) -> Path:
    """Save one row per image: three (C, S, S) panels side by side, with a 2-pixel white gap."""
    from torchvision.utils import save_image  # torchvision only needed here

    panels = []
    for row in zip(original, masked, reconstruction):
        panels.extend(p.detach().float().clamp(0, 1).cpu() for p in row)
    grid = torch.stack(panels)
    if grid.shape[1] == 1:
        grid = grid.expand(-1, 3, -1, -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, str(path), nrow=3, padding=2, pad_value=1.0)
    return path
