"""The original's SSL augmentations (`use_ssl_augmentations`): its Kornia pipeline, on the device, drawn per image.

The original normalises a training batch (ToTensor + Normalize) and then runs Kornia's

    RandomResizedCrop(S, scale=(0.4, 1.0), ratio=(0.75, 1.33))   p 1
    RandomHorizontalFlip                                          p 0.5
    ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)   p 1
    RandomGrayscale                                               p 0.2
    RandomGaussianBlur(3x3, sigma=(0.1, 2.0))                     p 0.5

on it, every draw per image. This module computes the same maths as batched tensor ops:

* crop: up to 10 tries of (area fraction U(0.4, 1), aspect exp(U(log 0.75, log 1.33))), w = floor(round(sqrt(
  area * aspect))), h likewise with area / aspect; the first with 0 < w < S and 0 < h < S wins, else a centre-ish
  fallback (w = S, h = round(0.75 S)); offsets floor(U(0,1) * (S - size + 1)); the box is resized back to S x S
  bilinearly with the corners aligned (`grid_sample`, which equals Kornia's slice + resize);
* brightness x*b, contrast x*c + m*(1-c) (m the image's grey mean), saturation g*(1-s) + x*s (g its grey image),
  b, c, s ~ U(0.6, 1.4), hue rotated by U(-0.1, 0.1) turns through HSV; each of the four clamps to [0, 1]. Kornia
  clamps in the normalised space the original feeds it, so negative (darker than the mean) values become 0: the
  original trained on that, and so does this;
* grey: 0.299 R + 0.587 G + 0.114 B in every channel; blur: a normalised 3-tap Gaussian per axis, reflect border.

Two deliberate differences, neither changes what a single image can get: Kornia draws one order of the four
colour adjustments per batch; here every image draws its own (each image's order is uniform either way). And
images of one channel (Fashion-MNIST): saturation, hue and grey have no colour to act on (Kornia leaves a grey
image unchanged by saturation and grey and refuses hue), so only crop, flip, brightness, contrast and blur act;
contrast blends towards the image's own mean, where Kornia would use the mean of the whole batch for grey images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

CROP_SCALE, CROP_RATIO, CROP_TRIES = (0.4, 1.0), (0.75, 1.33), 10
FLIP_P, GRAY_P, BLUR_P = 0.5, 0.2, 0.5
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.4, 0.1
BLUR_SIGMA, BLUR_TAPS = (0.1, 2.0), 3
GREY_WEIGHTS = (0.299, 0.587, 0.114)
HSV_EPS = 1e-8


@dataclass
class Draws:
    """Every random choice for a batch of B images, as (B, ...) tensors on the images' device."""

    box: Tensor  # (B, 4) crop x0, y0, w, h in pixels (whole numbers)
    flip: Tensor  # (B,) bool
    factors: Tensor  # (B, 4) brightness, contrast, saturation factors and the hue shift in turns
    order: Tensor  # (B, 4) the order of the four colour adjustments (0 brightness .. 3 hue)
    grey: Tensor  # (B,) bool
    blur: Tensor  # (B,) bool
    sigma: Tensor  # (B,)


def draw(batch: int, size: int, generator: torch.Generator) -> Draws:
    """The random choices for `batch` images of `size` x `size`, from `generator` (on the images' device)."""
    device = generator.device

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator, device=device)

    area = uniform(batch, CROP_TRIES, low=CROP_SCALE[0], high=CROP_SCALE[1]) * size * size
    aspect = torch.exp(uniform(batch, CROP_TRIES, low=math.log(CROP_RATIO[0]), high=math.log(CROP_RATIO[1])))
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w < size) & (h > 0) & (h < size)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    found = fits.any(dim=1)
    w = torch.where(found, w.gather(1, first)[:, 0], torch.tensor(float(size), device=device)).clamp(1, size)
    h = torch.where(found, h.gather(1, first)[:, 0], torch.tensor(float(round(size * CROP_RATIO[0])),
                                                                    device=device)).clamp(1, size)
    x0 = (uniform(batch) * (size - w + 1)).floor()
    y0 = (uniform(batch) * (size - h + 1)).floor()
    flip = uniform(batch) < FLIP_P
    factors = torch.stack([uniform(batch, low=1 - BRIGHTNESS, high=1 + BRIGHTNESS),
                           uniform(batch, low=1 - CONTRAST, high=1 + CONTRAST),
                           uniform(batch, low=1 - SATURATION, high=1 + SATURATION),
                           uniform(batch, low=-HUE, high=HUE)], dim=1)
    order = uniform(batch, 4).argsort(dim=1)
    grey, blur = uniform(batch) < GRAY_P, uniform(batch) < BLUR_P
    sigma = uniform(batch, low=BLUR_SIGMA[0], high=BLUR_SIGMA[1])
    return Draws(torch.stack([x0, y0, w, h], dim=1), flip, factors, order, grey, blur, sigma)


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """A normalised batch (B, C, S, S), C = 1 or 3, augmented with fresh draws from `generator`."""
    return apply(x, draw(len(x), x.shape[-1], generator))


def apply(x: Tensor, d: Draws) -> Tensor:
    """The pipeline with the given draws: crop, flip, colour jitter, grey, blur. (B, C, S, S) -> same shape."""
    x = resized_crop(x, d.box)
    x = torch.where(d.flip[:, None, None, None], x.flip(-1), x)
    x = colour_jitter(x, d.factors, d.order)
    if x.shape[1] == 3:
        x = torch.where(d.grey[:, None, None, None], grey(x).expand_as(x), x)
    return torch.where(d.blur[:, None, None, None], gaussian_blur(x, d.sigma), x)


def resized_crop(x: Tensor, box: Tensor) -> Tensor:
    """Each image's box (x0, y0, w, h) resized to the whole image, bilinear with the corners aligned."""
    B, _, S, _ = x.shape
    t = torch.linspace(0, 1, S, device=x.device, dtype=x.dtype)  # output pixel j -> j / (S - 1)
    x0, y0, w, h = (box[:, i, None].to(x.dtype) for i in range(4))
    src_x, src_y = x0 + t * (w - 1), y0 + t * (h - 1)  # (B, S) source pixel coordinates
    gx, gy = 2 * src_x / (S - 1) - 1, 2 * src_y / (S - 1) - 1  # grid_sample's [-1, 1], corners aligned
    grid = torch.stack([gx[:, None, :].expand(B, S, S), gy[:, :, None].expand(B, S, S)], dim=-1)  # (B, S, S, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def grey(x: Tensor) -> Tensor:
    """(B, 3, S, S) -> (B, 1, S, S) luma."""
    r, g, b = x.unbind(1)
    return (GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b)[:, None]


def colour_jitter(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """Brightness, contrast, saturation and hue, each image in its own order; one channel: the first two only."""
    per_image = lambda v: v[:, None, None, None]  # noqa: E731
    b, c, s, hue = (per_image(factors[:, i]) for i in range(4))

    def brightness(v: Tensor) -> Tensor:
        return (v * b).clamp(0, 1)

    def contrast(v: Tensor) -> Tensor:
        mean = (grey(v) if v.shape[1] == 3 else v).mean(dim=(-3, -2, -1), keepdim=True)
        return (v * c + mean * (1 - c)).clamp(0, 1)

    def saturation(v: Tensor) -> Tensor:
        return ((1 - s) * grey(v) + s * v).clamp(0, 1) if v.shape[1] == 3 else v

    def hue_shift(v: Tensor) -> Tensor:
        return rotate_hue(v, hue * 2 * math.pi) if v.shape[1] == 3 else v

    adjustments = (brightness, contrast, saturation, hue_shift)
    for position in range(4):
        which = per_image(order[:, position])
        out = x
        for i, adjust in enumerate(adjustments):
            out = torch.where(which == i, adjust(x), out)
        x = out
    return x


def rotate_hue(x: Tensor, radians: Tensor) -> Tensor:
    """RGB -> HSV (hue in [0, 2 pi)), hue + radians (fmod 2 pi), -> RGB; Kornia's formulas, eps included."""
    r, g, b = x.unbind(1)
    v, low = x.amax(1), x.amin(1)
    delta = v - low
    s = delta / (v + HSV_EPS)
    delta = torch.where(delta == 0, torch.ones_like(delta), delta)
    h = torch.where((r >= g) & (r >= b), g - b,
                    torch.where(g >= b, (b - r) + 2 * delta, (r - g) + 4 * delta)) / delta
    h = 2 * math.pi * ((h / 6.0) % 1.0)
    h = torch.fmod(h + radians[:, 0], 2 * math.pi) / (2 * math.pi)
    sector = torch.floor(h * 6) % 6
    f = (h * 6) % 6 - sector
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    sector = sector.long().clamp(0, 5)
    def pick(*values: Tensor) -> Tensor:  # the value of each pixel's hue sector
        out = values[-1]
        for i in range(len(values) - 2, -1, -1):
            out = torch.where(sector == i, values[i], out)
        return out

    return torch.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], dim=1)


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Each image blurred by a normalised 3-tap Gaussian of its own sigma along both axes, reflect border."""
    B, C, S, _ = x.shape
    taps = torch.arange(BLUR_TAPS, device=x.device, dtype=x.dtype) - BLUR_TAPS // 2
    kernel = torch.exp(-taps.square() / (2 * sigma[:, None].to(x.dtype).square()))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, taps)
    weights = kernel.repeat_interleave(C, dim=0)  # one kernel per (image, channel), as grouped convolution
    pad = BLUR_TAPS // 2
    v = x.reshape(1, B * C, S, S)
    v = F.conv2d(F.pad(v, (pad, pad, 0, 0), mode="reflect"), weights[:, None, None, :], groups=B * C)
    v = F.conv2d(F.pad(v, (0, 0, pad, pad), mode="reflect"), weights[:, None, :, None], groups=B * C)
    return v.reshape(B, C, S, S)
