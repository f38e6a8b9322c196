"""The HDF5 run file: preallocated layout, raw crash-safe writes, reload into a model."""

from __future__ import annotations

import multiprocessing as mp
import os

import h5py
import numpy as np
import pytest
import torch

from engine.errors import RunFileError
from engine.store import RunFile


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(5, 3, generator=g),
        "b": torch.randn(3, generator=g).to(torch.bfloat16),
        "bn.running_mean": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
        "empty": torch.zeros(0),
    }


def _create(path, iterations=(0, 3, 10)):
    return RunFile.create(path, config={"model": "toy", "steps": 10}, steps=10,
                          iterations=iterations, state=_state(), param_names=["w", "b"])


def test_roundtrip_all_dtypes(tmp_path):
    run = _create(tmp_path / "r.h5")
    with run.writer() as w:
        for k, it in enumerate((0, 3, 10)):
            st = _state(k + 1)
            w.write_checkpoint(it, st, {"w": st["w"] * 2, "b": None}, train_loss=float(k))
    run = RunFile(tmp_path / "r.h5")
    assert run.completed_iterations() == [0, 3, 10]
    for k, it in enumerate((0, 3, 10)):
        ref, got = _state(k + 1), run.load_state(it)
        for name in ref:
            assert got[name].dtype == ref[name].dtype, name
            assert torch.equal(got[name], ref[name]), name
        mom = run.load_momentum(it)
        assert torch.equal(mom["w"], ref["w"] * 2)
        assert torch.equal(mom["b"], torch.zeros_like(ref["b"]))  # None → zeros
    assert run.config == {"model": "toy", "steps": 10}


def test_layout_is_fixed_at_creation(tmp_path):
    """Writing checkpoints must not change any HDF5 metadata: only raw bytes change."""
    path = tmp_path / "r.h5"
    run = _create(path)
    size0 = os.path.getsize(path)
    with run.writer() as w:
        w.write_checkpoint(3, _state(5))
    assert os.path.getsize(path) == size0
    with h5py.File(path, "r") as f:
        assert f["state/w"].shape == (3, 5, 3)
        assert f["state/w"].chunks is None  # contiguous
        assert f["checkpoints/complete"][...].tolist() == [0, 1, 0]


def test_incomplete_checkpoint_is_refused_by_name(tmp_path):
    run = _create(tmp_path / "r.h5")
    with pytest.raises(RunFileError, match=r"iteration 3.*never completed"):
        run.load_state(3)
    with pytest.raises(RunFileError, match="iteration 4 is not a checkpoint"):
        run.load_state(4)


def _write_then_die(path):
    run = RunFile(path)
    w = run.writer()
    w.write_checkpoint(0, _state(1))
    # Die in the middle of checkpoint 3: rows written, completion flag not yet.
    w.write_rows("state", run.index(3), _state(2), run.state_names[:2])
    os._exit(0)


def test_killed_mid_write_keeps_completed_checkpoints(tmp_path):
    path = tmp_path / "r.h5"
    _create(path)
    p = mp.get_context("fork").Process(target=_write_then_die, args=(path,))
    p.start()
    p.join()
    run = RunFile(path)
    assert run.completed_iterations() == [0]
    assert torch.equal(run.load_state(0)["w"], _state(1)["w"])
    with pytest.raises(RunFileError):
        run.load_state(3)


def test_not_a_run_file(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(RunFileError, match=r"not an entk run file"):
        RunFile(p)
    with pytest.raises(RunFileError, match="does not exist"):
        RunFile(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(RunFileError, match=r"junk\.h5"):
        RunFile(tmp_path / "junk.h5")


def test_existing_file_not_clobbered(tmp_path):
    _create(tmp_path / "r.h5")
    with pytest.raises(RunFileError, match="already exists"):
        _create(tmp_path / "r.h5")


def test_paths_that_cannot_be_a_run_file_get_one_line_errors(tmp_path):
    """A directory (read or written, overwrite or not) or a path under a regular file: no HDF5 text."""
    errors = []
    for call in (lambda: RunFile(tmp_path), lambda: _create(tmp_path),
                 lambda: RunFile.create(tmp_path, config={}, steps=1, iterations=[1], state=_state(),
                                        param_names=["w"], overwrite=True)):
        with pytest.raises(RunFileError, match=rf"{tmp_path} is a directory") as e:
            call()
        errors.append(str(e.value))
    (tmp_path / "plain").write_text("x")
    with pytest.raises(RunFileError, match=r"cannot create .*plain is a file, not a directory") as e:
        _create(tmp_path / "plain" / "r.h5")
    errors.append(str(e.value))
    assert all("\n" not in m and "errno" not in m for m in errors), errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]
