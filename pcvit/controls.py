"""Controls for the linear probe: what learned features must beat, each probed the same way on the same images.

A probe accuracy means little alone: on Fashion-MNIST a linear head on almost anything scores well above
chance. Each control keeps the probe protocol (the same training and test images, standardisation, head,
optimiser and epochs) and changes only where the features come from:

* `raw_patches`: the patch-averaged normalised pixels, no model (the weakest: it keeps only the patch mean).
* `untrained`: the same network at its initialisation (same seed, so the same weights and starting states the
  trained run began from), settled by the same inference; its weights are never updated. Training must beat
  this for predictive coding to have learned anything.
* `pca`: a PCA of the training pixels to the probed feature dimension (the number of features the model
  gives the probe). Features worth probing should beat this: it is the best linear code of that size.
* `pixels`: every normalised pixel, no model: the probe is then the best linear classifier of the pixels it can
  fit, the level that features which are an affine map of the image (see `linearity`) are held to.

`probe_controls` returns every control with the seconds it took; `pcvit-train --baseline` prints them and the
summary JSON holds them (`untrained_baseline`, `pca_baseline`, `pca_components`, `raw_patch_baseline`,
`pixel_baseline`).

Beside the controls, `linearity` asks how much of the features a linear map of the image already gives: the R^2,
on the test images, of an affine map from the pixels to the features fitted on the training images (ridge by
generalised cross-validation). At 1 the network computes nothing a linear map of the pixels does not: a linear
head on such features is a linear classifier of the pixels, and no depth changes that (`untrained_linearity_r2`,
`feature_linearity_r2`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import Config
from .data import ImageData
from .inference import States, init_states
from .model import PCViT, patchify
from .probe import ProbeFit, extract_features, fit_linear_probe, probe_features

CONTROLS = ("raw_patches", "untrained", "pca", "pixels")
BATCH = 1000  # images per step when computing pixel features


@dataclass
class Controls:
    """The controls of one config: a fitted probe per control, the PCA's size, and the seconds they took."""

    fits: dict[str, ProbeFit]
    pca_components: int
    time_s: float
    untrained_linearity: float | None = None  # R^2 of the untrained features as an affine map of the pixels

    def summary(self) -> dict[str, float | int]:
        """The summary JSON's keys (and the study's trial attributes)."""
        names = {"raw_patches": "raw_patch_baseline", "untrained": "untrained_baseline", "pca": "pca_baseline",
                 "pixels": "pixel_baseline"}
        linear = {} if self.untrained_linearity is None else \
            {"untrained_linearity_r2": round(self.untrained_linearity, 4)}
        return {**{names[k]: round(fit.accuracy, 4) for k, fit in self.fits.items()},
                "pca_components": self.pca_components, **linear, "controls_time_s": round(self.time_s, 1)}

    def describe(self) -> str:
        """One line: `raw patches 0.35 | untrained network 0.44 | PCA-16 of the pixels 0.79`."""
        labels = {"raw_patches": "raw patches", "untrained": "untrained network",
                  "pca": f"PCA-{self.pca_components} of the pixels", "pixels": "all the pixels"}
        return " | ".join(f"{labels[k]} {fit.accuracy:.4f}{fit.describe()}" for k, fit in self.fits.items())


def probe_controls(data: ImageData, config: Config, which: tuple[str, ...] = CONTROLS) -> Controls:
    """Probe each control in `which` with `config`'s probe protocol on `data`'s images."""
    unknown = set(which) - set(CONTROLS)
    if unknown:
        raise ValueError(f"unknown controls {sorted(unknown)}; known: {', '.join(CONTROLS)}")
    start = time.perf_counter()
    test_images, test_labels = data.test_images[: config.test_subset], data.test_labels[: config.test_subset]

    def fit(train_x: Tensor, test_x: Tensor) -> ProbeFit:
        return fit_linear_probe(train_x, data.train_labels, test_x, test_labels, config)

    model, states = untrained_network(data, config)
    width = probed_width(model, config)
    fits, untrained_linearity = {}, None
    for name in which:
        if name == "raw_patches":
            fits[name] = fit(patch_means(data, data.train_images, config), patch_means(data, test_images, config))
        elif name == "untrained":
            features = (extract_features(model, states, data.train_images, data, config),
                        extract_features(model, states, test_images, data, config))
            fits[name] = fit(*features)
            untrained_linearity = linearity(data, test_images, *features)
        elif name == "pca":
            fits[name] = fit(*pca_features(data, data.train_images, test_images, width))
        else:
            fits[name] = fit(pixels(data, data.train_images), pixels(data, test_images))
    return Controls(fits, width, time.perf_counter() - start, untrained_linearity)


def untrained_network(data: ImageData, config: Config) -> tuple[PCViT, States]:
    """The model and starting states a run with `config` begins from (the same generator draws, in order)."""
    generator = torch.Generator().manual_seed(config.seed)
    model = PCViT(config, data.channels, data.image_size, generator=generator).to(data.device)
    return model, init_states(model, config.batch_size, config.use_noise, generator)


def probed_width(model: PCViT, config: Config) -> int:
    """How many features the probe reads: the summed widths of the probed nodes (node 0, the top latent, has one
    value per patch feature; every other node the hidden size)."""
    return sum(model.patch_dim if i == 0 else config.hidden_size for i in config.linear_probe_vode_indices)


def patch_means(data: ImageData, images: Tensor, config: Config) -> Tensor:
    """(n, P): the normalised pixels of each patch, averaged over the patches."""
    return torch.cat([patchify(data.normalise(images[s:s + BATCH]), config.patch_size).mean(dim=1)
                      for s in range(0, len(images), BATCH)])


RIDGES = torch.logspace(-8, 1, 19, dtype=torch.float64)  # candidate ridges, in units of the mean input variance


class AffineFit:
    """`affine_r2` with the inputs' side done once, for any number of target sets: the training inputs centred
    and the eigenbasis of X^T X (on CIFAR-10 pixels, 50,000 x 3,072: most of the work)."""

    def __init__(self, train_inputs: Tensor, test_inputs: Tensor):
        n, d = train_inputs.shape
        self.usable = n > d + 1  # else the fit would interpolate the training rows and say nothing
        if not self.usable:
            return
        self.n, self.test_inputs = n, test_inputs
        self.x = train_inputs.to(torch.float64, copy=True)
        self.x_mean = self.x.mean(dim=0)
        self.x.sub_(self.x_mean)  # in place: on CIFAR-10 x is 50,000 x 3,072 numbers
        variances, self.axes = torch.linalg.eigh(self.x.T @ self.x)  # X^T X = V diag(s^2) V^T
        self.variances = variances.clamp_min(0)

    def r2(self, train_targets: Tensor, test_targets: Tensor) -> float | None:
        """R^2 on the test rows of the ridge-regularised affine map to these targets (see `affine_r2`)."""
        if not self.usable:
            return None
        y = train_targets.to(torch.float64, copy=True)
        y_mean = y.mean(dim=0)
        y.sub_(y_mean)
        along = self.axes.T @ (self.x.T @ y)  # (d, k): V^T X^T Y
        total = y.square().sum()
        best = None
        for ridge in RIDGES * self.variances.mean():
            shrink = 1 / (self.variances + ridge)
            fitted = shrink[:, None] * along  # the map in the eigenbasis; |Y - X W|^2 below without forming X W
            residual = total - 2 * (along * fitted).sum() + (self.variances[:, None] * fitted.square()).sum()
            dof = (self.variances * shrink).sum()
            score = self.n * residual.clamp_min(0) / (self.n - dof).clamp_min(1e-12) ** 2
            if best is None or score < best[0]:
                best = (score, fitted)
        weights = self.axes @ best[1]  # (d, k)
        test = test_targets.double()
        predicted = (self.test_inputs.double() - self.x_mean) @ weights + y_mean
        residual = (test - predicted).square().sum(dim=0)
        variance = (test - test.mean(dim=0)).square().sum(dim=0).clamp_min(1e-30)
        return (1 - residual / variance).mean().item()


def affine_r2(train_inputs: Tensor, test_inputs: Tensor, train_targets: Tensor, test_targets: Tensor) -> float | None:
    """R^2 on the test rows of a ridge-regularised affine map from inputs to targets fitted on the training rows:
    the mean over the targets of 1 - residual / variance. The ridge is the one of `RIDGES` with the least
    generalised cross-validation error on the training rows (Golub, Heath & Wahba 1979), so that a map which is
    nearly but not exactly affine is not judged by a fit that learned the training rows' noise. None when there
    are not more training rows than input columns (the fit would interpolate them and say nothing)."""
    return AffineFit(train_inputs, test_inputs).r2(train_targets, test_targets)


def pixel_fit(data: ImageData, test_images: Tensor) -> AffineFit:
    """An `AffineFit` from the pixels of the training images (`data.train_images`) and of `test_images`."""
    return AffineFit(pixels(data, data.train_images), pixels(data, test_images))


def linearity(data: ImageData, test_images: Tensor, train_features: Tensor, test_features: Tensor) -> float | None:
    """`affine_r2` from the pixels of the training images (`data.train_images`, the rows of `train_features`)
    and of `test_images` to their features."""
    return pixel_fit(data, test_images).r2(train_features, test_features)


def feature_linearity(model: PCViT, states: States, data: ImageData, config: Config,
                      features: tuple[Tensor, Tensor] | None = None) -> float | None:
    """`linearity` of the probed features of `model`: `features` (train, test) when the run's last probe left
    them (no extra pass; `pcvit-train` probes after its last epoch), else one more feature pass."""
    train, test = features if features is not None else probe_features(model, states, data, config)
    return linearity(data, data.test_images[: config.test_subset], train, test)


def pixels(data: ImageData, images: Tensor) -> Tensor:
    return torch.cat([data.normalise(images[s:s + BATCH]).flatten(1) for s in range(0, len(images), BATCH)])


def pca_features(data: ImageData, train_images: Tensor, test_images: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Both sets projected on the top-`k` principal axes of the training pixels (centred with their mean)."""
    train, test = pixels(data, train_images).double(), pixels(data, test_images).double()
    mean = train.mean(dim=0)
    axes = principal_axes(train - mean, k)
    return ((train - mean) @ axes).float(), ((test - mean) @ axes).float()


def principal_axes(centred: Tensor, k: int) -> Tensor:
    """(d, k) unit axes of the `k` largest variances of the rows of `centred` (n, d), smallest first, through
    whichever of the d x d covariance and the n x n Gram matrix is smaller (the same axes)."""
    k = min(k, *centred.shape)
    if len(centred) >= centred.shape[1]:
        return torch.linalg.eigh(centred.T @ centred)[1][:, -k:]  # ascending eigenvalues
    values, vectors = torch.linalg.eigh(centred @ centred.T)
    return centred.T @ vectors[:, -k:] / values[-k:].clamp_min(1e-12).sqrt()


@dataclass
class NodeProbe:
    """One node's probe: its patch-averaged state, trained and untrained, beside a PCA of the pixels to its width."""

    node: int
    width: int
    trained: float
    untrained: float
    pca: float
    linearity: float | None  # R^2 of the trained node's state as an affine map of the pixels (`linearity`)

    HEADER = "    node  width  trained  untrained  PCA of its width  R^2 linear in the pixels"

    def row(self) -> str:
        name = "0 (top)" if self.node == 0 else str(self.node)
        linear = "-" if self.linearity is None else f"{self.linearity:.4f}"
        return (f"{name:>8} {self.width:>6} {self.trained:>8.4f} {self.untrained:>10.4f} {self.pca:>17.4f} "
                f"{linear:>25}")


def probe_each_node(model: PCViT, states: States, data: ImageData, config: Config) -> list[NodeProbe]:
    """Where the features are: every node probed alone (one inference pass gives all of them), the same node of
    the untrained network beside it, and a PCA of the pixels to its width; the probe protocol of `config`."""
    every = config.replace(linear_probe_vode_indices=tuple(range(config.num_blocks + 2)))
    test_images, test_labels = data.test_images[: config.test_subset], data.test_labels[: config.test_subset]
    untrained_model, untrained_states = untrained_network(data, config)
    features = {name: (extract_features(m, s, data.train_images, data, every),
                       extract_features(m, s, test_images, data, every))
                for name, (m, s) in {"trained": (model, states), "untrained": (untrained_model, untrained_states)}.items()}
    pca: dict[int, float] = {}
    fit = pixel_fit(data, test_images)  # one eigendecomposition of the pixels for every node's R^2
    rows, start = [], 0
    for node in every.linear_probe_vode_indices:
        width = model.patch_dim if node == 0 else config.hidden_size
        columns = slice(start, start + width)
        start += width
        accuracy = {name: fit_linear_probe(train[:, columns], data.train_labels, test[:, columns], test_labels,
                                           config).accuracy for name, (train, test) in features.items()}
        if width not in pca:
            train_pca, test_pca = pca_features(data, data.train_images, test_images, width)
            pca[width] = fit_linear_probe(train_pca, data.train_labels, test_pca, test_labels, config).accuracy
        trained_train, trained_test = features["trained"]
        linear = fit.r2(trained_train[:, columns], trained_test[:, columns])
        rows.append(NodeProbe(node, width, accuracy["trained"], accuracy["untrained"], pca[width], linear))
    return rows
