"""Outputs are checked before any work starts (issue 11, defect g): one line naming the flag for a
directory where a file belongs (or the reverse), a path under a regular file, or a place where
nothing can be created; missing parent directories are created."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.cli import main

TINY = ["--model", "cnn", "--n-train", "200", "--n-test", "100", "--batch-size", "20", "--eval-train", "100",
        "--device", "cpu", "--quiet"]
WORK = {"train": "engine.cli.train.train", "chaos": "engine.cli.chaos.run_chaos",
        "reproduce": "engine.report.reproduce", "ntk": "engine.cli.ntk.checkpoint_kernels",
        "data": "engine.cli.data.load_dataset"}


@pytest.fixture
def no_work(monkeypatch):
    """Every subcommand's work function fails the test if it is reached."""
    def started(*a, **k):
        raise AssertionError("the work started before the outputs were checked")

    for target in WORK.values():
        monkeypatch.setattr(target, started)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


def _cases(f: Path, d: Path):
    chaos = ["chaos", *TINY, "--t0", "0", "--t1", "2"]
    return [
        (["train", *TINY, "--out", str(d)], "--out", "is a directory; expected a file path"),
        (["train", *TINY, "--out", str(f / "run.h5")], "--out", "is a file, not a directory"),
        (["train", *TINY, "--out", str(f / "deeper" / "run.h5")], "--out", "is a file, not a directory"),
        (["train", *TINY, "--json", str(f / "s.json")], "--json", "is a file, not a directory"),
        (["train", *TINY, "--out", str(d / "r.h5"), "--json", str(d / "r.h5")], "--json", "the same path"),
        ([*chaos, "--out", str(f / "c.h5")], "--out", "is a file, not a directory"),
        ([*chaos, "--out", str(d)], "--out", "is a directory"),
        ([*chaos, "--out", str(d / "c.h5"), "--json", str(f / "c.json")], "--json", "is a file, not a directory"),
        ([*chaos, "--out", str(d / "c.h5"), "--summary", str(f / "c.json")], "--summary",
         "is a file, not a directory"),
        (["ntk", "--run", str(d / "run.h5"), "--out", str(f / "k.h5")], "--out", "is a file, not a directory"),
        (["ntk", "--run", str(d / "run.h5"), "--out", str(d)], "--out", "is a directory"),
        (["ntk", "--run", str(f), "--out", str(f)], "--run and --out", "the same path"),
        (["ntk", "--run", str(d / "run.h5"), "--out", str(d / "k.h5"), "--json", str(f / "k.json")], "--json",
         "not a directory"),
        (["reproduce", "--out", str(f)], "--out", "is a file; expected a directory"),
        (["reproduce", "--out", str(f / "study")], "--out", "is a file, not a directory"),
        (["reproduce", "--out", str(d / "study"), "--json", str(f / "s.json")], "--json", "not a directory"),
        (["data", "--json", str(d)], "--json", "is a directory"),
        (["ext", "status", "--device", "cpu", "--json", str(f / "e.json")], "--json", "not a directory"),
    ]


@pytest.mark.parametrize("case", range(len(_cases(Path("f"), Path("d")))))
def test_unwritable_outputs_are_refused_before_any_work(case, tmp_path, no_work, capsys):
    f, d = tmp_path / "a-file", tmp_path / "a-dir"
    f.write_text("not a directory")
    d.mkdir()
    argv, flag, needle = _cases(f, d)[case]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert flag in line and needle in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir", "a-file"]  # nothing created
    assert not list(d.iterdir())


def test_output_where_nothing_can_be_created(tmp_path, no_work, capsys):
    """/proc refuses new files even to root, for whom permission bits mean nothing."""
    probe = Path("/proc/entk-probe")
    try:
        probe.mkdir()
    except OSError:
        pass
    else:
        probe.rmdir()
        pytest.skip("/proc accepts new entries here")
    assert main(["train", *TINY, "--out", "/proc/entk/run.h5"]) == 2
    line = _one_error_line(capsys)
    assert "--out /proc/entk/run.h5: cannot write in /proc" in line, line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only directories; the regular-file and /proc cases cover it")
def test_read_only_directory(tmp_path, no_work, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["train", *TINY, "--out", str(ro / "run.h5")]) == 2
        assert "cannot write in" in _one_error_line(capsys)
        assert main(["train", *TINY, "--json", str(ro / "new" / "s.json")]) == 2
        assert "cannot write in" in _one_error_line(capsys)
    finally:
        ro.chmod(0o700)


def test_missing_output_directories_are_created(tmp_path, monkeypatch, capsys):
    """Outputs under directories that do not exist yet (runs/ in a fresh clone) are fine."""
    got = {}

    def fake(out, **kw):
        got["out"] = out
        return {}

    monkeypatch.setattr("engine.report.reproduce", fake)  # imported by the command when it runs
    out = tmp_path / "runs" / "deep" / "study"
    assert main(["reproduce", "--out", str(out), "--json", str(tmp_path / "js" / "s.json")]) == 0
    assert out.is_dir() and (tmp_path / "js" / "s.json").is_file() and got["out"] == str(out)
