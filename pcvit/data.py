"""Datasets kept whole on the training device as uint8, normalised per batch (no DataLoader).

* `cifar10`: torchvision's on-disk format (`cifar-10-batches-py/`); downloaded only with `download=True`.
* `fashion-mnist`: the IDX files (gzipped or not) that Debian's `dataset-fashion-mnist` installs.
* `synthetic`: class-structured smooth 3x32x32 images made from a seed, for tests and demos.

Subsets take the FIRST n images, as the original: train = first `train_subset`, validation = first
`validation_subset` test images, probe test set = first `test_subset` test images.
"""

from __future__ import annotations

import gzip
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import Config

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CIFAR10_DIR = "data/cifar10"
NORMALISATION = {  # per-dataset (mean, std) per channel, used when use_cifar10_norm is true
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # the original's constants
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


class DatasetError(RuntimeError):
    """The dataset cannot be loaded: says which folder and what to do."""


@dataclass
class ImageData:
    """A dataset on one device: uint8 images (N, C, S, S), int64 labels, and its normalisation."""

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    mean: Tensor  # (1, C, 1, 1) float32
    std: Tensor

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.train_images.device

    def normalise(self, images: Tensor) -> Tensor:
        """uint8 (B, C, S, S) -> float32 in normalised space: (x/255 - mean)/std, as ToTensor + Normalize."""
        return (images.float() / 255.0 - self.mean) / self.std


_CACHE: dict[tuple, ImageData] = {}


def load_data(config: Config, device: torch.device | str | None = None) -> ImageData:
    """Load (once per process, cached by dataset, folder, subsets, normalisation and device) and move to device."""
    device = torch.device(device if device is not None else resolve_device(config.device))
    key = (config.dataset, config.data_dir, config.train_subset, max(config.test_subset, config.validation_subset),
           config.use_cifar10_norm, config.seed if config.dataset == "synthetic" else None, str(device))
    if key not in _CACHE:
        if len(_CACHE) >= 2:  # a worker sweeps one dataset; do not hold stale copies on the GPU
            _CACHE.clear()
        _CACHE[key] = _load(config, device)
    return _CACHE[key]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load(config: Config, device: torch.device) -> ImageData:
    n_test = max(config.test_subset, config.validation_subset)
    if config.dataset == "cifar10":
        train_x, train_y, test_x, test_y = _read_cifar10(Path(config.data_dir or CIFAR10_DIR), config.download)
    elif config.dataset == "fashion-mnist":
        train_x, train_y, test_x, test_y = _read_fashion_mnist(Path(config.data_dir or FASHION_MNIST_DIR))
    else:
        train_x, train_y = synthetic_images(config.train_subset, seed=config.seed)
        test_x, test_y = synthetic_images(n_test, seed=config.seed + 1_000_003)
    for what, have, want in (("train_subset", len(train_x), config.train_subset), ("test images", len(test_x), n_test)):
        if have < want:
            raise DatasetError(f"{config.dataset}: {what} asks for {want} images but the dataset has {have}")
    mean, std = NORMALISATION[config.dataset] if config.use_cifar10_norm else ((0.5,) * 3, (0.5,) * 3)
    channels = train_x.shape[1]
    as_tensor = lambda a: torch.from_numpy(np.array(a)).to(device)  # noqa: E731  (a writable copy)
    return ImageData(
        name=config.dataset,
        train_images=as_tensor(train_x[: config.train_subset]),
        train_labels=as_tensor(train_y[: config.train_subset].astype(np.int64)),
        test_images=as_tensor(test_x[:n_test]),
        test_labels=as_tensor(test_y[:n_test].astype(np.int64)),
        mean=torch.tensor(mean[:channels], dtype=torch.float32, device=device).reshape(1, channels, 1, 1),
        std=torch.tensor(std[:channels], dtype=torch.float32, device=device).reshape(1, channels, 1, 1),
    )


def _read_cifar10(root: Path, download: bool):
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir():
        if not download:
            raise DatasetError(f"CIFAR-10 not found in {folder}. Download it once with `python -m pcvit.data "
                               f"{root}`, or put torchvision's 'cifar-10-batches-py' there, or point data_dir "
                               "at its parent (runs download only with download: true).")
        import torchvision  # only needed to download

        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    def read(names):
        xs, ys = [], []
        for name in names:
            path = folder / name
            if not path.is_file():
                raise DatasetError(f"CIFAR-10 file missing: {path}")
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    train_x, train_y = read([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = read(["test_batch"])
    return train_x, train_y, test_x, test_y


def _read_fashion_mnist(folder: Path):
    def read_idx(stem: str) -> np.ndarray:
        for path in (folder / f"{stem}.gz", folder / stem):
            if path.is_file():
                opener = gzip.open if path.suffix == ".gz" else open
                with opener(path, "rb") as f:
                    raw = f.read()
                break
        else:
            raise DatasetError(f"Fashion-MNIST file {stem}(.gz) not found in {folder}. "
                               "Install it with `apt-get install dataset-fashion-mnist`, or set data_dir.")
        magic = int.from_bytes(raw[:4], "big")
        if magic >> 8 != 0x08:  # 0x08 = unsigned byte data
            raise DatasetError(f"{folder / stem}: not an IDX file of unsigned bytes (magic {magic:#x})")
        ndim = magic & 0xFF
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)

    train_x = read_idx("train-images-idx3-ubyte")[:, None]
    test_x = read_idx("t10k-images-idx3-ubyte")[:, None]
    return train_x, read_idx("train-labels-idx1-ubyte"), test_x, read_idx("t10k-labels-idx1-ubyte")


def synthetic_images(n: int, seed: int, classes: int = 10, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Each class is a smooth random colour pattern; samples add a random shift in brightness and noise.

    The class templates come from a fixed seed so that train and test share them; `seed` draws the samples.
    """
    templates_rng = np.random.default_rng(20260101)
    coarse = templates_rng.uniform(0, 1, size=(classes, 3, 4, 4))
    templates = coarse.repeat(size // 4, axis=2).repeat(size // 4, axis=3)  # (classes, 3, S, S) blocky
    kernel = np.ones(5) / 5  # smooth the blocks a little
    templates = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), 3, templates)
    templates = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), 2, templates)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    brightness = rng.uniform(-0.1, 0.1, size=(n, 1, 1, 1))
    noise = rng.normal(0, 0.05, size=(n, 3, size, size))
    images = np.clip(templates[labels] + brightness + noise, 0, 1)
    return (images * 255).round().astype(np.uint8), labels.astype(np.int64)



def main(argv: list[str] | None = None) -> int:
    """`python -m pcvit.data [FOLDER]`: download CIFAR-10 once, before starting workers (they never download)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pcvit.data", description=main.__doc__)
    p.add_argument("folder", nargs="?", default=CIFAR10_DIR, help=f"where to put it (default {CIFAR10_DIR})")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    existed = folder.exists()
    try:
        train_x, _, test_x, _ = _read_cifar10(folder, download=True)
    except (OSError, DatasetError, RuntimeError) as exc:  # URLError is an OSError; torchvision raises RuntimeError
        if not existed:  # a failed download leaves nothing behind (torchvision made the folder, maybe a partial file)
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        reason = getattr(exc, "reason", None) or exc
        print(f"python -m pcvit.data: error: cannot download CIFAR-10 into {args.folder}: {reason} (no network? "
              "copy torchvision's 'cifar-10-batches-py' folder there instead)", file=sys.stderr)
        return 1
    print(f"CIFAR-10 ready in {args.folder}: {len(train_x)} train, {len(test_x)} test images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
