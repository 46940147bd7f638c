"""How big do a fresh model's states and energy get, with the double vs the single residual?

The original's decoder adds the state twice (u = 2h + attn + mlp), so the run-start INIT forward
roughly doubles the state at every block: 2^12 over 12 blocks. Prints one JSON line per residual.

    python benchmarks/residual_growth.py [--blocks 12 --hidden 64 --heads 1 --batch 200]
"""

import argparse
import json

import torch

from pcvit import Config, PCViT, init_states, load_data


def measure(residual: str, args) -> dict:
    config = Config(dataset="synthetic", num_blocks=args.blocks, hidden_size=args.hidden, num_heads=args.heads,
                    residual=residual, train_subset=args.batch, device="cpu", seed=args.seed)
    data = load_data(config)
    generator = torch.Generator().manual_seed(config.seed)
    model = PCViT(config, data.channels, data.image_size, generator=generator)
    states = init_states(model, args.batch, True, generator)
    x = data.normalise(data.train_images[: args.batch])
    with torch.no_grad():
        energies = model.node_energies(x, states.top, states.hidden).sum(0)
    rms = states.hidden.square().mean(dim=(1, 2, 3)).sqrt()
    return {"residual": residual, "blocks": args.blocks, "hidden": args.hidden,
            "state_rms_node1": rms[0].item(), "state_rms_top_block": rms[-1].item(),
            "growth_bottom_over_top": (rms[-1] / rms[0]).item(),
            "energy_total": energies.sum().item(), "energy_sensory": energies[-1].item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--seed", type=int, default=10)
    args = p.parse_args()
    for residual in ("double", "single"):
        print(json.dumps(measure(residual, args)), flush=True)


if __name__ == "__main__":
    main()
