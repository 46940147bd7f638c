"""Reconstruction grids a person can judge in the dashboard: enlarged, with a label over each column.

The training loop saves rows of three small panels (original | input | reconstruction, 2-pixel gaps), e.g.
104x36 pixels for one 32x32 image: a thumbnail too small to see anything in. This redraws such a grid with
every panel scaled up (nearest neighbour: pixels stay pixels) under labelled columns, and leaves out the
input column when it equals the original (nothing masked).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GAP = 2  # pixels between panels in the saved grid (pcvit.images)
COLUMNS = ("original", "input", "reconstruction")
TARGET_PANEL = 192  # pixels: a 32x32 image becomes 192x192
LABEL_HEIGHT = 28


def read_panels(path: Path) -> list[list[np.ndarray]]:
    """Rows of three panels from a saved grid (square panels, GAP pixels around each)."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    height, width, _ = grid.shape
    size = (width - 4 * GAP) // 3
    rows = (height - GAP) // (size + GAP)
    panels = []
    for r in range(rows):
        top = GAP + r * (size + GAP)
        panels.append([grid[top:top + size, GAP + c * (size + GAP):GAP + c * (size + GAP) + size] for c in range(3)])
    return panels


def labelled_grid(source: Path, target: Path) -> Path:
    rows = read_panels(source)
    same_input = all(np.array_equal(row[0], row[1]) for row in rows)
    columns = [0, 2] if same_input else [0, 1, 2]
    size = rows[0][0].shape[0]
    scale = max(1, TARGET_PANEL // size)
    panel = size * scale
    pad = 8
    width = len(columns) * (panel + pad) + pad
    height = LABEL_HEIGHT + len(rows) * (panel + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=18)
    for i, c in enumerate(columns):
        label = "original = input" if same_input and c == 0 else COLUMNS[c]
        draw.text((pad + i * (panel + pad), 4), label, fill="black", font=font)
        for r, row in enumerate(rows):
            image = Image.fromarray(row[c]).resize((panel, panel), Image.NEAREST)
            canvas.paste(image, (pad + i * (panel + pad), LABEL_HEIGHT + r * (panel + pad)))
    canvas.save(target)
    return target
