import pytest
import torch

from pcvit.inference import layer_scales, settle_states, state_grads, StepRecord

from tests.helpers import random_images, random_states, tiny_config, tiny_model


def test_layer_scaling_exponents_are_base_to_the_L_plus_1_minus_i():
    scales = layer_scales(tiny_config(num_blocks=12, inference_lr_scale_base=1.25))
    assert scales.tolist() == [1.25 ** (13 - i) for i in range(14)]
    assert scales[0] == pytest.approx(18.189894, rel=1e-6) and scales[-1] == 1.0
    assert layer_scales(tiny_config(use_inference_lr_scaling=False)).tolist() == [1.0] * 4


def one_step(config, clip_norm, lr=0.1, momentum=0.0):
    model = tiny_model(config)
    states, x = random_states(model, 3), random_images(model, 3)
    record: list[StepRecord] = []
    new = settle_states(model, x, states, 1, lambda t: lr, momentum, clip_norm, layer_scales(config), record=record)
    return model, states, x, new, record[0]


def test_one_global_clip_over_all_nodes_and_the_whole_batch():
    config = tiny_config()
    model = tiny_model(config)
    states, x = random_states(model, 3), random_images(model, 3)
    _, g_top, g_hidden = state_grads(model, x, states)
    scales = layer_scales(config)
    scaled_top = g_top * scales[0].item()
    scaled_hidden = g_hidden * scales[1:].float()[:, None, None, None]
    norm = torch.sqrt(scaled_top.square().sum() + scaled_hidden.square().sum())
    clip = 0.5 * norm.item()  # force clipping
    new = settle_states(model, x, states, 1, lambda t: 0.1, 0.0, clip, scales)
    # every node, every sample moved by lr * g * clip / norm: ONE factor for all
    torch.testing.assert_close(states.top - new.top, 0.1 * scaled_top * clip / norm, rtol=1e-4, atol=1e-6)  # differences of O(1) states: float32 rounding
    torch.testing.assert_close(states.hidden - new.hidden, 0.1 * scaled_hidden * clip / norm, rtol=1e-4, atol=1e-6)  # differences of O(1) states: float32 rounding
    unclipped = settle_states(model, x, states, 1, lambda t: 0.1, 0.0, 2 * norm.item(), scales)
    torch.testing.assert_close(states.hidden - unclipped.hidden, 0.1 * scaled_hidden, rtol=1e-4, atol=1e-6)  # differences of O(1) states: float32 rounding


def test_clip_applies_at_equality_as_optax():
    config = tiny_config()
    _, _, _, _, probe = one_step(config, clip_norm=1e9)
    _, _, _, _, at_norm = one_step(config, clip_norm=probe.grad_norm.item())
    assert bool(at_norm.clipped) and not bool(probe.clipped)


def test_momentum_buffer_is_sgd_without_dampening_and_fed_at_lr_zero():
    config = tiny_config()
    model = tiny_model(config)
    states, x = random_states(model, 2), random_images(model, 2)
    scales = layer_scales(config)
    lrs = [0.0, 0.05]  # a warm-up that starts at 0 still loads the momentum buffer
    after = settle_states(model, x, states, 2, lambda t: lrs[t], 0.4, 1e9, scales)
    _, g1_top, _ = state_grads(model, x, states)  # step 1 moved nothing, so step 2 sees the same states
    expected_top = states.top - 0.05 * (g1_top * scales[0].item() * (1 + 0.4))
    torch.testing.assert_close(after.top, expected_top, rtol=1e-4, atol=1e-6)  # differences of O(1) states: float32 rounding


@pytest.mark.parametrize("implementation", ["plain", "parallel"])
def test_inference_steps_lower_the_energy(implementation):
    config = tiny_config(implementation=implementation)
    model = tiny_model(config)
    states, x = random_states(model, 4), random_images(model, 4)
    record: list[StepRecord] = []
    final = settle_states(model, x, states, 8, lambda t: 0.05, 0.4, 1e6, layer_scales(config), record=record)
    energies = [r.energy.item() for r in record] + [model.energy(x, final.top, final.hidden).item()]
    assert energies[-1] < 0.7 * energies[0]
    assert all(b < a for a, b in zip(energies, energies[1:3]))


def test_settle_states_leaves_its_input_alone():
    config = tiny_config()
    model = tiny_model(config)
    states, x = random_states(model, 2), random_images(model, 2)
    before = states.clone()
    settle_states(model, x, states, 3, lambda t: 0.05, 0.4, 100.0, layer_scales(config))
    assert torch.equal(states.top, before.top) and torch.equal(states.hidden, before.hidden)
