"""The HDF5 run file: every checkpoint of one training run, crash-safe.

Layout (documented in ``docs/FORMAT.md``): the schedule of checkpoint
iterations is known when a run starts, so the file is created once with every
dataset preallocated (a :class:`~engine.store.blockfile.StoreFile`); checkpoint
``k`` is row ``k`` of ``/state/<name>`` (parameters and buffers by ``state_dict``
name) and ``/optim/<name>`` (SGD momentum buffers), and ``/checkpoints/complete[k]``
is set to 1 only after the row's bytes are on disk. A run killed mid-write leaves
every completed checkpoint loadable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import RunFileError, describe_mismatch
from .blockfile import BlockWriter, StoreFile
from .h5raw import create_preallocated, numpy_dtype

# Columns of /summary, written once when training finishes.
SUMMARY_FIELDS = ("train_loss", "train_acc", "test_loss", "test_acc", "steps_per_sec", "wall_s")


def _h5name(name: str) -> str:
    # state_dict names never contain "/", but guard: HDF5 would make it a subgroup.
    if "/" in name:
        raise RunFileError(f"parameter name {name!r} contains '/', which HDF5 cannot store")
    return name


class RunFile(StoreFile):
    """An open run file; cheap to construct, reads go through memory maps per call."""

    FORMAT = "entk-run"
    NOUN = "entk run file"
    FLAGS = "checkpoints/complete"

    def _load(self, f: h5py.File) -> None:
        self.config: dict = json.loads(f.attrs["config"])
        self.meta: dict = json.loads(f.attrs.get("meta", "{}"))
        self.data: dict | None = json.loads(f.attrs["data"]) if "data" in f.attrs else None
        self.iterations = f["checkpoints/iteration"][...].astype(np.int64)
        self.steps = int(f.attrs["steps"])
        self.state_names: list[str] = list(json.loads(f["state"].attrs["names"]))
        self.param_names: list[str] = list(json.loads(f["state"].attrs["param_names"]))
        self.optim_names: list[str] = list(json.loads(f["optim"].attrs["names"]))
        for name in ("state", "optim", "checkpoints/wall_time", "checkpoints/train_loss", "log", "summary"):
            self._index(f, name)

    # -- creation ----------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, *, config: Mapping, steps: int,
               iterations: Sequence[int], state: Mapping[str, torch.Tensor],
               param_names: Sequence[str], meta: Mapping | None = None, data: Mapping | None = None,
               overwrite: bool = False) -> RunFile:
        """Create the file with storage for every scheduled checkpoint; reserve its disk space.

        ``state`` gives the name, shape and dtype of every stored tensor
        (a model's ``state_dict()``); ``param_names`` are the trainable ones,
        which also get a momentum slot under ``/optim``; ``data`` is the record of the
        training data (``data_record``).
        """
        iterations = sorted(set(int(i) for i in iterations))
        if not iterations:
            raise RunFileError("a run file needs at least one checkpoint iteration")
        t = len(iterations)

        def build(f: h5py.File) -> None:
            f.attrs["config"] = json.dumps(dict(config), sort_keys=True)
            f.attrs["meta"] = json.dumps(dict(meta or {}), sort_keys=True)
            if data is not None:
                f.attrs["data"] = json.dumps(dict(data), sort_keys=True)
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

        return cls._create(path, build, overwrite=overwrite)

    # -- queries -----------------------------------------------------------------------------

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
        return np.array(self.verified("log/loss"))

    def lr_log(self) -> np.ndarray:
        return np.array(self.verified("log/lr"))

    def summary(self) -> dict[str, float] | None:
        """Final metrics, or None if training has not finished."""
        vals = np.array(self.verified("summary"))
        if np.all(np.isnan(vals)):
            return None
        return dict(zip(SUMMARY_FIELDS, (float(v) for v in vals), strict=True))

    def _load_group(self, grp: str, iteration: int, names: Sequence[str]) -> dict[str, torch.Tensor]:
        k = self.index(iteration)
        if not self.complete[k]:
            raise RunFileError(f"checkpoint at iteration {iteration} in {self.path} was never "
                               f"completed (completed: {self.completed_iterations()})")
        return {name: self.read(f"{grp}/{name}", k) for name in names}

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
            raise RunFileError(f"checkpoint {iteration} of {self.path} does not fit the model: "
                               f"{describe_mismatch(e)}") from None
        return model

    # -- writing -----------------------------------------------------------------------------

    def writer(self) -> CheckpointWriter:
        return CheckpointWriter(self)


class CheckpointWriter(BlockWriter):
    """Raw, crash-safe writes into a run file's preallocated storage."""

    f: RunFile

    @property
    def run(self) -> RunFile:
        return self.f

    def write_rows(self, grp: str, k: int, tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
        """Row ``k`` of ``/<grp>/<name>`` for each name (no flag: :meth:`write_checkpoint` sets it)."""
        for name in names:
            t = tensors[name]
            want = self.f.torch_dtype(f"{grp}/{name}")
            if t.dtype != want:
                raise RunFileError(f"{grp}/{name}: got a {t.dtype} tensor for a {want} checkpoint slot")
            self.write(f"{grp}/{name}", k, t.reshape(1, *t.shape))

    def write_checkpoint(self, iteration: int, state: Mapping[str, torch.Tensor],
                         momentum: Mapping[str, torch.Tensor | None] | None = None,
                         train_loss: float = float("nan")) -> None:
        """Write checkpoint ``iteration``: all rows, fsync, then the completion flag, fsync."""
        run = self.f
        k = run.index(iteration)
        missing = [n for n in run.state_names if n not in state]
        if missing:
            raise RunFileError(f"state for checkpoint {iteration} lacks {missing[:3]}")
        self.write_rows("state", k, state, run.state_names)
        mom = {}
        for name in run.optim_names:
            buf = (momentum or {}).get(name)
            mom[name] = buf if buf is not None else torch.zeros_like(state[name])
        self.write_rows("optim", k, mom, run.optim_names)
        self.write("checkpoints/wall_time", k, np.float64([time.time()]))
        self.write("checkpoints/train_loss", k, np.float64([train_loss]))
        self.mark_complete(k)

    def write_log(self, start: int, loss: np.ndarray, lr: np.ndarray) -> None:
        """Per-step training loss and learning rate for steps ``start .. start+len-1``."""
        self.write("log/loss", start, np.asarray(loss, np.float32))
        self.write("log/lr", start, np.asarray(lr, np.float32))

    def write_summary(self, values: Mapping[str, float]) -> None:
        self.write("summary", 0, np.array([values.get(k, np.nan) for k in SUMMARY_FIELDS], dtype=np.float64))
        self.sync()
