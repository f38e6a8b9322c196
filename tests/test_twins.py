"""Twin fleets: perturbations, lockstep determinism (control = 0), momentum ownership,
both strategies, and the chaos grid with resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.data import BatchStream, load_synthetic
from engine.errors import ConfigError
from engine.jobs import FIELDS, ChaosConfig, load_chaos, run_chaos
from engine.jobs.chaos import ChaosDivergedError
from engine.models import build_model
from engine.store import ChaosStore, RunFile, StoreError
from engine.train import TrainConfig, train
from engine.twins import MemberSpec, Perturbation, ZeroPerturbationError, make_fleet, perturb_model_

FIELDS_IDX = {f: i for i, f in enumerate(FIELDS)}


@pytest.fixture(scope="module")
def ds():
    return load_synthetic(640, 200, seed=3)


def _cfg(**kw):
    base = {"model": "cnn", "steps": 10, "batch_size": 32, "lr": 0.05, "checkpoints": [10], "eval_train": 100}
    return TrainConfig(**{**base, **kw})


def _fleet(ds, cfg, specs, strategy):
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    stream = BatchStream.from_dataset(ds, batch_size=cfg.batch_size, seed=cfg.stream_seed)
    return make_fleet(model, cfg, stream, specs, strategy=strategy)


def _run(fleet, specs, steps):
    for t in range(steps):
        for k, s in enumerate(specs):
            if s.t0 == t:
                fleet.spawn(k)
        fleet.step(t)


def _l2(a, b, model):
    return math.sqrt(sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n, _ in model.named_parameters()))


# -- perturbations ---------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["l2", "linf", "gaussian", "relative"])
def test_perturbation_sizes(norm):
    m = build_model("cnn", width=4)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    info = perturb_model_(m, Perturbation(1e-2, norm, seed=1))
    delta = torch.cat([(p.detach().double() - before[n].double()).flatten() for n, p in m.named_parameters()])
    theta = torch.cat([v.double().flatten() for v in before.values()])
    assert info["realized_l2"] == pytest.approx(float(delta.norm()), rel=1e-12)
    f32 = torch.finfo(torch.float32).eps
    if norm == "l2":
        assert info["realized_l2"] == pytest.approx(1e-2, rel=100 * f32)
    elif norm == "linf":
        assert info["realized_linf"] == pytest.approx(1e-2, rel=100 * f32)
    elif norm == "relative":
        assert info["realized_l2"] == pytest.approx(1e-2 * float(theta.norm()), rel=100 * f32)
    else:
        assert float(delta.std()) == pytest.approx(1e-2, rel=0.05)
    assert info["changed"] == info["coords"] == delta.numel()


def test_perturbation_seeded_weights_only_and_rounding_to_zero():
    a, b = build_model("cnn", width=4), build_model("cnn", width=4)
    b.load_state_dict(a.state_dict())
    perturb_model_(a, Perturbation(1e-3, seed=5))
    perturb_model_(b, Perturbation(1e-3, seed=5))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = build_model("cnn", width=4)
    ref = {n: p.detach().clone() for n, p in c.named_parameters()}
    perturb_model_(c, Perturbation(1e-3, weights_only=True))
    for n, p in c.named_parameters():
        assert torch.equal(p, ref[n]) == (p.ndim < 2), n  # 1-D (biases, BN) untouched
    d = build_model("cnn", width=4)
    with torch.no_grad():
        for p in d.parameters():
            p.fill_(1.0)  # no zeros: a 1e-30 step is far below float32's resolution at 1.0
    info = perturb_model_(d, Perturbation(1e-30))
    assert info["realized_l2"] == 0.0 and info["changed"] == 0
    with pytest.raises(ConfigError, match="norm"):
        Perturbation(1e-3, "l3")
    with pytest.raises(ConfigError, match="finite"):
        Perturbation(float("nan"))


# -- fleets ----------------------------------------------------------------------------------

SPECS = [MemberSpec("base", None), MemberSpec("control", 2, None),
         MemberSpec("early", 2, Perturbation(1e-3, seed=1)), MemberSpec("late", 7, Perturbation(1e-3, seed=2))]


def test_loop_base_is_bit_identical_to_train_and_control_is_zero(tmp_path, ds):
    cfg = _cfg()
    train(cfg, out=tmp_path / "r.h5", dataset=ds, device="cpu", quiet=True)
    ref = RunFile(tmp_path / "r.h5").load_state(10)
    fleet = _fleet(ds, cfg, SPECS, "loop")
    _run(fleet, SPECS, 10)
    base = fleet.state(0)
    assert all(torch.equal(base[n], ref[n]) for n in ref), "spawning members disturbed the base run"
    assert all(torch.equal(base[n], v) for n, v in fleet.state(1).items()), "control differs from base"
    m = build_model("cnn")
    assert _l2(base, fleet.state(2), m) > _l2(base, fleet.state(3), m) > 0


def test_spawned_member_owns_its_momentum(ds):
    cfg = _cfg()
    specs = SPECS[:2]
    fleet = _fleet(ds, cfg, specs, "loop")
    for t in range(3):
        if t == 2:
            fleet.spawn(1)
        fleet.step(t)
    base_bufs = [fleet.opts[0].state[p]["momentum_buffer"] for p in fleet.models[0].parameters()]
    ctrl_bufs = [fleet.opts[1].state[p]["momentum_buffer"] for p in fleet.models[1].parameters()]
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(base_bufs, ctrl_bufs, strict=True))
    before = [b.clone() for b in base_bufs]
    for b in ctrl_bufs:
        b.add_(1.0)  # corrupting the member must not touch the base
    assert all(torch.equal(a, b) for a, b in zip(base_bufs, before, strict=True))


def test_vmap_fleet_control_zero_and_bn_stats_per_member(ds):
    cfg = _cfg()
    fleet = _fleet(ds, cfg, SPECS, "vmap")
    _run(fleet, SPECS, 10)
    base, ctrl, early = fleet.state(0), fleet.state(1), fleet.state(2)
    assert all(torch.equal(base[n], ctrl[n]) for n in base), "vmap control differs from base"
    assert int(base["bn1.num_batches_tracked"]) == 10
    assert not torch.equal(base["bn1.running_mean"], early["bn1.running_mean"])  # stats update per member
    # The vmap base follows the same trajectory as the loop base (different kernels: close, not equal).
    loop = _fleet(ds, cfg, SPECS[:1], "loop")
    _run(loop, SPECS[:1], 10)
    lb = loop.state(0)
    for n in lb:
        torch.testing.assert_close(base[n].double(), lb[n].double(), rtol=1e-3, atol=1e-4)


# -- chaos grid ------------------------------------------------------------------------------

def _chaos(**kw):
    args = {"train": _cfg(steps=12, n_train=None), "t0": [0, 6], "t1": [6, 12], "eps": 1e-3,
            "eval_train": 64, "eval_test": 64, "alphas": 5, "strategy": "loop"}
    return ChaosConfig(**{**args, **kw})


def test_chaos_grid_records_and_noise_floor(tmp_path, ds):
    res = run_chaos(_chaos(), tmp_path / "c.h5", dataset=ds, quiet=True)
    assert [s.kind for s in res.members] == ["base", "control", "perturbed", "perturbed"]
    assert res.noise_floor() == 0.0
    recs = res.records()
    keys = {"t0", "t1", "member", "dissimilarity", "l2", "rel_l2", "barrier_train", "barrier_test",
            "error_barrier_test", "disagreement", "acc_base", "acc_member"}
    assert all(set(r) == keys for r in recs)
    assert all(r["t1"] >= r["t0"] for r in recs)
    ctrl = [r for r in recs if r["member"] == "control"]
    assert ctrl and all(r["l2"] == 0 and r["dissimilarity"] == 0 and r["disagreement"] == 0 for r in ctrl)
    pert = {(r["t0"], r["t1"]): r for r in recs if r["member"] == "perturbed"}
    assert set(pert) == {(0, 6), (0, 12), (6, 6), (6, 12)}
    assert pert[(6, 6)]["l2"] == pytest.approx(res.realized[3, 1])  # just spawned: the perturbation itself
    assert pert[(0, 12)]["l2"] > pert[(6, 12)]["l2"]                # earlier perturbation, larger drift
    assert res.realized[2, 1] == pytest.approx(1e-3, rel=1e-4)


def test_chaos_resume_after_interruption_is_bit_identical(tmp_path, ds, monkeypatch):
    full = run_chaos(_chaos(t1=[2, 6, 12]), tmp_path / "a.h5", dataset=ds, quiet=True)
    import engine.jobs.chaos as chaos_mod

    real = chaos_mod._measure
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # during the t1=6 unit (after t1=2's three members)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(chaos_mod, "_measure", dying)
    with pytest.raises(KeyboardInterrupt):
        run_chaos(_chaos(t1=[2, 6, 12]), tmp_path / "b.h5", dataset=ds, quiet=True)
    assert ChaosStore(tmp_path / "b.h5").complete.tolist() == [True, False, False]
    monkeypatch.setattr(chaos_mod, "_measure", real)
    res = run_chaos(_chaos(t1=[2, 6, 12]), tmp_path / "b.h5", dataset=ds, quiet=True)
    assert res.resumed_from == 2
    np.testing.assert_array_equal(res.metrics, full.metrics)
    loaded = load_chaos(tmp_path / "b.h5")
    np.testing.assert_array_equal(loaded.metrics, full.metrics)
    with pytest.raises(StoreError, match="different job"):
        run_chaos(_chaos(t1=[2, 6, 12], eps=2e-3), tmp_path / "b.h5", dataset=ds, quiet=True)


def test_zero_perturbation_stops_loudly_keeping_results(tmp_path, ds):
    # Spawned at t0 = 3, after the t1 = 0 unit: that unit is kept when the perturbation is refused.
    with pytest.raises(ZeroPerturbationError, match="rounds to zero"):
        run_chaos(_chaos(eps=1e-45, norm="linf", t0=[3, 6], t1=[0, 6, 12]), tmp_path / "z.h5", dataset=ds,
                  quiet=True)
    assert ChaosStore(tmp_path / "z.h5").complete.tolist() == [True, False, False]


@pytest.mark.parametrize("kw,match", [
    ({"t1": [1], "t0": [5]}, "before the first t0"),
    ({"t0": [0], "t1": [60]}, "outside the run"),
    ({"eps": 0.0}, "eps must be finite and > 0"),
    ({"eps": float("inf")}, "eps must be finite"),
    ({"bn": "freeze"}, "bn must be"),
])
def test_bad_grids_refused_before_training(kw, match):
    with pytest.raises(ConfigError, match=match):
        _chaos(**kw).validate()


def test_entk_chaos_cli_summary_and_figure(tmp_path, capsys):
    out, js, fig = tmp_path / "c.h5", tmp_path / "c.json", tmp_path / "fig3"
    args = ["chaos", "--model", "cnn", "--data", "synthetic", "--n-train", "640", "--n-test", "100",
            "--batch-size", "32", "--lr", "0.05", "--t0", "0,4", "--t1", "4,8", "--eps", "1e-3",
            "--eval-n", "50", "--alphas", "3", "--out", str(out), "--summary", str(js), "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "noise floor (control vs base, L2): 0" in text
    summary = json.loads(js.read_text())
    assert summary["config"]["eps"] == 1e-3 and summary["noise_floor"] == 0.0
    assert {m["kind"] for m in summary["members"]} == {"base", "control", "perturbed"}
    r = subprocess.run([sys.executable, "scripts/fig3_chaos.py", str(out), "--out", str(fig)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "fig3.png").stat().st_size > 10_000 and (tmp_path / "fig3.pdf").exists()
    # The bad-input path through the CLI: t1 before every t0.
    bad = ["chaos", "--model", "cnn", "--data", "synthetic", "--t0", "5", "--t1", "1", "--out", str(tmp_path / "x.h5")]
    assert main(bad) == 2
    assert "before the first t0" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.cuda
@pytest.mark.parametrize("graph", [False, True])
def test_cuda_vmap_fleet_control_zero_graph_matches_eager(ds, graph):
    """On CUDA: deterministic control distance 0, and the graph-captured step equals eager."""
    from engine.determinism import set_deterministic

    set_deterministic(True)
    cfg = _cfg(model="resnet20")
    stream = BatchStream.from_dataset(ds, batch_size=cfg.batch_size, seed=0, device="cuda")
    fleets = []
    for use_graph in (False, graph):
        torch.manual_seed(0)
        f = make_fleet(build_model("resnet20").cuda(), cfg, stream, SPECS, strategy="vmap", cuda_graph=use_graph)
        _run(f, SPECS, 10)
        fleets.append(f)
    eager, other = fleets
    assert other.graph_failed is None
    assert (other.graph is not None) == graph
    base = other.state(0)
    assert all(torch.equal(base[n], v) for n, v in other.state(1).items())
    for k in range(len(SPECS)):
        a, b = eager.state(k), other.state(k)
        assert all(torch.equal(a[n], b[n]) for n in a), f"member {k}: graph replay differs from eager"


# -- divergence traces and the defects of issue 11 ------------------------------------------

def test_traces_match_the_metrics_and_the_control_stays_exactly_zero(tmp_path, ds):
    res = run_chaos(_chaos(trace_every=3), tmp_path / "t.h5", dataset=ds, quiet=True)
    assert res.trace_t.tolist() == [0, 3, 6, 9, 12]
    ctrl = next(k for k, s in enumerate(res.members) if s.kind == "control")
    assert (res.trace[:, ctrl, :2] == 0).all()                      # l2 and 1 - cos exactly 0
    l2, dis = FIELDS_IDX["l2"], FIELDS_IDX["dissimilarity"]
    for u, t1 in enumerate(res.config.t1):
        j = res.trace_t.tolist().index(t1)
        for k, s in enumerate(res.members):
            if s.t0 is not None and s.t0 <= t1:
                assert res.trace[j, k, 0] == pytest.approx(res.metrics[u, k, l2], rel=1e-9, abs=0)
                assert res.trace[j, k, 1] == pytest.approx(res.metrics[u, k, dis], rel=1e-6, abs=0)
    late = next(k for k, s in enumerate(res.members) if s.t0 == 6)
    assert np.isnan(res.trace[:2, late]).all()                      # not spawned yet
    summary = res.summary()
    tr = {r["name"]: r for r in summary["trace"]}
    assert tr["t0=6"]["t"] == [6, 9, 12] and len(tr["t0=6"]["l2"]) == 3 and tr["control"]["l2"] == [0.0] * 5
    loaded = load_chaos(tmp_path / "t.h5")
    np.testing.assert_array_equal(loaded.trace, res.trace)
    assert summary["used"]["data_fingerprint"] == ds.fingerprint


def test_vmap_traces_equal_loop_traces_on_the_same_states(ds):
    cfg = _cfg()
    fleets = [_fleet(ds, cfg, SPECS, s) for s in ("loop", "vmap")]
    out = []
    for f in fleets:
        buf = torch.full((2, len(SPECS), 3), float("nan"), dtype=torch.float64)
        for k in range(1, 3):
            f.spawn(k)
        f.trace_into(buf, 1)
        out.append(buf)
    torch.testing.assert_close(out[0], out[1], equal_nan=True)
    assert torch.isnan(out[0][0]).all() and torch.isnan(out[0][1, 3]).all() and (out[0][1, 1, :2] == 0).all()


def test_a_perturbation_that_only_hits_zero_parameters_is_refused(tmp_path, ds):
    # 1e-30 in L2 moves the exactly-zero biases but no trained (non-zero) weight in float32.
    with pytest.raises(ZeroPerturbationError, match=r"changes 0 of \d+ non-zero values.*Nothing was written"):
        run_chaos(_chaos(eps=1e-30, t0=[0], t1=[2, 4]), tmp_path / "z.h5", dataset=ds, quiet=True)
    assert not (tmp_path / "z.h5").exists()  # refused before any result: the file this call created is gone
    res = run_chaos(_chaos(eps=1e-30, t0=[0], t1=[2], allow_zero=True), tmp_path / "z2.h5", dataset=ds, quiet=True)
    assert res.realized[2, 1] > 0   # it did move something (the zeros), which is why the old guard passed


def test_resumed_chaos_job_refuses_other_data(tmp_path, ds):
    run_chaos(_chaos(t1=[2, 6]), tmp_path / "d.h5", dataset=ds, quiet=True)
    other = load_synthetic(640, 200, seed=4)
    with pytest.raises(ConfigError, match=r"other data: it holds b2:\w+ .* this run has b2:\w+"):
        run_chaos(_chaos(t1=[2, 6]), tmp_path / "d.h5", dataset=other, quiet=True)


def test_diverged_member_is_named_with_its_iteration(tmp_path, ds):
    cfg = _chaos(train=_cfg(steps=12, n_train=None, lr=1e5, schedule="constant"), t0=[0], t1=[12], trace_every=2)
    with pytest.raises(ChaosDivergedError, match=r"the base run diverged (between iterations \d+ and \d+|by)"):
        run_chaos(cfg, tmp_path / "n.h5", dataset=ds, quiet=True)


def test_eval_subsets_larger_than_the_data_are_said_and_recorded(tmp_path, ds, capsys):
    res = run_chaos(_chaos(eval_test=5000, t1=[6]), tmp_path / "e.h5", dataset=ds, quiet=False)
    assert "use 64 train / 200 test images (asked for 64 / 5000" in capsys.readouterr().err
    assert res.summary()["used"]["eval_test"] == 200
