"""The probe's controls (pcvit.controls): the same probe, the same images, features from elsewhere."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from pcvit import Run, load_data
from pcvit.cli import main
from pcvit.controls import (affine_r2, feature_linearity, pca_features, principal_axes, probe_controls,
                            probe_each_node, probed_width, untrained_network)
from pcvit.data import FASHION_MNIST_DIR
from pcvit.probe import fit_linear_probe, probe_accuracy
from tests.helpers import tiny_config, tiny_config_file


def test_the_untrained_network_is_the_one_a_run_starts_from_and_training_does_not_touch_it():
    config = tiny_config(linear_probe_vode_indices=(0, 1), epochs=1)
    data = load_data(config)
    run = Run(config, data)
    model, states = untrained_network(data, config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), run.model.state_dict().values()))
    assert torch.equal(states.top, run.states.top) and torch.equal(states.hidden, run.states.hidden)
    before = probe_accuracy(run.model, run.states, data, config).accuracy
    run.run()  # training moves the run's weights, not the control's
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), run.model.state_dict().values()))
    assert probe_controls(data, config, ("untrained",)).fits["untrained"].accuracy == before
    assert probed_width(model, config) == model.patch_dim + config.hidden_size


def test_pca_keeps_the_directions_of_largest_variance_of_the_training_pixels():
    config = tiny_config()
    data = load_data(config)
    train, test = pca_features(data, data.train_images, data.test_images, k=5)
    assert train.shape == (len(data.train_images), 5) and test.shape == (len(data.test_images), 5)
    pixels = torch.cat([data.normalise(data.train_images).flatten(1)]).double()
    singular = torch.linalg.svdvals(pixels - pixels.mean(dim=0))
    top = (singular[:5] ** 2 / (len(pixels) - 1)).flip(0)  # ascending, as the axes are ordered
    assert torch.allclose(train.double().var(dim=0), top, rtol=1e-3)
    assert torch.allclose(train.mean(dim=0), torch.zeros(5), atol=1e-4)  # centred with the training mean


@pytest.mark.parametrize("n, d", [(60, 20), (20, 60)])
def test_both_ways_to_the_principal_axes_agree_with_the_singular_values(n, d):
    scale = torch.arange(1, d + 1)  # distinct variances: the top axes are well defined
    centred = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scale
    centred -= centred.mean(dim=0)
    axes = principal_axes(centred, 5)
    assert torch.allclose(axes.T @ axes, torch.eye(5, dtype=torch.float64), atol=1e-8)  # orthonormal
    assert torch.allclose((centred @ axes).square().sum(dim=0), torch.linalg.svdvals(centred)[:5].square().flip(0))


def test_unknown_controls_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown controls \\['patches'\\]"):
        probe_controls(load_data(tiny_config()), tiny_config(), ("patches",))


def test_raw_patches_use_the_configured_probe_solver():
    config = tiny_config(linear_probe_solver="lbfgs")
    fit = probe_controls(load_data(config), config, ("raw_patches",)).fits["raw_patches"]
    assert fit.converged and fit.steps > 10
    short = probe_controls(load_data(tiny_config()), tiny_config(), ("raw_patches",)).fits["raw_patches"]
    assert not short.converged and short.steps == 4  # one epoch over 64 images in minibatches of 16


def test_baseline_prints_every_control_and_the_summary_holds_them(tmp_path, capsys):
    summary = tmp_path / "s.json"
    assert main([*tiny_config_file(tmp_path, epochs=1), "--no-progress", "--baseline", "--out", str(tmp_path / "o"),
                 "--summary-json", str(summary)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("controls"))
    assert "raw patches" in line and "untrained network" in line and "PCA-48 of the pixels" in line
    assert "all the pixels" in line
    data = json.loads(summary.read_text())
    keys = {"raw_patch_baseline", "untrained_baseline", "pca_baseline", "pixel_baseline", "controls_time_s"}
    assert keys <= set(data)
    assert data["pca_components"] == 48 and 0 <= data["pca_baseline"] <= 1  # P = 4 x 4 x 3 on 32-pixel images


def test_without_baseline_there_are_no_controls(tmp_path):
    summary = tmp_path / "s.json"
    assert main([*tiny_config_file(tmp_path, epochs=1), "--no-progress", "--out", str(tmp_path / "o"),
                 "--summary-json", str(summary)]) == 0
    assert "untrained_baseline" not in json.loads(summary.read_text())


def test_each_node_is_probed_alone_beside_its_untrained_self_and_a_pca_of_its_width(tmp_path):
    summary = tmp_path / "s.json"
    assert main(["--set", "dataset=synthetic", "--set", "num_blocks=2", "--set", "hidden_size=8",
                     "--set", "epochs=1", "--set", "train_subset=100", "--set", "test_subset=50",
                     "--set", "batch_size=50", "--set", "inference_steps=2", "--set", "linear_probe_every_n_epochs=0",
                     "--set", "validation_every_n_epochs=0", "--set", "reconstruction_every_n_epochs=0",
                     "--probe-each-node", "--no-progress", "--out", str(tmp_path / "run"),
                     "--summary-json", str(summary)]) == 0
    rows = json.loads(summary.read_text())["node_probes"]
    assert [r["node"] for r in rows] == [0, 1, 2, 3] and [r["width"] for r in rows] == [48, 8, 8, 8]
    assert all(0 <= r[k] <= 1 for r in rows for k in ("trained", "untrained", "pca"))
    assert rows[1]["pca"] == rows[2]["pca"]  # one PCA per width
    config = tiny_config(num_blocks=2, hidden_size=8)
    data = load_data(config)
    model, states = untrained_network(data, config)
    (top, *_) = probe_each_node(model, states, data, config)  # an untrained model is its own control
    assert top.trained == top.untrained


def test_affine_r2_is_one_for_an_affine_map_and_well_below_for_a_nonlinear_one():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(700, 20, generator=generator)
    weights = torch.randn(20, 6, generator=generator)
    train, test = inputs[:500], inputs[500:]
    assert affine_r2(train, test, train @ weights + 3, test @ weights + 3) > 0.9999
    squared = lambda x: (x @ weights).square()  # noqa: E731
    assert affine_r2(train, test, squared(train), squared(test)) < 0.1  # even in x: no linear part at all
    assert affine_r2(train[:21], test, train[:21] @ weights, test @ weights) is None  # 21 rows, 21 unknowns


def test_the_ridge_keeps_a_few_rows_per_input_from_calling_an_affine_map_with_noise_nonlinear():
    # targets: an affine map of 50 inputs plus noise, 0.8 of their variance affine. From 60 training rows least
    # squares alone fits the noise (test R^2 -0.14); the ridge chosen by cross-validation keeps 0.56, and 0.78
    # from 300 rows
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(1300, 50, generator=generator)
    noise = 0.5 * torch.randn(1300, 4, generator=generator)
    targets = inputs @ torch.randn(50, 4, generator=generator) / 50 ** 0.5 + noise
    test = slice(300, None)
    assert affine_r2(inputs[:60], inputs[test], targets[:60], targets[test]) > 0.45
    assert 0.75 < affine_r2(inputs[:300], inputs[test], targets[:300], targets[test]) < 0.82


FASHION = dict(dataset="fashion-mnist", train_subset=900, test_subset=200, validation_subset=100, batch_size=100,
               num_blocks=1, hidden_size=8, num_heads=1, use_noise=False, use_status_init_in_training=True,
               use_status_init_in_unmasking=True, residual="single", linear_probe_solver="lbfgs")


@pytest.mark.skipif(not pathlib.Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_from_a_zero_start_the_top_latent_is_a_linear_map_of_the_image_until_inference_settles():
    # one step per node from the image up (L + 2): the image's error is pulled back once through Jacobians taken
    # at image-independent starting states, so the top latent is exactly affine in the pixels; settled, it is not
    data = load_data(tiny_config(**FASHION))
    first = tiny_config(**FASHION, inference_steps=3)
    model, states = untrained_network(data, first)
    assert feature_linearity(model, states, data, first) > 0.9999  # 0.9999999
    settled = tiny_config(**FASHION, inference_steps=30, hidden_lr_inference=0.5)  # R^2 0.964
    assert feature_linearity(model, states, data, settled) < 0.99


@pytest.mark.skipif(not pathlib.Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_the_trained_linearity_reads_the_last_probes_features_which_are_the_final_models():
    config = tiny_config(**FASHION, epochs=2, inference_steps=6, linear_probe_every_n_epochs=1)
    data = load_data(config)
    run = Run(config, data)
    run.run()
    train, test = run.last_probe_features
    assert train.shape == (900, 16) and test.shape == (200, 16)
    assert feature_linearity(run.model, run.states, data, config, run.last_probe_features) == \
        pytest.approx(feature_linearity(run.model, run.states, data, config), abs=1e-9)


@pytest.mark.skipif(not pathlib.Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_baseline_says_how_linear_the_probed_features_are(tmp_path, capsys):
    summary = tmp_path / "s.json"
    assert main([*tiny_config_file(tmp_path, **FASHION, epochs=1, inference_steps=3), "--no-progress", "--baseline",
                 "--out", str(tmp_path / "o"), "--summary-json", str(summary)]) == 0
    out = capsys.readouterr().out
    data = json.loads(summary.read_text())
    assert 0.99 < data["untrained_linearity_r2"] <= 1 and 0.99 < data["feature_linearity_r2"] <= 1
    assert f"R^2 {data['feature_linearity_r2']:.4f} (untrained {data['untrained_linearity_r2']:.4f}" in out


def test_with_fewer_training_images_than_pixels_linearity_is_not_claimed(tmp_path, capsys):
    summary = tmp_path / "s.json"
    assert main([*tiny_config_file(tmp_path, epochs=1), "--no-progress", "--baseline", "--out", str(tmp_path / "o"),
                 "--summary-json", str(summary)]) == 0
    assert "linearity of the features not measured: 64 training images, not more than the 3072 pixels" in \
        capsys.readouterr().out
    assert "feature_linearity_r2" not in json.loads(summary.read_text())


def test_the_pixels_control_is_a_linear_head_on_every_normalised_pixel():
    config = tiny_config(linear_probe_solver="lbfgs")
    data = load_data(config)
    fit = probe_controls(data, config, ("pixels",)).fits["pixels"]
    direct = fit_linear_probe(data.normalise(data.train_images).flatten(1), data.train_labels,
                              data.normalise(data.test_images[: config.test_subset]).flatten(1),
                              data.test_labels[: config.test_subset], config)
    assert fit.accuracy == direct.accuracy and fit.converged
