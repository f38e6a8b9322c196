"""Model factories that are wrong on purpose, for the bad-input tables: ``entk kernel --model-fn`` in
tests/test_cli_refusals.py, ``entk``/``jacobian_to_store`` in tests/test_api_refusals.py."""

from __future__ import annotations

import torch
from torch import nn


class _Tiny(nn.Module):
    def __init__(self, dtype=torch.float32, as_tuple=False):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10, dtype=dtype)
        self.as_tuple = as_tuple

    def forward(self, x):
        y = self.fc(x.flatten(1).to(self.fc.weight.dtype))
        return (y, y.sum()) if self.as_tuple else y


def float32_model() -> nn.Module:
    torch.manual_seed(0)
    return _Tiny()


def float64_model() -> nn.Module:
    torch.manual_seed(0)
    return _Tiny(torch.float64)


def tuple_model() -> nn.Module:
    torch.manual_seed(0)
    return _Tiny(as_tuple=True)
