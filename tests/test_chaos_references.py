"""Reference members of the chaos job: the independent run (another initialisation, same data
order) and spawn copies (the base at t0 on another data order); the error barrier in the grid;
resume after a SIGKILL in the middle of a reference run."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import engine.jobs.chaos as chaos_mod
from engine.data import BatchStream, load_synthetic
from engine.errors import ConfigError
from engine.jobs import FIELDS, ChaosConfig, load_chaos, run_chaos
from engine.models import build_model
from engine.store import ChaosStore
from engine.train import TrainConfig
from engine.twins import MemberSpec, make_fleet


@pytest.fixture(scope="module")
def ds():
    return load_synthetic(640, 200, seed=5)


def _train(**kw):
    base = {"model": "cnn", "steps": 12, "batch_size": 32, "lr": 0.05, "checkpoints": [12], "eval_train": 100}
    return TrainConfig(**{**base, **kw})


def _chaos(**kw):
    args = {"train": _train(), "t0": [0, 6], "t1": [6, 12], "eps": 1e-3, "eval_train": 64, "eval_test": 64,
            "alphas": 5, "strategy": "loop", "independent": True, "spawn_t0": [4]}
    return ChaosConfig(**{**args, **kw})


def _l2(a: dict, b: dict, names) -> float:
    return math.sqrt(sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n in names))


def test_reference_members_are_recorded_with_their_kinds_and_error_barrier(tmp_path, ds):
    cfg = _chaos()
    res = run_chaos(cfg, tmp_path / "c.h5", dataset=ds, quiet=True)
    kinds = [s.kind for s in res.members]
    assert kinds == ["base", "control", "perturbed", "perturbed", "independent", "spawn"]
    recs = res.records()
    ind = {r["t1"]: r for r in recs if r["member"] == "independent"}
    spawn = {r["t1"]: r for r in recs if r["member"] == "spawn"}
    assert set(ind) == {6, 12} and all(r["t0"] == 0 for r in ind.values())
    assert set(spawn) == {6, 12} and all(r["t0"] == 4 for r in spawn.values())
    assert all("error_barrier_test" in r and 0 <= r["error_barrier_test"] <= 1 for r in recs)
    twin = {r["t1"]: r for r in recs if r["member"] == "perturbed" and r["t0"] == 0}
    # Another initialisation is far from the base; a 1e-3 twin of it is not (yet).
    assert ind[12]["l2"] > 10 * twin[12]["l2"]
    # The independent run starts from the state built under its own seed: the trace at t = 0 is that distance.
    torch.manual_seed(cfg.train.seed)
    a = build_model("cnn").state_dict()
    torch.manual_seed(cfg.train.seed + chaos_mod.INDEPENDENT_SEED)
    b = build_model("cnn").state_dict()
    names = [n for n, _ in build_model("cnn").named_parameters()]
    tr = next(t for t in res.traces() if t["member"] == "independent")
    assert tr["t"][0] == 0 and tr["l2"][0] == pytest.approx(_l2(a, b, names), rel=1e-6)
    summary = res.summary()
    ms = {m["kind"]: m for m in summary["members"]}
    assert ms["independent"]["init_seed"] == cfg.train.seed + chaos_mod.INDEPENDENT_SEED
    assert ms["spawn"]["data_seed"] == cfg.train.stream_seed + chaos_mod.SPAWN_SEED
    # The file keeps the fields it was written with; load_chaos gives the same records.
    assert load_chaos(tmp_path / "c.h5").records() == recs
    assert len(FIELDS) == res.metrics.shape[2]


def test_spawn_member_trains_on_its_own_data_order_bit_for_bit(ds):
    """A spawn member equals the base at t0 trained on from there on the other stream, step for step."""
    cfg = _train()
    torch.manual_seed(cfg.seed)
    model = build_model("cnn")
    stream = BatchStream.from_dataset(ds, batch_size=cfg.batch_size, seed=cfg.stream_seed)
    other = BatchStream.from_dataset(ds, batch_size=cfg.batch_size, seed=cfg.stream_seed + 99)
    specs = [MemberSpec("base", None), MemberSpec("spawn", 3, data_seed=cfg.stream_seed + 99)]
    fleet = make_fleet(model, cfg, stream, specs, strategy="loop", streams={1: other})
    solo = None
    for t in range(8):
        if t == 3:
            fleet.spawn(1)
            solo = make_fleet(build_model("cnn"), cfg, other, [MemberSpec("base", None)], strategy="loop")
            solo.load(0, fleet.state(0), fleet.momentum(0))
        fleet.step(t)
        if solo is not None:
            solo.step(t)
    s1, s2, s0 = fleet.state(1), solo.state(0), fleet.state(0)
    assert all(torch.equal(s1[n], s2[n]) for n in s1)
    assert not all(torch.equal(s1[n], s0[n]) for n in s1)  # another data order: another trajectory


def test_spawn_members_need_the_loop_strategy(ds, capsys):
    cfg = _train()
    stream = BatchStream.from_dataset(ds, batch_size=cfg.batch_size, seed=1)
    specs = [MemberSpec("base", None), MemberSpec("spawn", 3, data_seed=7)]
    with pytest.raises(ConfigError, match="strategy='loop'"):
        make_fleet(build_model("cnn"), cfg, stream, specs, strategy="vmap", streams={1: stream})
    with pytest.raises(ConfigError, match="--strategy loop"):
        chaos_mod._reference_strategy("vmap", specs, torch.device("cpu"), quiet=True)
    # auto would pick vmap on CUDA: it falls back to loop and says so.
    assert chaos_mod._reference_strategy("auto", specs, torch.device("cuda"), quiet=False) == "loop"
    assert "spawn references" in capsys.readouterr().err
    assert chaos_mod._reference_strategy("auto", specs[:1], torch.device("cuda"), quiet=True) == "auto"


@pytest.mark.parametrize("kw,match", [({"spawn_t0": [13]}, "spawn t0"), ({"spawn_t0": [-1]}, "spawn t0")])
def test_bad_spawn_grid_refused_before_training(kw, match):
    with pytest.raises(ConfigError, match=match):
        _chaos(**kw).validate()


@pytest.mark.slow
def test_sigkill_during_a_reference_run_then_rerun_is_bit_identical(tmp_path):
    args = ["chaos", "--model", "cnn", "--data", "synthetic", "--n-train", "640", "--n-test", "100",
            "--batch-size", "32", "--lr", "0.05", "--t0", "0,6", "--t1", "3,6,9,12,15,18", "--eps", "1e-3",
            "--eval-n", "50", "--alphas", "3", "--strategy", "loop", "--independent", "--spawn-t0", "6",
            "--quiet"]
    ref = tmp_path / "ref.h5"
    r = subprocess.run([sys.executable, "-m", "engine", *args, "--out", str(ref)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-m", "engine", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed = time.time() + 600, None
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            done = ChaosStore(out).complete
        except Exception:
            continue  # not created yet
        if done[2]:  # t1 = 9 written: the spawn reference (t0 = 6) is mid-run
            proc.send_signal(signal.SIGKILL)
            killed = int(done.sum())
            break
    proc.wait()
    assert killed is not None and killed < 6, "the job finished before it could be killed"
    again = subprocess.run([sys.executable, "-m", "engine", *args, "--out", str(out)], capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    a, b = load_chaos(ref), load_chaos(out)
    np.testing.assert_array_equal(a.metrics, b.metrics)
    np.testing.assert_array_equal(a.trace, b.trace)
    assert {r["member"] for r in b.records()} >= {"independent", "spawn"}
