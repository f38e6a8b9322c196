"""A seeded, class-structured, CIFAR-shaped dataset that needs no files.

Each class has a smooth random prototype image (low-frequency noise, upsampled).
A sample is its class prototype, randomly shifted (so raw-pixel templates blur
while a convolutional network can still match it), with a random contrast, plus
a per-sample smooth deformation field and pixel noise, clipped to uint8. The
deformation is twice as strong as the prototype, so classes overlap: nothing
reaches 100%, a nearest-class-mean classifier on raw pixels is well above chance,
and a small CNN does better still (see the measurements on
:func:`load_synthetic`).

Everything is drawn from CPU ``torch.Generator`` streams seeded from ``seed``,
so the bits are identical on any machine for the same arguments.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .dataset import Dataset

# Shape of the generator, tuned so the task is learnable but not trivial (see
# the measurements on load_synthetic).
# Smooth fields are randn on a (GRID * size / 32 + 1)² grid, upsampled: blobs ~7 px wide.
PROTO_GRID = 4  # class prototypes
DEFORM_GRID = 4  # per-sample deformation field, same scale as the prototypes
DEFORM_SCALE = 2.0  # deformation std relative to the (unit-std) prototype: classes overlap
PIXEL_NOISE = 0.35  # i.i.d. pixel noise std, same units
MAX_SHIFT = 6  # prototypes are shifted by up to this many pixels each way
CONTRAST = (0.6, 1.4)  # per-sample multiplier of the prototype
PIXEL_CENTER, PIXEL_SCALE = 120.0, 60.0  # pixel mean ~0.47, std ~0.21, ~2% clipped
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


@functools.lru_cache(maxsize=8)
def _upsampler(grid: int, size: int) -> torch.Tensor:
    """``(grid², size²)`` matrix of bicubic upsampling from ``grid``² to ``size``² pixels.

    Upsampling is linear, so it is one matmul with the upsampled basis images:
    ~10x faster than ``F.interpolate`` on a batch (0.12 s per 4096 samples).
    """
    basis = torch.eye(grid * grid).view(grid * grid, 1, grid, grid)
    up = F.interpolate(basis, size=(size, size), mode="bicubic", align_corners=False)
    return up.view(grid * grid, size * size)


def _smooth_noise(n: int, size: int, grid: int, g: torch.Generator) -> torch.Tensor:
    """``(n, 3, size, size)`` float32 low-frequency noise: randn on ``grid``² upsampled."""
    coarse = torch.randn(n * 3, grid * grid, generator=g)
    return (coarse @ _upsampler(grid, size)).view(n, 3, size, size)


def _prototypes(num_classes: int, size: int, g: torch.Generator) -> torch.Tensor:
    """``(K, 3, size, size)`` smooth class prototypes, each scaled to unit std."""
    protos = _smooth_noise(num_classes, size, PROTO_GRID * size // 32 + 1, g)
    protos = protos - protos.mean(dim=(1, 2, 3), keepdim=True)
    return protos / protos.std(dim=(1, 2, 3), keepdim=True)


def _all_shifts(protos: torch.Tensor, size: int) -> torch.Tensor:
    """Every shifted ``size``² window of each prototype: ``(K, (2*MAX_SHIFT+1)², 3, size, size)``.

    Precomputing the 81 shifts per class (2.5 MB at 32 px) makes per-sample
    shifting a plain index instead of a per-pixel gather (0.16 s per 4096 samples).
    """
    span = 2 * MAX_SHIFT + 1
    crops = [protos[:, :, dy:dy + size, dx:dx + size] for dy in range(span) for dx in range(span)]
    return torch.stack(crops, dim=1).contiguous()


def _samples(shifted: torch.Tensor, n: int, g: torch.Generator):
    """``n`` samples ``(n, 3, S, S)`` uint8 and balanced int64 labels ``(n,)``.

    ``shifted`` is :func:`_all_shifts` of the prototypes.
    """
    k, n_shifts, _, size, _ = shifted.shape
    y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    x = torch.empty(n, 3, size, size, dtype=torch.uint8)
    lo, hi = CONTRAST
    # Std of a pixel before scaling, so the uint8 spread (and clipping) stays put when tuning.
    total_std = (1 + DEFORM_SCALE**2 + PIXEL_NOISE**2) ** 0.5
    for start in range(0, n, CHUNK):
        yb = y[start:start + CHUNK]
        b = len(yb)
        shift = torch.randint(0, n_shifts, (b,), generator=g)
        contrast = lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=g)
        img = _smooth_noise(b, size, DEFORM_GRID * size // 32 + 1, g).mul_(DEFORM_SCALE)
        img.add_(shifted[yb, shift] * contrast)
        img.add_(torch.randn(b, 3, size, size, generator=g), alpha=PIXEL_NOISE)
        img.mul_(PIXEL_SCALE / total_std).add_(PIXEL_CENTER).round_().clamp_(0, 255)
        x[start:start + b] = img
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

    Measured (seed 0, 32x32, 10 classes, 2 busy CPU cores): generating 50,000 +
    10,000 takes ~2.1 s. Test accuracy: nearest class mean on raw pixels 66%; a
    3-conv + linear CNN (Adam, 10,000 train samples) 66% after 1 epoch, 75% after
    4 and still rising; chance is 10%.
    """
    if n_train < 1 or n_test < 1:
        raise ConfigError(
            f"synthetic split sizes must be positive, got n_train={n_train}, n_test={n_test}"
        )
    if num_classes < 2:
        raise ConfigError(f"synthetic num_classes must be at least 2, got {num_classes}")
    if image_size < 8:
        raise ConfigError(f"synthetic image_size must be at least 8, got {image_size}")
    t0 = time.perf_counter()
    protos = _prototypes(num_classes, image_size + 2 * MAX_SHIFT, _generator(seed, 0))
    shifted = _all_shifts(protos, image_size)
    x_train, y_train = _samples(shifted, n_train, _generator(seed, 1))
    x_test, y_test = _samples(shifted, n_test, _generator(seed, 2))
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
