"""Linear probe: how linearly separable are the features the PC model infers for an image?

Features: for every image, settle the states for T steps from the model's current states (the same
starting state for every batch; nothing is written back) with a constant state lr, then average the
chosen nodes over the patches (node 0, the top latent, gives P = 48 features on CIFAR-10). Standardise
with the training statistics, fit a linear softmax classifier with AdamW, report the best test accuracy
over the probe epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import Config
from .data import ImageData
from .inference import States, init_states, layer_scales, settle_states, settle_states_adamw
from .model import PCViT


@torch.no_grad()
def extract_features(model: PCViT, states: States, images: Tensor, data: ImageData, config: Config) -> Tensor:
    """(n, C, S, S) uint8 images -> (n, F) features; the model's states are left untouched.

    Each batch starts from the model's current states (slot i from slot i), or, with
    `use_status_init_in_unmasking`, from fresh states drawn from a generator seeded with `linear_probe_seed`."""
    scales = layer_scales(config, model.top_shared_by)
    lr = config.hidden_lr_inference
    B = states.batch_size
    fresh = torch.Generator().manual_seed(config.linear_probe_seed) if config.use_status_init_in_unmasking else None
    features = []
    for start in range(0, len(images), B):
        x = data.normalise(images[start:start + B])
        if fresh is not None:
            start_states = init_states(model, len(x), config.use_noise, fresh)
        else:
            start_states = states.head(len(x))  # slot i starts from slot i; a partial batch uses the first slots
        if config.use_adamw_for_hidden_optimizer:  # the one place where the original's AdamW switch acts
            final = settle_states_adamw(model, x, start_states, config.probe_steps, lr, config.h_grad_clip_norm,
                                        scales, grad_norm_target=config.grad_norm_target)
        else:
            final = settle_states(model, x, start_states, config.probe_steps, lambda t: lr, config.hidden_momentum,
                                  config.h_grad_clip_norm, scales, grad_norm_target=config.grad_norm_target)
        nodes = final.as_list()
        features.append(torch.cat([nodes[i].mean(dim=1) for i in config.linear_probe_vode_indices], dim=1))
    return torch.cat(features)


def standardise(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """(f - mean) / (std + 1e-7) with the training set's statistics (std with ddof 0, as np.std)."""
    mean = train.mean(dim=0)
    std = train.std(dim=0, unbiased=False)
    return (train - mean) / (std + 1e-7), (test - mean) / (std + 1e-7)


@dataclass
class ProbeFit:
    """A fitted probe: its test accuracy, how many optimiser steps it took, and whether that was enough."""

    accuracy: float
    steps: int  # AdamW minibatch steps, or L-BFGS iterations
    converged: bool  # adamw: its loss had settled (linear_probe_converged_change); lbfgs: stopped by its tolerance

    def describe(self) -> str:
        return "" if self.converged else f" (probe NOT converged: {self.steps} steps; raise linear_probe_epochs " \
                                         "or use linear_probe_solver=lbfgs)"


LBFGS_MAX_ITERATIONS = 1000


def fit_linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, config: Config,
                     num_classes: int = 10) -> ProbeFit:
    """Train a linear softmax head on standardised features and measure it on the test features.

    adamw (the original): linear_probe_epochs of shuffled minibatches, best test accuracy over the epochs.
    lbfgs: the same loss (mean cross-entropy + the decay as an L2 penalty) on the whole set until converged."""
    train_x, test_x = standardise(train_x.float(), test_x.float())
    if not (torch.isfinite(train_x).all() and torch.isfinite(test_x).all()):
        return ProbeFit(1.0 / num_classes, 0, True)  # NaN features carry no information: chance level
    generator = torch.Generator().manual_seed(config.linear_probe_seed)
    n_features = train_x.shape[1]
    bound = math.sqrt(6.0 / (n_features + num_classes))  # glorot-uniform weights, zero bias
    weight = torch.empty(n_features, num_classes).uniform_(-bound, bound, generator=generator)
    weight = weight.to(train_x.device).requires_grad_(True)
    bias = torch.zeros(num_classes, device=train_x.device, requires_grad=True)

    def test_accuracy() -> float:
        with torch.no_grad():
            return ((test_x @ weight + bias).argmax(dim=1) == test_y).float().mean().item()  # GPU sync

    if config.linear_probe_solver == "lbfgs":
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=LBFGS_MAX_ITERATIONS, history_size=20,
                                      tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            decay = 0.5 * config.linear_probe_wd * weight.square().sum()
            loss = F.cross_entropy(train_x @ weight + bias, train_y) + decay
            loss.backward()
            return loss

        optimizer.step(closure)
        iterations = optimizer.state[weight]["n_iter"]
        return ProbeFit(test_accuracy(), iterations, iterations < LBFGS_MAX_ITERATIONS)

    optimizer = torch.optim.AdamW([weight, bias], lr=config.linear_probe_lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=config.linear_probe_wd)
    best, losses = 0.0, []
    B = config.linear_probe_batch_size
    for _ in range(config.linear_probe_epochs):
        order = torch.randperm(len(train_x), generator=generator).to(train_x.device)
        for start in range(0, len(order), B):
            idx = order[start:start + B]
            loss = F.cross_entropy(train_x[idx] @ weight + bias, train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        best = max(best, test_accuracy())
    return ProbeFit(best, len(losses), loss_settled(torch.stack(losses), config.linear_probe_converged_change))


def loss_settled(losses: Tensor, tolerance: float) -> bool:
    """True when the mean loss of the last tenth of the steps differs from that of the tenth before it by at most
    `tolerance` times the first tenth's: the head has stopped learning, whatever the number of steps (measured
    against where the loss started, so a loss near zero that still creeps does not count as learning).
    Fewer than 20 steps: never."""
    window = len(losses) // 10
    if window < 2:
        return False
    first, before, last = (losses[s].mean().item() for s in  # GPU syncs, once per probe
                           (slice(0, window), slice(-2 * window, -window), slice(-window, None)))
    return abs(last - before) <= tolerance * abs(first)


def probe_features(model: PCViT, states: States, data: ImageData, config: Config) -> tuple[Tensor, Tensor]:
    """The probe's features: of the training subset and of the first `test_subset` test images."""
    return (extract_features(model, states, data.train_images, data, config),
            extract_features(model, states, data.test_images[: config.test_subset], data, config))


def probe_accuracy(model: PCViT, states: States, data: ImageData, config: Config,
                   features: tuple[Tensor, Tensor] | None = None) -> ProbeFit:
    """The whole probe: `probe_features` (unless given), then the head fitted on them."""
    train_features, test_features = features if features is not None else probe_features(model, states, data, config)
    return fit_linear_probe(train_features, data.train_labels, test_features,
                            data.test_labels[: config.test_subset], config)
