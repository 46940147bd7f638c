"""The pictures a trial uploads for the dashboard: its curves, and a reconstruction grid a person can read."""

from __future__ import annotations

import torch
from PIL import Image

from pcvit.images import LABEL_HEIGHT, PAD, TARGET_PANEL, save_reconstruction_grid, to_pixels
from studies.results.curves import save_curves


def test_grid_is_enlarged_and_the_input_column_appears_only_when_it_differs(tmp_path):
    original, masked, reconstruction = (torch.rand(2, 3, 32, 32) for _ in range(3))
    same = save_reconstruction_grid(original, original, reconstruction, tmp_path / "same.png")
    differs = save_reconstruction_grid(original, masked, reconstruction, tmp_path / "differs.png")
    with Image.open(same) as two, Image.open(differs) as three:
        panel = TARGET_PANEL  # 32 divides it: a source pixel is a 10x10 block
        assert two.size[0] >= 600 and three.size[0] >= 3 * panel > two.size[0]  # readable: over 600 px wide
        assert two.size[1] >= 2 * panel  # two rows
        for row, column, images in ((0, 0, original), (1, 1, reconstruction)):  # pixels come from the tensors
            for y, x in ((0, 0), (5, 17), (31, 31)):
                shown = two.convert("RGB").getpixel((PAD + column * (panel + PAD) + 10 * x + 5,
                                                     LABEL_HEIGHT + row * (panel + PAD) + 10 * y + 5))
                assert shown == tuple(to_pixels(images)[row, y, x].tolist())


def test_a_gray_image_is_shown_in_gray(tmp_path):
    gray = torch.rand(1, 1, 28, 28)
    with Image.open(save_reconstruction_grid(gray, gray, gray, tmp_path / "g.png")) as image:
        r, g, b = image.convert("RGB").getpixel((PAD + 3, LABEL_HEIGHT + 3))
        assert r == g == b == round(float(gray[0, 0, 0, 0]) * 255)


def test_curves_are_drawn_even_for_a_run_that_diverged(tmp_path):
    history = [{"epoch": 1, "train_mse": 0.2, "probe_accuracy": 0.1, "val_mse": 0.21},
               {"epoch": 2, "train_mse": 0.1, "probe_accuracy": 0.2},
               {"epoch": 3, "train_mse": float("nan")}]
    path = save_curves(history, tmp_path / "curves.png", "trial 0: diverged")
    with Image.open(path) as image:
        assert image.size == (640, 320)
