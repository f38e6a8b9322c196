"""Diagnostics of a trajectory of empirical NTKs beyond the cone: kernel–label alignment,
spectrum and effective rank, distance to the final kernel.

Kernel–label alignment is the centred kernel alignment (Cortes, Mohri and Rostamizadeh
2012) of the output-traced kernel K_nm = Σ_c H_(n,c),(m,c) (N × N) with the Gram of the
probe labels' one-hot matrix Y (N × C), L = Y Yᵀ (1 where two probes share a class):
CKA(K, L) = ⟨K̃, L̃⟩_F / (‖K̃‖_F ‖L̃‖_F) with K̃ = J K J, J = I − 11ᵀ/N. It is 1 when the kernel's
centred similarity structure is exactly the class structure. A full kernel (row n·C + c) is
traced over c first; a traced kernel is used as it is.

Effective rank (Roy and Vetterli 2007): exp of the Shannon entropy of the normalised
eigenvalues p_i = λ_i / Σ λ (negative eigenvalues from rounding clipped to 0); between 1
(one direction) and the kernel's size (a flat spectrum).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError


def traced(h, num_outputs: int) -> np.ndarray:
    """The (N, N) output-traced kernel of a full (N·C, N·C) kernel with rows n·C + c."""
    h = np.asarray(h, dtype=np.float64)
    m = h.shape[0]
    if h.ndim != 2 or h.shape[1] != m or m % num_outputs:
        raise ConfigError(f"a full kernel must be square with a multiple of {num_outputs} rows, got {h.shape}")
    n = m // num_outputs
    return np.einsum("icjc->ij", h.reshape(n, num_outputs, n, num_outputs))


def centred_alignment(k, l) -> float:
    """CKA(K, L) = ⟨JKJ, JLJ⟩_F / (‖JKJ‖_F ‖JLJ‖_F); NaN when either centred matrix is zero."""
    k, l = np.asarray(k, dtype=np.float64), np.asarray(l, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape != l.shape:
        raise ConfigError(f"alignment needs two square matrices of one size, got {k.shape} and {l.shape}")
    kc = k - k.mean(0, keepdims=True) - k.mean(1, keepdims=True) + k.mean()
    lc = l - l.mean(0, keepdims=True) - l.mean(1, keepdims=True) + l.mean()
    den = np.linalg.norm(kc) * np.linalg.norm(lc)
    return float((kc * lc).sum() / den) if den > 0 else float("nan")


def label_gram(labels, num_classes: int) -> np.ndarray:
    """Y Yᵀ of the one-hot labels: 1 where two samples share a class, else 0."""
    y = np.asarray(labels).astype(np.int64).ravel()
    if (y < 0).any() or (y >= num_classes).any():
        raise ConfigError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    return (y[:, None] == y[None, :]).astype(np.float64)


def spectrum(h) -> np.ndarray:
    """Eigenvalues of a symmetric kernel, descending, in float64."""
    h = np.asarray(h, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ConfigError(f"a kernel must be square, got shape {h.shape}")
    return np.linalg.eigvalsh((h + h.T) / 2)[::-1].copy()


def effective_rank(eigenvalues) -> float:
    """exp(−Σ p log p) with p = λ⁺ / Σ λ⁺ (Roy and Vetterli 2007); NaN for an all-zero spectrum."""
    w = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    total = w.sum()
    if total <= 0:
        return float("nan")
    p = w[w > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))
