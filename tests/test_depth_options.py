"""The options that keep deep predictive coding trainable: each off by default, each wired where it claims to be.

Fresh states (the original's use_status_init_in_*), depth-scaled residual branches, per-node energy weighting,
and the per-node diagnostics. The hand-written VJP is checked against autograd for every option.
"""

import itertools
import math

import pytest
import torch

from pcvit import ConfigError, PCViT
from pcvit.data import load_data
from pcvit.inference import States, init_states, state_grads
from pcvit.probe import extract_features
from pcvit.train import Run

from tests.helpers import REPO, random_images, random_states, tiny_config, tiny_model

OPTIONS = list(itertools.product(["1", "1/sqrt(L)", "1/L"], ["sum", "mean"], ["double", "single"]))


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("scale, weighting, residual", OPTIONS)
def test_every_implementation_computes_the_same_energy_and_state_gradients(scale, weighting, residual):
    results = {}
    for implementation in ("plain", "parallel", "vjp"):
        config = tiny_config(num_blocks=3, residual_branch_scale=scale, energy_weighting=weighting, residual=residual,
                             intermediate_l1_coeff=1e-2, intermediate_l2_coeff=1e-2, implementation=implementation)
        model = tiny_model(config)
        results[implementation] = state_grads(model, random_images(model, 3), random_states(model, 3))
    for implementation in ("parallel", "vjp"):
        for name, actual, expected in zip(("energy", "dE/dh0", "dE/dh"), results[implementation], results["plain"]):
            assert relative_error(actual, expected) < 1e-5, f"{implementation} {name}"


@pytest.mark.parametrize("implementation", ["plain", "parallel"])
def test_branch_scale_multiplies_both_the_attention_and_the_mlp_branch(implementation):
    L = 4
    a = {"1/sqrt(L)": 1 / math.sqrt(L), "1/L": 1 / L}
    z = torch.randn(1, 2, 64, 16, generator=torch.Generator().manual_seed(3)).expand(L, 2, 64, 16).contiguous()
    for zeroed in ("mlp", "attention"):  # with one branch switched off, u - z is the other branch times a
        branches = {}
        for scale in ("1", *a):
            model = tiny_model(tiny_config(num_blocks=L, residual="single", residual_branch_scale=scale,
                                           implementation=implementation))
            with torch.no_grad():
                for p in ((model.fc2_w, model.fc2_b) if zeroed == "mlp" else (model.attn_o,)):
                    p.zero_()
                u = torch.stack([model.block_plain(l, z[l]) for l in range(L)]) if implementation == "plain" \
                    else model.blocks_parallel(z)
            branches[scale] = u - z
        assert branches["1"].abs().max() > 0.1
        for scale, factor in a.items():
            assert relative_error(branches[scale], factor * branches["1"]) < 1e-5, (zeroed, scale)


def test_branch_scale_is_one_of_the_choices_and_resolves_by_depth():
    assert tiny_config(num_blocks=4, residual_branch_scale="1/sqrt(L)").branch_scale == 0.5
    assert tiny_config(num_blocks=4, residual_branch_scale="1/L").branch_scale == 0.25
    for field, value in (("residual_branch_scale", "0.5"), ("energy_weighting", "max"),
                         ("linear_probe_solver", "sgd"), ("linear_probe_converged_change", 0)):
        with pytest.raises(ConfigError) as info:
            tiny_config(**{field: value})
        assert info.value.field == field and str(value) in str(info.value)


def test_mean_weighting_puts_every_node_on_the_scale_of_the_image():
    config = tiny_config(num_blocks=2, hidden_size=32, energy_weighting="mean", dataset="fashion-mnist")
    model = PCViT(config, 1, 28, torch.Generator().manual_seed(0))  # 49 patches x 32 per node, 784 pixels
    assert model.hidden_node_weight == pytest.approx(784 / (49 * 32))
    x, states = random_images(model, 2), random_states(model, 2)
    per_node = model.node_energies(x, states.top, states.hidden)
    expected = per_node[:, :-1].sum() * 784 / (49 * 32) + per_node[:, -1].sum()
    assert model.energy(x, states.top, states.hidden).item() == pytest.approx(expected.item(), rel=1e-6)
    assert PCViT(tiny_config(), 3, 32).hidden_node_weight == 1.0  # the original's plain sum by default


def synthetic_run(**changes) -> Run:
    config = tiny_config(implementation="vjp", **changes)
    return Run(config, load_data(config))


def poison(run: Run) -> None:
    """Carried states far from anything a batch would leave: a run that reads them behaves differently."""
    run.states = States(run.states.top + 5.0, run.states.hidden - 3.0)


@pytest.mark.parametrize("fresh", [False, True])
def test_status_init_in_training_ignores_the_carried_states(fresh):
    results = []
    for poisoned in (False, True):
        run = synthetic_run(use_status_init_in_training=fresh)
        x = run.data.normalise(run.data.train_images[:run.config.batch_size])
        if poisoned:
            poison(run)
        energy, _ = run.train_on_batch(x)
        results.append((energy.item(), run.model.out_proj_w.detach().clone()))
    same = results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])
    assert same == fresh


def test_fresh_training_states_are_the_forward_pass_of_a_new_top_latent():
    run = synthetic_run(use_status_init_in_training=True, inference_steps=1)
    generator_state = run.generator.get_state()
    expected = init_states(run.model, run.config.batch_size, True, torch.Generator().set_state(generator_state))
    start = run.start_states(run.config.batch_size, fresh=True)
    assert torch.equal(start.top, expected.top) and torch.equal(start.hidden, expected.hidden)
    assert 0.005 < start.top.std().item() < 0.02  # 0.01 N(0, 1), redrawn
    no_noise = synthetic_run(use_status_init_in_training=True, use_noise=False)
    assert no_noise.start_states(8, fresh=True).top.abs().max().item() == 0.0


@pytest.mark.parametrize("fresh", [False, True])
def test_status_init_in_unmasking_makes_validation_and_probe_ignore_the_carried_states(fresh):
    outputs = []
    for poisoned in (False, True):
        run = synthetic_run(use_status_init_in_unmasking=fresh)
        if poisoned:
            poison(run)
        features = extract_features(run.model, run.states, run.data.test_images[:16], run.data, run.config)
        outputs.append((run.validate()["val_mse"], features))
    same = outputs[0][0] == outputs[1][0] and torch.equal(outputs[0][1], outputs[1][1])
    assert same == fresh


def test_diagnostics_report_every_node_and_match_the_state_gradient():
    run = synthetic_run(num_blocks=2, inference_steps=2)
    x = run.data.normalise(run.data.train_images[:run.config.batch_size])
    before = PCViT(run.config, run.data.channels, run.data.image_size)
    before.load_state_dict(run.model.state_dict())
    start = run.states.clone()
    run.train_on_batch(x)
    summary = run.diagnostics.summary()
    L = run.config.num_blocks
    assert len(summary["node_energy"]) == L + 2 and len(summary["state_rms"]) == L + 2
    energy, g_top, g_hidden = state_grads(before, x, run.states)  # at the settled states, before the weight step
    expected = [g_top.norm().item()] + [g.norm().item() for g in g_hidden]
    assert summary["grad_norm"] == pytest.approx(expected, rel=1e-4, abs=1e-5 * max(expected))
    assert sum(summary["node_energy"]) * len(x) == pytest.approx(energy.item(), rel=1e-4)
    assert summary["top_move_rms"] == pytest.approx((run.states.top - start.top).square().mean().sqrt().item(),
                                                    rel=1e-5)
    assert run.diagnostics.summary() == {}  # summary() starts a new epoch


def test_diagnostics_reach_the_epoch_metrics_and_the_result_and_can_be_switched_off():
    result = synthetic_run(epochs=1, linear_probe_every_n_epochs=0).run()
    on = result.history[-1]
    off = synthetic_run(epochs=1, linear_probe_every_n_epochs=0, node_diagnostics=False).run().history[-1]
    assert result.node_diagnostics["state_rms"] == on["state_rms"] and len(on["grad_norm"]) == 4
    assert {"node_energy", "state_rms", "grad_norm", "top_move_rms"} <= set(on)
    assert "node_energy" not in off
    assert on["train_mse"] == off["train_mse"]  # diagnostics observe; they change nothing


def test_a_study_file_with_an_impossible_option_is_refused_naming_the_key(tmp_path):
    from studies.studyfile.spec import StudyFileError, load_spec

    text = (REPO / "studies" / "fashion-mnist-12block.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace('choices: ["1", "1/L"]', 'choices: ["1", "1/3"]'))
    assert "1/3" in bad.read_text()  # the file still has the choices this test rewrites
    assert load_spec(REPO / "studies" / "fashion-mnist-12block.yaml").space["residual_branch_scale"]
    with pytest.raises(StudyFileError) as info:
        load_spec(bad)
    assert "space.residual_branch_scale" in str(info.value) and "1/3" in str(info.value)


def test_vode_grad_norm_gives_every_node_the_same_step_in_every_implementation():
    """The original's use_vode_grad_norm: after layer scaling each node's whole-batch gradient has norm `target`
    (so with momentum 0 and no clip, every node moves by exactly lr * target in the first step)."""
    from pcvit.inference import layer_scales, settle_states

    moved = {}
    for implementation in ("plain", "vjp"):
        config = tiny_config(num_blocks=3, implementation=implementation, use_vode_grad_norm=True,
                             vode_grad_norm_target=0.5)
        model = tiny_model(config)
        x, start = random_images(model, 3), random_states(model, 3)
        end = settle_states(model, x, start, 1, lambda t: 0.1, 0.0, 1e9, layer_scales(config),
                            grad_norm_target=config.grad_norm_target)
        moved[implementation] = torch.stack([(end.top - start.top).norm()] +
                                            [(a - b).norm() for a, b in zip(end.hidden, start.hidden)])
        assert moved[implementation].tolist() == pytest.approx([0.05] * 5, rel=1e-4)
        two = settle_states(model, x, start, 3, lambda t: 0.1, 0.4, 1e9, layer_scales(config),
                            grad_norm_target=config.grad_norm_target)
        moved[implementation + "3"] = two.hidden
    assert relative_error(moved["vjp3"], moved["plain3"]) < 1e-5
    off = tiny_model(tiny_config(num_blocks=3))
    end = settle_states(off, x, start, 1, lambda t: 0.1, 0.0, 1e9, layer_scales(off.config),
                        grad_norm_target=off.config.grad_norm_target)
    assert (end.top - start.top).norm().item() != pytest.approx(0.05, rel=1e-2)  # off by default


@pytest.mark.parametrize("implementation", ["plain", "vjp"])
def test_vode_grad_norm_acts_in_training_and_probe_features_only(implementation, monkeypatch):
    """As the original: the rescaled gradients drive training inference and the probe's feature extraction;
    validation and reconstruction settle with the plain (layer-scaled, clipped) gradients."""
    import importlib

    targets = []
    train_module, probe_module = importlib.import_module("pcvit.train"), importlib.import_module("pcvit.probe")
    for module in (train_module, probe_module):
        original = module.settle_states

        def spy(*args, original=original, where=module.__name__, **kwargs):
            targets.append((where, kwargs.get("before_step") is not None, kwargs.get("grad_norm_target")))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, "settle_states", spy)
    config = tiny_config(num_blocks=2, implementation=implementation, use_vode_grad_norm=True,
                         vode_grad_norm_target=0.5)
    run = Run(config, load_data(config))
    x = run.data.normalise(run.data.train_images[: config.batch_size])
    run.train_on_batch(x)
    run.settle_and_reconstruct(x, len(x), 2)
    probe_module.extract_features(run.model, run.states, run.data.train_images[:4], run.data, config)
    assert targets == [("pcvit.train", False, 0.5), ("pcvit.train", True, None), ("pcvit.probe", False, 0.5)]
    off = Run(config.replace(use_vode_grad_norm=False), load_data(config))  # same seed: the same model and states
    assert torch.equal(off.settle_and_reconstruct(x, len(x), 3), Run(config, load_data(config))
                       .settle_and_reconstruct(x, len(x), 3))  # reconstruction does not see the switch


def test_a_numeric_choice_given_on_the_command_line_reads_as_its_text():
    from pcvit.config import coerce

    assert coerce("residual_branch_scale", 1) == "1" and tiny_config(residual_branch_scale=coerce(
        "residual_branch_scale", 1)).branch_scale == 1.0
    with pytest.raises(ConfigError, match="residual_branch_scale"):
        tiny_config(residual_branch_scale=coerce("residual_branch_scale", 0.5))  # "0.5" is not a choice
