"""End-to-end: `entk reproduce --preset cpu-small --data synthetic`, shortened to about a minute."""

from __future__ import annotations

import itertools
import json

from engine.cli import main

SHORT = ["reproduce", "--preset", "cpu-small", "--data", "synthetic", "--n-train", "2000", "--steps", "60",
         "--checkpoints", "0,1,2,3,5,8,12,20,30,45,60", "--probe", "8", "--t0", "0,5,30", "--t1", "30,60",
         "--eval-n", "100", "--device", "cpu", "--quiet"]


def test_reproduce_writes_every_promised_file_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    assert main([*SHORT, "--out", str(out)]) == 0
    for name in ("run.h5", "kernels.h5", "chaos.h5", "chaos.json", "study.json", "report.md", "report.html"):
        assert (out / name).stat().st_size > 0, name
    for fig in ("fig3_chaos", "fig4_kernel_distance", "fig5_cone"):
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{fig}.{ext}").stat().st_size > 5000, f"{fig}.{ext}"
    md = (out / "report.md").read_text()
    for needle in ("Figure 3", "Figure 4", "Figure 5", "figures/fig3_chaos.png", "figures/fig4_kernel_distance.png",
                   "figures/fig5_cone.png", "noise floor", "cone transition", "chaos transition", "synthetic",
                   "Hardware and time"):
        assert needle in md, needle
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page
    rec = json.loads((out / "study.json").read_text())
    assert rec["estimates"]["noise_floor"] == 0.0
    assert set(rec["times_s"]) >= {"train", "ntk", "chaos", "analysis"}
    first_times = dict(rec["times_s"])
    # Rerun: every stage resumes (nothing recomputed), the report is rewritten identically.
    capsys.readouterr()
    assert main([*SHORT, "--out", str(out)]) == 0
    rec2 = json.loads((out / "study.json").read_text())
    assert rec2["estimates"] == rec["estimates"]
    for stage in ("train", "ntk", "chaos"):
        assert rec2["times_s"][stage] == first_times[stage], stage


def test_presets_are_valid_studies():
    """Both presets give consistent schedules without running anything."""
    import pytest

    from engine.errors import ConfigError
    from engine.report import preset
    from engine.report.study import log_schedule

    small = preset("cpu-small")
    assert small.model == "cnn" and small.steps == 600 and small.checkpoints[0] == 0
    assert small.checkpoints[-1] == 600 and max(small.t1) == 600 and max(small.t0) < 600
    paper = preset("gpu-paper")
    assert paper.model == "resnet20" and paper.steps == 62_400 and paper.n_train is None  # 160 epochs, all data
    ck = paper.checkpoints
    assert ck == sorted(set(ck)) and ck[:11] == list(range(11)) and ck[-1] == 62_400
    gaps = [b - a for a, b in itertools.pairwise(ck[10:])]
    assert gaps[-1] > 100 * gaps[0]  # log-spaced: the last gap is far wider than the first
    short = preset("gpu-paper", model="vgg16", steps=2000)
    assert short.model == "vgg16" and max(short.t1) == 2000 and all(t < 2000 for t in short.t0)
    assert log_schedule(5) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="preset"):
        preset("tpu-huge")
