"""Bad input on the command line gets a clear refusal before any work (issue 22): a table of bad
calls replayed through ``entk``'s ``main``.

Every case must exit 2 with its error as one line (``entk CMD: error: ...``, or argparse's usage
error) that names the flag or file and what was expected, print no traceback, leave no new file
behind and change no existing file (the files are tests/helpers/refusal_files.py's). ``verify``'s
exit codes and an interrupt's (SIGINT: 130, one line) are here too; the API's table is in
tests/test_api_refusals.py.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from engine.cli import build_parser, main
from tests.helpers.refusal_files import SMALL, snapshot

ROOT = Path(__file__).resolve().parents[1]
MODELS = "tests.helpers.bad_models"


class CaseTimeout(BaseException):
    """A refusal comes before any work: a case still running after CASE_SECONDS did the work instead."""


CASE_SECONDS = 60


def _alarm(signum, frame):
    raise CaseTimeout(f"still running after {CASE_SECONDS} s: the input was accepted and the work started")


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return rc, out.getvalue(), err.getvalue()


# (id, argv with {d} for the fixture folder, regexes the error line must match)
CLI_CASES = [
    # kernel-predict: non-finite and too-small numbers
    ("predict-ridge-inf", "kernel-predict --train {d}/ktr.h5 --cross {d}/kte.h5 --ridge inf", [r"--ridge", r"finite"]),
    ("predict-ridge-nan", "kernel-predict --train {d}/ktr.h5 --cross {d}/kte.h5 --ridge nan", [r"--ridge"]),
    ("predict-budget-inf", "kernel-predict --train {d}/ktr.h5 --cross {d}/kte.h5 --budget-gb inf",
     [r"--budget-gb", r"finite"]),
    ("predict-budget-nan", "kernel-predict --train {d}/ktr.h5 --cross {d}/kte.h5 --budget-gb nan", [r"--budget-gb"]),
    ("predict-budget-tiny", "kernel-predict --train {d}/ktr.h5 --cross {d}/kte.h5 --budget-gb 1e-12",
     [r"--budget-gb", r"1e-12", r"byte", r"^(?!.*got 0\b)"]),
    ("predict-budget-neg", "kernel-predict --train {d}/ktr.h5 --cross {d}/kte.h5 --budget-gb -1", [r"--budget-gb"]),
    # stored kernels that are wrong: a NaN, an asymmetric diagonal tile
    ("info-nan-tile", "kernel-info {d}/knan.h5", [r"knan\.h5", r"tile \(0, 0\)", r"not finite"]),
    ("predict-nan-train-cg", "kernel-predict --train {d}/knan.h5 --cross {d}/kte.h5 --solver cg",
     [r"knan\.h5", r"tile \(0, 0\)", r"not finite"]),
    ("predict-nan-train-chol", "kernel-predict --train {d}/knan.h5 --cross {d}/kte.h5 --solver cholesky",
     [r"knan\.h5", r"tile \(0, 0\)", r"not finite"]),
    ("info-asym-tile", "kernel-info {d}/kasym.h5", [r"kasym\.h5", r"tile \(0, 0\)", r"not symmetric"]),
    ("predict-asym-train", "kernel-predict --train {d}/kasym.h5 --cross {d}/kte.h5 --solver cg",
     [r"kasym\.h5", r"tile \(0, 0\)", r"not symmetric"]),
    ("predict-swapped", "kernel-predict --train {d}/kte.h5 --cross {d}/ktr.h5", [r"kte\.h5", r"square"]),
    ("info-missing", "kernel-info {d}/nope.h5", [r"nope\.h5", r"does not exist"]),
    ("info-not-kernel", "kernel-info {d}/run.h5", [r"run\.h5", r"not"]),
    ("info-dir", "kernel-info {d}/statedir", [r"statedir", r"directory"]),
    ("info-garbage", "kernel-info {d}/garbage.pt", [r"garbage\.pt"]),
    # damaged files: refused naming the file and the part, never a crash
    ("info-damaged-tile", "kernel-info {d}/kdamaged.h5", [r"kdamaged\.h5", r"damaged", r"row 0 of tiles"]),
    ("predict-damaged-tile", "kernel-predict --train {d}/kdamaged.h5 --cross {d}/kte.h5", [r"kdamaged\.h5",
                                                                                        r"damaged"]),
    ("ntk-damaged-run", "ntk --run {d}/rundamaged.h5 --probe 4 --out {d}/kk.h5", [r"rundamaged\.h5", r"metadata"]),
    ("kernel-damaged-run", "kernel --run {d}/rundamaged.h5 --x1 train:4 --out {d}/kx.h5",
     [r"rundamaged\.h5", r"metadata"]),
    ("train-resume-damaged", "train " + " ".join(SMALL) + " --steps 4 --checkpoints 0 --out {d}/rundamaged.h5",
     [r"rundamaged\.h5", r"damaged"]),
    ("verify-not-ours", "verify {d}/garbage.pt", [r"garbage\.pt", r"not an entk file"]),
    ("verify-dir", "verify {d}/statedir", [r"statedir", r"directory"]),
    # train: numbers and lists
    ("train-lr-inf", "train " + " ".join(SMALL) + " --steps 5 --lr inf", [r"lr", r"finite"]),
    ("train-lr-nan", "train " + " ".join(SMALL) + " --steps 5 --lr nan", [r"lr"]),
    ("train-momentum-nan", "train " + " ".join(SMALL) + " --steps 5 --momentum nan", [r"momentum"]),
    ("train-wd-inf", "train " + " ".join(SMALL) + " --steps 5 --weight-decay inf", [r"weight_decay|--weight-decay"]),
    ("train-gamma-nan", "train " + " ".join(SMALL) + " --steps 5 --gamma nan", [r"gamma"]),
    ("train-milestones-inf", "train " + " ".join(SMALL) + " --steps 5 --milestones inf", [r"milestones", r"finite"]),
    ("train-milestones-mixed", "train " + " ".join(SMALL) + " --steps 5 --milestones 0.5,3",
     [r"milestones", r"mix"]),
    ("train-seed-2**64", "train " + " ".join(SMALL) + f" --steps 5 --seed {2**64 + 1}", [r"seed", r"2\*\*63|2\^63"]),
    ("train-seed-2**63", "train " + " ".join(SMALL) + f" --steps 5 --seed {2**63}", [r"seed"]),
    ("train-seed-neg", "train " + " ".join(SMALL) + " --steps 5 --seed -1", [r"seed"]),
    ("train-data-seed-big", "train " + " ".join(SMALL) + f" --steps 5 --data-seed {2**63}", [r"seed"]),
    ("train-subset-seed-big", "train " + " ".join(SMALL) + f" --steps 5 --subset-seed {2**64}", [r"seed"]),
    ("train-checkpoints-empty", "train " + " ".join(SMALL) + " --steps 5 --checkpoints '' --out {d}/new.h5",
     [r"--checkpoints"]),
    ("train-steps-frac", "train " + " ".join(SMALL) + " --steps 2.5", [r"--steps"]),
    ("train-out-dir", "train " + " ".join(SMALL) + " --steps 5 --out {d}/statedir", [r"statedir", r"directory"]),
    ("train-resume-other-data", "train " + " ".join(SMALL).replace("200", "180", 1) + " --steps 4 --checkpoints 0 "
     "--out {d}/run.h5", [r"run\.h5"]),
    # reproduce: empty lists are errors, never the preset
    ("reproduce-seeds-empty", "reproduce --seeds '' --out {d}/study", [r"--seeds", r"empty"]),
    ("reproduce-t0-empty", "reproduce --t0 '' --out {d}/study", [r"--t0", r"empty"]),
    ("reproduce-t1-empty", "reproduce --t1 , --out {d}/study", [r"--t1", r"empty"]),
    ("reproduce-checkpoints-empty", "reproduce --checkpoints '' --out {d}/study", [r"--checkpoints", r"empty"]),
    ("reproduce-seeds-big", f"reproduce --seeds 0,{2**63} --out {{d}}/study", [r"--seeds", r"2\*\*63"]),
    ("reproduce-steps-zero", "reproduce --steps 0 --out {d}/study", [r"--steps"]),
    # chaos
    ("chaos-t0-empty", "chaos " + " ".join(SMALL) + " --t0 '' --t1 4 --out {d}/chaos.h5", [r"--t0", r"empty"]),
    ("chaos-eps-zero", "chaos " + " ".join(SMALL) + " --t0 0 --t1 4 --eps 0 --out {d}/chaos.h5", [r"eps"]),
    ("chaos-eps-inf", "chaos " + " ".join(SMALL) + " --t0 0 --t1 4 --eps inf --out {d}/chaos.h5", [r"eps"]),
    ("chaos-perturb-seed-big", "chaos " + " ".join(SMALL) + f" --t0 0 --t1 4 --perturb-seed {2**63} "
     "--out {d}/chaos.h5", [r"seed"]),
    # kernel: models, states, data, budgets
    ("kernel-run-other-data", "kernel --run {d}/runA.h5 --data-root {d}/treeB --cache-dir {d}/cache --x1 train:4 "
     "--quiet --out {d}/kx.h5", [r"runA\.h5", r"other data"]),
    ("kernel-tile-over-memory", "kernel --run {d}/run.h5 --x1 train:40 --tile 40 --memory-gb 1.08 --quiet "
     "--out {d}/kx.h5", [r"--tile 40", r"--memory-gb", r"largest tile that fits is --tile \d+"]),
    ("kernel-memory-inf", "kernel --run {d}/run.h5 --x1 train:4 --memory-gb inf --out {d}/kx.h5",
     [r"--memory-gb", r"finite"]),
    ("kernel-memory-tiny", "kernel --run {d}/run.h5 --x1 train:4 --memory-gb 1e-12 --out {d}/kx.h5",
     [r"--memory-gb", r"^(?!.*got 0\b)"]),
    ("kernel-memory-and-budget", "kernel --run {d}/run.h5 --x1 train:4 --memory-gb 2 --budget-gb 2 "
     "--out {d}/kx.h5", [r"--budget-gb", r"deprecated alias of --memory-gb"]),
    ("kernel-budget-inf", "kernel --run {d}/run.h5 --x1 train:4 --budget-gb inf --out {d}/kx.h5",
     [r"--budget-gb", r"finite"]),
    ("kernel-disk-budget-inf", "kernel --run {d}/run.h5 --x1 train:4 --disk-budget-gb inf --out {d}/kx.h5",
     [r"--disk-budget-gb", r"finite"]),
    ("kernel-seed-big", f"kernel --run {{d}}/run.h5 --x1 train:4 --seed {2**63} --out {{d}}/kx.h5", [r"--seed"]),
    ("kernel-seed-neg", "kernel --run {d}/run.h5 --x1 train:4 --seed -3 --out {d}/kx.h5", [r"--seed"]),
    ("kernel-state-garbage", f"kernel --model-fn {MODELS}:float32_model --state {{d}}/garbage.pt --x1 train:4 "
     "--quiet --out {d}/kx.h5", [r"--state", r"garbage\.pt"]),
    ("kernel-state-dir", f"kernel --model-fn {MODELS}:float32_model --state {{d}}/statedir --x1 train:4 "
     "--quiet --out {d}/kx.h5", [r"--state", r"statedir", r"directory"]),
    ("kernel-model-float64", f"kernel --model-fn {MODELS}:float64_model --x1 train:4 --quiet --out {{d}}/kx.h5",
     [r"--model-fn", r"float64"]),
    ("kernel-model-tuple", f"kernel --model-fn {MODELS}:tuple_model --x1 train:4 --quiet --out {{d}}/kx.h5",
     [r"--model-fn", r"tuple"]),
    ("kernel-x1-too-many", "kernel --run {d}/run.h5 --x1 train:100000 --out {d}/kx.h5", [r"--x1"]),
    ("kernel-x1-bad", "kernel --run {d}/run.h5 --x1 val:4 --out {d}/kx.h5", [r"--x1"]),
    ("kernel-checkpoint-missing", "kernel --run {d}/run.h5 --checkpoint 3 --x1 train:4 --out {d}/kx.h5",
     [r"checkpoint 3"]),
    ("kernel-run-is-kernel", "kernel --run {d}/ktr.h5 --x1 train:4 --out {d}/kx.h5", [r"ktr\.h5"]),
    ("kernel-out-is-run", "kernel --run {d}/run.h5 --x1 train:4 --out {d}/run.h5", [r"run\.h5"]),
    ("kernel-resume-other-job", "kernel --run {d}/run.h5 --x1 train:4 --quiet --out {d}/ktr.h5", [r"ktr\.h5"]),
    # ntk
    ("ntk-probe-zero", "ntk --run {d}/run.h5 --probe 0 --out {d}/kk.h5", [r"--probe"]),
    ("ntk-run-garbage", "ntk --run {d}/garbage.pt --probe 4 --out {d}/kk.h5", [r"garbage\.pt"]),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_bad_input(bad_input_files, case):
    _, template, patterns = case
    argv = [a if a != "''" else "" for a in template.format(d=bad_input_files).split()]
    before = snapshot(bad_input_files)
    rc, out, err = _cli(argv)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, f"exit {rc}; stderr: {err[-600:]!r}; stdout: {out[-300:]!r}"
    assert "Traceback" not in err + out
    assert lines, "no message"
    msg = lines[-1]
    if not msg.startswith("usage:") and not re.match(r"entk [\w-]+: error: argument ", msg):
        assert len(lines) == 1, f"the error is not one line: {err!r}"
    assert re.match(r"entk [\w-]+: error: ", msg), msg
    for pat in patterns:
        assert re.search(pat, msg), f"{pat!r} not in {msg!r}"
    assert snapshot(bad_input_files) == before, "a file was created or changed"


def test_verify_exit_codes(bad_input_files):
    """0 for an intact file, 1 for a damaged one (the part named), 2 for a file that is not ours."""
    for name in ("run.h5", "ktr.h5", "kte.h5", "kdiag.h5", "runA.h5"):
        rc, out, err = _cli(["verify", str(bad_input_files / name)])
        assert rc == 0 and "ok" in out, (name, out, err)
    rc, out, _ = _cli(["verify", str(bad_input_files / "kdamaged.h5")])
    assert rc == 1 and "kdamaged.h5 is damaged: row 0 of tiles fails its checksum" in out, out
    rc, out, _ = _cli(["verify", str(bad_input_files / "rundamaged.h5")])
    assert rc == 1 and "metadata" in out, out
    rc, _, err = _cli(["verify", str(bad_input_files / "garbage.pt")])
    assert rc == 2 and "not an entk file" in err


def test_negative_numbers_are_values_not_options():
    """``--eps -1e-7`` is a value (argparse alone reads it as an option)."""
    p = build_parser()
    args = p.parse_args(["chaos", "--t0", "0", "--t1", "4", "--eps", "-1e-7", "--out", "x.h5"])
    assert args.eps == -1e-7
    args = p.parse_args(["reproduce", "--eps", "-1E-7", "--out", "d"])
    assert args.eps == -1e-7


def test_chaos_negative_eps_is_refused_before_any_file(bad_input_files):
    before = snapshot(bad_input_files)
    rc, _, err = _cli(["chaos", *SMALL, "--t0", "0", "--t1", "4", "--eps", "-1e-7",
                       "--out", str(bad_input_files / "c.h5")])
    assert rc == 2 and "eps" in err and "Traceback" not in err
    assert snapshot(bad_input_files) == before


def test_kernel_info_of_the_diagonal_kernel_names_no_x2(bad_input_files):
    rc, out, err = _cli(["kernel-info", str(bad_input_files / "kdiag.h5")])
    assert rc == 0, err
    assert "None" not in out and "x2" not in out


def test_ext_status_claims_no_cuda_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, out, _ = _cli(["ext", "status", "--device", "cuda"])
    assert rc == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("triton (cuda)")]
    assert lines and "not available" in lines[0], out


def test_json_into_a_read_only_directory_is_refused_up_front(bad_input_files, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "s.json").write_text("{}")
    ro.chmod(0o555)
    try:
        rc, _, err = _cli(["kernel-info", str(bad_input_files / "ktr.h5"), "--json", str(ro / "s.json")])
    finally:
        ro.chmod(0o755)
    assert rc == 2 and "--json" in err and (ro / "s.json").read_text() == "{}"


def test_sigint_exits_130_without_traceback(bad_input_files):
    """SIGINT while the work runs exits 130; SIGINT once it has ended (reporting, teardown) keeps exit 0.

    Neither prints a traceback. The signal is sent once the process is past its imports: the work
    has started when the run file exists, and has ended when the summary is printed.
    """
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    out = bad_input_files / "sigint.h5"
    for when, steps, want in (("working", 2000, 130), ("ending", 2, 0)):
        out.unlink(missing_ok=True)
        p = subprocess.Popen([sys.executable, "-m", "engine", "train", *SMALL, "--steps", str(steps), "--checkpoints",
                              "0", "--out", str(out)], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=env)
        if when == "working":
            deadline = time.monotonic() + 240
            while not out.exists() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
        else:
            # the last line of the summary ("checkpoints ... saved in FILE"): the command has returned
            # or is about to; earlier lines are printed while it still works (a SIGINT there is 130)
            line = "start"
            while line and "saved in" not in line:
                line = p.stdout.readline()
            assert line, p.stderr.read()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=240)
        assert p.returncode == want, (when, p.returncode, err)
        assert "Traceback" not in err and "Exception ignored" not in err, err
        if want == 130:
            assert "interrupted" in err and len(err.strip().splitlines()) == 1, err
    out.unlink(missing_ok=True)
