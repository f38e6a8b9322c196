"""The conventions every `entk` subcommand follows: exit codes, --version, --json, a closed pipe,
and `entk ntk --checkpoints` taking the same specs as `entk train`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

import engine
from engine.cli import main
from engine.errors import ConfigError, NonFiniteLossError
from engine.store import RunFile

TINY = ["--model", "cnn", "--data", "synthetic", "--n-train", "200", "--n-test", "100",
        "--batch-size", "20", "--eval-train", "100", "--device", "cpu", "--quiet"]


def _json(path) -> dict:
    rec = json.loads(path.read_text())
    assert rec["command"] and rec["version"] == engine.__version__
    return rec


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"entk {engine.__version__}"


@pytest.mark.parametrize("argv", [[], ["train", "--no-such-flag"], ["train", "--steps", "x"],
                                  ["ntk", "--out", "k.h5"], ["ext", "status", "--device", "tpu"]])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("exc,code,needle", [
    (ConfigError("bad thing"), 2, "error: bad thing"),                       # input error
    (NonFiniteLossError(3, math.nan), 1, "error: non-finite loss nan at step 3"),  # runtime failure
    (OSError(28, "No space left on device"), 1, "No space left on device"),  # runtime failure
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_exit_codes(exc, code, needle, monkeypatch, capsys):
    def fail(*a, **k):
        raise exc

    monkeypatch.setattr("engine.cli.data.load_dataset", fail)
    assert main(["data"]) == code
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_closed_pipe_is_not_a_traceback():
    """`entk ... | head`: the reader goes away before the output is written."""
    p = subprocess.Popen([sys.executable, "-m", "engine", "ext", "status", "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


def test_json_of_data_and_ext(tmp_path, capsys):
    js = tmp_path / "d.json"
    assert main(["data", "--n-train", "100", "--n-test", "50", "--json", str(js)]) == 0
    rec = _json(js)
    assert rec["command"] == "data" and sum(rec["train_per_class"]) == 100
    js = tmp_path / "e.json"
    assert main(["ext", "status", "--device", "cpu", "--json", str(js)]) == 0
    rec = _json(js)
    assert rec["command"] == "ext" and rec["action"] == "status" and set(rec["devices"]) == {"cpu"}
    assert {"built", "status", "triton"} <= set(rec["devices"]["cpu"])


def test_json_of_reproduce_is_the_study_record(tmp_path, monkeypatch):
    """The study itself takes a minute (tests/test_reproduce.py); here only what --json writes of it."""
    seen = {}

    def fake(out, **kw):
        seen.update(kw, out=out)
        return {"preset": kw["preset_name"], "times_s": {"train": 1.0}}

    monkeypatch.setattr("engine.report.reproduce", fake)  # imported by the command when it runs
    js = tmp_path / "study-summary.json"
    assert main(["reproduce", "--out", str(tmp_path / "study"), "--json", str(js), "--t0", "0,5"]) == 0
    rec = _json(js)
    assert rec == {"command": "reproduce", "version": engine.__version__, "out": str(tmp_path / "study"),
                   "preset": "quick", "times_s": {"train": 1.0}}
    assert seen["t0"] == [0, 5]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run of 8 steps with checkpoints log:4 = [0, 1, 2, 4, 8], and its --json summary."""
    d = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--steps", "8", "--checkpoints", "log:4", "--out", str(d / "run.h5"),
                 "--json", str(d / "train.json")]) == 0
    return d


def test_json_of_train(tiny_run):
    rec = _json(tiny_run / "train.json")
    assert rec["command"] == "train" and rec["config"]["steps"] == 8 and rec["out"] == str(tiny_run / "run.h5")
    assert 0 <= rec["test_acc"] <= 1
    assert RunFile(tiny_run / "run.h5").completed_iterations() == [0, 1, 2, 4, 8]


@pytest.mark.parametrize("spec,expected", [("log:4", [0, 1, 2, 4, 8]), ("every:4", [0, 4, 8]), ("1,log:2", [0, 1, 8]),
                                           ("0,2", [0, 2])])
def test_ntk_checkpoints_take_train_specs(spec, expected, tiny_run, tmp_path, capsys):
    js = tmp_path / "k.json"
    assert main(["ntk", "--run", str(tiny_run / "run.h5"), "--checkpoints", spec, "--probe", "4", "--device", "cpu",
                 "--quiet", "--out", str(tmp_path / "k.h5"), "--json", str(js)]) == 0
    rec = _json(js)
    assert rec["command"] == "ntk" and rec["iterations"] == expected and rec["size"] == 40
    assert len(rec["distance"]) == len(expected) and rec["distance"][0][0] == 0.0


@pytest.mark.parametrize("spec,needle", [("every:3", "[3, 6] are not completed"), ("log:0", "log:0"),
                                         ("9", "outside [0, 8]"), ("x", "'x'")])
def test_ntk_bad_checkpoint_specs_are_one_line(spec, needle, tiny_run, tmp_path, capsys):
    assert main(["ntk", "--run", str(tiny_run / "run.h5"), "--checkpoints", spec, "--probe", "4",
                 "--device", "cpu", "--quiet", "--out", str(tmp_path / "k.h5")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "k.h5").exists()


def test_chaos_json_and_deprecated_summary(tmp_path, capsys):
    args = ["chaos", *TINY, "--t0", "0", "--t1", "2", "--eval-n", "20", "--alphas", "3",
            "--out", str(tmp_path / "c.h5")]
    js = tmp_path / "c.json"
    assert main([*args, "--summary", str(js)]) == 0
    assert "--summary is deprecated; use --json" in capsys.readouterr().err
    rec = _json(js)
    assert rec["command"] == "chaos" and rec["out"] == str(tmp_path / "c.h5")
    assert rec["config"]["t1"] == [2] and rec["noise_floor"] == 0.0
    assert {(r["t0"], r["t1"], r["member"]) for r in rec["records"]} == {(0, 2, "perturbed"), (0, 2, "control")}
    # --json is the name; given both, they must agree.
    assert main([*args, "--json", str(tmp_path / "other.json"), "--summary", str(js)]) == 2


@pytest.mark.parametrize("kernel,shape", [("diagonal", (40, 10)), ("pntk", (4, 4)), ("traced", (4, 4))])
def test_ntk_kernel_shapes_params_and_bf16(kernel, shape, tiny_run, tmp_path):
    """entk ntk stores each of entk's kernel shapes, of a parameter subset, in bfloat16 compute mode too,
    and what it stores is entk's kernel of that checkpoint."""
    import torch

    from engine.jobs import probe_set
    from engine.models import build_model
    from engine.ntk import entk
    from engine.store import KernelStore
    from engine.train import TrainConfig, prepare_data

    run = RunFile(tiny_run / "run.h5")
    cfg = TrainConfig.from_dict(run.config)
    model = build_model(cfg.model).eval()
    run.load_into(model, 4)
    x, _ = probe_set(prepare_data(cfg, quiet=True), 4)
    params = "conv3.weight,fc.weight,fc.bias"
    for dtype, how in (("float32", "auto"), ("bfloat16", "auto"), ("float32", "pairs"), ("float32", "materialise")):
        out = tmp_path / f"{kernel}-{dtype}-{how}.h5"
        argv = ["ntk", "--run", str(tiny_run / "run.h5"), "--checkpoints", "0,4", "--probe", "4", "--kernel", kernel,
                "--compute-dtype", dtype, "--params", params, "--device", "cpu", "--quiet", "--out", str(out),
                "--contraction", how]
        assert main(argv) == 0
        got = torch.from_numpy(KernelStore(out).kernel(4).copy())
        assert tuple(got.shape) == shape
        want = entk(model, x, kernel=kernel, param_names=params.split(","), contraction=how,
                    compute_dtype=torch.bfloat16 if dtype == "bfloat16" else None).reshape(shape)
        assert torch.equal(got, want.float()), f"{kernel} {dtype} {how}: the stored kernel is not entk's"
    assert main(["ntk", "--run", str(tiny_run / "run.h5"), "--probe", "4", "--params", "no.such", "--quiet",
                 "--out", str(tmp_path / "bad.h5")]) == 2
