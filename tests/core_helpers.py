"""Tiny configs and models shared by the core's tests (imported by the test files)."""

from __future__ import annotations

import torch

from pcvit import Config, PCViT, States
from pcvit.inference import init_states

TINY = dict(dataset="synthetic", num_blocks=2, hidden_size=16, num_heads=2, batch_size=8, train_subset=64,
            test_subset=32, validation_subset=16, epochs=2, inference_steps=3, device="cpu",
            linear_probe_batch_size=16)


def tiny_config(**changes) -> Config:
    return Config(**{**TINY, **changes})


def tiny_model(config: Config, seed: int = 0, channels: int = 3, image_size: int = 32) -> PCViT:
    """A model whose LayerNorm gains/biases are moved off 1/0, so a misplaced one shows."""
    generator = torch.Generator().manual_seed(seed)
    model = PCViT(config, channels, image_size, generator=generator)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return model


def random_states(model: PCViT, batch: int, seed: int = 1, scale: float = 1.0) -> States:
    """States with non-zero errors at every node: the INIT forward plus noise."""
    generator = torch.Generator().manual_seed(seed)
    states = init_states(model, batch, True, generator)
    return States(states.top + 0.3 * scale * torch.randn(states.top.shape, generator=generator),
                  states.hidden + 0.3 * scale * torch.randn(states.hidden.shape, generator=generator))


def random_images(model: PCViT, batch: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.channels, model.image_size, model.image_size, generator=generator)
