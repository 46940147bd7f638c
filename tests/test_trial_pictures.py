"""The pictures a trial uploads for the dashboard: its curves, and a reconstruction grid a person can read."""

from __future__ import annotations

import torch
from PIL import Image

from pcvit.images import save_reconstruction_grid
from studies.results.curves import save_curves
from studies.results.reconstruction_view import labelled_grid, read_panels


def test_grid_is_enlarged_and_the_input_column_appears_only_when_it_differs(tmp_path):
    original, masked, reconstruction = (torch.rand(2, 3, 32, 32) for _ in range(3))
    same = save_reconstruction_grid(original, original, reconstruction, tmp_path / "same.png")
    differs = save_reconstruction_grid(original, masked, reconstruction, tmp_path / "differs.png")
    assert len(read_panels(same)) == 2  # two rows of three panels
    with Image.open(labelled_grid(same, tmp_path / "same_big.png")) as two, \
            Image.open(labelled_grid(differs, tmp_path / "differs_big.png")) as three:
        assert two.size[0] >= 2 * 192 and three.size[0] >= 3 * 192 > two.size[0]
        assert two.size[1] >= 2 * 192
        # the enlarged panel holds the same pixels as the saved one
        small = Image.open(same).convert("RGB").getpixel((2, 2))
        assert two.convert("RGB").getpixel((8 + 3, 28 + 3)) == small


def test_curves_are_drawn_even_for_a_run_that_diverged(tmp_path):
    history = [{"epoch": 1, "train_mse": 0.2, "probe_accuracy": 0.1, "val_mse": 0.21},
               {"epoch": 2, "train_mse": 0.1, "probe_accuracy": 0.2},
               {"epoch": 3, "train_mse": float("nan")}]
    path = save_curves(history, tmp_path / "curves.png", "trial 0: diverged")
    with Image.open(path) as image:
        assert image.size == (900, 360)
