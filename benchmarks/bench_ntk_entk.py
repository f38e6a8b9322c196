"""eNTK throughput of the full kernel in one pass: ``engine.ntk.entk`` against the PyTorch tutorial's recipe.

Groups (each has a reference member; the ratio table is printed at the end):

* ``entk-<model>-N<n>`` (ENTK_CASES): the full (N·C) × (N·C) eNTK of a freshly initialised
  model in eval mode at N random-normal CIFAR-shaped inputs. Members: ``engine.ntk.entk`` in
  float32 and with compute_dtype=bfloat16, the PyTorch "Neural Tangent Kernels" tutorial's
  ``empirical_ntk_jacobian_contraction`` exactly as the tutorial writes it (role reference;
  called with x1 = x2 = x) and nngeometry's ``GramMatrix`` (peer).
* ``entk-cross-cnn-256x64``: the train (256) × test (64) cross-kernel.
* ``entk-pntk-cnn-N256``: the pNTK (N × N) against the tutorial recipe applied to Σ_c f_c / √C.

Every member is checked against the recipe before timing (relative Frobenius error recorded in
extra_info["rel_err_vs_recipe"]).

FLOP floor (multiply-adds, extra_info["floor_s"]): C backward-data passes (C × the
forward's multiply-adds of the conv/linear layers), the per-sample weight-gradient
formation (another C × forward), and the Gram, (N·C)²·P/2 for a symmetric kernel
(N1·C·N2·C·P for a cross-kernel), at the float32 (bf16 for the bf16 member's Gram)
torch.mm rate measured in the same run; "floor" = floor_s / median.

Rounds: members alternate inside pytest's order; each member is one warm-up + ROUNDS_ENTK
(env ENTK_BENCH_ROUNDS, default 3) rounds, best-of-rounds is the "min" in the JSON (reported in
the table, since other processes share the cores).

Run: .venv/bin/python -m pytest benchmarks/bench_ntk_entk.py -p no:cacheprovider \
     --benchmark-json=benchmarks/results/ntk-entk-<hw>.json
(nngeometry comes with the ``bench`` extra; without it that member is skipped.)
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
from _common import bench_calls, fresh_model, nngeometry_version
from torch.func import functional_call, jacrev, vmap

from engine.ntk import entk

C = 10
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
        pytest.skip(f"nngeometry {nngeometry_version()} failed: {type(e).__name__}: {e}")
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
    bench_calls(benchmark, fn, device, role, "kernels", 1, rounds=ROUNDS_ENTK, n1=n1, n2=n2, kernel=kernel,
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
    model = fresh_model(model_name, device)
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(device)
    _entk_member(benchmark, device, mm_rates, model, x, None, impl)


@pytest.mark.parametrize("impl", ENTK_IMPLS[:3])
def test_entk_cross(benchmark, device, mm_rates, impl):
    benchmark.group = "entk-cross-cnn-256x64"
    model = fresh_model("cnn", device)
    g = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(256, 3, 32, 32, generator=g).to(device), torch.randn(64, 3, 32, 32, generator=g).to(device)
    _entk_member(benchmark, device, mm_rates, model, x1, x2, impl)


@pytest.mark.parametrize("impl", ENTK_IMPLS[:3])
def test_entk_pntk(benchmark, device, mm_rates, impl):
    benchmark.group = "entk-pntk-cnn-N256"
    model = fresh_model("cnn", device)
    x = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(5)).to(device)
    _entk_member(benchmark, device, mm_rates, model, x, None, impl, kernel="pntk")
