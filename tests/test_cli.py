"""The entk command line: help, training, resume after SIGKILL, errors for people."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine.cli import build_parser, main
from engine.store import RunFile

SMALL = ["--model", "cnn", "--data", "synthetic", "--n-train", "1000", "--n-test", "200",
         "--batch-size", "50", "--eval-train", "200", "--quiet"]


def _run(*args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_explains_every_flag():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"train", "data"}
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, f"entk {name} {action.option_strings}"
    out = _run("train", "--help")
    assert out.returncode == 0 and "--checkpoints" in out.stdout and "resume" in out.stdout


def test_every_subcommand_shares_the_option_groups():
    """--json everywhere; --device, --quiet, --overwrite, --data-root wherever they apply (one definition each)."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}
    # Read stored kernels, or plan from shapes only: no data, device or progress.
    tools = {"kernel-predict", "kernel-info", "plan", "verify"}
    assert set(flags) == {"train", "ntk", "chaos", "reproduce", "data", "ext", "kernel", *tools}
    for name, have in flags.items():
        assert "--json" in have, name
        assert "--quiet" in have or name in ("ext", *tools), name
        assert "--device" in have or name in ("data", *tools), name
        assert "--data-root" in have or name in ("ext", *tools), name
        assert ("--overwrite" in have) == (name in ("train", "ntk", "chaos", "kernel")), name


def test_module_entry_point_version_and_usage_exit_codes():
    import engine

    out = _run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"entk {engine.__version__}"
    out = _run("train", "--lr", "fast")
    assert out.returncode == 2 and "--lr" in out.stderr and "Traceback" not in out.stderr


def test_train_prints_accuracy_and_writes_run(tmp_path, capsys):
    out = tmp_path / "run.h5"
    summary = tmp_path / "s.json"
    rc = main(["train", *SMALL, "--steps", "30", "--checkpoints", "0,5,10", "--out", str(out),
               "--json", str(summary)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "final train accuracy" in text and "test accuracy" in text
    assert RunFile(out).completed_iterations() == [0, 5, 10, 30]
    rec = json.loads(summary.read_text())
    assert rec["command"] == "train" and rec["config"]["steps"] == 30 and 0 <= rec["test_acc"] <= 1
    # Same command again: nothing to redo, resumes at the end.
    assert main(["train", *SMALL, "--steps", "30", "--checkpoints", "0,5,10", "--out", str(out)]) == 0
    assert "resumed from iteration 30" in capsys.readouterr().out


def test_sigkill_then_rerun_is_bit_identical(tmp_path):
    """Kill a real training process mid-run; the same command resumes to identical bits."""
    args = ["train", *SMALL, "--steps", "120", "--checkpoints", "every:10"]
    ref = tmp_path / "ref.h5"
    assert _run(*args, "--out", str(ref)).returncode == 0

    out = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-m", "engine", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            done = RunFile(out).completed_iterations()
        except Exception:
            continue  # not created yet
        if len(done) >= 4:
            proc.send_signal(signal.SIGKILL)
            killed_at = done[-1]
            break
    proc.wait()
    assert killed_at is not None and killed_at < 120, "the run finished before it could be killed"
    again = _run(*args, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "resumed from iteration" in again.stdout
    a, b = RunFile(ref), RunFile(out)
    assert a.completed_iterations() == b.completed_iterations()
    for it in a.completed_iterations():
        sa, sb = a.load_state(it), b.load_state(it)
        assert all(torch.equal(sa[n], sb[n]) for n in sa), f"iteration {it} differs"


@pytest.mark.parametrize("argv,needle", [
    (["train", "--data", "cifar10"], "--data-root"),
    (["train", "--data", "cifar10", "--data-root", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["train", "--momentum", "2"], "momentum"),
    (["train", "--steps", "10", "--checkpoints", "0,99", "--out", "x.h5"], "outside"),
    (["data", "--data", "cifar10", "--data-root", "/nonexistent/x.tar.gz"], "/nonexistent/x.tar.gz"),
])
def test_errors_are_one_line_and_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_data_command_describes_synthetic(capsys, tmp_path):
    js = tmp_path / "d.json"
    assert main(["data", "--data", "synthetic", "--n-train", "500", "--n-test", "100", "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "500 train / 100 test" in text
    desc = json.loads(js.read_text())
    assert desc["command"] == "data"
    assert sum(desc["train_per_class"]) == 500 and len(desc["classes"]) == 10


def test_ext_status_reports_each_backend():
    out = _run("ext", "status", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "ext (cpu):" in out.stdout and "triton (cpu):" in out.stdout
    assert "CUDA_HOME" not in out.stderr  # torch's CUDA-toolkit warning is irrelevant on the CPU
    assert "bf16 matmul (cpu):" in out.stdout


@pytest.mark.parametrize(("flags", "unit"), [({"avx2", "fma"}, "none"), ({"avx2", "avx512_bf16"}, "AVX-512 BF16"),
                                             ({"avx512_bf16", "amx_bf16", "amx_tile"}, "AMX")])
def test_ext_status_names_the_bf16_matrix_unit(monkeypatch, capsys, tmp_path, flags, unit):
    """An AVX2-only CPU is said to emulate bfloat16 (no speed-up to expect), not left to look slow."""
    from engine.ntk import contract

    assert contract.bf16_unit_name(frozenset(flags)) == unit
    monkeypatch.setattr(contract, "_cpu_flags", lambda: frozenset(flags))
    js = tmp_path / "e.json"
    assert main(["ext", "status", "--device", "cpu", "--json", str(js)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("bf16 matmul (cpu):"))
    assert line.startswith(f"bf16 matmul (cpu): {unit}")
    assert ("emulated" in line and "no speed-up" in line) == (unit == "none")
    assert json.loads(js.read_text())["devices"]["cpu"]["bf16_matmul"] == unit
    assert contract.bf16_matrix_unit() == (unit != "none")
