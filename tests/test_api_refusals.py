"""Bad input through the API gets a clear refusal before any work (issue 22): a table of bad
calls to the engine's functions and configs.

Every case must raise ``ConfigError`` or ``DataError`` (or a store error, which is a ``ValueError``
of the engine) with its message on one line naming what was expected, and change no file (the
files are tests/helpers/refusal_files.py's). The command line's table is in
tests/test_cli_refusals.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import EngineError
from tests.helpers.refusal_files import snapshot


def _api_cases(d: Path):
    from engine import TrainConfig
    from engine.analysis.kernel_tools import kernel_predict, top_eigenpairs
    from engine.ntk import entk, gram, jacobian_to_store
    from engine.store import JacobianStore, RunFile, open_kernel
    from tests.helpers.bad_models import float64_model, tuple_model

    x = torch.randn(3, 3, 32, 32)

    def incomplete_store():
        s = JacobianStore.create_for(d / "api-J.h5", job={"model": "x"}, n_inputs=4, num_outputs=2, n_params=5,
                                     block_inputs=2, overwrite=True)
        with s.writer() as w:
            w.write("jacobian", 0, torch.ones(4, 5))
            w.mark_complete(0)
        try:
            return gram(JacobianStore(d / "api-J.h5"))
        finally:
            (d / "api-J.h5").unlink()

    def load_into_wrong_model():
        from engine.models import build_model

        return RunFile(d / "run.h5").load_into(build_model("resnet20", num_classes=10), 0)

    nan = np.eye(6)
    nan[1, 2] = np.nan
    labels = np.arange(6) % 2
    not_psd = -np.eye(6)
    return [
        ("predict-nan-file", lambda: kernel_predict(open_kernel(d / "knan.h5"), open_kernel(d / "kte.h5")),
         [r"knan\.h5", r"tile \(0, 0\)", r"not finite"]),
        ("predict-nan-array", lambda: kernel_predict(nan, np.eye(6), y_train=labels, num_classes=2),
         [r"not finite"]),
        ("predict-asym-array", lambda: kernel_predict(np.triu(np.ones((6, 6))), np.eye(6), y_train=labels,
                                                      num_classes=2), [r"not symmetric"]),
        ("predict-not-psd-cg", lambda: kernel_predict(not_psd, np.eye(6), y_train=labels, num_classes=2,
                                                      solver="cg"), [r"positive"]),
        ("predict-ridge-inf", lambda: kernel_predict(np.eye(6), np.eye(6), y_train=labels, num_classes=2,
                                                     ridge=float("inf")), [r"ridge", r"finite"]),
        ("predict-budget-zero", lambda: kernel_predict(np.eye(6), np.eye(6), y_train=labels, num_classes=2,
                                                       budget_bytes=0), [r"budget"]),
        ("eig-iterations-1", lambda: top_eigenpairs(np.diag(np.arange(1.0, 9.0)), 4, iterations=1),
         [r"iterations"]),
        ("eig-nan", lambda: top_eigenpairs(open_kernel(d / "knan.h5"), 2), [r"tile \(0, 0\)", r"not finite"]),
        ("gram-budget-zero", lambda: gram(torch.ones(4, 3), budget_bytes=0), [r"budget_bytes"]),
        ("gram-budget-inf", lambda: gram(torch.ones(4, 3), budget_bytes=float("inf")), [r"budget_bytes"]),
        ("gram-incomplete-store", incomplete_store, [r"api-J\.h5", r"unit|block", r"1"]),
        ("entk-float64-model", lambda: entk(float64_model().eval(), x), [r"float64"]),
        ("entk-tuple-model", lambda: entk(tuple_model().eval(), x), [r"tuple"]),
        ("jacobian-store-float64", lambda: jacobian_to_store(float64_model().eval(), x, d / "api-J64.h5"),
         [r"float64"]),
        ("config-steps-frac", lambda: TrainConfig(steps=2.5).validate(), [r"steps", r"int"]),
        ("config-lr-str", lambda: TrainConfig(lr="0.1").validate(), [r"lr", r"number"]),
        ("config-lr-inf", lambda: TrainConfig(lr=float("inf")).validate(), [r"lr", r"finite"]),
        ("config-seed-big", lambda: TrainConfig(seed=2**63).validate(), [r"seed", r"2\*\*63"]),
        ("config-batch-bool", lambda: TrainConfig(batch_size=True).validate(), [r"batch_size"]),
        ("config-milestones-mixed", lambda: TrainConfig(milestones=(0.5, 3)).validate(), [r"milestones", r"mix"]),
        ("load-into-wrong-model", load_into_wrong_model, [r"run\.h5", r"does not fit", r"\d+ (missing|unexpected)"]),
    ]


API_IDS = ["predict-nan-file", "predict-nan-array", "predict-asym-array", "predict-not-psd-cg", "predict-ridge-inf",
           "predict-budget-zero", "eig-iterations-1", "eig-nan", "gram-budget-zero", "gram-budget-inf",
           "gram-incomplete-store", "entk-float64-model", "entk-tuple-model", "jacobian-store-float64",
           "config-steps-frac", "config-lr-str", "config-lr-inf", "config-seed-big", "config-batch-bool",
           "config-milestones-mixed", "load-into-wrong-model"]


@pytest.mark.parametrize("name", API_IDS)
def test_api_refuses_bad_input(bad_input_files, name):
    cases = {c[0]: c for c in _api_cases(bad_input_files)}
    assert set(cases) == set(API_IDS)
    _, call, patterns = cases[name]
    before = snapshot(bad_input_files)
    with pytest.raises(EngineError) as info:
        call()
    assert isinstance(info.value, ValueError), type(info.value)
    msg = str(info.value)
    assert "\n" not in msg.strip(), msg
    for pat in patterns:
        assert re.search(pat, msg), f"{pat!r} not in {msg!r}"
    assert snapshot(bad_input_files) == before, "a file was created or changed"


def test_top_eigenpairs_returns_the_pairs_asked_for():
    from engine.analysis.kernel_tools import top_eigenpairs

    k = np.diag(np.arange(1.0, 9.0))
    eig = top_eigenpairs(k, 4, iterations=4)
    assert len(eig.values) == 4 and eig.vectors.shape == (8, 4)
