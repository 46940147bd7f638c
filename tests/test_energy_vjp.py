"""The hand-written VJP (`pcvit.energy_vjp`) against autograd on the `parallel` model, and against finite differences.

Runs on the CPU by default; PCVIT_TEST_DEVICE=cuda runs the same checks on a GPU (TF32 is switched off here,
so both sides compute in true float32).
"""

import itertools
import os

import pytest
import torch

import pcvit.energy_vjp as energy_vjp
import pcvit.inference as inference
from pcvit.config import IMPLEMENTATIONS, Config
from pcvit.energy_vjp import energy_and_state_grads, resolve_attention, settle_states_inplace
from pcvit.inference import States, layer_scales, settle_states, state_grads
from pcvit.model import PCViT

from tests.helpers import tiny_config

DEVICE = torch.device(os.environ.get("PCVIT_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
TOL = 1e-5  # max |difference| relative to max |value|, float32
GEOMETRIES = {"cifar": (3, 32, "synthetic"), "fmnist": (1, 28, "fashion-mnist")}  # channels, side, dataset


def make_case(geometry="cifar", batch=2, seed=0, dtype=torch.float32, device=DEVICE, **overrides):
    """A model with LayerNorm gains/biases moved away from 1/0, an image and random states."""
    channels, side, dataset = GEOMETRIES[geometry]
    config = tiny_config(**{"dataset": dataset, "implementation": "parallel", **overrides})
    gen = torch.Generator().manual_seed(seed)
    model = PCViT(config, channels, side, gen)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model = model.to(device=device, dtype=dtype)
    x = torch.randn(batch, channels, side, side, generator=gen).to(device, dtype)
    top = torch.randn(batch, model.num_patches, model.patch_dim, generator=gen).to(device, dtype)
    hidden = torch.randn(config.num_blocks + 1, batch, model.num_patches, config.hidden_size,
                         generator=gen).to(device, dtype)
    return model, x, top, hidden


def assert_close(actual, expected, tol=TOL, what=""):
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= tol, f"{what}: max |diff| / max |value| = {err:.3g} > {tol:g}"


def check_against_autograd(model, x, top, hidden, attention="auto", tol=TOL):
    top0, hidden0 = top.clone(), hidden.clone()
    energy, g_top, g_hidden = state_grads(model, x, States(top, hidden))
    fast_energy, fast_top, fast_hidden = energy_and_state_grads(model, x, top, hidden, attention=attention)
    assert fast_top.shape == g_top.shape and fast_hidden.shape == g_hidden.shape
    assert_close(fast_energy, energy, tol, "energy")
    assert_close(fast_top, g_top, tol, "dE/dh0")
    for i in range(hidden.shape[0]):  # node by node, so a small node's error is not hidden by a large one
        assert_close(fast_hidden[i], g_hidden[i], tol, f"dE/dh{i + 1}")
    assert torch.equal(top, top0) and torch.equal(hidden, hidden0), "the inputs were modified"


ATTENTION = ["math", "fused"]
VARIANTS = list(itertools.product(["double", "single"], [False, True], [False, True], [1, 2, 4]))


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("residual, state_ln, regularised, heads", VARIANTS)
def test_vjp_matches_autograd(residual, state_ln, regularised, heads, attention):
    i = VARIANTS.index((residual, state_ln, regularised, heads))
    reg = dict(intermediate_l1_coeff=3e-2, intermediate_l2_coeff=2e-2) if regularised else {}
    model, x, top, hidden = make_case(
        geometry="cifar" if i % 2 == 0 else "fmnist", batch=1 if i % 3 == 0 else 3, seed=i,
        num_blocks=1 + i % 3, num_heads=heads, residual=residual, use_vode_state_layernorm=state_ln, **reg)
    check_against_autograd(model, x, top, hidden, attention)


@pytest.mark.parametrize("geometry", ["cifar", "fmnist"])
@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_vjp_matches_autograd_at_depth(depth, geometry):
    model, x, top, hidden = make_case(geometry=geometry, batch=3, seed=depth, num_blocks=depth, hidden_size=32,
                                      num_heads=4, use_vode_state_layernorm=True, intermediate_l1_coeff=1e-3,
                                      intermediate_l2_coeff=1e-3)
    check_against_autograd(model, x, top, hidden)


def test_regulariser_uses_the_state_not_the_prediction():
    """L1/L2 on h: with everything else zero the state gradient is exactly l1*sign(h) + 2*l2*h plus errors."""
    model, x, top, hidden = make_case(intermediate_l1_coeff=0.5, intermediate_l2_coeff=0.25)
    _, _, with_reg = energy_and_state_grads(model, x, top, hidden)
    plain = Config(**{**model.config.to_dict(), "linear_probe_vode_indices": (0,),
                      "intermediate_l1_coeff": 0.0, "intermediate_l2_coeff": 0.0})
    model.config = plain
    _, _, without = energy_and_state_grads(model, x, top, hidden)
    assert_close(with_reg - without, 0.5 * hidden.sign() + 0.5 * hidden, 1e-5, "regulariser gradient")


@pytest.mark.parametrize("attention", ATTENTION)
def test_vjp_matches_finite_differences_in_float64(attention):
    """Directional derivatives of the vjp's own energy, float64, on a tiny model (independent of autograd)."""
    if DEVICE.type == "cuda" and attention == "fused":
        pytest.skip("the CUDA fused attention kernel has no float64 (auto falls back to math there)")
    model, x, top, hidden = make_case(geometry="fmnist", batch=2, dtype=torch.float64, num_blocks=2, hidden_size=8,
                                      num_heads=2, residual="single", use_vode_state_layernorm=True,
                                      intermediate_l1_coeff=1e-2, intermediate_l2_coeff=1e-2)
    energy = lambda t, h: energy_and_state_grads(model, x, t, h, attention=attention)[0]  # noqa: E731
    _, g_top, g_hidden = energy_and_state_grads(model, x, top, hidden, attention=attention)
    gen = torch.Generator().manual_seed(7)
    eps = 1e-6
    for _ in range(4):
        v_top = torch.randn(top.shape, generator=gen, dtype=torch.float64).to(DEVICE)
        v_hidden = torch.randn(hidden.shape, generator=gen, dtype=torch.float64).to(DEVICE)
        numeric = (energy(top + eps * v_top, hidden + eps * v_hidden)
                   - energy(top - eps * v_top, hidden - eps * v_hidden)) / (2 * eps)
        analytic = (g_top * v_top).sum() + (g_hidden * v_hidden).sum()
        assert abs(numeric - analytic) <= 1e-6 * abs(analytic), (numeric.item(), analytic.item())
    for node in range(hidden.shape[0]):  # one coordinate per node, so each node's backward is seen alone
        e = torch.zeros_like(hidden)
        e[node, 1, 2, 3] = eps
        numeric = (energy(top, hidden + e) - energy(top, hidden - e)) / (2 * eps)
        assert abs(numeric - g_hidden[node, 1, 2, 3]) <= 1e-6 * max(1.0, abs(numeric)), node


def test_bf16_products_stay_close_to_float32():
    """precision=bf16 only rounds the matrix products: the result is near the float32 autograd one."""
    model, x, top, hidden = make_case(num_blocks=3, hidden_size=32, num_heads=2, precision="bf16")
    reference = Config(**{**model.config.to_dict(), "linear_probe_vode_indices": (0,), "precision": "float32"})
    _, g_top, g_hidden = energy_and_state_grads(model, x, top, hidden)
    model.config = reference
    _, ref_top, ref_hidden = state_grads(model, x, States(top, hidden))
    assert_close(g_top, ref_top, 3e-2, "dE/dh0 (bf16)")
    assert_close(g_hidden, ref_hidden, 3e-2, "dE/dh (bf16)")


def test_attention_choice(monkeypatch):
    monkeypatch.delenv("PCVIT_VJP_ATTENTION", raising=False)
    assert resolve_attention("math", torch.device("cuda"), 4, 32, "float32") == "math"
    assert resolve_attention("auto", torch.device("cpu"), 4, 4, "float32") == "fused"  # the CPU flash kernel
    assert resolve_attention("auto", torch.device("cuda"), 4, 2, "float32") == "math"  # misaligned for the kernel
    assert resolve_attention("auto", torch.device("cuda"), 2, 8, "float32", torch.float64) == "math"  # no float64
    assert resolve_attention("auto", torch.device("cuda"), 2, 8, "float32") == "math"  # until run on a GPU
    assert resolve_attention("fused", torch.device("cuda"), 2, 8, "float32") == "fused"
    with pytest.raises(ValueError, match="attention"):
        resolve_attention("flash", torch.device("cpu"), 1, 8, "float32")
    monkeypatch.setenv("PCVIT_VJP_ATTENTION", "fused")  # the opt-in for CUDA
    assert resolve_attention("auto", torch.device("cuda"), 2, 8, "float32") == "fused"


def test_settled_states_match_the_parallel_implementation(monkeypatch):
    """T inference steps (clip, momentum, layer scaling) with vjp gradients give the parallel one's states."""
    model, x, top, hidden = make_case(batch=3, num_blocks=3, hidden_size=16, num_heads=2,
                                      intermediate_l1_coeff=1e-3, intermediate_l2_coeff=1e-3, h_grad_clip_norm=50.0)
    c = model.config
    settle = lambda: settle_states(model, x, States(top, hidden), 5, lambda t: 0.05, c.hidden_momentum,  # noqa: E731
                                   c.h_grad_clip_norm, layer_scales(c))
    reference = settle()
    if "vjp" in IMPLEMENTATIONS:
        model.config = c.replace(implementation="vjp")
    else:
        monkeypatch.setattr(inference, "state_grads",
                            lambda m, x_, s: energy_and_state_grads(m, x_, s.top, s.hidden))
    fast = settle()
    assert_close(fast.top, reference.top, 1e-5, "settled h0")
    assert_close(fast.hidden, reference.hidden, 1e-5, "settled hidden")


def test_inplace_settle_matches_settle_states(monkeypatch):
    """The in-place step (one global clip, momentum from zero buffers, lr schedule) reproduces settle_states."""
    model, x, top, hidden = make_case(batch=3, num_blocks=2, hidden_size=16, num_heads=2, residual="single",
                                      intermediate_l1_coeff=1e-3, h_grad_clip_norm=310.0)
    c = model.config
    lr_at = lambda t: 0.02 + 0.01 * t  # noqa: E731
    args = (5, lr_at, c.hidden_momentum, c.h_grad_clip_norm, layer_scales(c))
    reference = settle_states(model, x, States(top, hidden), *args)  # autograd, parallel
    records = []
    monkeypatch.setattr(inference, "state_grads", lambda m, x_, s: energy_and_state_grads(m, x_, s.top, s.hidden))
    vjp_reference = settle_states(model, x, States(top, hidden), *args, record=records)
    assert any(bool(r.clipped) for r in records) and not all(bool(r.clipped) for r in records), "clip not exercised"
    fast = settle_states_inplace(model, x, States(top, hidden), *args)
    assert_close(fast.top, vjp_reference.top, 1e-6, "h0 vs settle_states(vjp)")
    assert_close(fast.hidden, vjp_reference.hidden, 1e-6, "hidden vs settle_states(vjp)")
    assert_close(fast.hidden, reference.hidden, 1e-5, "hidden vs settle_states(autograd)")
    assert not torch.equal(fast.hidden, hidden), "the states did not move"


def test_qkv_grad_product_for_both_grad_layouts():
    """d(qkv) @ W^T is the same whether the grads come as (LB, N, nh, d) (fused kernels) or (LB, nh, N, d)."""
    packed = torch.randn(6, 16, 3, 2, 4, device=DEVICE)  # (LB, N, 3, nh, d); L = 2, B = 3, BN = 48, H = 8
    w_t = torch.randn(2, 24, 8, device=DEVICE)
    expected = torch.bmm(packed.reshape(2, 48, 24), w_t)
    grads = packed.permute(2, 0, 3, 1, 4)  # each (LB, nh, N, d), views of the packed tensor
    products = energy_vjp._Products("float32")
    for layout in ([t.transpose(1, 2).contiguous().transpose(1, 2) for t in grads],  # (LB, N, nh, d) memory
                   [t.contiguous() for t in grads]):  # (LB, nh, N, d) memory
        assert_close(energy_vjp._qkv_grads_times(*layout, w_t, 2, 48, products), expected, 1e-6, "d(qkv) @ W^T")
