"""Deterministic, device-resident batch streams.

Twin runs need two or more trainings to see bit-identical SGD noise. A
:class:`BatchStream` keeps the whole dataset on the training device and makes
the batch at step ``t`` a pure function of ``(seed, t)``:

* the epoch ``t // steps_per_epoch`` is shuffled by sorting counter-based hash
  keys of ``(seed, epoch, index)``; no stateful RNG is involved, so the order is
  the same on every device and in every call order;
* augmentation (random crop with zero padding, horizontal flip) draws its
  offsets from hashes of ``(seed, t, slot)`` and is applied as one gather;
* normalization is a fused multiply-add on the device.

Nothing in :meth:`BatchStream.batch` synchronizes with the host or uses
boolean-mask indexing, and ``t`` may be a 0-d device tensor, so the whole
sampling step can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .dataset import Dataset

_M32 = 0xFFFFFFFF
# Domain-separation salts so that shuffling and each augmentation draw are independent.
_SALT_PERM_HI, _SALT_PERM_LO, _SALT_AUG = 0x5EED0001, 0x5EED0002, 0x5EED0003


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit integer hash ("lowbias32", Wellons) on int64 tensors in [0, 2^32).

    Products may exceed 2^63 and wrap; two's-complement wrap keeps the low 32
    bits exact, which is all the mask keeps.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def hash_words(*words: torch.Tensor | int) -> torch.Tensor:
    """Hash a sequence of integers (ints or int64 tensors, broadcast) to [0, 2^32)."""
    h: torch.Tensor | int = 0x9E3779B9
    for w in words:
        if isinstance(w, int):
            # Fold Python ints of any size into 32-bit words so large seeds still matter.
            parts = [(w >> s) & _M32 for s in range(0, max(w.bit_length(), 1), 32)] or [0]
            for p in parts:
                h = _mix32(torch.as_tensor(h, dtype=torch.int64) ^ p)
        else:
            h = _mix32((h ^ (w & _M32)) if isinstance(h, torch.Tensor) else (w & _M32) ^ h)
    return torch.as_tensor(h, dtype=torch.int64)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images ``(B, C, H, W)`` → normalized float ``(B, C, H, W)``: ``(x/255 - mean)/std``."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=dtype, device=x.device)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], dtype=dtype,
                         device=x.device)
    return x.to(dtype) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class BatchStream:
    """The batch at step ``t`` as a pure function of ``(seed, t)``, computed on ``device``.

    Args:
        x: uint8 images ``(N, C, H, W)``; copied to ``device`` once.
        y: int64 labels ``(N,)``.
        batch_size: ``B``; each epoch has ``N // B`` steps (the last partial batch
            is dropped so every batch has the same shape, which CUDA graphs need;
            every index appears at most once per epoch, exactly once when ``B`` divides ``N``).
        seed: the stream's seed; two streams with the same seed and data give identical bits.
        augment: random crop (``pad`` pixels of zero padding) and horizontal flip.
        mean, std: per-channel normalization (pixels scaled to [0, 1]).
        device: where the data lives and batches are made.
        dtype: floating dtype of the returned images.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        batch_size: int = 128,
        seed: int = 0,
        augment: bool = True,
        pad: int = 4,
        flip: bool = True,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ConfigError(f"BatchStream images must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if y.shape != (x.shape[0],):
            raise ConfigError(f"BatchStream labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        if not 1 <= batch_size <= x.shape[0]:
            raise ConfigError(f"batch_size must be in [1, {x.shape[0]}] (the dataset size), got {batch_size}")
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}")
        if pad < 0:
            raise ConfigError(f"pad must be non-negative, got {pad}")
        self.device = torch.device(device)
        self.x = x.to(self.device).contiguous()
        self.y = y.to(self.device, torch.int64).contiguous()
        self.n = x.shape[0]
        self.batch_size = batch_size
        self.steps_per_epoch = self.n // batch_size
        self.seed = int(seed)
        self.augment = augment
        self.pad = pad if augment else 0
        self.flip = flip and augment
        self.mean, self.std = tuple(mean), tuple(std)
        self.dtype = dtype
        c, h, w = self.x.shape[1:]
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], dtype=dtype,
                                   device=self.device).view(1, c, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std, strict=True)],
                                   dtype=dtype, device=self.device).view(1, c, 1, 1)
        self._arange_n = torch.arange(self.n, device=self.device)
        self._arange_b = torch.arange(batch_size, device=self.device)
        self._rows = torch.arange(h, device=self.device)
        self._cols = torch.arange(w, device=self.device)
        self._chan = torch.arange(c, device=self.device)
        self._cached_epoch: int | None = None
        self._cached_perm: torch.Tensor | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset, split: str = "train", **kwargs) -> BatchStream:
        """A stream over ``ds``'s ``split`` ("train" or "test") with its normalization."""
        if split not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
        x, y = (ds.x_train, ds.y_train) if split == "train" else (ds.x_test, ds.y_test)
        kwargs.setdefault("mean", ds.mean)
        kwargs.setdefault("std", ds.std)
        return cls(x, y, **kwargs)

    def config(self) -> dict:
        """The parameters that determine every batch's bits (for provenance)."""
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed,
                "augment": self.augment, "pad": self.pad, "flip": self.flip,
                "mean": list(self.mean), "std": list(self.std), "dtype": str(self.dtype)}

    # -- shuffling ---------------------------------------------------------------------------

    def _perm_keys(self, epoch: torch.Tensor | int) -> torch.Tensor:
        idx = self._arange_n
        hi = hash_words(self.seed, _SALT_PERM_HI, epoch, idx)
        lo = hash_words(self.seed, _SALT_PERM_LO, epoch, idx)
        # 62-bit keys: collisions are vanishingly rare and a stable sort breaks them by index.
        return (hi << 30) | (lo >> 2)

    def epoch_permutation(self, epoch: int | torch.Tensor) -> torch.Tensor:
        """The order of sample indices in ``epoch`` (int64 ``(N,)``, on ``device``)."""
        if isinstance(epoch, torch.Tensor):
            epoch = epoch.to(self.device)
        return torch.argsort(self._perm_keys(epoch), stable=True)

    def indices(self, t: int | torch.Tensor) -> torch.Tensor:
        """Sample indices of the batch at step ``t`` (int64 ``(B,)``)."""
        b, spe = self.batch_size, self.steps_per_epoch
        if isinstance(t, torch.Tensor):
            # Graph-capturable path: everything stays on the device.
            t = t.to(self.device, torch.int64)
            perm = self.epoch_permutation(torch.div(t, spe, rounding_mode="floor"))
            return perm.index_select(0, (t % spe) * b + self._arange_b)
        if t < 0:
            raise ConfigError(f"step t must be non-negative, got {t}")
        epoch, pos = divmod(int(t), spe)
        if self._cached_epoch != epoch:
            self._cached_perm = self.epoch_permutation(epoch)
            self._cached_epoch = epoch
        return self._cached_perm[pos * b:(pos + 1) * b]

    # -- augmentation ------------------------------------------------------------------------

    def _augment(self, xb: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        bsz, _, _, w = xb.shape
        r = hash_words(self.seed, _SALT_AUG, t, self._arange_b[:bsz])
        span = 2 * self.pad + 1
        dy = r % span
        dx = (r >> 8) % span
        rows = dy[:, None] + self._rows[None, :]                       # (B, H)
        cols = self._cols[None, :].expand(bsz, w)
        if self.flip:
            flip = ((r >> 16) & 1).bool()[:, None]
            cols = torch.where(flip, (w - 1) - cols, cols)
        cols = dx[:, None] + cols                                       # (B, W)
        if self.pad:
            xb = F.pad(xb, (self.pad, self.pad, self.pad, self.pad))
        bidx = self._arange_b[:bsz].view(bsz, 1, 1, 1)
        return xb[bidx, self._chan.view(1, -1, 1, 1), rows[:, None, :, None], cols[:, None, None, :]]

    # -- public ------------------------------------------------------------------------------

    def batch(self, t: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at step ``t``: images ``(B, C, H, W)`` in ``dtype``, labels int64 ``(B,)``.

        ``t`` may be a Python int (the epoch's permutation is cached) or a 0-d
        int64 tensor on the device (recomputed in full, capturable in a CUDA
        graph); both give the same bits.
        """
        idx = self.indices(t)
        xb = self.x.index_select(0, idx)
        if self.augment and (self.pad or self.flip):
            xb = self._augment(xb, t)
        xb = xb.to(self.dtype) * self._scale + self._shift
        return xb, self.y.index_select(0, idx)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        t = 0
        while True:
            yield self.batch(t)
            t += 1


def eval_batches(x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000,
                 mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Unaugmented, normalized batches of ``(x, y)`` in order (the last may be smaller)."""
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(device, non_blocking=True)
        yield normalize(xb, mean, std, dtype), y[i:i + batch_size].to(device, non_blocking=True)
