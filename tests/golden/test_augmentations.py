"""`use_ssl_augmentations` against the original's pipeline run by Kornia 0.8.1 itself (README section 10):
the whole pipeline replayed with Kornia's own draws, and each colour operation and the blur alone."""

import json
import math
import pathlib

import numpy as np
import pytest
import torch

from pcvit import augment

DATA = pathlib.Path(__file__).parent / "data" / "augmentations.npz"


@pytest.fixture(scope="module")
def golden():
    z = np.load(DATA)
    return {k: torch.as_tensor(z[k]) for k in z.files if k != "meta.json"}, json.loads(str(z["meta.json"]))


def close(ours, theirs, tol=1e-5):
    """Kornia computes in float32 too: agreement to float32 rounding of values of size ~1."""
    assert ours.shape == theirs.shape
    err = (ours - theirs).abs().max().item()
    assert err <= tol, f"max |difference| {err:.3g} > {tol:g}"


def test_the_whole_pipeline_with_kornias_draws_gives_kornias_output(golden):
    g, meta = golden
    assert meta["kornia"] == "0.8.1" and "ColorJitter(0.4,0.4,0.4,0.1)" in meta["pipeline"]
    assert 0 < int(g["flip"].sum()) < 16 and 0 < int(g["grey"].sum()) < 16 and 0 < int(g["blur"].sum()) < 16
    order = g["order"][None].expand(16, 4)  # Kornia draws one order per batch; here each image has its own
    draws = augment.Draws(g["box"], g["flip"], g["factors"], order, g["grey"], g["blur"], g["sigma"])
    close(augment.apply(g["x"], draws), g["out"])


@pytest.mark.parametrize("position", range(4))
def test_each_colour_operation_alone(golden, position):
    g, _ = golden
    x, f, hue = g["x"], g["op.factor"], g["op.hue"]
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0])
    factors = identity.repeat(16, 1)
    factors[:, position] = hue if position == 3 else f
    order = torch.tensor([position, *[i for i in range(4) if i != position]]).expand(16, 4)
    name = ["brightness", "contrast", "saturation", "hue_rotated"][position]
    # the other three at their identity still clamp to [0, 1], as Kornia's do when they run
    close(augment.colour_jitter(x, factors, order), g[f"op.{name}"].clamp(0, 1))


def test_hue_rotation_on_normalised_and_on_clamped_images(golden):
    g, _ = golden
    radians = (g["op.hue"] * 2 * math.pi)[:, None, None, None]
    close(augment.rotate_hue(g["x"], radians), g["op.hue_rotated"], 2e-5)  # values up to 2.7: float32 rounding
    close(augment.rotate_hue(g["x"].clamp(0, 1), radians), g["op.hue_rotated_clamped"])


def test_grey_and_blur(golden):
    g, _ = golden
    close(augment.grey(g["x"]), g["op.grey"])
    close(augment.gaussian_blur(g["x"], g["op.sigma"]), g["op.blur"])
