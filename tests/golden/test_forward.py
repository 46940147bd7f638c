"""Predictions, energies and state gradients at the stored start states (README 7.1, 7.2; cases a and c)."""

import pytest
import torch

from pcvit.inference import state_grads

from .adapter import assert_rel, model_for, states_from_npz

CASES = ["basic", "layernorm"]  # case a, case c (state-LayerNorm)


@pytest.fixture(params=CASES)
def case(request):
    return request.getfixturevalue(request.param)


def test_predictions_match_golden(case, implementation):
    npz, _ = case
    _, model = model_for(case, implementation)
    states = states_from_npz(npz)
    with torch.no_grad():
        u1, u_blocks, u_s = model.predict(states.top, states.hidden)
    assert_rel(u1, npz["u1"], 1e-5, "u1")
    for l in range(len(u_blocks)):
        assert_rel(u_blocks[l], npz[f"u{l + 2}"], 1e-5, f"u{l + 2}")
    assert_rel(u_s, npz["u_s"], 1e-5, "u_s")


def test_node_energies_and_total_energy_match_golden(case, implementation):
    npz, _ = case
    _, model = model_for(case, implementation)
    states = states_from_npz(npz)
    x = torch.as_tensor(npz["x"])
    with torch.no_grad():
        assert_rel(model.node_energies(x, states.top, states.hidden), npz["E_node"], 1e-5, "E_node")
        assert_rel(model.energy(x, states.top, states.hidden), npz["E_total"], 1e-5, "E_total")


def test_state_gradient_is_unscaled_batch_sum_gradient(case, implementation):
    npz, _ = case
    _, model = model_for(case, implementation)
    energy, g_top, g_hidden = state_grads(model, torch.as_tensor(npz["x"]), states_from_npz(npz))
    assert_rel(energy, npz["E_total"], 1e-5, "E_total")
    assert_rel(g_top, npz["dEdh.h0"], 1e-4, "dEdh.h0")
    for i in range(1, len(g_hidden) + 1):
        assert_rel(g_hidden[i - 1], npz[f"dEdh.h{i}"], 1e-4, f"dEdh.h{i}")
