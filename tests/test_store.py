"""Resumable job files: memory-mapped reads, job identity, disk-full behaviour."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch

from engine.store import JacobianStore, KernelStore, StoreError, kernel_name


def _jstore(path, **kw):
    args = {"job": {"model": "toy", "probe_hash": "abc"}, "n_inputs": 10, "num_outputs": 3,
            "n_params": 17, "block_inputs": 4}
    return JacobianStore.create_for(path, **{**args, **kw})


def test_jacobian_store_roundtrip_and_memmap(tmp_path):
    s = _jstore(tmp_path / "j.h5")
    assert s.shape == (30, 17) and s.n_units == 3 and s.unit_inputs(2) == (8, 10)
    J = torch.randn(30, 17)
    with s.writer() as w:
        for u in range(3):
            a, b = s.unit_inputs(u)
            w.write("jacobian", a * 3, J[a * 3:b * 3])
            w.mark_complete(u)
    mm = JacobianStore(tmp_path / "j.h5").jacobian_memmap()
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    assert torch.equal(torch.from_numpy(np.array(mm)), J)


def test_bfloat16_store(tmp_path):
    s = _jstore(tmp_path / "j.h5", dtype=torch.bfloat16)
    J = torch.randn(30, 17)
    with s.writer() as w:
        w.write("jacobian", 0, J)
    assert torch.equal(s.read("jacobian"), J.to(torch.bfloat16))


def test_same_job_resumes_different_job_refused(tmp_path):
    s = _jstore(tmp_path / "j.h5")
    with s.writer() as w:
        w.write("jacobian", 0, torch.ones(12, 17))
        w.mark_complete(0)
    again = _jstore(tmp_path / "j.h5")
    assert again.complete.tolist() == [True, False, False]
    with pytest.raises(StoreError, match=r"different job \(differs in probe_hash\)"):
        _jstore(tmp_path / "j.h5", job={"model": "toy", "probe_hash": "xyz"})
    with pytest.raises(StoreError, match="block_inputs"):
        _jstore(tmp_path / "j.h5", block_inputs=5)
    fresh = _jstore(tmp_path / "j.h5", block_inputs=5, overwrite=True)
    assert not fresh.complete.any()


def test_disk_too_small_is_reported_before_work(tmp_path, monkeypatch):
    def full(fd, off, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(StoreError, match=r"not enough disk space for .*j\.h5"):
        _jstore(tmp_path / "j.h5")
    assert not (tmp_path / "j.h5").exists() and not list(tmp_path.iterdir())


def test_disk_filling_mid_job_leaves_file_resumable(tmp_path, monkeypatch):
    s = _jstore(tmp_path / "j.h5")
    with s.writer() as w:
        w.write("jacobian", 0, torch.ones(12, 17))
        w.mark_complete(0)
    real = os.pwrite

    def failing(fd, data, off):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", failing)
    with s.writer() as w, pytest.raises(StoreError, match="rerun the same command to resume"):
        w.write("jacobian", 12, torch.ones(12, 17))
    monkeypatch.setattr(os, "pwrite", real)
    resumed = _jstore(tmp_path / "j.h5")
    assert resumed.complete.tolist() == [True, False, False]
    assert torch.equal(resumed.read("jacobian", slice(0, 12)), torch.ones(12, 17))


def test_kernel_store_layout_and_attributes(tmp_path):
    job = {"model": "cnn", "probe_hash": "p1", "mode": "eval", "kernel": "full"}
    ks = KernelStore.create_for(tmp_path / "k.h5", job=job, iterations=[0, 10, 100], size=6)
    assert ks.completed_iterations() == [] and ks.distances() is None
    with ks.writer() as w:
        w.write(kernel_name(10), 0, torch.eye(6))
        w.mark_complete(1)
    ks = KernelStore(tmp_path / "k.h5")
    assert ks.completed_iterations() == [10]
    assert np.array_equal(ks.kernel(10), np.eye(6, dtype=np.float32))
    attrs = ks.attrs[kernel_name(10)]
    assert attrs["iteration"] == 10 and attrs["model"] == "cnn" and attrs["probe_hash"] == "p1"
    assert attrs["mode"] == "eval" and attrs["dtype"] == "torch.float32"
    with pytest.raises(StoreError, match="never completed"):
        ks.kernel(0)
    with pytest.raises(StoreError, match="iteration 5 is not in"):
        ks.kernel(5)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        JacobianStore(tmp_path / "none.h5")
    (tmp_path / "x.h5").write_bytes(b"garbage")
    with pytest.raises(StoreError, match=r"x\.h5"):
        KernelStore(tmp_path / "x.h5")


def test_one_bfloat16_reader(tmp_path):
    """to_numpy/from_numpy: bfloat16 as uint16 bits, 0-d and strided arrays, read-only memory maps."""
    import warnings

    from engine.store.h5raw import from_numpy, to_numpy, torch_dtype_of

    t = torch.randn(7, 5).to(torch.bfloat16)
    bits = to_numpy(t)
    assert bits.dtype == np.uint16 and torch_dtype_of(bits.dtype) == torch.bfloat16
    assert torch.equal(from_numpy(bits), t)  # untagged uint16: bfloat16 bits
    assert torch.equal(from_numpy(bits, "torch.bfloat16"), t)
    assert torch.equal(from_numpy(bits[:, 1::2]), t[:, 1::2])  # strided, no copy needed
    assert torch.equal(from_numpy(bits[::-1]), t.flip(0))  # negative strides
    assert from_numpy(np.asarray(np.int64(3))).shape == ()  # 0-d stays 0-d
    assert torch_dtype_of(np.float32) == torch.float32 and torch_dtype_of(np.int16) == torch.int16
    mm = np.lib.format.open_memmap(tmp_path / "b.npy", mode="w+", dtype=np.uint16, shape=bits.shape)
    mm[:] = bits
    ro = np.load(tmp_path / "b.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(from_numpy(ro), t)
