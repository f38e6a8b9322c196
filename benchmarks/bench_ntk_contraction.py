"""eNTK per-layer contraction: the engine (auto / materialise / pairs) vs the torch.func recipe,
as a share of the FLOP floor at the torch.mm rate measured in the same run.

Groups ``contraction-<model>-N<n>``: the full symmetric (N·C) × (N·C) eNTK (C = 10) of a freshly
initialised model in eval mode at N random inputs (CIFAR-shaped images; token ids for ``block``,
a small transformer block: embedding + learned positions, attention and MLP from ``nn.Linear`` on
(N, L, d)). Members:

* ``recipe`` (role reference): the PyTorch NTK tutorial's ``empirical_ntk_jacobian_contraction``
  (vmap of jacrev, then einsum), float32; where its two Jacobians would not fit in half the
  available memory, the same recipe over blocks of samples (``extra_info["recipe_block"]``);
* ``<contraction>-<dtype>``: ``engine.ntk.entk(model, x, contraction=..., compute_dtype=...)`` for
  contraction auto, materialise, pairs and dtype float32, bfloat16 (float32 accumulation).

Every member is checked against the recipe first (relative Frobenius error in
``extra_info["rel_err_vs_recipe"]``: < 1e-4 in float32, < 5e-3 in bfloat16).

Floor (``extra_info["floor_s"]``): ``engine.ntk.plan``'s per-layer best multiply-adds, each
layer's at the torch.mm rate measured in this run at that layer's dominant GEMM shape (m, k, n
capped at 4096 rows and columns) in the member's dtype, plus the backward-data passes at the
float32 1024³ rate. ``share_of_floor`` = floor_s / median time (printed as "% of mm" in the
table). The same floor is used for every member of a group, so a forced strategy shows what
the other choice costs.

Machine: ``extra_info`` records the CPU's name, its bfloat16 matrix unit (AMX, AVX-512 BF16 or
none: without one bfloat16 runs emulated in float32 and its times are not a bf16 result),
threads, and the 1-minute load average before and after each member. ``--contended`` runs one
busy competing process (a float32 torch.mm loop on every thread, at libgomp's default wait
policy whatever this process's) for the whole session.

Env: ENTK_BENCH_ROUNDS (timed rounds, default 3), ENTK_BENCH_WARMUP (untimed rounds after the
checked first call, default 1).

Run: .venv/bin/python -m pytest benchmarks/bench_ntk_contraction.py -p no:cacheprovider \
     [-k "vgg16-N8 and (materialise or pairs)"] [--contended] \
     --benchmark-json=benchmarks/results/ntk-contraction-<hw>.json
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest
import torch
from _common import bf16_unit, cpu_name, sync
from torch import nn
from torch.func import functional_call, jacrev, vmap

from engine.models import build_model
from engine.ntk import entk, plan

C = 10
ROUNDS = int(os.environ.get("ENTK_BENCH_ROUNDS", "3"))
# The correctness check before timing is a warm-up call too; a loaded machine may skip the second.
WARMUP = int(os.environ.get("ENTK_BENCH_WARMUP", "1"))
_RECIPE: dict[tuple[str, int], torch.Tensor] = {}  # the recipe's kernel per case, for the checks
CASES = [("resnet20", 32), ("resnet20", 256), ("vgg16", 8), ("vgg16", 32), ("cnn", 512), ("block", 64)]
IMPLS = ["recipe"] + [f"{c}-{d}" for d in ("float32", "bfloat16") for c in ("auto", "materialise", "pairs")]
_CAP = 4096  # mm rates saturate well below this; bigger shapes only cost memory


class Block(nn.Module):
    """A small pre-norm transformer block on token ids, every weight an nn.Linear on (N, L, d)."""

    def __init__(self, vocab: int = 64, length: int = 16, d: int = 64, heads: int = 4, c: int = C):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, c)

    def forward(self, ids):
        h = self.emb(ids) + self.pos
        n, length, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(n, length, 3, self.heads, d // self.heads).unbind(2)
        att = torch.softmax(torch.einsum("nlhe,nmhe->nhlm", q, k) / math.sqrt(d // self.heads), -1)
        h = h + self.proj(torch.einsum("nhlm,nmhe->nlhe", att, v).reshape(n, length, d))
        h = h + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))


def _model_and_inputs(name: str, n: int):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    if name == "block":
        return Block().eval(), torch.randint(0, 64, (n, 16), generator=g)
    return build_model(name, num_classes=C).eval(), torch.randn(n, 3, 32, 32, generator=g)


def _recipe_block(model, n: int) -> int:
    """Samples per block of the recipe: all ``n`` when its two Jacobians (2·n·C·P floats) fit in
    half the memory available now, else the largest block that does (vgg16 at N=32 needs 38 GB)."""
    per_sample = 2 * C * sum(p.numel() for p in model.parameters()) * 4
    try:
        with open("/proc/meminfo") as fh:
            avail = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return n
    return max(1, min(n, avail // 2 // per_sample))


def _recipe(model, block: int | None = None):
    """The torch.func tutorial's empirical_ntk_jacobian_contraction, rows n·C + c.

    With ``block``: the same recipe over blocks of ``block`` samples (the upper triangle of block
    pairs, mirrored), as a user whose Jacobians do not fit in memory would run it."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(params, x):
        return functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

    def ntk(x1, x2):
        jac1 = [j.flatten(2) for j in vmap(jacrev(fnet_single), (None, 0))(params, x1).values()]
        jac2 = [j.flatten(2) for j in vmap(jacrev(fnet_single), (None, 0))(params, x2).values()]
        k4 = torch.stack([torch.einsum("Naf,Mbf->NMab", a, b) for a, b in zip(jac1, jac2, strict=True)]).sum(0)
        n, m, c, _ = k4.shape
        return k4.permute(0, 2, 1, 3).reshape(n * c, m * c)

    if block is None:
        return ntk

    def blocked(x1, x2):
        assert x1 is x2, "the blocked recipe computes the symmetric kernel"
        n = x1.shape[0]
        out = torch.empty(n * C, n * C)
        starts = range(0, n, block)
        for i in starts:
            for j in starts:
                if j < i:
                    continue
                t = ntk(x1[i:i + block], x1[j:j + block])
                out[i * C:i * C + t.shape[0], j * C:j * C + t.shape[1]] = t
                out[j * C:j * C + t.shape[1], i * C:i * C + t.shape[0]] = t.T
        return out

    return blocked


@pytest.fixture(scope="module")
def mm_rate():
    """mm_rate(shape, dtype): multiply-adds per second of torch.mm at (m, k, n), best of 3, cached."""
    cache: dict = {}

    def rate(shape, dtype):
        m, k, n = min(shape[0], _CAP), shape[1], min(shape[2], _CAP)
        key = (m, k, n, dtype)
        if key not in cache:
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
            torch.mm(a, b)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                torch.mm(a, b)
                best = min(best, time.perf_counter() - t0)
            cache[key] = m * k * n / best
        return cache[key]

    return rate


@pytest.fixture(scope="module", autouse=True)
def competitor(request):
    """With --contended: one busy process multiplying float32 matrices on every thread."""
    if not request.config.getoption("--contended", default=False):
        yield None
        return
    code = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    torch.mm(a, a)\n"
    # The competitor is someone else's process: it keeps libgomp's default (spinning) wait policy
    # whatever this one runs with.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    p = subprocess.Popen([sys.executable, "-c", code], env=env)
    time.sleep(2)  # let it start multiplying
    yield p
    p.terminate()
    p.wait(timeout=30)


def _floor_s(model, x, dtype, rate) -> tuple[float, int]:
    pl = plan(model, x, compute_dtype=dtype if dtype == torch.bfloat16 else None)
    seconds = pl.backward_macs / rate((1024, 1024, 1024), torch.float32)
    for lc in pl.layers:
        cost = lc.chosen
        if cost.macs:
            seconds += cost.macs / rate(cost.gemm or (1024, 1024, 1024), dtype)
    return seconds, pl.floor.macs


@pytest.mark.parametrize(("model_name", "n"), CASES, ids=[f"{m}-N{n}" for m, n in CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_contraction(benchmark, device, mm_rate, competitor, model_name, n, impl):
    if device.type != "cpu":
        pytest.skip("the floor is rated at CPU torch.mm rates; run on the CPU")
    benchmark.group = f"contraction-{model_name}-N{n}"
    model, x = _model_and_inputs(model_name, n)
    block = _recipe_block(model, n)
    recipe = _recipe(model, None if block == n else block)
    if impl == "recipe":
        def fn():
            return recipe(x, x)
        dtype = torch.float32
    else:
        contraction, dname = impl.split("-")
        dtype = getattr(torch, dname)
        cd = torch.bfloat16 if dtype == torch.bfloat16 else None

        def fn():
            return entk(model, x, contraction=contraction, compute_dtype=cd)

    load_before = os.getloadavg()[0]
    h = fn()
    if impl == "recipe":
        _RECIPE[model_name, n] = h
    ref = _RECIPE.get((model_name, n))
    if ref is None:
        ref = _RECIPE[model_name, n] = recipe(x, x)
    err = float((h.double() - ref.double()).norm() / ref.double().norm())
    assert err < (5e-3 if dtype == torch.bfloat16 else 1e-4), f"{impl}: relative error {err:.3g} vs the recipe"
    del h
    floor_s, floor_macs = _floor_s(model, x, dtype, mm_rate)

    def call():
        fn()
        sync(device)

    benchmark.extra_info.update(
        role="reference" if impl == "recipe" else "engine", unit="kernels", items_per_call=1, n=n,
        rel_err_vs_recipe=err, floor_s=floor_s, macs_floor=floor_macs, flops=floor_macs,
        ceiling_TFLOPs=floor_macs / floor_s / 1e12, cpu=cpu_name(), bf16_unit=bf16_unit(),
        threads=torch.get_num_threads(), contended=competitor is not None, load_avg_1min_before=load_before,
        recipe_block=block)
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    benchmark.extra_info.update(load_avg_1min_after=os.getloadavg()[0],
                                share_of_floor=floor_s / benchmark.stats.stats.median)
