"""The weight step at the settled states (README 7.4; case a, and dE/dW of case c): raw gradient, /B and the
global-norm clip, AdamW alone and with the core's own gradient, then the top-down reconstruction and train MSE."""

import pytest
import torch

from pcvit.optim import make_weight_optimizer, scale_and_clip_grads, set_lr, weight_lr
from pcvit.train import clipped_mse

from .adapter import (assert_exact, assert_rel, assert_weights, grads_from_model, load_adam, model_for, set_grads,
                      states_from_npz)


def raw_weight_grads(case, implementation):
    """dE_total/dW at the stored final states `step3.*` with the pre-step weights; returns (config, model)."""
    npz, _ = case
    config, model = model_for(case, implementation)
    final = states_from_npz(npz, f"step{config.inference_steps}.")
    model.zero_grad(set_to_none=True)
    model.energy(torch.as_tensor(npz["x"]), final.top, final.hidden).backward()
    return config, model


@pytest.mark.parametrize("name", ["basic", "layernorm"])
def test_raw_weight_gradient_is_the_batch_sum_gradient(request, name, implementation):
    case = request.getfixturevalue(name)
    npz, _ = case
    _, model = raw_weight_grads(case, implementation)
    for weight, grad in grads_from_model(model).items():
        assert_rel(grad, npz["wgrad.raw." + weight], 1e-4, "wgrad.raw." + weight)


def test_gradient_divided_by_batch_then_clipped_by_global_norm(basic, implementation):
    npz, _ = basic
    config, model = raw_weight_grads(basic, implementation)
    norm, clipped = scale_and_clip_grads(list(model.parameters()), config.batch_size, config.w_grad_clip_norm)
    assert_rel(norm, npz["wgrad.norm"], 1e-4, "wgrad.norm")
    assert_exact(clipped, npz["wgrad.clip_active"], "wgrad.clip_active")
    for weight, grad in grads_from_model(model).items():
        assert_rel(grad, npz["wgrad.clipped." + weight], 1e-4, "wgrad.clipped." + weight)


def test_weight_lr_at_the_global_step(basic, implementation):
    npz, meta = basic
    config, _ = model_for(basic, implementation)
    assert_rel(weight_lr(config, int(npz["global_step"]), meta["total_train_steps"]), npz["lr_w"], 1e-6, "lr_w")


def adamw_step(config, model, npz, meta) -> None:
    """One step of the core's AdamW with the stored moments, at the lr of the stored global step."""
    optimizer = make_weight_optimizer(model, config)
    load_adam(optimizer, model, npz)
    set_lr(optimizer, weight_lr(config, int(npz["global_step"]), meta["total_train_steps"]))
    optimizer.step()


def test_adamw_alone_from_the_stored_clipped_gradient(basic, implementation):
    npz, meta = basic
    config, model = model_for(basic, implementation)
    set_grads(model, npz, "wgrad.clipped.")
    adamw_step(config, model, npz, meta)
    assert_weights(model, npz, "w_after.", 3e-7)


def test_adamw_with_own_gradient(basic, implementation):
    npz, meta = basic
    config, model = raw_weight_grads(basic, implementation)
    scale_and_clip_grads(list(model.parameters()), config.batch_size, config.w_grad_clip_norm)
    adamw_step(config, model, npz, meta)
    assert_weights(model, npz, "w_after.", 1e-5)


def test_reconstruction_and_train_mse_use_the_updated_weights(basic, implementation):
    npz, _ = basic
    config, model = model_for(basic, implementation, weights="w_after.")
    xhat = model.reconstruct(torch.as_tensor(npz[f"step{config.inference_steps}.h0"]))
    assert_rel(xhat, npz["xhat"], 1e-5, "xhat")
    assert_rel(clipped_mse(xhat, torch.as_tensor(npz["x"])), npz["train_mse"], 1e-5, "train_mse")
