"""Twin-fleet throughput: training images/s per member, fleet strategies vs sequential runs.

Groups ``fleet-K<k>`` for K = 1, 2, 4, 8 (every member spawned, i.e. all K computed):
* ``sequential`` (reference): K independent runs, each with its own model, optimizer and
  batch sampling, stepped one after another — what a user without a fleet would do;
* ``loop``: the fleet's loop strategy (one shared batch, K modules);
* ``vmap``: the fleet's vmap strategy (stacked parameters, one batched step), eager;
* ``vmap-graph`` (CUDA only): the vmap step captured in a CUDA graph.

Group ``chaos-traces-<model>``: one whole chaos grid (``run_chaos``: a base, a control and
four twins, 60 steps, metrics at two t1) without divergence traces (``trace_every=0``, the
reference) and with them every 10 steps and every step; the ratio is the traces' cost
(the target: under 5% of the step time at the default spacing).

Throughput = K × batch / step time (images/s summed over members); the ratio table
compares each with ``sequential``. Targets on an H200 (resnet20, batch 128): fleet of
8 ≥ 3x sequential, graph ≥ 1.3x eager. The model is resnet20 (cnn on CPU when
ENTK_BENCH_FAST=1).

Run: .venv/bin/python -m pytest benchmarks/bench_twins.py --benchmark-json=benchmarks/results/twins-<hw>.json
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from _common import sync

from engine.data import BatchStream, load_synthetic
from engine.determinism import set_deterministic
from engine.models import build_model
from engine.train import TrainConfig, make_optimizer
from engine.twins import MemberSpec, Perturbation, make_fleet

BATCH = 128
MODEL = "cnn" if os.environ.get("ENTK_BENCH_FAST") else "resnet20"
KS = [1, 2, 4, 8]


@pytest.fixture(scope="module")
def data():
    return load_synthetic(4096, 100, seed=0)



def _specs(k):
    return [MemberSpec("base", None)] + [MemberSpec(f"m{i}", 0, Perturbation(1e-3, seed=i)) for i in range(1, k)]


def _impls(device):
    out = ["sequential", "loop", "vmap"]
    if device.type == "cuda":
        out.append("vmap-graph")
    return out


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("impl", ["sequential", "loop", "vmap", "vmap-graph"])
def test_fleet_step(benchmark, data, device, k, impl):
    if impl not in _impls(device):
        pytest.skip("CUDA graphs need a CUDA device")
    benchmark.group = f"fleet-{MODEL}-K{k}"
    set_deterministic(True)
    cfg = TrainConfig(model=MODEL, steps=1000, batch_size=BATCH, lr=0.05)
    if impl == "sequential":
        runs = []
        for i in range(k):
            torch.manual_seed(i)
            m = build_model(MODEL).to(device).train()
            s = BatchStream.from_dataset(data, batch_size=BATCH, seed=i, device=device)
            runs.append((m, make_optimizer(m, cfg), s))

        def step(t):
            for m, opt, s in runs:
                xb, yb = s.batch(t)
                loss = F.cross_entropy(m(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    else:
        torch.manual_seed(0)
        stream = BatchStream.from_dataset(data, batch_size=BATCH, seed=0, device=device)
        strategy = "loop" if impl == "loop" else "vmap"
        fleet = make_fleet(build_model(MODEL).to(device), cfg, stream, _specs(k), strategy=strategy,
                           cuda_graph=impl == "vmap-graph")
        for i in range(1, k):
            fleet.spawn(i)
        step = fleet.step

    state = {"t": 0}

    def call():
        step(state["t"])
        state["t"] += 1
        sync(device)

    benchmark.extra_info.update(role="reference" if impl == "sequential" else "engine", unit="images",
                                items_per_call=k * BATCH, device=str(device), model=MODEL)
    rounds = 3 if device.type == "cpu" else 30
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("every", [0, 10, 1])
def test_chaos_grid_traces(benchmark, data, device, tmp_path, every):
    from engine.jobs import ChaosConfig, run_chaos

    benchmark.group = f"chaos-traces-{MODEL}"
    set_deterministic(True)
    steps = 60
    cfg = ChaosConfig(train=TrainConfig(model=MODEL, steps=steps, batch_size=BATCH, lr=0.05, checkpoints=[]),
                      t0=[0, 5, 10, 20], t1=[30, steps], eps=1e-3, eval_train=128, eval_test=100, alphas=3,
                      trace_every=every)
    n = {"i": 0}

    def call():
        n["i"] += 1
        run_chaos(cfg, tmp_path / f"c{n['i']}.h5", dataset=data, device=device, quiet=True)
        sync(device)

    benchmark.extra_info.update(role="reference" if every == 0 else "engine", unit="member-steps",
                                items_per_call=2 * steps + sum(steps - t for t in cfg.t0), device=str(device),
                                model=MODEL, trace_every=every)
    benchmark.pedantic(call, rounds=3 if device.type == "cpu" else 5, warmup_rounds=1, iterations=1)
