import math

import pytest
import torch

from pcvit import Config, PCViT, patchify, positional_encoding, unpatchify
from pcvit.inference import state_grads

from tests.helpers import random_images, random_states, tiny_config, tiny_model


def test_weight_count_matches_the_spec_formula():
    # L(12H^2 + 9H) + 97H + 48: 602,992 for H=64, L=12 (spec section 2)
    model = PCViT(Config(num_blocks=12, hidden_size=64), channels=3, image_size=32)
    assert sum(p.numel() for p in model.parameters()) == 602_992
    small = PCViT(Config(num_blocks=2, hidden_size=16, num_heads=2), channels=3, image_size=32)
    assert sum(p.numel() for p in small.parameters()) == 8_032


def test_positional_encoding_follows_the_formula():
    pe = positional_encoding(grid=8, hidden_size=16, theta=10000.0)
    assert pe.shape == (64, 16)
    r, c = 3, 5
    p = 8 * r + c
    d = 8
    for k in range(d // 2):
        w = 10000.0 ** (-2 * k / d)
        assert pe[p, 2 * k] == pytest.approx(math.sin(r * w), abs=1e-6)
        assert pe[p, 2 * k + 1] == pytest.approx(math.cos(r * w), abs=1e-6)
        assert pe[p, d + 2 * k] == pytest.approx(math.sin(c * w), abs=1e-6)
        assert pe[p, d + 2 * k + 1] == pytest.approx(math.cos(c * w), abs=1e-6)


def test_unpatchify_puts_channel_fastest_and_patchify_inverts_it():
    out = torch.arange(2 * 64 * 48, dtype=torch.float32).reshape(2, 64, 48)
    image = unpatchify(out, channels=3, patch=4)
    i, j, a, b, ch = 2, 7, 1, 3, 2
    assert image[1, ch, 4 * i + a, 4 * j + b] == out[1, 8 * i + j, (a * 4 + b) * 3 + ch]
    assert torch.equal(patchify(image, 4), out)
    fm = torch.randn(3, 49, 16)
    assert torch.equal(patchify(unpatchify(fm, channels=1, patch=4), 4), fm)


@pytest.mark.parametrize("changes", [
    {}, dict(residual="single"), dict(use_vode_state_layernorm=True), dict(num_heads=1, num_blocks=3),
    dict(intermediate_l1_coeff=1e-3, intermediate_l2_coeff=2e-3), dict(num_blocks=0),
])
def test_plain_and_parallel_predict_the_same(changes):
    plain = tiny_model(tiny_config(implementation="plain", **changes))
    parallel = tiny_model(tiny_config(implementation="parallel", **changes))
    parallel.load_state_dict(plain.state_dict())
    states, x = random_states(plain, 3), random_images(plain, 3)
    for a, b in zip(plain.predict(states.top, states.hidden), parallel.predict(states.top, states.hidden)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.node_energies(x, states.top, states.hidden),
                               parallel.node_energies(x, states.top, states.hidden), rtol=1e-5, atol=1e-4)


def test_double_residual_adds_the_state_twice():
    double = tiny_model(tiny_config(residual="double"))
    single = tiny_model(tiny_config(residual="single"))
    single.load_state_dict(double.state_dict())
    states = random_states(double, 2)
    _, u_double, _ = double.predict(states.top, states.hidden)
    _, u_single, _ = single.predict(states.top, states.hidden)
    torch.testing.assert_close(u_double - u_single, states.hidden[:-1], rtol=1e-5, atol=1e-5)


def test_energy_is_the_sum_of_node_energies_over_nodes_and_batch():
    model = tiny_model(tiny_config(intermediate_l1_coeff=1e-3, intermediate_l2_coeff=2e-3))
    states, x = random_states(model, 3), random_images(model, 3)
    u1, ub, us = model.predict(states.top, states.hidden)
    h = states.hidden
    by_hand = (0.5 * (h - torch.cat([u1[None], ub])).square().sum() + 1e-3 * h.abs().sum()
               + 2e-3 * h.square().sum() + 0.5 * (x - us).square().sum())
    torch.testing.assert_close(model.energy(x, states.top, states.hidden), by_hand, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("changes", [{}, dict(use_vode_state_layernorm=True, residual="single")])
def test_state_gradient_matches_finite_differences(changes):
    config = tiny_config(num_blocks=1, hidden_size=8, num_heads=2, intermediate_l2_coeff=1e-2, **changes)
    model = tiny_model(config).double()
    model.pos_embed = model.pos_embed.double()
    states, x = random_states(model, 2), random_images(model, 2).double()
    states.top, states.hidden = states.top.double(), states.hidden.double()
    _, g_top, g_hidden = state_grads(model, x, states)
    generator = torch.Generator().manual_seed(5)
    eps = 1e-6
    for tensor, grad in ((states.top, g_top), (states.hidden, g_hidden)):
        for _ in range(6):
            idx = tuple(int(torch.randint(0, n, (1,), generator=generator)) for n in tensor.shape)
            old = tensor[idx].item()
            tensor[idx] = old + eps
            up = model.energy(x, states.top, states.hidden).item()
            tensor[idx] = old - eps
            down = model.energy(x, states.top, states.hidden).item()
            tensor[idx] = old
            assert grad[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-6)
