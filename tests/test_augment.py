"""`use_ssl_augmentations`: the draws (per image, seeded, on the device, with the original's distributions), grey
images, and where training uses them. The Kornia comparison itself is tests/golden/test_augmentations.py."""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch

from pcvit import Run, augment, load_data, train
from pcvit.config import ConfigError

from tests.helpers import tiny_config

N = 20000  # draws for the frequency checks: a binomial with p = 0.5 stays within 0.5 +- 0.011 (3 sigma)


def draws(n=N, size=32, seed=0):
    return augment.draw(n, size, torch.Generator().manual_seed(seed))


def within(count, n, p):
    """The observed count is within 4 standard deviations of n*p."""
    return abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p))


def test_every_image_gets_its_own_draws_with_the_originals_probabilities():
    d = draws()
    assert within(int(d.flip.sum()), N, 0.5) and within(int(d.grey.sum()), N, 0.2)
    assert within(int(d.blur.sum()), N, 0.5)
    low, high = d.factors.amin(0), d.factors.amax(0)
    assert torch.all(low >= torch.tensor([0.6, 0.6, 0.6, -0.1]))
    assert torch.all(high <= torch.tensor([1.4, 1.4, 1.4, 0.1]))
    assert torch.all(high - low > torch.tensor([0.79, 0.79, 0.79, 0.19]))  # the whole range is used
    assert 0.1 <= float(d.sigma.min()) and float(d.sigma.max()) <= 2.0
    assert len({tuple(o) for o in d.order.tolist()}) == 24  # every order of the four colour operations
    assert len({tuple(b) for b in d.box.tolist()}) > N // 10  # crops differ from image to image


@pytest.mark.parametrize("size", [32, 28])
def test_crop_boxes_follow_the_area_and_aspect_rule(size):
    d = draws(size=size)
    x0, y0, w, h = d.box.unbind(1)
    assert torch.all((x0 >= 0) & (y0 >= 0) & (x0 + w <= size) & (y0 + h <= size))
    assert torch.all((w < size) & (h < size))  # a try that fits is strictly smaller (Kornia 0.8)
    # w, h are rounded from sqrt(area * aspect), sqrt(area / aspect): area and aspect within their ranges
    # up to that rounding
    area, aspect = w * h / size ** 2, w / h
    slack = 2.0 / size
    assert float(area.min()) >= 0.4 - 2 * slack and float(area.max()) <= 1.0
    assert float(aspect.min()) >= 0.75 - slack * 2 and float(aspect.max()) <= 1.33 + slack * 2
    assert 0.55 < float(area.mean()) < 0.7  # U(0.4, 1) has mean 0.7; the tries that do not fit are the large ones


def test_the_same_seed_gives_the_same_batch_and_another_seed_another():
    x = torch.randn(8, 3, 32, 32)
    same = [augment.augment(x, torch.Generator().manual_seed(5)) for _ in range(2)]
    other = augment.augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], other)


def test_an_image_is_augmented_the_same_whatever_else_is_in_its_batch():
    """Per image, also for grey images: contrast blends towards the image's own mean, not the batch's."""
    for channels, size in ((3, 32), (1, 28)):
        x = torch.randn(6, channels, size, size)
        d = augment.draw(6, size, torch.Generator().manual_seed(1))
        whole = augment.apply(x, d)
        for i in range(6):
            alone = augment.Draws(*(getattr(d, f)[i:i + 1] for f in d.__dataclass_fields__))
            torch.testing.assert_close(augment.apply(x[i:i + 1], alone), whole[i:i + 1], rtol=0, atol=1e-6)


def test_grey_images_get_crop_flip_brightness_contrast_and_blur_but_no_colour():
    x = torch.rand(4, 1, 28, 28)
    d = augment.draw(4, 28, torch.Generator().manual_seed(2))
    out = augment.apply(x, d)
    assert out.shape == (4, 1, 28, 28)
    for column in (2, 3):  # saturation and hue change nothing on one channel
        changed = augment.Draws(d.box, d.flip, d.factors.clone(), d.order, d.grey, d.blur, d.sigma)
        changed.factors[:, column] = 0.77 if column == 2 else 0.05
        assert torch.equal(augment.apply(x, changed), out)
    d.grey[:] = True  # grey has nothing to do either
    assert torch.equal(augment.apply(x, d), out)
    d.factors[:, :2] = torch.tensor([1.3, 0.7])  # brightness and contrast do act
    assert not torch.equal(augment.apply(x, d), out)


def test_identity_draws_leave_an_in_range_image_unchanged():
    x = torch.rand(3, 3, 32, 32)
    identity = augment.Draws(torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 3), torch.zeros(3, dtype=torch.bool),
                             torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 3), torch.arange(4).repeat(3, 1),
                             torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool), torch.ones(3))
    torch.testing.assert_close(augment.apply(x, identity), x, rtol=0, atol=5e-6)  # hue 0 goes through HSV
    identity.flip[:] = True
    torch.testing.assert_close(augment.apply(x, identity), x.flip(-1), rtol=0, atol=5e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_draws_and_the_work_stay_on_the_device():
    x = torch.randn(16, 3, 32, 32, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(3)
    d = augment.draw(16, 32, generator)
    assert all(getattr(d, f).device.type == "cuda" for f in d.__dataclass_fields__)
    out = augment.apply(x, d)
    torch.testing.assert_close(out.cpu(), augment.apply(x.cpu(), augment.Draws(
        *(getattr(d, f).cpu() for f in d.__dataclass_fields__))), rtol=0, atol=1e-5)


def test_training_augments_the_training_batches_only(monkeypatch):
    """Every training batch is augmented once; validation, probe and image see the plain test images."""
    training = importlib.import_module("pcvit.train")  # the module: `pcvit.train` is also the function

    seen = []
    real = training.augment

    def counted(x, generator):
        seen.append(x.shape)
        return real(x, generator)

    monkeypatch.setattr(training, "augment", counted)
    config = tiny_config(use_ssl_augmentations=True, epochs=2, validation_every_n_epochs=1)
    result = train(config)
    assert len(seen) == 2 * (config.train_subset // config.batch_size) and result.stop_reason == "completed"
    plain = train(tiny_config(epochs=2, validation_every_n_epochs=1))
    assert [h["train_mse"] for h in result.history] != [h["train_mse"] for h in plain.history]


def test_an_augmented_run_is_reproducible_and_resumes_exactly():
    config = tiny_config(use_ssl_augmentations=True, epochs=3, linear_probe_every_n_epochs=0)
    whole = train(config)
    assert [h["train_mse"] for h in train(config).history] == [h["train_mse"] for h in whole.history]
    first = Run(config.replace(), load_data(config))
    first.run_epoch()
    resumed = Run(config, load_data(config))
    resumed.load_checkpoint(first.checkpoint())
    rest = resumed.run()
    assert [h["train_mse"] for h in rest.history] == [h["train_mse"] for h in whole.history]


def test_the_switch_is_a_boolean():
    with pytest.raises(ConfigError, match="use_ssl_augmentations: must be true or false, got 'strong'"):
        tiny_config(use_ssl_augmentations="strong")


def test_all_orders_of_the_colour_operations_are_distinct_maps():
    """Order matters (each operation clamps): the 24 orders of one set of factors give different images."""
    x = torch.randn(1, 3, 32, 32)
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.06]])
    outs = {augment.colour_jitter(x, factors, torch.tensor([order])).sum().item()
            for order in itertools.permutations(range(4))}
    assert len(outs) > 12
