"""Kernel-trajectory diagnostics of one study seed from its kernel file (rules in
:mod:`engine.analysis.kernel_stats`): alignment with the probe labels, top eigenvalues,
effective rank and distance to the final kernel, per checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..analysis import ConeAnalysis, centred_alignment, effective_rank, label_gram, spectrum, traced
from ..data import load_dataset
from ..ntk import probe_hash
from ..store import KernelStore
from ..train import TrainConfig
from .kernels import probe_set

TOP = 5


@dataclass
class KernelDiagnostics:
    iterations: np.ndarray        # (T,)
    alignment: np.ndarray         # (T,) CKA of the traced kernel with the probe labels' Gram
    top_eigenvalues: np.ndarray   # (T, TOP) of the stored kernel, descending
    effective_rank: np.ndarray    # (T,)
    distance_to_final: np.ndarray  # (T,) S(H_t, H_final) = 1 − cos

    def to_dict(self) -> dict:
        return {"iterations": self.iterations.tolist(), "alignment": self.alignment.tolist(),
                "top_eigenvalues": self.top_eigenvalues.tolist(), "effective_rank": self.effective_rank.tolist(),
                "distance_to_final": self.distance_to_final.tolist()}


def kernel_diagnostics(kernels_path, cone: ConeAnalysis, cfg: TrainConfig, *, cache_dir=None) -> KernelDiagnostics:
    """Diagnostics of every kernel in ``kernels_path`` (probe labels re-drawn as the kernel job drew them)."""
    store = KernelStore(kernels_path)
    job = store.job
    kwargs = {"cache_dir": cache_dir, "progress": False} if cfg.data == "cifar10" else {}
    ds = load_dataset(cfg.data, cfg.data_root, **kwargs)
    target = None
    # The kernel job drew its probes from the whole split or from the run's subset: take the one it used.
    for src in (ds, ds.subset(cfg.n_train, cfg.n_test, seed=cfg.subset_seed)):
        x, y = probe_set(src, int(job["probe"]), seed=int(job["probe_seed"]), split=job["probe_split"])
        if probe_hash(x) == job["probe_hash"]:
            target = label_gram(y.numpy(), ds.num_classes)
            break
    c = int(job["num_outputs"])
    its = np.asarray(cone.iterations)
    align, tops, ranks = [], [], []
    for it in its:
        h = np.asarray(store.kernel(int(it)), dtype=np.float64)
        k = h if job["kernel"] == "traced" else traced(h, c)
        align.append(centred_alignment(k, target) if target is not None else float("nan"))
        w = spectrum(h)
        tops.append(np.pad(w[:TOP], (0, max(0, TOP - len(w))), constant_values=np.nan))
        ranks.append(effective_rank(w))
    return KernelDiagnostics(iterations=its, alignment=np.array(align), top_eigenvalues=np.array(tops),
                             effective_rank=np.array(ranks), distance_to_final=cone.distance[:, -1].copy())
