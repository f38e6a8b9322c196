"""Tools on stored kernels that stream over their tiles: NTK prediction, spectrum, alignment.

Every function takes a tiled kernel file (a path or :class:`~engine.store.TiledKernel`, as
written by ``entk kernel``) or, for small cases and tests, an in-memory matrix. They only ever
hold one tile (plus vectors of the kernel's side length), except the direct ridge solve, which
is chosen only when the dense train kernel fits the memory budget.

Conventions: the full kernel's row ``n·C + c`` targets the one-hot label ``[y_n == c]``; traced
and pNTK kernels (N × N) regress the C one-hot columns at once. The ridge is relative, as in
neural-tangents' ``predict`` (``diag_reg``): λ = ridge · trace(K)/M is added to the diagonal.
The participation ratio (Σλ)²/Σλ² = trace(K)²/‖K‖_F² is an effective rank that needs no eigensolver
(``engine.analysis.effective_rank`` is the entropy form, from eigenvalues). Kernel–target
alignment is ⟨K, YYᵀ⟩_F / (‖K‖_F ‖YYᵀ‖_F) with class-centred one-hot targets Y.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..ntk.budget import DEFAULT_BUDGET
from ..store import TiledKernel, open_kernel


class _Source:
    """A kernel as a stream of ``(r0, r1, c0, c1, float64 block)``; symmetric sources give upper tiles."""

    def __init__(self, K):
        self.file: TiledKernel | None = None
        if isinstance(K, (str, Path)):
            K = open_kernel(K)
        if isinstance(K, TiledKernel):
            if K.ndim != 2:
                raise ConfigError(f"{K.path}: a {K.attrs.get('kernel')} kernel of shape {K.shape} is not a matrix; "
                                  "use a full, traced or pntk kernel")
            if not K.is_complete:
                raise ConfigError(f"{K.path} is incomplete ({int(K.complete.sum())}/{len(K.complete)} tiles); "
                                  "rerun the job that wrote it to finish")
            self.file, self.shape, self.symmetric = K, K.matrix_shape, K.symmetric
            self.dense = None
        else:
            given = K.dtype if isinstance(K, torch.Tensor) else np.asarray(K).dtype
            a = K.detach().cpu().double().numpy() if isinstance(K, torch.Tensor) else np.asarray(K, np.float64)
            if a.ndim != 2:
                raise ConfigError(f"a kernel must be a 2-D matrix, got shape {a.shape}")
            if not np.isfinite(a).all():
                bad = np.argwhere(~np.isfinite(a))[0]
                raise DataError(f"the kernel is not finite (NaN or inf at [{int(bad[0])}, {int(bad[1])}])")
            self.dense, self.shape, self.symmetric = a, a.shape, False
            if isinstance(given, torch.dtype):
                self._eps = float(torch.finfo(given if given.is_floating_point else torch.float64).eps)
            else:
                self._eps = float(np.finfo(given if np.issubdtype(given, np.floating) else np.float64).eps)

    def require_symmetric(self, what: str) -> None:
        """Refuse a kernel that must be symmetric and is not (stored files check each diagonal tile when read).

        An in-memory kernel may carry rounding from the product that made it, so it passes while
        ``|K - K^T|_F <= sqrt(eps) |K|_F`` (half the digits of its dtype), far above rounding and far below
        any kernel that is not one.
        """
        if self.dense is None:
            return
        a = self.dense
        if a.shape[0] != a.shape[1] or np.linalg.norm(a - a.T) > np.sqrt(self._eps) * np.linalg.norm(a):
            raise DataError(f"{what} is not symmetric (|K - K^T|_F = {np.linalg.norm(a - a.T):.3g} of "
                            f"|K|_F = {np.linalg.norm(a):.3g}); a kernel matrix must be")

    def blocks(self) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
        if self.dense is not None:
            yield 0, self.shape[0], 0, self.shape[1], self.dense
            return
        for r0, r1, c0, c1, b in self.file.stored_tiles():
            yield r0, r1, c0, c1, b.astype(np.float64)

    def to_dense(self) -> np.ndarray:
        return self.dense if self.dense is not None else np.asarray(self.file[:, :], dtype=np.float64)


def kernel_matvec(K, v: np.ndarray) -> np.ndarray:
    """``K @ v`` in float64 for ``v`` of shape ``(M2,)`` or ``(M2, r)``, reading each stored tile once."""
    src = _Source(K)
    v = np.asarray(v, np.float64)
    if v.shape[0] != src.shape[1]:
        raise ConfigError(f"vector of length {v.shape[0]} does not match a kernel of shape {src.shape}")
    out = np.zeros((src.shape[0], *v.shape[1:]))
    for r0, r1, c0, c1, b in src.blocks():
        out[r0:r1] += b @ v[c0:c1]
        if src.symmetric and r0 != c0:
            out[c0:c1] += b.T @ v[r0:r1]
    return out


def kernel_norms(K) -> tuple[float, float]:
    """``(trace, Frobenius norm)`` of a square kernel, in one pass."""
    src = _Source(K)
    tr, fro2 = 0.0, 0.0
    for r0, r1, c0, c1, b in src.blocks():
        if r0 == c0 and r1 == c1:
            tr += float(np.trace(b))
        elif src.dense is not None:
            tr += float(np.trace(b[: min(r1, c1)]))
        fro2 += float(np.square(b).sum()) * (2 if src.symmetric and r0 != c0 else 1)
    return tr, fro2 ** 0.5


def participation_ratio(K) -> float:
    """Participation ratio trace(K)² / ‖K‖_F² (between 1 and the rank; exact, no eigensolver)."""
    tr, fro = kernel_norms(K)
    return tr * tr / (fro * fro) if fro > 0 else 0.0


@dataclass
class Eigenpairs:
    values: np.ndarray     # (k,) largest first
    vectors: np.ndarray    # (M, k) orthonormal Ritz vectors
    residuals: np.ndarray  # (k,) ‖K v − λ v‖₂ (a bound on each eigenvalue's error, K symmetric)
    iterations: int


def top_eigenpairs(K, k: int = 10, *, iterations: int | None = None, seed: int = 0) -> Eigenpairs:
    """The ``k`` largest eigenpairs of a symmetric kernel by Lanczos on tile mat-vecs.

    Full reorthogonalisation (twice, classical Gram–Schmidt) over ``iterations`` steps
    (default ``max(2k + 20, 40)``, at most M); each step reads the kernel once. The
    returned residuals are measured with one more pass over the kernel.
    """
    src = _Source(K)
    m_size = src.shape[0]
    if src.shape[0] != src.shape[1]:
        raise ConfigError(f"eigenpairs need a square kernel, got shape {src.shape}")
    if not 1 <= k <= m_size:
        raise ConfigError(f"k must be in [1, {m_size}], got {k}")
    if iterations is not None and not k <= iterations:
        raise ConfigError(f"iterations must be >= k ({k}) to find {k} eigenpairs, got {iterations}")
    src.require_symmetric("the kernel")
    m = min(m_size, iterations or max(2 * k + 20, 40))
    rng = np.random.default_rng(seed)
    Q = np.zeros((m_size, m))
    alpha, beta = np.zeros(m), np.zeros(m)
    q = rng.standard_normal(m_size)
    q /= np.linalg.norm(q)
    steps = m
    for j in range(m):
        Q[:, j] = q
        w = kernel_matvec(src.file if src.file is not None else src.dense, q)
        alpha[j] = q @ w
        for _ in range(2):
            w -= Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        beta[j] = np.linalg.norm(w)
        if j + 1 == m:
            break
        if beta[j] <= 1e-12 * max(abs(alpha[: j + 1]).max(), 1e-300):
            steps = j + 1  # an invariant subspace: the Ritz values are exact
            break
        q = w / beta[j]
    T = np.diag(alpha[:steps]) + np.diag(beta[: steps - 1], 1) + np.diag(beta[: steps - 1], -1)
    if steps < k:
        raise ConfigError(f"Lanczos stopped after {steps} steps in an invariant subspace, fewer than the k={k} "
                          f"eigenpairs asked for; pass another seed")
    theta, S = np.linalg.eigh(T)
    top = np.argsort(theta)[::-1][: min(k, steps)]
    vecs = Q[:, :steps] @ S[:, top]
    kv = kernel_matvec(src.file if src.file is not None else src.dense, vecs)
    res = np.linalg.norm(kv - vecs * theta[top], axis=0)
    return Eigenpairs(values=theta[top], vectors=vecs, residuals=res, iterations=steps)


def _targets(labels: np.ndarray, num_classes: int, full: bool) -> np.ndarray:
    """One-hot targets: ``(N·C, 1)`` for a full kernel (row n·C + c), ``(N, C)`` otherwise."""
    labels = np.asarray(labels, np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"labels must be in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    y = np.eye(num_classes)[labels]
    return y.reshape(-1, 1) if full else y


def _is_full(src: _Source, n: int, num_classes: int) -> bool:
    if src.file is not None:
        return src.file.attrs.get("kernel") == "full"
    return src.shape[0] == n * num_classes and num_classes > 1


def kernel_target_alignment(K, labels: np.ndarray | None = None, num_classes: int | None = None) -> float:
    """⟨K, YYᵀ⟩_F / (‖K‖_F ‖YYᵀ‖_F) with class-centred one-hot targets (labels default: the file's)."""
    src = _Source(K)
    if src.shape[0] != src.shape[1]:
        raise ConfigError(f"alignment needs a square (train x train) kernel, got shape {src.shape}")
    labels, num_classes = _labels(src, labels, num_classes)
    y = _targets(labels, num_classes, _is_full(src, len(labels), num_classes))
    if y.shape[0] != src.shape[0]:
        raise ConfigError(f"{len(labels)} labels do not match a kernel of shape {src.shape}")
    y = y - y.mean(0)
    _, fro = kernel_norms(K if src.file is None else src.file)
    ky = kernel_matvec(src.file if src.file is not None else src.dense, y)
    denom = fro * np.linalg.norm(y.T @ y)
    return float(np.trace(y.T @ ky) / denom) if denom > 0 else 0.0


def _labels(src: _Source, labels, num_classes):
    if labels is None:
        if src.file is None:
            raise ConfigError("labels are needed for an in-memory kernel")
        labels = src.file.x1_labels
    labels = np.asarray(labels, np.int64)
    if num_classes is None:
        num_classes = int(src.file.attrs["num_outputs"]) if src.file is not None else int(labels.max()) + 1
    return labels, num_classes


@dataclass
class Prediction:
    predictions: np.ndarray  # (N_test, C) kernel regression outputs
    accuracy: float | None   # argmax accuracy against the test labels (None without them)
    ridge: float             # the relative ridge asked for
    ridge_abs: float         # λ added to the diagonal: ridge · trace(K_train)/M
    solver: str              # "cholesky" or "cg"
    iterations: int          # CG iterations (0 for the direct solve)


def _solve_cg(src: _Source, b: np.ndarray, lam: float, tol: float, max_iter: int) -> tuple[np.ndarray, int]:
    """(K + λI) x = b for every column of b at once (independent CGs sharing each tile pass)."""
    kern = src.file if src.file is not None else src.dense
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rs = (r * r).sum(0)
    target = (tol ** 2) * np.maximum((b * b).sum(0), 1e-300)
    for it in range(1, max_iter + 1):
        ap = kernel_matvec(kern, p) + lam * p
        curv = (p * ap).sum(0)
        live = rs > target  # columns still iterating (a converged column's p may be 0)
        if np.any(live & ~(curv > 0)):
            raise DataError(f"conjugate gradients found a direction of curvature <= 0 at iteration {it}: "
                            f"K_train + λI is not positive definite (the kernel is not PSD); check it with "
                            f"entk kernel-info, or raise --ridge")
        step = rs / np.maximum(curv, 1e-300)
        x += p * step
        r -= ap * step
        rs_new = (r * r).sum(0)
        if np.all(rs_new <= target):
            return x, it
        p = r + p * (rs_new / np.maximum(rs, 1e-300))
        rs = rs_new
    return x, max_iter


def kernel_predict(k_train, k_cross, *, ridge: float = 1e-3, y_train: np.ndarray | None = None,
                   y_test: np.ndarray | None = None, num_classes: int | None = None, solver: str = "auto",
                   budget_bytes: int = DEFAULT_BUDGET, tol: float = 1e-8, max_iter: int | None = None) -> Prediction:
    """Kernel regression (NTK prediction) on one-hot labels: ``K_cross (K_train + λI)⁻¹ Y``.

    ``k_train`` is train × train, ``k_cross`` test × train (its columns must be the train
    kernel's inputs; checked for stored files). ``solver``: ``cholesky`` (dense float64 train
    kernel in memory), ``cg`` (conjugate gradients on tile mat-vecs, nothing dense) or ``auto``
    (Cholesky when the dense train kernel fits ``budget_bytes``).
    """
    if not (ridge > 0 and np.isfinite(ridge)):
        raise ConfigError(f"--ridge must be a finite number > 0, got {ridge}")
    if not (isinstance(budget_bytes, (int, np.integer)) and budget_bytes >= 1):
        raise ConfigError(f"budget_bytes must be a whole number of bytes >= 1, got {budget_bytes!r}")
    tr_src, cr_src = _Source(k_train), _Source(k_cross)
    m = tr_src.shape[0]
    if tr_src.shape[0] == tr_src.shape[1]:
        tr_src.require_symmetric("the train kernel")
    if tr_src.shape[0] != tr_src.shape[1]:
        where = f" {tr_src.file.path}" if tr_src.file is not None else ""
        raise ConfigError(f"the train kernel{where} must be square (train x train), got shape {tr_src.shape}")
    if cr_src.shape[1] != m:
        raise ConfigError(f"the cross kernel has {cr_src.shape[1]} columns but the train kernel is {m}x{m}")
    if tr_src.file is not None and cr_src.file is not None:
        _check_pair(tr_src.file, cr_src.file)
    y_train, num_classes = _labels(tr_src, y_train, num_classes)
    if y_test is None and cr_src.file is not None:
        y_test = cr_src.file.x1_labels
    full = _is_full(tr_src, len(y_train), num_classes)
    y = _targets(y_train, num_classes, full)
    if y.shape[0] != m:
        raise ConfigError(f"{len(y_train)} train labels do not match a train kernel of size {m}")
    tr, _ = kernel_norms(tr_src.file if tr_src.file is not None else tr_src.dense)
    lam = ridge * tr / m
    if solver == "auto":
        solver = "cholesky" if m * m * 8 * 2 <= budget_bytes else "cg"
    if solver == "cholesky":
        a = torch.from_numpy(tr_src.to_dense().copy())
        a.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info):
            raise ConfigError(f"K_train + λI is not positive definite at ridge {ridge}; raise --ridge")
        alpha = torch.cholesky_solve(torch.from_numpy(y), chol).numpy()
        iters = 0
    elif solver == "cg":
        alpha, iters = _solve_cg(tr_src, y, lam, tol, max_iter or 10 * m)
    else:
        raise ConfigError(f"solver must be auto, cholesky or cg, got {solver!r}")
    f = kernel_matvec(cr_src.file if cr_src.file is not None else cr_src.dense, alpha)
    preds = f.reshape(-1, num_classes)
    acc = None
    if y_test is not None:
        y_test = np.asarray(y_test, np.int64)
        if len(y_test) != preds.shape[0]:
            raise ConfigError(f"{len(y_test)} test labels for {preds.shape[0]} test predictions")
        acc = float((preds.argmax(1) == y_test).mean())
    return Prediction(predictions=preds, accuracy=acc, ridge=ridge, ridge_abs=lam, solver=solver, iterations=iters)


def _check_pair(train: TiledKernel, cross: TiledKernel) -> None:
    """The cross kernel's columns must be exactly the train kernel's inputs, same model and data."""
    a, b = train.attrs, cross.attrs
    if not train.symmetric:
        raise ConfigError(f"{train.path} is a cross-kernel; the train kernel must be symmetric (no --x2)")
    if cross.symmetric:
        raise ConfigError(f"{cross.path} is symmetric; the test kernel must be a cross-kernel (--x1 test:N --x2 ...)")
    for key in ("kernel", "state_hash", "data_fingerprint", "num_outputs"):
        if a.get(key) != b.get(key):
            raise ConfigError(f"{cross.path} and {train.path} differ in {key} ({b.get(key)!r} vs {a.get(key)!r})")
    if not np.array_equal(cross.x2_index, train.x1_index) or b.get("x2_split") != a.get("x1_split"):
        raise ConfigError(f"the columns of {cross.path} ({b.get('x2_split')}:{b.get('x2_n')}) are not the inputs of "
                          f"{train.path} ({a.get('x1_split')}:{a.get('x1_n')}, seed {a.get('seed')})")


__all__ = [
    "Eigenpairs",
    "Prediction",
    "kernel_matvec",
    "kernel_norms",
    "kernel_predict",
    "kernel_target_alignment",
    "participation_ratio",
    "top_eigenpairs",
]
