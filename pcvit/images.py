"""Reconstruction grids as PNG, drawn once from the tensors: one row per image, columns original | input seen by
the model | reconstruction under a label each, every panel enlarged (nearest neighbour: pixels stay pixels) so
that a person can judge it in the dashboard. The input column is left out when it equals the original (nothing
masked).

Values are shown in normalised space clipped to [0, 1], as the original saves them (no de-normalisation).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

COLUMNS = ("original", "input", "reconstruction")
TARGET_PANEL = 320  # pixels: a 32x32 image becomes 320x320, a 28x28 one 308x308 (a 2-column grid: over 600 px)
LABEL_HEIGHT = 28  # pixels above the panels for the column labels
PAD = 8  # pixels around each panel


def to_pixels(images: Tensor) -> Tensor:
    """(N, C, S, S) in normalised space -> (N, S, S, 3) uint8 on the CPU, clipped to [0, 1] first."""
    images = images.detach().float().clamp(0, 1).cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def save_reconstruction_grid(original: Tensor, masked: Tensor, reconstruction: Tensor, path: Path) -> Path:
    """Draw the labelled, enlarged grid of (N, C, S, S) originals, inputs and reconstructions to `path`."""
    from PIL import Image, ImageDraw, ImageFont  # PIL only needed here (it comes with torchvision)

    same_input = torch.equal(original, masked)
    columns = [(label, to_pixels(images)) for label, images in zip(COLUMNS, (original, masked, reconstruction))
               if not (same_input and label == "input")]
    rows, size = original.shape[0], original.shape[-1]
    panel = size * max(1, TARGET_PANEL // size)
    canvas = Image.new("RGB", (len(columns) * (panel + PAD) + PAD, LABEL_HEIGHT + rows * (panel + PAD) + PAD),
                       "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=18)
    for i, (label, pixels) in enumerate(columns):
        left = PAD + i * (panel + PAD)
        draw.text((left, 4), "original = input" if same_input and label == "original" else label, fill="black",
                  font=font)
        for r in range(rows):
            image = Image.fromarray(pixels[r].numpy()).resize((panel, panel), Image.NEAREST)
            canvas.paste(image, (left, LABEL_HEIGHT + r * (panel + PAD)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
