"""Files record the data their job used; resumed jobs and `entk ntk` refuse other data (issue 11, defects a, e)."""

from __future__ import annotations

import shutil

import h5py
import pytest
import torch

from engine.data import load_synthetic
from engine.errors import ConfigError, RunFileError
from engine.jobs import checkpoint_kernels, probe_set
from engine.ntk import probe_hash
from engine.store import KernelStore, RunFile, StoreError, integrity
from engine.train import TrainConfig, prepare_data, train


def _cfg(**kw):
    base = {"model": "cnn", "steps": 4, "batch_size": 16, "checkpoints": [0, 2], "eval_train": 50,
            "n_train": 200, "n_test": 60, "subset_seed": 3}
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def whole():
    return prepare_data(_cfg(n_train=None, n_test=None))  # the default synthetic data (about 5 s)


@pytest.fixture(scope="module")
def run(tmp_path_factory, whole):
    """A finished run on a seeded subset of the default synthetic data, and that dataset."""
    cfg = _cfg()
    ds = whole.subset(200, 60, seed=3)
    path = tmp_path_factory.mktemp("run") / "run.h5"
    train(cfg, out=path, dataset=ds, device="cpu", quiet=True)
    return path, ds


def test_run_file_records_the_data(run):
    path, ds = run
    rec = RunFile(path).data
    assert rec["fingerprint"] == ds.fingerprint and rec["fingerprint"].startswith("b2:")
    assert (rec["n_train"], rec["n_test"], rec["subset_seed"]) == (200, 60, 3)
    assert rec["name"] == "synthetic" and rec["source"] == ds.source


def test_resume_on_other_data_is_refused_naming_both(run, tmp_path):
    _, ds = run
    other = load_synthetic(200, 60, seed=5)
    out = tmp_path / "r.h5"
    train(_cfg(steps=6, checkpoints=[0]), out=out, dataset=ds, device="cpu", quiet=True)
    with h5py.File(out, "r+") as f:
        f["checkpoints/complete"][1:] = 0  # as if killed after checkpoint 0
    # The data's location is not what matters: same data under another data_root resumes ...
    assert train(_cfg(steps=6, checkpoints=[0], data_root="moved"), out=out, dataset=ds,
                 device="cpu", quiet=True).resumed_from == 0
    with h5py.File(out, "r+") as f:
        f["checkpoints/complete"][1:] = 0
    # ... other data with the same config does not.
    with pytest.raises(RunFileError, match="holds a run trained on other data") as e:
        train(_cfg(steps=6, checkpoints=[0]), out=out, dataset=other, device="cpu", quiet=True)
    msg = str(e.value)
    assert ds.fingerprint in msg and other.fingerprint in msg and "\n" not in msg
    assert "--overwrite" in msg


def test_resume_of_a_file_without_fingerprint_is_refused(run, tmp_path):
    _, ds = run
    out = tmp_path / "old.h5"
    train(_cfg(), out=out, dataset=ds, device="cpu", quiet=True)
    with h5py.File(out, "r+") as f:
        del f.attrs["data"]  # a file written before runs recorded their data
    integrity.reseal(out)  # an edit of the metadata: its checksum is recomputed, as FORMAT.md says
    assert RunFile(out).data is None
    with pytest.raises(RunFileError, match=r"records no data fingerprint .*--overwrite"):
        train(_cfg(), out=out, dataset=ds, device="cpu", quiet=True)


def test_ntk_probes_come_from_the_runs_subset(run, whole, tmp_path):
    """Defect e: the probes are drawn from the run's own test subset, not the whole split."""
    path, ds = run
    res = checkpoint_kernels(path, tmp_path / "k.h5", probe=6, device="cpu", quiet=True)  # reloads the data
    x_run, _ = probe_set(ds, 6)
    x_whole, _ = probe_set(whole, 6)
    assert not torch.equal(x_run, x_whole)  # the two choices differ, so the check can fail
    assert res.store.job["probe_hash"] == probe_hash(x_run)
    assert res.store.data["fingerprint"] == ds.fingerprint
    with pytest.raises(ConfigError, match=r"probe size must be in \[1, 60\]"):
        checkpoint_kernels(path, tmp_path / "k61.h5", probe=61, device="cpu", quiet=True, dataset=ds)


def test_ntk_on_other_data_is_refused_naming_both(run, tmp_path):
    path, ds = run
    other = load_synthetic(200, 60, seed=5)
    with pytest.raises(RunFileError, match="was trained on other data") as e:
        checkpoint_kernels(path, tmp_path / "k.h5", probe=4, device="cpu", quiet=True, dataset=other)
    assert ds.fingerprint in str(e.value) and other.fingerprint in str(e.value)
    assert not (tmp_path / "k.h5").exists()


def test_kernel_file_resume_checks_the_data(tmp_path):
    job = {"model": "cnn", "probe_hash": "p"}
    a = {"fingerprint": "b2:aaa", "name": "synthetic", "source": "s", "n_train": 2, "n_test": 2, "subset_seed": None}
    b = {**a, "fingerprint": "b2:bbb", "source": "elsewhere"}
    KernelStore.create_for(tmp_path / "k.h5", job=job, iterations=[0], size=2, data=a)
    assert KernelStore.create_for(tmp_path / "k.h5", job=job, iterations=[0], size=2,
                                  data={**a, "source": "moved"}).data == a  # same data, moved: resumes
    with pytest.raises(StoreError, match=r"holds a job computed on other data: b2:aaa .* b2:bbb"):
        KernelStore.create_for(tmp_path / "k.h5", job=job, iterations=[0], size=2, data=b)
    KernelStore.create_for(tmp_path / "old.h5", job=job, iterations=[0], size=2)
    with pytest.raises(StoreError, match="records no data fingerprint"):
        KernelStore.create_for(tmp_path / "old.h5", job=job, iterations=[0], size=2, data=a)


def test_ntk_on_an_interrupted_run_says_only_completed_checkpoints_are_used(run, tmp_path, capsys):
    """Defect h: one line saying how many of the scheduled checkpoints the kernels cover."""
    path, ds = run
    part = tmp_path / "part.h5"
    shutil.copy(path, part)
    with h5py.File(part, "r+") as f:
        f["checkpoints/complete"][1:] = 0  # as if killed after checkpoint 0 (scheduled: 0, 2, 4)
    res = checkpoint_kernels(part, tmp_path / "k.h5", probe=3, device="cpu", quiet=True, dataset=ds)
    assert res.iterations == [0]
    err = capsys.readouterr().err
    assert "only its 1 completed checkpoints of 3 scheduled are used, up to iteration 0" in err
    assert res.notes and len(err.strip().splitlines()) == 1
    checkpoint_kernels(path, tmp_path / "k2.h5", probe=3, device="cpu", quiet=True, dataset=ds)
    assert capsys.readouterr().err == ""  # a finished run: nothing to say
