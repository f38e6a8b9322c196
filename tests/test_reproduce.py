"""End-to-end: `entk reproduce --preset cpu-small --data synthetic`, shortened to about a minute."""

from __future__ import annotations

import itertools
import json

import pytest

from engine.cli import main

SHORT = ["reproduce", "--preset", "cpu-small", "--data", "synthetic", "--n-train", "2000", "--steps", "60",
         "--checkpoints", "0,1,2,3,5,8,12,20,30,45,60", "--probe", "8", "--t0", "0,5,10,30", "--t1", "20,40",
         "--eval-n", "100", "--device", "cpu", "--quiet", "--seeds", "0,1", "--window", "10",
         "--trace-every", "2", "--schedule", "multistep",  # decays at 30 and 45: the report must warn
         "--independent", "--spawn-t0", "10"]


def test_reproduce_writes_every_promised_file_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    assert main([*SHORT, "--out", str(out)]) == 0
    for s in (0, 1):
        for name in ("run.h5", "kernels.h5", "chaos.h5", "chaos.json"):
            assert (out / f"seed{s}" / name).stat().st_size > 0, name
    for name in ("study.json", "report.md", "report.html"):
        assert (out / name).stat().st_size > 0, name
    figs = ("fig3b_basins", "fig3_chaos", "fig4_kernel_distance", "fig5_cone", "fig6_growth", "fig7_kernels")
    for fig in figs:
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{fig}.{ext}").stat().st_size > 5000, f"{fig}.{ext}"
    md = (out / "report.md").read_text()
    for needle in ("Figure 3", "Figure 4", "Figure 5", "Figure 6", "Figure 7", "figures/fig6_growth.png",
                   "Noise floor", "sensitivity_growth", "sensitivity_dissimilarity", "cone", "chaos_basin",
                   "Which basin the twins end in", "independent", "spawn", "synthetic", "Hardware and time",
                   "cannot be attributed to the training dynamics", "[30, 45]"):
        assert needle in md, needle
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(figs) and "<table>" in page
    rec = json.loads((out / "study.json").read_text())
    assert rec["estimates"]["noise_floor"] == 0.0 and rec["lr_changes"] == [30, 45] and rec["seeds"] == [0, 1]
    trans = {t["rule"]: t for t in rec["transitions"]}
    assert rec["transitions"][0]["rule"] == "chaos_basin"  # the paper's question first
    assert set(trans) == {"chaos_basin", "cone", "sensitivity_dissimilarity", "sensitivity_window",
                          "sensitivity_growth"}
    assert set(trans["chaos_basin"]) >= {"reference_barrier", "reference_error_barrier", "reference_separated"}
    for s in ("0", "1"):
        for t1 in ("20", "40"):
            cell = rec["basins"][s][t1]
            assert set(cell["twins"]) == {"0", "5", "10", "30"} - ({"30"} if t1 == "20" else set())
            assert set(cell["spawn"]) == {"10"} and cell["independent"]["barrier_test"] > 0
            for v in [*cell["twins"].values(), *cell["spawn"].values(), cell["independent"]]:
                assert set(v) == {"barrier_test", "error_barrier_test", "disagreement", "l2"}
    assert rec["plan"]["members"] == 7 and rec["plan"]["projected_s"] > 0
    for t in trans.values():
        assert set(t) >= {"iteration", "spread", "coincides_with_lr_change", "at_grid_edge", "per_seed"}
        assert len(t["per_seed"]) == 2
        if sum(v is not None for v in t["per_seed"]) == 2:
            assert t["spread"] is not None  # two seeds give a spread
    chaos = json.loads((out / "seed0" / "chaos.json").read_text())
    traces = [r for r in chaos["trace"] if r["member"] == "perturbed"]
    assert len(traces) == 4 and all(set(r) >= {"t", "l2", "dissimilarity"} for r in traces)
    assert all(v == 0.0 for r in chaos["trace"] if r["member"] == "control" for v in r["l2"])
    assert set(rec["kernels"]["0"]) >= {"alignment", "top_eigenvalues", "effective_rank", "distance_to_final"}
    assert set(rec["times_s"]) >= {"seed0/train", "seed0/ntk", "seed0/chaos", "seed1/chaos", "analysis"}
    first_times = dict(rec["times_s"])
    # Rerun: every stage resumes (nothing recomputed), the report is rewritten identically.
    capsys.readouterr()
    assert main([*SHORT, "--out", str(out)]) == 0
    rec2 = json.loads((out / "study.json").read_text())
    assert rec2["estimates"] == rec["estimates"] and rec2["transitions"] == rec["transitions"]
    for stage in ("train", "ntk", "chaos"):
        assert rec2["times_s"][f"seed0/{stage}"] == first_times[f"seed0/{stage}"], stage


@pytest.mark.parametrize("flag,value,match", [
    ("--steps", "0", "--steps must be a positive integer"),
    ("--probe", "0", "--probe must be a positive integer"),
    ("--eval-n", "0", "--eval-n must be a positive integer"),
    ("--n-test", "0", "--n-test must be a positive integer"),
    ("--seeds", "1,1", "--seeds must be distinct"),
    ("--window", "5000", "no growth window"),
])
def test_reproduce_refuses_meaningless_flags_in_one_line(tmp_path, capsys, flag, value, match):
    assert main(["reproduce", "--out", str(tmp_path / "s"), flag, value, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not (tmp_path / "s" / "seed0").exists()


def test_reproduce_honours_n_test_and_subset_seed(tmp_path, monkeypatch):
    """--n-test and --subset-seed reach every run of the study (they used to be dropped)."""
    import engine.jobs.study as study

    seen = []

    def fake_train(cfg, **kw):
        seen.append((cfg.n_test, cfg.subset_seed, cfg.seed))
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(study, "train", fake_train)
    assert main(["reproduce", "--out", str(tmp_path / "s"), "--n-test", "300", "--subset-seed", "7", "--quiet"]) == 130
    assert seen == [(300, 7, 0)]


def test_presets_are_valid_studies():
    """Both presets give consistent, confound-free schedules without running anything."""
    from engine.errors import ConfigError
    from engine.jobs.presets import log_schedule
    from engine.report import lr_changes, preset
    from engine.train import TrainConfig

    small = preset("cpu-small")
    assert small.model == "cnn" and small.schedule == "constant" and small.checkpoints[0] == 0
    assert small.checkpoints[-1] == small.steps and max(small.t1) <= small.steps and max(small.t0) < max(small.t1)
    assert len(small.t0) >= 8 and len(small.t1) >= 6 and len(small.seeds) >= 2
    assert max(small.t0) + small.window <= max(small.t1)          # every window fits in the grid
    ratios = [b / a for a, b in itertools.pairwise(small.t0[1:])]
    assert min(ratios) >= 1.5                                      # log-spaced
    assert lr_changes(TrainConfig(steps=small.steps, schedule=small.schedule)) == []
    paper = preset("gpu-paper")
    assert paper.model == "resnet20" and paper.steps == 62_400 and paper.n_train is None  # 160 epochs, all data
    decay = lr_changes(TrainConfig(steps=paper.steps, schedule=paper.schedule, milestones=paper.milestones))
    assert decay == [31_200, 46_800]
    assert max(paper.t1) < decay[0] and max(paper.t0) + paper.window < decay[0]  # crosses the first phase early
    assert len(paper.t0) >= 8 and len(paper.t1) >= 6
    ck = paper.checkpoints
    assert ck == sorted(set(ck)) and ck[:11] == list(range(11)) and ck[-1] == 62_400
    gaps = [b - a for a, b in itertools.pairwise(ck[10:])]
    assert gaps[-1] > 100 * gaps[0]  # log-spaced: the last gap is far wider than the first
    short = preset("gpu-paper", model="vgg16", steps=2000)
    assert short.model == "vgg16" and max(short.t1) <= 2000 and all(t < 2000 for t in short.t0)
    assert log_schedule(5) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="preset"):
        preset("tpu-huge")


def test_basin_presets_have_the_issue_grids():
    from engine.jobs.presets import preset
    from engine.report import lr_changes
    from engine.train import TrainConfig

    b = preset("cpu-basins")
    assert (b.model, b.steps, b.n_train, b.seeds) == ("cnn", 2000, 10_000, [0, 1, 2])
    assert b.t0 == [0, 10, 40, 150, 400, 1000] and b.t1 == [300, 1000, 2000]
    assert b.independent and len(b.spawn_t0) == 3 and set(b.spawn_t0) <= set(b.t0)
    assert lr_changes(TrainConfig(steps=b.steps, schedule=b.schedule, milestones=b.milestones)) == [1000, 1500]
    c = preset("cpu-basins-constant")
    assert c.schedule == "constant" and c.t0 == b.t0 and c.t1 == b.t1
    assert preset("cpu-basins", model="resnet20").model == "resnet20"
    r = preset("gpu-fig3")
    assert r.model == "resnet20" and r.t0 == [0, 20, 50, 100, 200, 300, 500, 1000, 2000, 5000]
    assert r.t1[-1] == r.steps == 62_400 and len(r.seeds) == 3 and r.independent and r.gpu
    v = preset("gpu-fig3", model="vgg16")
    assert v.t0 == list(range(0, 10_001, 250))
    q = preset("quick")
    assert q.seeds == [0] and q.independent and q.spawn_t0 and q.t1[-1] == q.steps


def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    js = tmp_path / "plan.json"
    assert main(["reproduce", "--preset", "gpu-fig3", "--model", "vgg16", "--dry-run", "--out", str(out),
                 "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "plan (gpu-fig3)" in text and "projected time" in text and "assumed" in text
    assert not out.exists()
    rec = json.loads(js.read_text())
    # control + 41 twins + independent + 3 spawns besides the base, each from its t0 to the end of training.
    assert rec["plan"]["members"] == 46 and rec["plan"]["seeds"] == 3
    assert rec["plan"]["chaos_member_steps"] == 62_400 * 47 - sum(range(0, 10_001, 250)) - (500 + 2000)


TINY = ["reproduce", "--preset", "cpu-small", "--data", "synthetic", "--n-train", "600", "--steps", "30",
        "--checkpoints", "0,10,20,30", "--probe", "4", "--t0", "0,5", "--t1", "15,30", "--eval-n", "50",
        "--device", "cpu", "--quiet", "--seeds", "0,1", "--window", "10", "--trace-every", "5",
        "--no-independent", "--spawn-t0", "none"]


@pytest.mark.slow  # two studies, one of them in two worker processes
def test_jobs_run_seeds_side_by_side_with_the_bits_of_one_process(tmp_path):
    """--jobs 2: each seed in its own process at half the threads; the stage files and estimates are
    those of the seeds run one after another at that thread count, and a rerun resumes everything."""
    import torch

    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the workers' share of this test's threads
        assert main([*TINY, "--out", str(tmp_path / "serial")]) == 0
        torch.set_num_threads(2)  # --jobs 2 gives each worker one
        assert main([*TINY, "--out", str(tmp_path / "jobs"), "--jobs", "2"]) == 0
        rec = json.loads((tmp_path / "jobs" / "study.json").read_text())
        assert main([*TINY, "--out", str(tmp_path / "jobs"), "--jobs", "2"]) == 0  # resumes: nothing recomputed
    finally:
        torch.set_num_threads(n)
    serial = json.loads((tmp_path / "serial" / "study.json").read_text())
    assert rec["estimates"] == serial["estimates"] and rec["transitions"] == serial["transitions"]
    for s in ("0", "1"):
        for key in ("train_acc", "test_acc"):
            assert rec["train_result"][s][key] == serial["train_result"][s][key], (s, key)
    for s in (0, 1):
        for name in ("chaos.json",):
            assert (tmp_path / "jobs" / f"seed{s}" / name).read_text() == \
                (tmp_path / "serial" / f"seed{s}" / name).read_text(), (s, name)
    again = json.loads((tmp_path / "jobs" / "study.json").read_text())
    for s in (0, 1):
        for stage in ("train", "ntk", "chaos"):
            assert again["times_s"][f"seed{s}/{stage}"] == rec["times_s"][f"seed{s}/{stage}"], (s, stage)


def test_jobs_must_be_positive(tmp_path, capsys):
    assert main(["reproduce", "--out", str(tmp_path / "s"), "--jobs", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--jobs must be a positive integer" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()
