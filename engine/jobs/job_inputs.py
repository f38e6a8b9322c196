"""Checks of what a kernel job is given, made before any tile is computed (issue 22).

Each refuses with one line naming the flag or file and what was expected: a ``--state`` file
that is not a state dict, a model the job cannot compute, a run read on data other than the
data it was trained on, a ``--tile`` larger than ``--memory-gb`` allows.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..ntk.budget import GiB
from ..store import data_mismatch, data_record


def load_state_file(state: str | Path, spec: str) -> Mapping[str, torch.Tensor]:
    """The state dict in ``--state`` (``torch.save`` of a ``state_dict``, or of ``{"state_dict": ...}``)."""
    path = Path(state)
    if not path.exists():
        raise ConfigError(f"--state {state} does not exist")
    if path.is_dir():
        raise ConfigError(f"--state {state} is a directory; expected a file written by torch.save(model.state_dict())")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError,
            IndexError, KeyError, AttributeError, TypeError) as e:  # what torch.load raises on bytes it cannot read
        why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--state {state} is not a state dict saved by torch.save ({why})") from None
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"--state {state} holds a {type(sd).__name__}, not a state dict of tensors "
                          f"for --model-fn {spec}")
    return sd


def check_model(model: nn.Module, spec: str) -> None:
    """A ``--model-fn`` model the job can compute: float32 parameters (the job feeds it float32 images)."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    if dtypes and dtypes != ["float32"]:
        raise ConfigError(f"--model-fn {spec} has {', '.join(dtypes)} parameters; entk kernel computes float32 "
                          f"models (return model.float(); --compute-dtype float64 gives float64 products)")


def check_logits(model: nn.Module, x: torch.Tensor, spec: str) -> None:
    """The model returns one logits tensor ``(N, C)`` (a tuple or dict is refused by name)."""
    with torch.no_grad():
        y = model(x)
    if not isinstance(y, torch.Tensor):
        raise ConfigError(f"--model-fn {spec} returns a {type(y).__name__}; expected one logits tensor (N, C)")
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ConfigError(f"--model-fn {spec} returns shape {tuple(y.shape)} for {x.shape[0]} inputs; "
                          f"expected logits (N, C)")


def check_run_data(run_path, stored: Mapping | None, ds, cfg) -> None:
    """The data a run's checkpoint is evaluated on is the data it was trained on (by fingerprint).

    ``ds`` is the whole dataset as loaded now; the run's record is of its subset
    (``cfg.n_train``, ``cfg.n_test``, ``cfg.subset_seed``), so the subset is taken first.
    A run that records no fingerprint (an older entk) is refused: its data cannot be checked.
    """
    used = ds.subset(cfg.n_train, cfg.n_test, seed=cfg.subset_seed) if (cfg.n_train or cfg.n_test) else ds
    bad = data_mismatch(run_path, stored, data_record(used), what="was trained",
                        fix="point --data-root at the data it was trained on")
    if bad:
        raise DataError(bad)


def check_tile(tile: int, memory_bytes: int, in_use: int, *, largest: int, need: int) -> None:
    """A ``--tile`` whose estimated working set ``need`` does not fit the process memory beside ``in_use``
    is refused, with the largest that fits."""
    if need > memory_bytes - in_use:
        raise ConfigError(f"--tile {tile} needs about {need / GiB:.3g} GiB per tile pair beside the "
                          f"{in_use / GiB:.2f} GiB in use, more than --memory-gb {memory_bytes / GiB:.3g} "
                          f"(memory_bytes={memory_bytes:,}); the largest tile that fits is --tile {largest} "
                          f"(or raise --memory-gb)")
