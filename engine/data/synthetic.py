"""A seeded, class-structured, CIFAR-shaped dataset that needs no files.

Each class has a smooth random prototype image (low-frequency noise, upsampled).
A sample is its class prototype, randomly shifted (so raw-pixel templates blur
while a convolutional network can still match it), with a random contrast, plus
a per-sample smooth deformation field and pixel noise, clipped to uint8. The
deformation is about as strong as the prototype, so classes overlap: nothing
reaches 100%, a nearest-class-mean classifier on raw pixels is well above chance,
and a small CNN does better still (see the measurements on
:func:`load_synthetic`).

Everything is drawn from CPU ``torch.Generator`` streams seeded from ``seed``,
so the bits are identical on any machine for the same arguments.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .dataset import Dataset

# Shape of the generator, tuned so the task is learnable but not trivial (see
# the measurements on load_synthetic).
PROTO_GRID = 4  # prototypes are randn on a 4x4 grid upsampled: blobs ~8 px wide at 32 px
DEFORM_GRID = 4  # per-sample deformation field, same scale as the prototypes
DEFORM_SCALE = 0.9  # deformation std relative to the (unit-std) prototype
PIXEL_NOISE = 0.35  # i.i.d. pixel noise std, same units
MAX_SHIFT = 4  # prototypes are shifted by up to this many pixels each way
CONTRAST = (0.6, 1.4)  # per-sample multiplier of the prototype
PIXEL_CENTER, PIXEL_SCALE = 120.0, 45.0  # map unit-std fields to uint8 without much clipping
CHUNK = 4096  # samples generated at once: bounds memory at ~50 MB of float32


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images ``(N, C, H, W)``, pixels scaled to [0, 1].

    Exact and without a float copy of the images: a 256-bin histogram per
    channel (~0.4 s for CIFAR-10's train split on 2 cores, against ~3.5 s for a
    float64 ``sum``).
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        n = hist.sum()
        mean = (hist * values).sum() / n
        var = (hist * values.square()).sum() / n - mean.square()
        means.append(round(float(mean), 6))
        stds.append(round(float(var.clamp_min(0).sqrt()), 6))
    return tuple(means), tuple(stds)


def _generator(seed: int, stream: int) -> torch.Generator:
    """An independent CPU generator per (seed, stream): prototypes, train, test."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + stream)


def _smooth_noise(n: int, size: int, grid: int, g: torch.Generator) -> torch.Tensor:
    """``(n, 3, size, size)`` float32 low-frequency noise: randn on ``grid``² upsampled."""
    coarse = torch.randn(n, 3, grid, grid, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def _prototypes(num_classes: int, size: int, g: torch.Generator) -> torch.Tensor:
    """``(K, 3, size, size)`` smooth class prototypes, each scaled to unit std."""
    protos = _smooth_noise(num_classes, size, PROTO_GRID * size // 32 + 1, g)
    protos = protos - protos.mean(dim=(1, 2, 3), keepdim=True)
    return protos / protos.std(dim=(1, 2, 3), keepdim=True)


def _shifted_crops(big: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, size: int):
    """Crop ``(B, C, size, size)`` windows of ``big`` ``(B, C, S, S)`` at offsets ``dy, dx``."""
    ar = torch.arange(size)
    rows = (dy[:, None] + ar)[:, None, :, None]  # (B, 1, size, 1)
    cols = (dx[:, None] + ar)[:, None, None, :]  # (B, 1, 1, size)
    b = torch.arange(big.shape[0])[:, None, None, None]
    c = torch.arange(big.shape[1])[None, :, None, None]
    return big[b, c, rows, cols]


def _samples(protos: torch.Tensor, n: int, size: int, g: torch.Generator):
    """``n`` samples ``(n, 3, size, size)`` uint8 and balanced int64 labels ``(n,)``."""
    k = protos.shape[0]
    y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    x = torch.empty(n, 3, size, size, dtype=torch.uint8)
    lo, hi = CONTRAST
    for start in range(0, n, CHUNK):
        yb = y[start:start + CHUNK]
        b = len(yb)
        shift = torch.randint(0, 2 * MAX_SHIFT + 1, (2, b), generator=g)
        contrast = lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=g)
        img = contrast * _shifted_crops(protos[yb], shift[0], shift[1], size)
        img += DEFORM_SCALE * _smooth_noise(b, size, DEFORM_GRID * size // 32 + 1, g)
        img += PIXEL_NOISE * torch.randn(b, 3, size, size, generator=g)
        x[start:start + b] = (PIXEL_CENTER + PIXEL_SCALE * img).round().clamp(0, 255).to(torch.uint8)
    return x, y


def load_synthetic(
    n_train: int = 50000,
    n_test: int = 10000,
    *,
    seed: int = 0,
    num_classes: int = 10,
    image_size: int = 32,
) -> Dataset:
    """A seeded synthetic dataset: uint8 ``(N, 3, S, S)`` images, balanced labels.

    Identical bits for identical arguments on any machine. Labels are exactly
    balanced when ``n`` is a multiple of ``num_classes``. ``mean``/``std`` are the
    per-channel statistics of the train split.

    Measured (seed 0, 32x32, 10 classes, 2 CPU cores): generating 50,000 + 10,000
    takes ~2 s; a nearest-class-mean classifier on raw pixels gets ~40% test
    accuracy; a 3-layer CNN trained for 3 epochs on 10,000 samples ~75%.
    """
    if n_train < 1 or n_test < 1:
        raise ConfigError(f"synthetic split sizes must be positive, got n_train={n_train}, n_test={n_test}")
    if num_classes < 2:
        raise ConfigError(f"synthetic num_classes must be at least 2, got {num_classes}")
    if image_size < 8:
        raise ConfigError(f"synthetic image_size must be at least 8, got {image_size}")
    t0 = time.perf_counter()
    protos = _prototypes(num_classes, image_size + 2 * MAX_SHIFT, _generator(seed, 0))
    x_train, y_train = _samples(protos, n_train, image_size, _generator(seed, 1))
    x_test, y_test = _samples(protos, n_test, image_size, _generator(seed, 2))
    mean, std = channel_stats(x_train)
    return Dataset(
        name="synthetic",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        classes=tuple(f"class{i}" for i in range(num_classes)),
        mean=mean,
        std=std,
        source=f"synthetic(seed={seed})",
        meta={"seed": seed, "generate_s": round(time.perf_counter() - t0, 3)},
    )
