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

The FLOP and byte counts of each member are also recorded in ``extra_info``.
On CUDA every call is followed by ``torch.cuda.synchronize``.

Run: .venv/bin/python -m pytest benchmarks/bench_ntk.py -p no:cacheprovider \
     --benchmark-json=benchmarks/results/ntk-<hw>.json
(nngeometry comes with the ``bench`` extra; without it that member is skipped.)
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from _common import sync

from engine.models import build_model
from engine.ntk import jacobian, pairwise_kernel_distance
from engine.ntk.gram import gram, plan_tiles
from engine.store import JacobianStore

try:
    from nngeometry import Jacobian as NNGJacobian
    _NNG_ERROR = None
except Exception as e:  # ImportError, or an API break under this torch
    NNGJacobian = None
    _NNG_ERROR = f"{type(e).__name__}: {e}"



def _nng_version() -> str:
    try:
        return importlib.metadata.version("nngeometry")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


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



def _bench(benchmark, fn, device, role, unit, items, rounds=ROUNDS, **info):
    """Time ``fn`` (one call = one round); the caller has already run it once (warm-up)."""

    def call():
        fn()
        sync(device)

    benchmark.extra_info.update(role=role, unit=unit, items_per_call=items, device=str(device), **info)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)


# --------------------------------------------------------------------------- Jacobians


@pytest.fixture(scope="module")
def probe(device):
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 3, 32, 32, generator=g).to(device)


def _model(name, device):
    torch.manual_seed(0)
    return build_model(name, num_classes=C).to(device).eval()


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
    model = _model(model_name, device)
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
        pytest.skip(f"nngeometry {_nng_version()} failed on {model_name} under torch "
                    f"{torch.__version__}: {type(e).__name__}: {e}")
    assert J.numel() == N * C * n_params, f"{impl}: Jacobian has {J.numel()} entries, expected {N}·{C}·{n_params}"
    want = _sample0_rows(model, probe)
    scale = want.abs().max().item()
    tol = 1e-2 if device.type == "cuda" else 1e-4  # cuDNN convolutions run in TF32 by default
    torch.testing.assert_close(rows0(J), want, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{impl} Jacobian disagrees with autograd on sample 0: {m}")
    del J

    role = {"reference": "reference", "structured": "engine", "nngeometry": "peer"}[impl]
    _bench(benchmark, fn, device, role, "Jacobian rows", N * C,
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
    _bench(benchmark, fn, device, "reference" if impl == "in-memory-mm" else "engine", "GFLOP", GRAM_GFLOP,
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
    _bench(benchmark, fn, device, "reference" if impl == "naive-loop" else "engine", "kernel pairs", PAIRS,
           rounds=ROUNDS, n_kernels=T, kernel_size=M, **info)


# --------------------------------------------------------------------------- full eNTK (one pass)
#
# Group ``entk-<model>-N<n>``: the full (N·C) × (N·C) eNTK of a freshly initialised model in
# eval mode at N random-normal CIFAR-shaped inputs. Members: ``engine.ntk.entk`` in float32
# and with compute_dtype=bfloat16, the PyTorch "Neural Tangent Kernels" tutorial's
# ``empirical_ntk_jacobian_contraction`` exactly as the tutorial writes it (role reference;
# called with x1 = x2 = x) and nngeometry's ``GramMatrix`` (peer). ``entk-cross-cnn`` is the
# train (256) × test (64) cross-kernel, ``entk-pntk-cnn`` the pNTK (N × N) against the
# tutorial recipe applied to Σ_c f_c / √C. Every member is checked against the recipe
# before timing (relative Frobenius error recorded in extra_info["rel_err_vs_recipe"]).
#
# FLOP floor (multiply-adds, extra_info["floor_s"]): C backward-data passes (C × the
# forward's multiply-adds of the conv/linear layers), the per-sample weight-gradient
# formation (another C × forward), and the Gram, (N·C)²·P/2 for a symmetric kernel
# (N1·C·N2·C·P for a cross-kernel), at the float32 (bf16 for the bf16 member's Gram)
# torch.mm rate measured in the same run; "floor" = floor_s / median.
#
# Rounds: members alternate inside pytest's order; each member is one warm-up + ROUNDS_ENTK
# rounds, best-of-rounds is the "min" in the JSON (reported in the table, since other
# processes share the cores).

import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from torch.func import functional_call, jacrev, vmap  # noqa: E402

from engine.ntk import entk  # noqa: E402

ROUNDS_ENTK = int(os.environ.get("ENTK_BENCH_ROUNDS", "3"))
ENTK_CASES = [("resnet20", 32), ("resnet20", 64), ("resnet20", 256), ("cnn", 64), ("cnn", 512)]


@pytest.fixture(scope="module")
def mm_rates():
    """Measured torch.mm multiply-add rates (MAC/s) in float32 and bfloat16, best of 3, 1024²."""
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        a = torch.randn(1024, 1024).to(dt)
        torch.mm(a, a)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            torch.mm(a, a)
            best = min(best, time.perf_counter() - t0)
        out[str(dt)] = 1024 ** 3 / best
    return out


def _forward_macs(model, x1):
    """Multiply-adds of the conv and linear layers in one forward of one sample."""
    macs = [0]

    def hook(m, a, y):
        if isinstance(m, torch.nn.Conv2d):
            macs[0] += y[0].numel() * m.in_channels // m.groups * math.prod(m.kernel_size)
        elif isinstance(m, torch.nn.Linear):
            macs[0] += y[0].numel() * m.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(x1)
    for h in hs:
        h.remove()
    return macs[0]


def _floor_s(model, x, n1, n2, symmetric, rates, gram_dtype):
    p = sum(q.numel() for q in model.parameters())
    fwd = _forward_macs(model, x[:1])
    per_sample = 2 * C * fwd * (n1 + (0 if symmetric else n2))  # backward-data + weight-gradient formation
    gram = (n1 * C) ** 2 * p / 2 if symmetric else n1 * C * n2 * C * p
    return per_sample / rates[str(torch.float32)] + gram / rates[str(gram_dtype)], per_sample + gram


def _recipe(model):
    """The torch.func tutorial's empirical_ntk_jacobian_contraction, as written there."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(params, x):
        return functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

    def empirical_ntk_jacobian_contraction(fnet_single, params, x1, x2):
        # Compute J(x1)
        jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
        jac1 = jac1.values()
        jac1 = [j.flatten(2) for j in jac1]
        # Compute J(x2)
        jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
        jac2 = jac2.values()
        jac2 = [j.flatten(2) for j in jac2]
        # Compute J(x1) @ J(x2).T
        result = torch.stack([torch.einsum("Naf,Mbf->NMab", j1, j2) for j1, j2 in zip(jac1, jac2)])  # noqa: B905
        result = result.sum(0)
        return result

    return lambda x1, x2, f=fnet_single: empirical_ntk_jacobian_contraction(f, params, x1, x2)


def _as_rows(k4):
    """(N, M, C, C) of the recipe -> (N·C, M·C), row n·C + c."""
    n, m, c, _ = k4.shape
    return k4.permute(0, 2, 1, 3).reshape(n * c, m * c)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _entk_member(benchmark, device, mm_rates, model, x1, x2, impl, kernel="full"):
    sym = x2 is None
    xb = x1 if sym else x2
    recipe = _recipe(model)
    if kernel == "pntk":
        sm = _Summed(model)
        ref_fn = lambda: _recipe(sm)(x1, xb)[:, :, 0, 0]  # noqa: E731
    else:
        ref_fn = lambda: _as_rows(recipe(x1, xb))  # noqa: E731
    if impl == "recipe":
        fn = ref_fn
    elif impl in ("engine-float32", "engine-bfloat16"):
        cd = torch.bfloat16 if impl.endswith("bfloat16") else None

        def fn():
            return entk(model, x1, x2, kernel=kernel, compute_dtype=cd)
    else:  # nngeometry
        try:
            from nngeometry import GramMatrix
        except Exception as e:
            pytest.skip(f"nngeometry is not importable ({type(e).__name__}: {e}); pip install nngeometry")
        if not sym or kernel != "full":
            pytest.skip("nngeometry's GramMatrix computes only the symmetric full kernel")
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x1, torch.zeros(len(x1))),
                                             batch_size=min(len(x1), 64))

        def fn():
            g = GramMatrix(model, loader, function=lambda x, t: model(x)).to_torch()  # (C, N, C, N)
            return g.permute(1, 0, 3, 2).reshape(len(x1) * C, len(x1) * C)
    try:
        h = fn()
    except Exception as e:
        if impl != "nngeometry":
            raise
        pytest.skip(f"nngeometry {_nng_version()} failed: {type(e).__name__}: {e}")
    ref = h if impl == "recipe" else ref_fn()
    err = _rel(h, ref)
    bound = 5e-3 if impl == "engine-bfloat16" else 1e-4
    assert err < bound, f"{impl}: relative error {err:.3g} against the recipe"
    del h, ref
    n1, n2 = len(x1), len(xb)
    floor, flops = _floor_s(model, x1, n1, n2, sym, mm_rates,
                            torch.bfloat16 if impl == "engine-bfloat16" else torch.float32)
    if kernel == "pntk":
        floor, flops = floor / C, flops / C  # one output instead of C
    role = {"recipe": "reference", "nngeometry": "peer"}.get(impl, "engine")
    _bench(benchmark, fn, device, role, "kernels", 1, rounds=ROUNDS_ENTK, n1=n1, n2=n2, kernel=kernel,
           rel_err_vs_recipe=err, floor_s=floor, macs_floor=flops, mm_mac_per_s=mm_rates,
           threads=torch.get_num_threads(), load_avg_1min=os.getloadavg()[0])


class _Summed(torch.nn.Module):
    """Σ_c f_c / √C as a one-output model (the pNTK's function)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        y = self.model(x)
        return y.sum(1, keepdim=True) / math.sqrt(y.shape[1])


ENTK_IMPLS = ["recipe", "engine-float32", "engine-bfloat16", "nngeometry"]


@pytest.mark.parametrize(("model_name", "n"), ENTK_CASES, ids=[f"{m}-N{n}" for m, n in ENTK_CASES])
@pytest.mark.parametrize("impl", ENTK_IMPLS)
def test_entk_full(benchmark, device, mm_rates, model_name, n, impl):
    benchmark.group = f"entk-{model_name}-N{n}"
    model = _model(model_name, device)
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(device)
    _entk_member(benchmark, device, mm_rates, model, x, None, impl)


@pytest.mark.parametrize("impl", ENTK_IMPLS[:3])
def test_entk_cross(benchmark, device, mm_rates, impl):
    benchmark.group = "entk-cross-cnn-256x64"
    model = _model("cnn", device)
    g = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(256, 3, 32, 32, generator=g).to(device), torch.randn(64, 3, 32, 32, generator=g).to(device)
    _entk_member(benchmark, device, mm_rates, model, x1, x2, impl)


@pytest.mark.parametrize("impl", ENTK_IMPLS[:3])
def test_entk_pntk(benchmark, device, mm_rates, impl):
    benchmark.group = "entk-pntk-cnn-N256"
    model = _model("cnn", device)
    x = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(5)).to(device)
    _entk_member(benchmark, device, mm_rates, model, x, None, impl, kernel="pntk")
