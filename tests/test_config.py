import dataclasses

import pytest

from pcvit import Config, ConfigError
from pcvit.config import coerce, resolve_precision


def test_defaults_are_the_original_sweeps_fixed_values():
    c = Config()
    assert (c.num_blocks, c.epochs, c.batch_size, c.theta, c.weight_decay) == (12, 100, 200, 10000.0, 2e-4)
    assert (c.early_stopping_patience, c.early_stopping_min_delta, c.validation_every_n_epochs) == (5, 0.001, 25)
    assert c.residual == "double" and c.linear_probe_vode_indices == (0,) and c.hidden_lr_inference == 0.095


@pytest.mark.parametrize("changes, field", [
    (dict(hidden_size=96, num_heads=5), "num_heads"),
    (dict(peak_lr_hidden=-0.1), "peak_lr_hidden"),
    (dict(intermediate_l1_coeff=-1e-3), "intermediate_l1_coeff"),
    (dict(dataset="imagenet"), "dataset"),
    (dict(linear_probe_vode_indices=(14,)), "linear_probe_vode_indices"),
    (dict(num_blocks=2, linear_probe_vode_indices=(4,)), "linear_probe_vode_indices"),
    (dict(implementation="fastest"), "implementation"),
    (dict(residual="triple"), "residual"),
    (dict(batch_size=0), "batch_size"),
    (dict(hidden_momentum=1.0), "hidden_momentum"),
    (dict(lr_schedule_min_lr_factor=1.5), "lr_schedule_min_lr_factor"),
    (dict(hidden_size=66, num_heads=1), "hidden_size"),
    (dict(dataset="fashion-mnist", patch_size=8), "patch_size"),
    (dict(use_ssl_augmentations=1.0), "use_ssl_augmentations"),
    (dict(early_stopping_metric="val_loss"), "early_stopping_metric"),
    (dict(num_blocks=-1), "num_blocks"),
    (dict(epochs=2.5), "epochs"),
    (dict(peak_lr_weights=float("nan")), "peak_lr_weights"),
    (dict(use_noise="yes"), "use_noise"),
])
def test_impossible_values_name_their_field(changes, field):
    with pytest.raises(ConfigError) as err:
        Config(**changes)
    assert err.value.field == field
    assert field in str(err.value)


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(ConfigError, match="corrupt_ratio"):
        Config.from_dict({"hidden_size": 64, "corrupt_ratio": 0.25})


def test_from_dict_converts_strings_like_the_cli_gives():
    c = Config.from_dict({"hidden_size": "96", "num_heads": "4", "peak_lr_weights": "1e-3", "use_noise": "false",
                          "linear_probe_vode_indices": "0,1"})
    assert (c.hidden_size, c.num_heads, c.peak_lr_weights, c.use_noise) == (96, 4, 1e-3, False)
    assert c.linear_probe_vode_indices == (0, 1)


def test_coerce_refuses_lossy_conversions():
    with pytest.raises(ConfigError, match="num_blocks"):
        coerce("num_blocks", 2.5)
    with pytest.raises(ConfigError, match="use_noise"):
        coerce("use_noise", "maybe")


def test_config_is_frozen_and_round_trips():
    c = Config(hidden_size=128, num_heads=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden_size = 64  # type: ignore[misc]
    assert Config.from_dict(c.to_dict()) == c


def test_precision_is_the_originals_tf32_on_cuda_and_float32_on_the_cpu():
    assert Config().precision == "auto"
    assert resolve_precision("auto", "cuda") == "tf32"  # JAX's default on the A100/H100-class GPUs it ran on
    assert resolve_precision("auto", "cpu") == "float32"
    assert resolve_precision("tf32", "cpu") == "float32"  # TF32 exists on CUDA only
    for chosen in ("float32", "tf32", "bf16"):
        assert resolve_precision(chosen, "cuda") == chosen
    assert resolve_precision("float32", "cpu") == "float32" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        Config(precision="fp16")
