"""Whole batches through the production path, `Run.train_on_batch`, from the run start (README 7.5, 7.6).

Case a: INIT forward from `runstart.h0`, train on `prev.x` (global step 0), check the state the recorded batch
started from (weights, states, AdamW moments), then train on `x` and check its outcome. Case b: the same over
two batches with warm-up 5 > T (first inference step lr 0, weight lr 0 at global step 0, bias correction k = 2).
Tolerances of chained steps (README section 8): 1e-4 relative on states, energies, norms, train MSE and Adam
moments; 5e-5 absolute on weights (a step moves them by ~1e-3 only).
"""

import importlib

import numpy as np
import torch

from pcvit.inference import States
from pcvit.optim import weight_lr
from pcvit.train import Run

from .adapter import (adam_from_optimizer, assert_exact, assert_rel, assert_states_rel, assert_weights,
                      config_from_meta, image_data, load_weights, to_uint8, weights_from_model)

train_module = importlib.import_module("pcvit.train")  # the attribute `pcvit.train` is the function train()


def run_from_start(case, implementation, first_batch: str) -> Run:
    """A Run over the case's first batch, holding `runstart.w.*` and the INIT states from `runstart.h0`."""
    npz, meta = case
    config = config_from_meta(meta, implementation)
    run = Run(config, image_data(to_uint8(npz[first_batch])))
    assert run.total_steps == meta["total_train_steps"] and run.global_step == 0
    load_weights(run.model, npz, "runstart.w.")  # in place: the run's AdamW keeps its parameters
    top = torch.as_tensor(npz["runstart.h0"])
    hidden, _ = run.model.feedforward(top)  # run-start INIT: every hidden state := its prediction
    run.states = States(top, hidden)
    return run


def record_batches(run: Run, monkeypatch) -> dict:
    """Make `run.train_on_batch` also record its inference steps, node energies and weight-gradient clip."""
    log: dict = {}
    settle = run.settle

    def settle_recorded(x, states, steps, **kwargs):
        log["records"] = []
        final = settle(x, states, steps, record=log["records"], **kwargs)
        visited = [states] + [r.states for r in log["records"]]
        with torch.no_grad():  # still the pre-step weights: settle runs before the weight step
            log["E_node_trace"] = torch.stack([run.model.node_energies(x, s.top, s.hidden) for s in visited])
        return final

    clip = train_module.scale_and_clip_grads

    def clip_recorded(params, batch_size, max_norm):
        log["wgrad.norm"], log["wgrad.clip_active"] = clip(params, batch_size, max_norm)
        return log["wgrad.norm"], log["wgrad.clip_active"]

    run.settle = settle_recorded
    monkeypatch.setattr(train_module, "scale_and_clip_grads", clip_recorded)
    return log


def train_and_check(run: Run, log: dict, npz, x: torch.Tensor, prefix: str) -> None:
    """One `train_on_batch` on x, compared with the batch's golden arrays `<prefix>*`."""
    c = run.config
    assert_rel(np.array([run.hidden_lr_at(t) for t in range(c.inference_steps)]), npz[prefix + "lr_h"], 1e-6,
               prefix + "lr_h")
    assert_rel(weight_lr(c, run.global_step, run.total_steps), npz[prefix + "lr_w"], 1e-6, prefix + "lr_w")
    assert_exact(run.global_step, npz[prefix + "global_step"], prefix + "global_step")
    energy, mse = run.train_on_batch(x)
    records = log["records"]
    assert_rel(torch.stack([r.energy for r in records] + [energy]), npz[prefix + "E_trace"], 1e-4,
               prefix + "E_trace")
    assert_rel(log["E_node_trace"], npz[prefix + "E_node_trace"], 1e-4, prefix + "E_node_trace")
    assert_rel(torch.stack([r.grad_norm for r in records]), npz[prefix + "hgrad.norm"], 1e-4, prefix + "hgrad.norm")
    assert_exact(torch.stack([r.clipped for r in records]), npz[prefix + "hgrad.clip_active"],
                 prefix + "hgrad.clip_active")
    assert_states_rel(run.states, npz, prefix + f"step{c.inference_steps}.", 1e-4)
    assert_rel(log["wgrad.norm"], npz[prefix + "wgrad.norm"], 1e-4, prefix + "wgrad.norm")
    assert_exact(log["wgrad.clip_active"], npz[prefix + "wgrad.clip_active"], prefix + "wgrad.clip_active")
    assert_weights(run.model, npz, prefix + "w_after.", 5e-5)
    assert_rel(mse, npz[prefix + "train_mse"], 1e-4, prefix + "train_mse")


def test_replay_case_a_from_run_start_through_both_batches(basic, implementation, monkeypatch):
    npz, meta = basic
    run = run_from_start(basic, implementation, "prev.x")
    log = record_batches(run, monkeypatch)
    x_prev = run.data.normalise(torch.as_tensor(to_uint8(npz["prev.x"])))
    x = run.data.normalise(torch.as_tensor(npz["x_uint8"]))
    assert_exact(x_prev, npz["prev.x"], "prev.x")
    assert_exact(x, npz["x"], "x = normalise(x_uint8)")

    # the previous batch (global step 0): what the recorded batch started from
    _, prev_mse = run.train_on_batch(x_prev)
    prev = meta["prev_batch"]
    assert_rel(torch.stack([r.grad_norm for r in log["records"]]), prev["hgrad_norm"], 1e-4, "prev hgrad.norm")
    assert_rel(log["wgrad.norm"], prev["wgrad_norm"], 1e-4, "prev wgrad.norm")
    assert_rel(prev_mse, npz["prev.train_mse"], 1e-4, "prev.train_mse")
    assert_states_rel(run.states, npz, "", 1e-4)
    assert_weights(run.model, npz, "w.", 5e-5)
    adam = adam_from_optimizer(run.optim_w, run.model)
    assert_exact(adam.pop("adam.count"), npz["adam.count"], "adam.count")
    for name, value in adam.items():
        assert_rel(value, npz[name], 1e-4, name)

    # the recorded batch (global step 1)
    train_and_check(run, log, npz, x, prefix="")


def test_warmup_init_forward_sets_states_to_predictions(warmup, implementation):
    npz, _ = warmup
    run = run_from_start(warmup, implementation, "batch0.x")
    assert_states_rel(run.states, npz, "runstart.", 1e-5)


def test_warmup_two_batches_from_run_start(warmup, implementation, monkeypatch):
    npz, _ = warmup
    run = run_from_start(warmup, implementation, "batch0.x")
    log = record_batches(run, monkeypatch)
    start = weights_from_model(run.model)
    for k in range(2):
        x = run.data.normalise(torch.as_tensor(to_uint8(npz[f"batch{k}.x"])))
        assert_exact(x, npz[f"batch{k}.x"], f"batch{k}.x")
        before = run.states
        train_and_check(run, log, npz, x, prefix=f"batch{k}.")
        # warm-up: inference step 0 has lr 0, so it moves nothing (but loads the momentum buffer)
        first = log["records"][0].states
        assert_exact(first.top, before.top, f"batch{k}: h0 after step 1")
        assert_exact(first.hidden, before.hidden, f"batch{k}: h1.. after step 1")
        if k == 0:  # weight lr 0 at global step 0: the weights are unchanged bit for bit
            for name, value in weights_from_model(run.model).items():
                assert_exact(value, npz["runstart.w." + name], f"batch0.w_after.{name} == runstart.w.{name}")
                assert_exact(value, start[name], f"batch0 weights unchanged: {name}")
            assert_exact(adam_from_optimizer(run.optim_w, run.model)["adam.count"], 1, "adam.count after batch0")
