"""The HDF5 run file: every checkpoint of one training run, crash-safe.

Layout (documented in ``docs/FORMAT.md``): the schedule of checkpoint
iterations is known when a run starts, so the file is created once with every
dataset preallocated (``engine.store.h5raw``); checkpoint ``k`` is row ``k`` of
``/state/<name>`` (parameters and buffers by ``state_dict`` name) and
``/optim/<name>`` (SGD momentum buffers), and ``/checkpoints/complete[k]`` is
set to 1 only after the row's bytes are on disk. A run killed mid-write leaves
every completed checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import RunFileError
from ..store.h5raw import (
    RawWriter,
    create_preallocated,
    dataset_offset,
    from_numpy,
    numpy_dtype,
    to_numpy,
)

FORMAT = "entk-run"
FORMAT_VERSION = 1
# Columns of /summary, written once when training finishes.
SUMMARY_FIELDS = ("train_loss", "train_acc", "test_loss", "test_acc", "steps_per_sec", "wall_s")


def _h5name(name: str) -> str:
    # state_dict names never contain "/", but guard: HDF5 would make it a subgroup.
    if "/" in name:
        raise RunFileError(f"parameter name {name!r} contains '/', which HDF5 cannot store")
    return name


class RunFile:
    """An open run file; cheap to construct, reads go through h5py per call."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise RunFileError(f"run file {self.path} does not exist")
        try:
            with h5py.File(self.path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise RunFileError(
                        f"{self.path} is not an entk run file (format attribute "
                        f"{f.attrs.get('format')!r}, expected {FORMAT!r})")
                version = int(f.attrs["format_version"])
                if version > FORMAT_VERSION:
                    raise RunFileError(f"{self.path} has format version {version}; "
                                       f"this engine reads <= {FORMAT_VERSION}")
                self.config: dict = json.loads(f.attrs["config"])
                self.meta: dict = json.loads(f.attrs.get("meta", "{}"))
                self.iterations = f["checkpoints/iteration"][...].astype(np.int64)
                self.steps = int(f.attrs["steps"])
                self.state_names: list[str] = list(json.loads(f["state"].attrs["names"]))
                self.param_names: list[str] = list(json.loads(f["state"].attrs["param_names"]))
                self.optim_names: list[str] = list(json.loads(f["optim"].attrs["names"]))
                self._offsets = {}
                self._rowbytes = {}
                self._dtypes = {}
                for grp in ("state", "optim"):
                    for name, ds in f[grp].items():
                        if ds.size:
                            self._offsets[(grp, name)] = dataset_offset(ds)
                            self._rowbytes[(grp, name)] = ds.dtype.itemsize * (ds.size // ds.shape[0])
                        self._dtypes[(grp, name)] = ds.attrs.get("torch_dtype")
                for name in ("checkpoints/complete", "checkpoints/wall_time",
                             "checkpoints/train_loss", "log/loss", "log/lr", "summary"):
                    self._offsets[name] = dataset_offset(f[name])
        except RunFileError:
            raise
        except (OSError, KeyError, ValueError) as e:
            raise RunFileError(f"cannot read run file {self.path}: {e}") from None

    # -- creation ----------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, *, config: Mapping, steps: int,
               iterations: Sequence[int], state: Mapping[str, torch.Tensor],
               param_names: Sequence[str], meta: Mapping | None = None,
               overwrite: bool = False) -> RunFile:
        """Create the file with storage for every scheduled checkpoint.

        ``state`` gives the name, shape and dtype of every stored tensor
        (a model's ``state_dict()``); ``param_names`` are the trainable ones,
        which also get a momentum slot under ``/optim``.
        """
        path = Path(path)
        iterations = sorted(set(int(i) for i in iterations))
        if not iterations:
            raise RunFileError("a run file needs at least one checkpoint iteration")
        if path.exists() and not overwrite:
            raise RunFileError(f"{path} already exists (pass overwrite to replace it)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".creating")
        t = len(iterations)
        with h5py.File(tmp, "w", libver="earliest") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["config"] = json.dumps(dict(config), sort_keys=True)
            f.attrs["meta"] = json.dumps(dict(meta or {}), sort_keys=True)
            f.attrs["steps"] = int(steps)
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            ck = f.create_group("checkpoints")
            ck.create_dataset("iteration", data=np.asarray(iterations, dtype=np.int64))
            create_preallocated(ck, "complete", (t,), np.uint8, fill=0)
            create_preallocated(ck, "wall_time", (t,), np.float64, fill=np.nan)
            create_preallocated(ck, "train_loss", (t,), np.float64, fill=np.nan)
            log = f.create_group("log")
            create_preallocated(log, "loss", (max(steps, 1),), np.float32, fill=np.nan)
            create_preallocated(log, "lr", (max(steps, 1),), np.float32, fill=np.nan)
            s = create_preallocated(f, "summary", (len(SUMMARY_FIELDS),), np.float64, fill=np.nan)
            s.attrs["fields"] = json.dumps(SUMMARY_FIELDS)
            for grp_name, names in (("state", list(state)), ("optim", list(param_names))):
                grp = f.create_group(grp_name)
                grp.attrs["names"] = json.dumps(names)
                for name in names:
                    ref = state[name]
                    ds = create_preallocated(grp, _h5name(name), (t, *ref.shape), numpy_dtype(ref.dtype))
                    ds.attrs["torch_dtype"] = str(ref.dtype)
            f["state"].attrs["param_names"] = json.dumps(list(param_names))
        # The layout becomes visible under its real name only once complete.
        os.replace(tmp, path)
        return cls(path)

    # -- queries -----------------------------------------------------------------------------

    def _read(self, name: str) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            return f[name][...]

    @property
    def complete(self) -> np.ndarray:
        """bool ``(T,)``: which scheduled checkpoints are fully written."""
        return self._read("checkpoints/complete").astype(bool)

    def completed_iterations(self) -> list[int]:
        return [int(i) for i, c in zip(self.iterations, self.complete, strict=True) if c]

    def index(self, iteration: int) -> int:
        hits = np.nonzero(self.iterations == int(iteration))[0]
        if not len(hits):
            raise RunFileError(f"iteration {iteration} is not a checkpoint of {self.path} "
                               f"(scheduled: {self.iterations.tolist()})")
        return int(hits[0])

    def loss_log(self) -> np.ndarray:
        """float32 ``(steps,)``: the training loss of each step (NaN where not reached)."""
        return self._read("log/loss")

    def lr_log(self) -> np.ndarray:
        return self._read("log/lr")

    def summary(self) -> dict[str, float] | None:
        """Final metrics, or None if training has not finished."""
        vals = self._read("summary")
        if np.all(np.isnan(vals)):
            return None
        return dict(zip(SUMMARY_FIELDS, (float(v) for v in vals), strict=True))

    def _load_group(self, grp: str, iteration: int, names: Sequence[str]) -> dict[str, torch.Tensor]:
        k = self.index(iteration)
        if not self.complete[k]:
            raise RunFileError(f"checkpoint at iteration {iteration} in {self.path} was never "
                               f"completed (completed: {self.completed_iterations()})")
        out = {}
        with h5py.File(self.path, "r") as f:
            for name in names:
                out[name] = from_numpy(f[grp][name][k], self._dtypes[(grp, name)])
        return out

    def load_state(self, iteration: int) -> dict[str, torch.Tensor]:
        """Parameters and buffers at ``iteration``, by ``state_dict`` name."""
        return self._load_group("state", iteration, self.state_names)

    def load_momentum(self, iteration: int) -> dict[str, torch.Tensor]:
        """SGD momentum buffers at ``iteration`` (zeros at iteration 0), by parameter name."""
        return self._load_group("optim", iteration, self.optim_names)

    def load_into(self, model: torch.nn.Module, iteration: int) -> torch.nn.Module:
        """Load the checkpoint at ``iteration`` into ``model`` (strict names and shapes)."""
        state = self.load_state(iteration)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise RunFileError(f"checkpoint {iteration} of {self.path} does not fit the model: "
                               f"{' '.join(s.strip() for s in first[:3])}") from None
        return model

    # -- writing -----------------------------------------------------------------------------

    def writer(self) -> CheckpointWriter:
        return CheckpointWriter(self)


class CheckpointWriter:
    """Raw, crash-safe writes into a run file's preallocated storage."""

    def __init__(self, run: RunFile):
        self.run = run
        self._raw = RawWriter(run.path)

    def _write_rows(self, grp: str, k: int, tensors: Mapping[str, torch.Tensor],
                    names: Sequence[str]) -> None:
        for name in names:
            key = (grp, name)
            if key not in self.run._offsets:
                continue  # zero-size tensor: nothing to store
            a = to_numpy(tensors[name])
            if a.nbytes != self.run._rowbytes[key]:
                raise RunFileError(f"{grp}/{name}: got {a.nbytes} bytes for checkpoint row, "
                                   f"expected {self.run._rowbytes[key]}")
            self._raw.write(self.run._offsets[key] + k * a.nbytes, a)

    def write_checkpoint(self, iteration: int, state: Mapping[str, torch.Tensor],
                         momentum: Mapping[str, torch.Tensor | None] | None = None,
                         train_loss: float = float("nan")) -> None:
        """Write checkpoint ``iteration``: all rows, fsync, then the completion flag, fsync."""
        run = self.run
        k = run.index(iteration)
        missing = [n for n in run.state_names if n not in state]
        if missing:
            raise RunFileError(f"state for checkpoint {iteration} lacks {missing[:3]}")
        self._write_rows("state", k, state, run.state_names)
        mom = {}
        for name in run.optim_names:
            buf = (momentum or {}).get(name)
            mom[name] = buf if buf is not None else torch.zeros_like(state[name])
        self._write_rows("optim", k, mom, run.optim_names)
        self._raw.write(run._offsets["checkpoints/wall_time"] + 8 * k, np.float64([time.time()]))
        self._raw.write(run._offsets["checkpoints/train_loss"] + 8 * k, np.float64([train_loss]))
        self._raw.sync()
        self._raw.write(run._offsets["checkpoints/complete"] + k, np.uint8([1]))
        self._raw.sync()

    def write_log(self, start: int, loss: np.ndarray, lr: np.ndarray) -> None:
        """Per-step training loss and learning rate for steps ``start .. start+len-1``."""
        self._raw.write(self.run._offsets["log/loss"] + 4 * start, np.asarray(loss, np.float32))
        self._raw.write(self.run._offsets["log/lr"] + 4 * start, np.asarray(lr, np.float32))

    def write_summary(self, values: Mapping[str, float]) -> None:
        row = np.array([values.get(k, np.nan) for k in SUMMARY_FIELDS], dtype=np.float64)
        self._raw.write(self.run._offsets["summary"], row)
        self._raw.sync()

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
