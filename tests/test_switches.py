"""The original's remaining switches, as its code behaves: early_stopping_metric, num_blocks 0,
use_adamw_for_hidden_optimizer, update_weights_every_inference_step, reinitialize_model_for_each_epoch.

Each is checked against an oracle written here from the original's code (its `train_on_batch` modes, its epoch
loop, optax's adamw), not against the implementation's own helpers."""

from __future__ import annotations

import copy

import pytest
import torch

from pcvit import Config, ConfigError, Run, States, StopReason, layer_scales, load_data, train
from pcvit.inference import settle_states_adamw, state_grads
from pcvit.model import unpatchify
from pcvit.optim import weight_lr

from tests.helpers import random_images, random_states, tiny_config, tiny_model


def make_run(**changes) -> Run:
    config = tiny_config(**changes)
    return Run(config, load_data(config))


# --- early_stopping_metric ---------------------------------------------------------------------------------
def scripted_validation(monkeypatch, values):
    """Validation returns the given val_mse values in turn."""
    queue = list(values)
    monkeypatch.setattr(Run, "validate", lambda self: {"val_mse": queue.pop(0), "val_l1": 0.0, "val_psnr": 0.0})


def test_val_mse_stops_on_validations_without_improvement_before_that_epochs_probe(monkeypatch):
    """The original: the first validation counts as no improvement; patience counts validations; the stopping
    epoch runs no probe and no image (it breaks right after validating)."""
    scripted_validation(monkeypatch, [0.5, 0.4, 0.3995, 0.3992, 0.1])
    result = train(tiny_config(early_stopping_metric="val_mse", early_stopping_patience=2, epochs=10,
                               validation_every_n_epochs=2, linear_probe_every_n_epochs=1))
    assert result.stop_reason is StopReason.EARLY_STOPPED and "2 validations" in result.stop_detail
    assert result.epochs_run == 8  # validations at 2, 4, 6, 8: counter 1, 0, 1, 2
    assert "probe_accuracy" not in result.history[-1] and "probe_accuracy" in result.history[-2]
    assert len(result.probe_accuracies) == 7


def test_val_mse_ignores_the_train_mse_and_train_mse_ignores_validations(monkeypatch):
    scripted_validation(monkeypatch, [0.5] * 10)
    flat = dict(early_stopping_patience=1, epochs=4, validation_every_n_epochs=4, linear_probe_every_n_epochs=0)
    by_val = train(tiny_config(early_stopping_metric="val_mse", **flat))
    assert by_val.epochs_run == 4 and by_val.stop_reason is StopReason.EARLY_STOPPED  # the one validation, at epoch 4
    by_train = train(tiny_config(early_stopping_metric="train_mse", **flat))
    assert by_train.epochs_run == 1 and by_train.stop_reason is StopReason.EARLY_STOPPED  # patience 1: the first epoch


def test_probe_accuracy_never_stops_a_run_as_in_the_original():
    """The original's loop has branches for train_mse and val_mse only: with probe_accuracy nothing stops."""
    result = train(tiny_config(early_stopping_metric="probe_accuracy", early_stopping_patience=1, epochs=4))
    assert result.stop_reason == "completed" and result.epochs_run == 4


def test_an_unknown_early_stopping_metric_names_field_and_value():
    with pytest.raises(ConfigError, match="early_stopping_metric: must be one of train_mse, val_mse, "
                                          "probe_accuracy, got 'val_loss'"):
        Config(early_stopping_metric="val_loss")


# --- num_blocks: 0 ------------------------------------------------------------------------------------------
def test_zero_blocks_is_top_latent_patch_node_image_by_hand():
    """The original with no blocks: u1 = h0 Wp + bp + PE, image = unpatchify(h1 Wo + bo); energy of node 1 and
    of the image only."""
    for implementation in ("plain", "parallel", "vjp"):
        model = tiny_model(tiny_config(num_blocks=0, implementation=implementation, intermediate_l2_coeff=1e-3))
        states, x = random_states(model, 3), random_images(model, 3)
        assert states.hidden.shape[0] == 1
        h0, h1 = states.top, states.hidden[0]
        u1 = h0 @ model.patch_proj_w + model.patch_proj_b + model.pos_embed
        image = unpatchify(h1 @ model.out_proj_w + model.out_proj_b, 3, model.patch)
        by_hand = 0.5 * (h1 - u1).square().sum() + 1e-3 * h1.square().sum() + 0.5 * (x - image).square().sum()
        torch.testing.assert_close(model.energy(x, h0, states.hidden), by_hand, rtol=1e-5, atol=1e-4)
        energy, g_top, g_hidden = state_grads(model, x, states)
        torch.testing.assert_close(energy, by_hand, rtol=1e-5, atol=1e-4)
        assert g_top.shape == h0.shape and g_hidden.shape == (1, *h1.shape)


def test_zero_blocks_trains_and_probes_with_every_implementation_alike():
    results = [train(tiny_config(num_blocks=0, implementation=i, epochs=2, linear_probe_vode_indices=(0, 1),
                                 residual_branch_scale="1/L")) for i in ("plain", "parallel", "vjp")]
    mses = [[h["train_mse"] for h in r.history] for r in results]
    assert all(r.stop_reason == "completed" for r in results)
    for other in mses[1:]:
        assert other == pytest.approx(mses[0], rel=1e-4)


@pytest.mark.parametrize("changes, message", [
    (dict(num_blocks=-1), "num_blocks: must be >= 0"),
    (dict(num_blocks=0, linear_probe_vode_indices=(2,)), "linear_probe_vode_indices: node 2 is out of range"),
])
def test_impossible_depths_name_field_and_value(changes, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**changes)


# --- use_adamw_for_hidden_optimizer -------------------------------------------------------------------------
def test_state_adamw_is_optax_adamw_on_the_scaled_clipped_state_gradient():
    """Oracle: torch.optim.AdamW (the same update as optax.adamw: decoupled decay on the value before the step)
    with optax's defaults b1 0.9, b2 0.999, eps 1e-8, weight decay 1e-4, fed the layer-scaled, globally clipped
    gradient the original chains in front of it."""
    config = tiny_config(h_grad_clip_norm=5.0)
    model, lr, steps = tiny_model(config), 0.05, 4
    states, x = random_states(model, 3), random_images(model, 3)
    scales = layer_scales(config)
    ours = settle_states_adamw(model, x, states, steps, lr, config.h_grad_clip_norm, scales)

    top, hidden = states.top.clone().requires_grad_(), states.hidden.clone().requires_grad_()
    opt = torch.optim.AdamW([top, hidden], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    clipped = 0
    for _ in range(steps):
        _, g_top, g_hidden = state_grads(model, x, States(top.detach(), hidden.detach()))
        g_top, g_hidden = g_top * float(scales[0]), g_hidden * scales[1:, None, None, None].float()
        norm = torch.sqrt(g_top.square().sum() + g_hidden.square().sum())
        factor = min(1.0, config.h_grad_clip_norm / float(norm))
        clipped += factor < 1
        top.grad, hidden.grad = g_top * factor, g_hidden * factor
        opt.step()
    assert clipped >= 1  # the clip took part
    torch.testing.assert_close(ours.top, top.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.hidden, hidden.detach(), rtol=1e-5, atol=1e-6)


def test_adamw_acts_in_the_probe_only_as_in_the_original():
    """The original overwrites its AdamW choice with SGD for training, validation and images: only the probe's
    feature extraction changes."""
    base = dict(epochs=2, validation_every_n_epochs=1)
    sgd, adamw = train(tiny_config(**base)), train(tiny_config(use_adamw_for_hidden_optimizer=True, **base))
    for key in ("train_mse", "train_energy", "val_mse"):
        assert [h[key] for h in adamw.history] == [h[key] for h in sgd.history], key
    from pcvit.probe import extract_features

    config = tiny_config()
    run = Run(config, load_data(config))
    images = run.data.test_images[:16]
    features = [extract_features(run.model, run.states, images, run.data,
                                 config.replace(use_adamw_for_hidden_optimizer=on)) for on in (False, True)]
    assert not torch.allclose(*features)


# --- update_weights_every_inference_step --------------------------------------------------------------------
def test_weights_every_inference_step_is_the_originals_mode_1():
    """Oracle from the original's mode 1: per inference step, an SGD-momentum state step on the global-clipped,
    NOT layer-scaled gradient, then an AdamW weight step (grad / B, w-clip) at the new states, its lr the schedule
    at the count of weight steps so far."""
    changes = dict(update_weights_every_inference_step=True, inference_steps=3, warmup_steps=4,
                   inference_lr_scale_base=1.7, h_grad_clip_norm=50.0)
    run = make_run(**changes)
    oracle = copy.deepcopy(run)
    c, data = run.config, run.data
    x = data.normalise(data.train_images[:c.batch_size])
    for batch in range(2):
        run.train_on_batch(x)
        top, hidden = oracle.states.top.clone(), oracle.states.hidden.clone()
        m_top = m_hidden = None
        for t in range(c.inference_steps):
            _, g_top, g_hidden = state_grads(oracle.model, x, States(top, hidden))
            norm = torch.sqrt(g_top.square().sum() + g_hidden.square().sum())
            f = min(1.0, c.h_grad_clip_norm / float(norm))
            g_top, g_hidden = g_top * f, g_hidden * f
            m_top = g_top if m_top is None else g_top + c.hidden_momentum * m_top
            m_hidden = g_hidden if m_hidden is None else g_hidden + c.hidden_momentum * m_hidden
            lr = oracle.hidden_lr_at(t)
            top, hidden = top - lr * m_top, hidden - lr * m_hidden
            oracle.weight_step(x, States(top, hidden), batch * c.inference_steps + t, False)
        for (name, a), (_, b) in zip(run.model.named_parameters(), oracle.model.named_parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(run.states.top, top, rtol=1e-5, atol=1e-6)
        oracle.states = States(top, hidden)
    steps = {int(s["step"]) for s in run.optim_w.state.values()}
    assert steps == {2 * c.inference_steps}  # T weight updates per batch


def test_mode_1_counts_weight_steps_in_the_lr_schedule_and_ignores_layer_scaling():
    a = make_run(update_weights_every_inference_step=True, inference_steps=4, warmup_steps=8)
    b = make_run(update_weights_every_inference_step=True, inference_steps=4, warmup_steps=8,
                 inference_lr_scale_base=2.0)
    x = a.data.normalise(a.data.train_images[:a.config.batch_size])
    lrs = []
    for _ in range(2):
        a.train_on_batch(x)
        lrs.append(a.optim_w.param_groups[0]["lr"])  # the lr of the batch's last weight step
        b.train_on_batch(x)
    assert lrs == [weight_lr(a.config, 3, a.total_steps), weight_lr(a.config, 7, a.total_steps)]
    torch.testing.assert_close(a.states.top, b.states.top)  # the layer-scaling base plays no part


# --- reinitialize_model_for_each_epoch ----------------------------------------------------------------------
def test_every_epoch_starts_from_fresh_states_and_keeps_the_weights(monkeypatch):
    """At each epoch's first batch: every state is its prediction from the state above with the current weights
    (STATUS.INIT), h0 a new 0.01 N(0, 1) draw; the weights are the ones learnt so far."""
    starts = []
    real = Run.train_on_batch

    def record(self, x, last_of_epoch=True):
        if not starts or starts[-1]["epoch"] != self.epoch:
            starts.append({"epoch": self.epoch, "states": self.states.clone(),
                           "predicted": self.model.feedforward(self.states.top)[0],
                           "weights": [p.detach().clone() for p in self.model.parameters()]})
        return real(self, x, last_of_epoch)

    monkeypatch.setattr(Run, "train_on_batch", record)
    run = make_run(reinitialize_model_for_each_epoch=True, epochs=3, linear_probe_every_n_epochs=0,
                   validation_every_n_epochs=1)  # validation writes states back: the reset must come after it
    run.run()
    assert [s["epoch"] for s in starts] == [0, 1, 2]
    for start in starts:
        torch.testing.assert_close(start["states"].hidden, start["predicted"])
        assert 0.005 < float(start["states"].top.std()) < 0.02
    assert not torch.equal(starts[1]["states"].top, starts[2]["states"].top)
    assert any(not torch.equal(a, b) for a, b in zip(starts[1]["weights"], starts[2]["weights"]))


def test_without_the_switch_the_states_carry_over_between_epochs(monkeypatch):
    run = make_run(epochs=2, linear_probe_every_n_epochs=0, reconstruction_every_n_epochs=0,
                   validation_every_n_epochs=0, save_reconstruction_images=False)
    run.run_epoch()
    carried = run.states.clone()
    seen = []
    monkeypatch.setattr(Run, "train_on_batch", lambda self, x, last_of_epoch=True: seen.append(
        self.states.clone()) or (torch.zeros(()), torch.zeros(())))
    run.run_epoch()
    assert torch.equal(seen[0].top, carried.top)


@pytest.mark.parametrize("name", ["use_ssl_augmentations", "update_weights_every_inference_step",
                                  "use_adamw_for_hidden_optimizer", "reinitialize_model_for_each_epoch"])
def test_each_switch_refuses_a_non_boolean_naming_field_and_value(name):
    with pytest.raises(ConfigError, match=f"{name}: must be true or false, got 'maybe'"):
        Config(**{name: "maybe"})
    assert Config.from_dict({name: "true"}).__getattribute__(name) is True
