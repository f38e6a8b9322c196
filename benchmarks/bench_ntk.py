"""eNTK throughput: Jacobians, out-of-core Gram matrices, pairwise kernel distances.

Groups (each has a reference member; the ratio table is printed at the end):

* ``jacobian-<model>`` (resnet20, cnn): the full per-sample Jacobian J, (N·C) × P,
  of a freshly initialised model in eval mode (BatchNorm on its initial running
  statistics) at N random-normal CIFAR-shaped inputs (N = 64 on the CPU, 256 on CUDA),
  C = 10. Members: ``engine.ntk.jacobian(implementation="structured")``, the ``reference``
  backend (``torch.func`` vmap of jacrev; role reference), and nngeometry's
  ``Jacobian`` generator (``TorchHooksJacobianBackend.get_jacobian``, ``PFMapDense``)
  as a peer tool. Unit: Jacobian rows (items_per_call = N·C). nngeometry returns
  (C, N, P); the permutation to the engine's row order n·C + c is not timed. Each
  member's sample-0 rows are checked against ``torch.autograd.grad`` before timing.
  Bytes written per call: N·C·P·4 (resnet20, N=64: 640 × 269,722 × 4 = 690 MB;
  cnn: 640 × 24,346 × 4 = 62 MB).
  **Target: structured ≥ 5x the reference's rows/s on resnet20, N = 64, on the CPU.**
* ``gram-out-of-core``: H = J Jᵀ for a random float32 J of R × P (CPU: 2,000 × 50,000,
  400 MB; CUDA: 8,192 × 100,000, 3.3 GB) held in a ``JacobianStore`` file written once
  per module; ``gram(store, budget_bytes=64 MB, block_rows=512)`` (CPU; 4 row blocks ×
  5 column chunks, only the 10 upper-triangle tiles per chunk are multiplied) vs
  ``torch.mm(J, J.T)`` on the same J in memory (role reference). FLOPs are counted as
  R·R·P (one per multiply-add, i.e. half the usual 2·R·R·P convention) for *both*
  members, although the tiled path multiplies only the upper triangle, so the ratio
  is the ratio of times. Bytes read by the tiled path: Σ_j (j+1) · rows_j · P · 4 per
  call (2.5 × 400 MB = 1.0 GB on the CPU sizes; from the page cache once warm).
  Unit: GFLOP (items_per_call = R·R·P / 1e9).
  **Target: out-of-core ≥ 0.8x the in-memory GFLOP/s.**
* ``pairwise-distance``: T = 16 random symmetric float32 kernels of M × M (M = 2048 on
  the CPU, 4096 on CUDA): ``pairwise_kernel_distance`` (one streaming float64 pass,
  T·M² values read once, T²·M² multiply-adds) vs a naive Python loop over the
  T(T−1)/2 = 120 pairs computing 1 − ⟨Hᵢ,Hⱼ⟩/(‖Hᵢ‖‖Hⱼ‖) with float32 torch ops (role
  reference; reads 4 kernels per pair, 120 · 4 · M² values). Unit: kernel pairs.

The full-eNTK groups (``entk-*``: full, cross and pNTK kernels against the PyTorch tutorial's
recipe) are in ``benchmarks/bench_ntk_entk.py``; the per-layer contraction strategies in
``benchmarks/bench_ntk_contraction.py``.

The FLOP and byte counts of each member are also recorded in ``extra_info``.
On CUDA every call is followed by ``torch.cuda.synchronize``.

Run: .venv/bin/python -m pytest benchmarks/bench_ntk.py -p no:cacheprovider \
     --benchmark-json=benchmarks/results/ntk-<hw>.json
(nngeometry comes with the ``bench`` extra; without it that member is skipped.)
"""

from __future__ import annotations

import pytest
import torch
from _common import bench_calls, fresh_model, nngeometry_version, sync

from engine.ntk import jacobian, pairwise_kernel_distance
from engine.ntk.gram import gram, plan_tiles
from engine.store import JacobianStore

try:
    from nngeometry import Jacobian as NNGJacobian
    _NNG_ERROR = None
except Exception as e:  # ImportError, or an API break under this torch
    NNGJacobian = None
    _NNG_ERROR = f"{type(e).__name__}: {e}"


CUDA = torch.cuda.is_available()
C = 10
N = 256 if CUDA else 64
ROUNDS = 10 if CUDA else 5

# gram-out-of-core
R, P = (8192, 100_000) if CUDA else (2000, 50_000)
GRAM_BUDGET = (1 << 30) if CUDA else (64 << 20)
GRAM_BLOCK_ROWS = 2048 if CUDA else 512

# pairwise-distance
T, M = 16, (4096 if CUDA else 2048)


# --------------------------------------------------------------------------- Jacobians


@pytest.fixture(scope="module")
def probe(device):
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 3, 32, 32, generator=g).to(device)


def _sample0_rows(model, x):
    """∂f_c(x_0)/∂θ for every c by plain autograd on one sample: (C, P)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x[:1])[0]
    rows = [torch.cat([g.flatten() for g in torch.autograd.grad(out[c], params, retain_graph=True)])
            for c in range(out.shape[0])]
    return torch.stack(rows)


@pytest.mark.parametrize("model_name", ["resnet20", "cnn"])
@pytest.mark.parametrize("impl", ["reference", "structured", "nngeometry"])
def test_jacobian(benchmark, device, probe, model_name, impl):
    benchmark.group = f"jacobian-{model_name}"
    model = fresh_model(model_name, device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    if impl == "nngeometry":
        if NNGJacobian is None:
            pytest.skip(f"nngeometry is not importable under torch {torch.__version__} ({_NNG_ERROR}); "
                        "install the 'bench' extra (pip install nngeometry)")

        def fn():
            return NNGJacobian(model, (probe,)).to_torch()  # (C, N, P)

        def rows0(J):
            return J[:, 0, :]
    else:
        def fn():
            return jacobian(model, probe, implementation=impl)  # (N·C, P), row n·C + c

        def rows0(J):
            return J[:C]

    try:
        J = fn()  # also the first warm-up call
        sync(device)
    except Exception as e:
        if impl != "nngeometry":
            raise
        pytest.skip(f"nngeometry {nngeometry_version()} failed on {model_name} under torch "
                    f"{torch.__version__}: {type(e).__name__}: {e}")
    assert J.numel() == N * C * n_params, f"{impl}: Jacobian has {J.numel()} entries, expected {N}·{C}·{n_params}"
    want = _sample0_rows(model, probe)
    scale = want.abs().max().item()
    tol = 1e-2 if device.type == "cuda" else 1e-4  # cuDNN convolutions run in TF32 by default
    torch.testing.assert_close(rows0(J), want, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{impl} Jacobian disagrees with autograd on sample 0: {m}")
    del J

    role = {"reference": "reference", "structured": "engine", "nngeometry": "peer"}[impl]
    bench_calls(benchmark, fn, device, role, "Jacobian rows", N * C,
                rounds=ROUNDS if model_name == "resnet20" else 2 * ROUNDS,
                n_inputs=N, num_outputs=C, n_params=n_params, bytes_written=N * C * n_params * 4)


# --------------------------------------------------------------------------- out-of-core Gram


@pytest.fixture(scope="module")
def jacobian_file(tmp_path_factory):
    """A random R × P float32 Jacobian, in memory and in a JacobianStore (written once)."""
    g = torch.Generator().manual_seed(1)
    J = torch.randn(R, P, generator=g)
    path = tmp_path_factory.mktemp("ntk-bench") / "jacobian.h5"
    store = JacobianStore.create_for(path, job={"model": "random", "bench": "gram-out-of-core"},
                                     n_inputs=R // C, num_outputs=C, n_params=P, block_inputs=R // C)
    with store.writer() as w:
        w.write("jacobian", 0, J)
        w.mark_complete(0)
    return J, store


GRAM_GFLOP = R * R * P / 1e9


@pytest.mark.benchmark(group="gram-out-of-core")
@pytest.mark.parametrize("impl", ["in-memory-mm", "out-of-core"])
def test_gram(benchmark, device, jacobian_file, impl):
    J_host, store = jacobian_file
    if impl == "in-memory-mm":
        J = J_host.to(device)

        def fn():
            return torch.mm(J, J.T)

        info = {"bytes_read": R * P * 4}
    else:
        br, bc = plan_tiles(R, P, itemsize=4, budget_bytes=GRAM_BUDGET, block_rows=GRAM_BLOCK_ROWS)
        rows = [min(br, R - r) for r in range(0, R, br)]
        chunks = -(-P // bc)
        n_tiles = chunks * len(rows) * (len(rows) + 1) // 2
        info = {"budget_bytes": GRAM_BUDGET, "block_rows": br, "block_cols": bc, "row_blocks": len(rows),
                "col_chunks": chunks, "tile_products": n_tiles,
                "bytes_read": sum((j + 1) * r for j, r in enumerate(rows)) * P * 4,
                "flops_done": sum(a * b for i, a in enumerate(rows) for b in rows[i:]) * P}
        assert len(rows) > 1, f"budget {GRAM_BUDGET} gives a single row block; the benchmark needs several"

        def fn():
            return gram(store, budget_bytes=GRAM_BUDGET, block_rows=GRAM_BLOCK_ROWS, device=device)

    H = fn()  # first warm-up call, and a correctness check
    sync(device)
    if impl == "out-of-core":
        ref = torch.mm(J_host[:256].double(), J_host.double().T)
        err = ((H[:256].cpu().double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, f"out-of-core Gram rows 0..255 differ from float64 by {err:.2e} (relative)"
    del H
    bench_calls(benchmark, fn, device, "reference" if impl == "in-memory-mm" else "engine", "GFLOP", GRAM_GFLOP,
                rounds=ROUNDS, rows=R, cols=P, flops_counted=R * R * P, **info)


# --------------------------------------------------------------------------- kernel distances


@pytest.fixture(scope="module")
def kernels(device):
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(T):
        a = torch.randn(M, M, generator=g)
        out.append(((a + a.T) / 2).to(device))
    return out


def _naive_distances(ks):
    t = len(ks)
    s = torch.zeros(t, t, dtype=torch.float64)
    for i in range(t):
        for j in range(i + 1, t):
            v = 1 - torch.sum(ks[i] * ks[j]) / (torch.linalg.norm(ks[i]) * torch.linalg.norm(ks[j]))
            s[i, j] = s[j, i] = v.item()
    return s


PAIRS = T * (T - 1) // 2


@pytest.mark.benchmark(group="pairwise-distance")
@pytest.mark.parametrize("impl", ["naive-loop", "pairwise_kernel_distance"])
def test_pairwise_distance(benchmark, device, kernels, impl):
    if impl == "naive-loop":
        def fn():
            return _naive_distances(kernels)

        info = {"values_read": PAIRS * 4 * M * M, "flops": PAIRS * 4 * M * M}
    else:
        def fn():
            return pairwise_kernel_distance(kernels, device=device)

        info = {"values_read": T * M * M, "flops": T * T * M * M}

    S = fn().cpu()
    sync(device)
    if impl == "pairwise_kernel_distance":
        torch.testing.assert_close(S, _naive_distances(kernels), rtol=0, atol=1e-5)
    del S
    bench_calls(benchmark, fn, device, "reference" if impl == "naive-loop" else "engine", "kernel pairs", PAIRS,
                rounds=ROUNDS, n_kernels=T, kernel_size=M, **info)
