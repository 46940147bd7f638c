"""T inference steps from the stored start states (README 7.3; cases a and c): learning rates, layer scales,
h-gradient norms, clip decisions, the states after every step and the energy trace."""

import numpy as np
import pytest
import torch

from pcvit.inference import StepRecord, layer_scales, settle_states
from pcvit.optim import hidden_lr

from .adapter import assert_exact, assert_rel, assert_states_rel, config_from_meta, model_for, states_from_npz


def settle_recorded(case, implementation):
    """Run the case's T inference steps with the core's own schedule; returns (config, model, records, final)."""
    npz, meta = case
    config, model = model_for(case, implementation)
    x = torch.as_tensor(npz["x"])
    start = states_from_npz(npz)
    records: list[StepRecord] = []
    total = meta["total_train_steps"]  # the schedules' horizon
    final = settle_states(model, x, start, config.inference_steps, lambda t: hidden_lr(config, t, total),
                          config.hidden_momentum, config.h_grad_clip_norm, layer_scales(config), record=records)
    for i, node in enumerate(start.as_list()):
        assert_exact(node, npz[f"h{i}"], f"start state h{i} is not modified")
    return config, model, records, final


def test_hidden_lr_schedule_is_evaluated_at_the_inference_step(basic, layernorm, implementation):
    for npz, meta in (basic, layernorm):
        config = config_from_meta(meta, implementation)
        lrs = [hidden_lr(config, t, meta["total_train_steps"]) for t in range(config.inference_steps)]
        assert_rel(np.array(lrs), npz["lr_h"], 1e-6, "lr_h")


def test_layer_scales_are_powers_of_the_base(basic, implementation):
    npz, meta = basic
    scales = layer_scales(config_from_meta(meta, implementation))
    assert_rel(scales, npz["hgrad.layer_scale"], 1e-6, "hgrad.layer_scale")


@pytest.mark.parametrize("name", ["basic", "layernorm"])
def test_inference_norms_clip_flags_and_energy_trace(request, name, implementation):
    case = request.getfixturevalue(name)
    npz, _ = case
    config, model, records, final = settle_recorded(case, implementation)
    assert [r.lr for r in records] == pytest.approx(npz["lr_h"].tolist(), rel=1e-6)
    assert_rel(torch.stack([r.grad_norm for r in records]), npz["hgrad.norm"], 1e-4, "hgrad.norm")
    assert_exact(torch.stack([r.clipped for r in records]), npz["hgrad.clip_active"], "hgrad.clip_active")
    with torch.no_grad():
        final_energy = model.energy(torch.as_tensor(npz["x"]), final.top, final.hidden)
    trace = torch.stack([r.energy for r in records] + [final_energy])
    assert_rel(trace, npz["E_trace"], 1e-5, "E_trace")


def test_states_after_every_inference_step_case_a(basic, implementation):
    npz, _ = basic
    config, model, records, final = settle_recorded(basic, implementation)
    for t, record in enumerate(records, start=1):
        assert_states_rel(record.states, npz, f"step{t}.", 1e-4)
    assert_states_rel(final, npz, f"step{config.inference_steps}.", 1e-4)


def test_node_energy_trace_case_a(basic, implementation):
    npz, _ = basic
    _, model, records, _ = settle_recorded(basic, implementation)
    x = torch.as_tensor(npz["x"])
    visited = [states_from_npz(npz)] + [r.states for r in records]
    with torch.no_grad():
        trace = torch.stack([model.node_energies(x, s.top, s.hidden) for s in visited])
    assert_rel(trace, npz["E_node_trace"], 1e-5, "E_node_trace")


def test_final_states_case_c_state_layernorm(layernorm, implementation):
    npz, _ = layernorm
    config, _, _, final = settle_recorded(layernorm, implementation)
    # README section 8: this case amplifies input differences about 100x over its T steps, hence 5e-4
    assert_states_rel(final, npz, f"step{config.inference_steps}.", 5e-4)
