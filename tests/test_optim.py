import math

import pytest

from pcvit.optim import hidden_lr, lr_at, weight_lr

from tests.helpers import tiny_config


def test_schedule_warmup_then_cosine_to_the_floor():
    peak, W, total, f = 2e-3, 50, 1000, 0.3
    assert lr_at(0, peak, W, total, f) == 0.0
    assert lr_at(25, peak, W, total, f) == pytest.approx(peak / 2)
    assert lr_at(50, peak, W, total, f) == pytest.approx(peak)
    mid = 50 + (1000 - 50) / 2
    assert lr_at(mid, peak, W, total, f) == pytest.approx(f * peak + (1 - f) * peak * 0.5)
    assert lr_at(1000, peak, W, total, f) == pytest.approx(f * peak)
    assert lr_at(5000, peak, W, total, f) == pytest.approx(f * peak)  # clipped past the horizon


def test_no_warmup_starts_at_peak():
    assert lr_at(0, 0.1, 0, 25000, 0.5) == 0.1
    assert lr_at(1, 0.1, 0, 25000, 0.5) == pytest.approx(0.1 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi / 25000))))


def test_hidden_lr_restarts_every_batch_at_the_inference_step_index():
    # the original's quirk: warm-up 200 >= T=20 means lr 0 at t=0 and at most peak*19/200 in a batch
    c = tiny_config(peak_lr_hidden=0.1, warmup_steps=200, inference_steps=20)
    lrs = [hidden_lr(c, t, 25000) for t in range(20)]
    assert lrs[0] == 0.0
    assert max(lrs) == pytest.approx(0.1 * 19 / 200)
    flat = tiny_config(peak_lr_hidden=0.1, warmup_steps=0)
    assert max(abs(hidden_lr(flat, t, 25000) - 0.1) for t in range(40)) < 0.1 * 2e-5
    assert hidden_lr(tiny_config(use_lr_schedule_h=False, warmup_steps=200), 0, 100) == tiny_config().peak_lr_hidden


def test_weight_lr_uses_the_global_step():
    c = tiny_config(peak_lr_weights=1e-3, warmup_steps=5, lr_schedule_min_lr_factor=0.5)
    assert weight_lr(c, 0, 100) == 0.0
    assert weight_lr(c, 1, 100) == pytest.approx(2e-4)
    assert weight_lr(tiny_config(use_lr_schedule_w=False, warmup_steps=5), 0, 100) == 1e-3
