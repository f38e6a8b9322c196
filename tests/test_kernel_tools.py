"""Kernel tools streaming over stored tiles: mat-vecs, Lanczos, participation ratio, alignment, NTK prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.analysis.kernel_tools import (
    kernel_matvec,
    kernel_norms,
    kernel_predict,
    kernel_target_alignment,
    participation_ratio,
    top_eigenpairs,
)
from engine.errors import ConfigError
from engine.store import KernelTiles, open_kernel
from tests.seeding import seeded


def _store(path, h, *, tile, symmetric, kind="traced", labels=None, index=None, col_index=None, col_labels=None,
           extra=None):
    m1, m2 = h.shape
    n1 = len(labels)
    f = KernelTiles.create_for(path, job={"kernel": kind, "num_outputs": 3, "state_hash": "s", "data_fingerprint": "d",
                                          "x1_split": "test" if not symmetric else "train", "x2_split": "train",
                                          **(extra or {})},
                               matrix_shape=(m1, m2), kernel_shape=(m1, m2), tile_rows=tile, tile_cols=tile,
                               symmetric=symmetric, n1=n1, n2=None if symmetric else len(col_labels))
    with f.writer() as w:
        f.record_inputs(w, np.arange(n1) if index is None else index, labels,
                        *(() if symmetric else (col_index, col_labels)))
        for k, (i, j) in enumerate(f.grid()):
            r0, r1, c0, c1 = f.tile_bounds(i, j)
            f.write_tile(w, k, h[r0:r1, c0:c1].float())
    return open_kernel(path)


def _psd(n, g, decay=0.7):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = decay ** torch.arange(n, dtype=torch.float64) * 10
    return (q * lam) @ q.T


def test_matvec_norms_and_participation_ratio_stream_over_upper_tiles(tmp_path):
    g, seed = seeded()
    h = _psd(29, g).float().double()
    h = (h + h.T) / 2
    K = _store(tmp_path / "k.h5", h, tile=6, symmetric=True, labels=np.zeros(29, np.int64))
    dense = K[:].astype(np.float64)  # the float32 kernel as stored
    v = torch.randn(29, 4, generator=g, dtype=torch.float64).numpy()
    ref = dense @ v
    got = kernel_matvec(K, v)
    # float64 accumulation of float32 tiles: only reordering error, far below float32's eps
    assert np.abs(got - ref).max() <= 1e-12 * np.abs(ref).max(), f"seed {seed}"
    tr, fro = kernel_norms(K)
    assert tr == pytest.approx(np.trace(dense), rel=1e-12) and fro == pytest.approx(np.linalg.norm(dense), rel=1e-12)
    ev = np.linalg.eigvalsh(dense)
    assert participation_ratio(K) == pytest.approx(ev.sum() ** 2 / (ev**2).sum(), rel=1e-10)


def test_lanczos_matches_eigh_within_its_residual_bound(tmp_path):
    g, seed = seeded()
    h = _psd(60, g, decay=0.8)
    K = _store(tmp_path / "k.h5", h, tile=16, symmetric=True, labels=np.zeros(60, np.int64))
    dense = K[:].astype(np.float64)
    ref = np.linalg.eigvalsh(dense)[::-1]
    res = top_eigenpairs(K, 5, iterations=40, seed=1)
    # For a symmetric matrix each Ritz value lies within its residual norm of an eigenvalue.
    eps_bound = 60 * np.finfo(np.float64).eps * ref[0]
    assert np.all(np.abs(res.values - ref[:5]) <= res.residuals + eps_bound), f"seed {seed}: {res.values} vs {ref[:5]}"
    assert res.residuals.max() < 1e-6 * ref[0], f"seed {seed}: Lanczos did not converge: {res.residuals}"
    assert np.allclose(res.vectors.T @ res.vectors, np.eye(5), atol=1e-10)
    # All M steps: the full spectrum, to float64 rounding.
    full = top_eigenpairs(dense, 60, iterations=60)
    assert np.abs(full.values - ref).max() <= 1e3 * np.finfo(np.float64).eps * ref[0], f"seed {seed}"


def test_alignment_matches_its_definition():
    g, seed = seeded()
    n, c = 24, 3
    y = torch.arange(n) % c
    feats = torch.randn(n, 5, generator=g, dtype=torch.float64) + 2 * torch.eye(c, 5, dtype=torch.float64)[y]
    h = feats @ feats.T
    t = torch.eye(c, dtype=torch.float64)[y]
    t = t - t.mean(0)
    ref = float((h * (t @ t.T)).sum() / (h.norm() * (t @ t.T).norm()))
    assert kernel_target_alignment(h, y.numpy(), c) == pytest.approx(ref, rel=1e-12), f"seed {seed}"
    shuffled = y[torch.randperm(n, generator=g)]  # labels no longer follow the features' clusters
    assert kernel_target_alignment(h, y.numpy(), c) > kernel_target_alignment(h, shuffled.numpy(), c), f"seed {seed}"


def test_predict_from_stored_kernels_equals_a_dense_solve(tmp_path):
    g, seed = seeded()
    n_tr, n_te, c = 30, 11, 3
    y_tr, y_te = torch.arange(n_tr) % c, torch.arange(n_te) % c
    proto = 3 * torch.randn(c, 8, generator=g, dtype=torch.float64)
    x_tr = proto[y_tr] + torch.randn(n_tr, 8, generator=g, dtype=torch.float64)
    x_te = proto[y_te] + torch.randn(n_te, 8, generator=g, dtype=torch.float64)
    k_tr, k_cr = (x_tr @ x_tr.T).float().double(), (x_te @ x_tr.T).float().double()
    tr = _store(tmp_path / "tr.h5", k_tr, tile=7, symmetric=True, labels=y_tr.numpy())
    cr = _store(tmp_path / "cr.h5", k_cr, tile=7, symmetric=False, labels=y_te.numpy(), col_index=np.arange(n_tr),
                col_labels=y_tr.numpy())
    ridge = 1e-2
    lam = ridge * float(torch.trace(k_tr)) / n_tr
    onehot = torch.eye(c, dtype=torch.float64)[y_tr]
    ref = k_cr @ torch.linalg.solve(k_tr + lam * torch.eye(n_tr, dtype=torch.float64), onehot)
    ref_acc = float((ref.argmax(1) == y_te).double().mean())
    for solver in ("cholesky", "cg"):
        p = kernel_predict(tr, cr, ridge=ridge, solver=solver, tol=1e-12)
        # float64 solves of a float32-rounded kernel: agreement to ~cond(K+λI) · eps64 (CG stops at 1e-12).
        assert np.abs(p.predictions - ref.numpy()).max() <= 1e-7 * np.abs(ref.numpy()).max(), f"{solver} seed {seed}"
        assert p.accuracy == ref_acc and p.ridge_abs == pytest.approx(lam)
    assert ref_acc > 0.8, f"seed {seed}: clustered data should be easy ({ref_acc})"


def test_predict_refuses_mismatched_kernels(tmp_path):
    g, _ = seeded()
    h = _psd(9, g)
    tr = _store(tmp_path / "tr.h5", h, tile=4, symmetric=True, labels=np.arange(9) % 3)
    cr = _store(tmp_path / "cr.h5", h[:5], tile=4, symmetric=False, labels=np.arange(5) % 3,
                col_index=np.arange(9) + 1, col_labels=np.arange(9) % 3)
    with pytest.raises(ConfigError, match="are not the inputs of"):
        kernel_predict(tr, cr)
    other = _store(tmp_path / "o.h5", h[:5], tile=4, symmetric=False, labels=np.arange(5) % 3,
                   col_index=np.arange(9), col_labels=np.arange(9) % 3, extra={"state_hash": "t"})
    with pytest.raises(ConfigError, match="differ in state_hash"):
        kernel_predict(tr, other)
