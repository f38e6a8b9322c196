"""Messages for people (issue 11, defect h): a negative --steps is blamed on --steps, an unknown
model name, non-square kernels, and the README's load_synthetic signature."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from engine.cli import main
from engine.data import load_synthetic
from engine.errors import ConfigError
from engine.ntk import kernel_distance, pairwise_kernel_distance
from engine.train import TrainConfig


def test_negative_steps_blame_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--steps", "-5", "--out", "x.h5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    line = err
    assert "--steps must be >= 0, got -5" in line and "checkpoint" not in line, line


def test_train_config_checks_the_model_name():
    with pytest.raises(ConfigError, match=r"model must be one of .*resnet20.*got 'foo'"):
        TrainConfig(model="foo").validate()
    TrainConfig(model="cnn").validate()


def test_kernel_distance_needs_square_kernels():
    a, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"square.*6×4"):
        kernel_distance(a, b)
    with pytest.raises(ConfigError, match="square"):
        pairwise_kernel_distance([a, b, a])
    h = a @ a.T
    assert kernel_distance(h, 2 * h) == pytest.approx(0.0, abs=1e-12)


def test_readme_load_synthetic_signature_is_the_real_one():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    calls = re.findall(r"`load_synthetic\(([^)]*)\)`", readme)
    assert calls, "the README documents load_synthetic"
    params = inspect.signature(load_synthetic).parameters
    for call in calls:
        keyword_only = False
        for item in (s.strip() for s in call.split(",") if s.strip()):
            if item == "*":
                keyword_only = True
                continue
            name = item.split("=")[0].strip()
            assert name in params, f"README: load_synthetic has no parameter {name!r}"
            kind = params[name].kind
            assert (kind is inspect.Parameter.KEYWORD_ONLY) == keyword_only, f"README: {name} is {kind}"
            if "=" in item:
                assert repr(params[name].default) == item.split("=")[1].strip().replace("_", ""), name
