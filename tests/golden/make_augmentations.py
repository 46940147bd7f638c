"""Write `data/augmentations.npz`: the original's augmentation pipeline, run by Kornia itself, with its own draws.

The original (FeherBalazs/cora, examples/debug_transformer_wandb.py, `setup_gpu_augmentations`) augments
normalised training batches with this Kornia pipeline. This script builds the same pipeline, lets Kornia draw
its parameters for a batch of normalised synthetic images, runs it, and stores the input, Kornia's draws and its
output, plus each colour operation and the blur on their own with fixed factors. `tests/golden/
test_augmentations.py` replays the draws through `pcvit.augment.apply` and compares.

Kornia is not a dependency of this project; run with Kornia importable (a separate folder on PYTHONPATH):

    pip install --target /tmp/kornia --no-deps kornia==0.8.1 kornia_rs   # the release of the original's time
    PYTHONPATH=/tmp/kornia:. python tests/golden/make_augmentations.py
"""

from __future__ import annotations

import json
import math
import pathlib

import kornia
import kornia.augmentation as K
import numpy as np
import torch

OUT = pathlib.Path(__file__).parent / "data" / "augmentations.npz"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the original's CIFAR-10 normalisation


def images(batch: int, seed: int) -> torch.Tensor:
    """Smooth random uint8 patterns, normalised as ToTensor + Normalize: values below 0 and above 1 occur."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x * 255).round().to(torch.uint8).float() / 255
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def main() -> None:
    torch.manual_seed(20250606)
    x = images(16, 1)
    pipeline = K.AugmentationSequential(  # the original's, verbatim parameters
        K.RandomResizedCrop(size=(32, 32), scale=(0.4, 1.0), ratio=(0.75, 1.33)),
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur(kernel_size=(3, 3), sigma=(0.1, 2.0), p=0.5),
        same_on_batch=False,
    )
    params = pipeline.forward_parameters(x.shape)
    out = pipeline(x, params=params)
    crop, flip, jitter, grey, blur = (p.data for p in params)
    src = crop["src"].long()
    arrays = {
        "x": x, "out": out,
        "box": torch.stack([src[:, 0, 0], src[:, 0, 1], src[:, 1, 0] - src[:, 0, 0] + 1,
                            src[:, 3, 1] - src[:, 0, 1] + 1], dim=1).float(),
        "flip": flip["batch_prob"] > 0.5,
        "factors": torch.stack([jitter["brightness_factor"], jitter["contrast_factor"],
                                jitter["saturation_factor"], jitter["hue_factor"]], dim=1),
        "order": jitter["order"].long(),
        "grey": grey["batch_prob"] > 0.5,
        "blur": blur["batch_prob"] > 0.5,
    }
    sigma = torch.zeros(len(x))  # Kornia draws a sigma for the blurred images only
    sigma[arrays["blur"]] = blur["sigma"].float()
    arrays["sigma"] = sigma
    # each operation alone, fixed factors that cover both sides of 1 (and hue both ways)
    f = torch.linspace(0.6, 1.4, len(x))
    hue = torch.linspace(-0.1, 0.1, len(x))
    arrays["op.factor"], arrays["op.hue"] = f, hue
    arrays["op.brightness"] = kornia.enhance.adjust_brightness_accumulative(x, f)
    arrays["op.contrast"] = kornia.enhance.adjust_contrast_with_mean_subtraction(x, f)
    arrays["op.saturation"] = kornia.enhance.adjust_saturation_with_gray_subtraction(x, f)
    arrays["op.hue_rotated"] = kornia.enhance.adjust_hue(x, hue * 2 * math.pi)
    clamped = x.clamp(0, 1)  # hue on in-range images too (the order puts hue after a clamp 3 times in 4)
    arrays["op.hue_rotated_clamped"] = kornia.enhance.adjust_hue(clamped, hue * 2 * math.pi)
    arrays["op.grey"] = kornia.color.rgb_to_grayscale(x)
    s = torch.linspace(0.1, 2.0, len(x))
    arrays["op.sigma"] = s
    arrays["op.blur"] = kornia.filters.gaussian_blur2d(x, (3, 3), torch.stack([s, s], dim=1), border_type="reflect",
                                                       separable=True)
    meta = {"kornia": kornia.__version__, "torch": torch.__version__, "seed": 20250606,
            "pipeline": "K.AugmentationSequential(RandomResizedCrop((32,32), scale=(0.4,1.0), ratio=(0.75,1.33)), "
                        "RandomHorizontalFlip(0.5), ColorJitter(0.4,0.4,0.4,0.1), RandomGrayscale(0.2), "
                        "RandomGaussianBlur((3,3), (0.1,2.0), p=0.5), same_on_batch=False)"}
    np.savez_compressed(OUT, **{k: v.numpy() for k, v in arrays.items()}, **{"meta.json": np.array(json.dumps(meta))})
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
