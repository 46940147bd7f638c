"""The feature levers, each a named config field, off by default: error-based inference (ePC), per-node
precision weighting, inference steps that grow with depth, and one top latent per image."""

from __future__ import annotations

import pytest
import torch

from pcvit import Config, ConfigError, PCViT, Run, load_data
from pcvit.energy_vjp import energy_and_state_grads
from pcvit.inference import (errors_of, init_states, layer_scales, node_mse, settle_states, state_grads,
                             update_precision)
from tests.helpers import tiny_config


def setting(num_blocks: int = 2, **changes):
    config = tiny_config(num_blocks=num_blocks, residual="single", residual_branch_scale="1/L",
                         use_inference_lr_scaling=False, **{"implementation": "plain", **changes})
    data = load_data(config)
    generator = torch.Generator().manual_seed(0)
    model = PCViT(config, 3, 32, generator=generator)
    return config, model, data.normalise(data.train_images[:4]), init_states(model, 4, True, generator)


def settled_energy(model, config, x, states, steps):
    model.config = config
    out = settle_states(model, x, states, steps, lambda t: 0.05, 0.5, 1e9, layer_scales(config))
    return float(model.energy(x, out.top, out.hidden).detach())


def test_the_levers_are_off_by_default():
    c = Config()
    assert (c.inference_variables, c.node_precision, c.inference_steps_per_block) == ("states", "none", 0)
    assert (c.top_latent, c.top_latent_prior) == ("patches", 0.0)


def test_errors_rebuild_the_states_they_came_from():
    _, model, _, states = setting(num_blocks=3)
    hidden, _ = model.chain(states.top, errors_of(model, states))
    assert torch.allclose(hidden, states.hidden, atol=1e-6)


@pytest.mark.slow
def test_error_based_inference_settles_to_the_same_energy_as_state_based_inference():
    """Same energy, two parametrisations: the same minimum (here within 1e-4 relative after 3000 steps)."""
    config, model, x, states = setting()
    by_states = settled_energy(model, config, x, states, 3000)
    by_errors = settled_energy(model, config.replace(inference_variables="errors"), x, states, 3000)
    start = float(model.energy(x, states.top, states.hidden).detach())
    assert by_states < 0.9 * start  # both really moved
    assert by_errors == pytest.approx(by_states, rel=1e-4)


def test_error_based_inference_gets_further_in_a_few_steps_at_depth():
    config, model, x, states = setting(num_blocks=6)
    assert settled_energy(model, config.replace(inference_variables="errors"), x, states, 5) < \
        0.9 * settled_energy(model, config, x, states, 5)


def test_precision_weights_balance_the_nodes_and_keep_the_total():
    config, model, x, start = setting(num_blocks=3, node_precision="dynamic")
    states = settle_states(model, x, start, 10, lambda t: 0.05, 0.5, 1e9, layer_scales(config))  # errors everywhere
    fixed = float(model.energy(x, states.top, states.hidden).detach())
    per_node = model.node_energies(x, states.top, states.hidden).sum(dim=0).detach()
    update_precision(model, x, states)
    assert float(model.energy(x, states.top, states.hidden).detach()) == pytest.approx(fixed, rel=1e-5)
    weighted_mse = model.node_weights * node_mse(model, x, states).float()
    assert torch.allclose(weighted_mse, weighted_mse.mean().expand(5), rtol=1e-4)  # every node counts the same
    assert per_node[-1] > 100 * per_node[0]  # while unweighted, the image's error dwarfs the top node's
    first = model.node_mse_estimate.clone()
    update_precision(model, x, start)  # a second batch moves the estimate a tenth of the way
    assert torch.allclose(model.node_mse_estimate, 0.9 * first + 0.1 * node_mse(model, x, start))


def test_the_vjp_gradient_follows_the_node_weights():
    config, model, x, states = setting(num_blocks=3, intermediate_l1_coeff=0.01, intermediate_l2_coeff=0.01)
    model.node_weights = torch.tensor([0.5, 2.0, 3.0, 0.25, 1.5])
    energy, g_top, g_hidden = state_grads(model, x, states)  # autograd (plain)
    vjp_energy, vjp_top, vjp_hidden = energy_and_state_grads(model, x, states.top, states.hidden)
    assert float(vjp_energy) == pytest.approx(float(energy), rel=1e-5)
    assert torch.allclose(vjp_top, g_top, atol=1e-4) and torch.allclose(vjp_hidden, g_hidden, atol=1e-4)


def test_dynamic_precision_is_estimated_by_training_and_used_by_it():
    config = tiny_config(num_blocks=2, node_precision="dynamic", epochs=1)
    run = Run(config, load_data(config))
    assert run.model.node_weights is None
    run.run()
    assert run.model.node_weights is not None and run.model.node_weights.shape == (4,)
    assert torch.isfinite(torch.tensor(run.result.final_train_mse))


def test_inference_steps_grow_with_depth_when_asked(monkeypatch):
    config = tiny_config(num_blocks=3, inference_steps_per_block=4, epochs=1, linear_probe_every_n_epochs=0)
    assert (config.train_steps, config.probe_steps) == (12, 12)
    assert tiny_config(num_blocks=3, inference_steps_per_block=4, linear_probe_inference_steps=5).probe_steps == 5
    run = Run(config, load_data(config))
    steps = []
    settle = run.settle
    monkeypatch.setattr(run, "settle", lambda x, states, T, **kw: steps.append(T) or settle(x, states, T, **kw))
    run.train_on_batch(run.data.normalise(run.data.train_images[:config.batch_size]))
    assert steps == [12]


@pytest.mark.parametrize("field, value, words", [
    ("inference_variables", "gradients", "must be one of states, errors"),
    ("node_precision", "learned", "must be one of none, dynamic"),
    ("inference_steps_per_block", -1, "must be >= 0"),
    ("top_latent", "global", "must be one of patches, image, image_positional"),
    ("top_latent_prior", -0.1, "must be >= 0"),
])
def test_bad_lever_values_are_refused_naming_the_field(field, value, words):
    with pytest.raises(ConfigError, match=field) as info:
        tiny_config(**{field: value})
    assert words in str(info.value)


def test_errors_with_per_state_gradient_norms_are_refused():
    with pytest.raises(ConfigError, match="inference_variables.*use_vode_grad_norm"):
        tiny_config(inference_variables="errors", use_vode_grad_norm=True)


@pytest.mark.parametrize("implementation", ["plain", "parallel", "vjp"])
def test_an_image_latent_is_a_patch_latent_repeated_over_the_patches(implementation):
    """One (B, 1, P) latent per image predicts exactly what the same vector in every patch predicts; its
    gradient is the sum of the patches' gradients, in every implementation (the VJP by hand)."""
    config, model, x, _ = setting(num_blocks=2, top_latent="image", implementation=implementation)
    states = init_states(model, 4, True, torch.Generator().manual_seed(3))
    assert states.top.shape == (4, 1, model.patch_dim) and states.hidden.shape[2] == model.num_patches
    settled = settle_states(model, x, states, 5, lambda t: 0.05, 0.5, 1e9, layer_scales(config))  # not at rest
    repeated = settled.top.expand(-1, model.num_patches, -1).contiguous()
    energy, g_top, g_hidden = state_grads(model, x, settled)
    patch_energy, patch_top, patch_hidden = state_grads(model, x, type(settled)(repeated, settled.hidden))
    assert float(energy) == pytest.approx(float(patch_energy), rel=1e-6)
    assert g_top.shape == (4, 1, model.patch_dim)
    assert torch.allclose(g_top, patch_top.sum(dim=1, keepdim=True), atol=1e-4)
    assert torch.allclose(g_hidden, patch_hidden, atol=1e-5)
    assert g_top.abs().max() > 1e-3  # a real gradient, not zeros on both sides


def test_an_image_latent_trains_and_is_what_the_probe_reads():
    config = tiny_config(num_blocks=2, top_latent="image", epochs=2, linear_probe_every_n_epochs=1)
    run = Run(config, load_data(config))
    run.run()
    assert run.states.top.shape[1] == 1 and not run.result.diverged
    assert len(run.result.probe_accuracies) == 2 and run.result.best_probe_accuracy > 0


def test_an_image_latent_steps_by_the_mean_of_its_patches_gradients():
    config = tiny_config(num_blocks=2, top_latent="image")
    model = PCViT(config, 3, 32)
    patches, image = layer_scales(config.replace(top_latent="patches")), layer_scales(config, model.top_shared_by)
    assert model.top_shared_by == model.num_patches == 64
    assert image[0] == pytest.approx(patches[0] / 64) and torch.equal(image[1:], patches[1:])


@pytest.mark.parametrize("top_latent", ["patches", "image"])
def test_a_prior_on_the_top_latent_adds_its_energy_and_pulls_it_to_zero_in_every_implementation(top_latent):
    config, model, x, _ = setting(num_blocks=2, top_latent=top_latent)
    states = init_states(model, 4, True, torch.Generator().manual_seed(3))
    states = settle_states(model, x, states, 5, lambda t: 0.05, 0.5, 1e9, layer_scales(config))
    energy, g_top, g_hidden = state_grads(model, x, states)
    for implementation in ("plain", "parallel", "vjp"):
        model.config = config.replace(top_latent_prior=0.5, implementation=implementation)
        with_prior, g_top_prior, g_hidden_prior = state_grads(model, x, states)
        assert float(with_prior) == pytest.approx(float(energy) + 0.25 * float(states.top.square().sum()), rel=1e-5)
        assert torch.allclose(g_top_prior, g_top + 0.5 * states.top, atol=1e-4), implementation
        assert torch.allclose(g_hidden_prior, g_hidden, atol=1e-5)


def test_a_positional_image_latent_has_one_projection_per_patch_and_the_same_gradient_in_every_implementation():
    config, model, x, _ = setting(num_blocks=2, top_latent="image_positional")
    assert model.patch_proj_w.shape == (model.num_patches, model.patch_dim, config.hidden_size)
    states = init_states(model, 4, True, torch.Generator().manual_seed(3))
    assert states.top.shape == (4, 1, model.patch_dim)
    u1 = model.project_top(states.top)
    for n in (0, 5, model.num_patches - 1):  # patch n: h0 Wp[n] + bp + PE_n
        expected = states.top[:, 0] @ model.patch_proj_w[n] + model.patch_proj_b + model.pos_embed[n]
        assert torch.allclose(u1[:, n], expected, atol=1e-5)
    settled = settle_states(model, x, states, 5, lambda t: 0.05, 0.5, 1e9, layer_scales(config))
    reference = state_grads(model, x, settled)  # autograd, block after block
    for implementation in ("parallel", "vjp"):
        model.config = config.replace(implementation=implementation)
        energy, g_top, g_hidden = state_grads(model, x, settled)
        assert float(energy) == pytest.approx(float(reference[0]), rel=1e-5), implementation
        assert torch.allclose(g_top, reference[1], atol=1e-4) and torch.allclose(g_hidden, reference[2], atol=1e-4)
    assert reference[1].abs().max() > 1e-3


def test_a_positional_image_latent_trains():
    config = tiny_config(num_blocks=2, top_latent="image_positional", epochs=2, linear_probe_every_n_epochs=1)
    run = Run(config, load_data(config))
    run.run()
    assert run.states.top.shape[1] == 1 and not run.result.diverged and len(run.result.probe_accuracies) == 2
