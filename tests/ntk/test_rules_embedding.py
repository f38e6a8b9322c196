"""The Embedding rule against torch.func: repeated tokens, a padding index, and the fallback cases."""

from __future__ import annotations

import torch
from torch import nn

from engine.ntk.rules import rule_for
from tests.ntk._rule_check import check_rule
from tests.seeding import seeded


def _ids(*shape, vocab):
    gen, _ = seeded()
    return torch.randint(0, vocab, shape, generator=gen)


def test_embedding_repeated_tokens():
    check_rule(nn.Embedding(7, 5), _ids(5, 9, vocab=7), "Embedding(7, 5)")


def test_embedding_padding_idx():
    ids = _ids(4, 6, vocab=5)
    ids[:, 0] = 2
    check_rule(nn.Embedding(5, 3, padding_idx=2), ids, "Embedding(5, 3, padding_idx=2)")


def test_embedding_max_norm_and_frequency_scaling_fall_back():
    ids = _ids(3, 4, vocab=6)
    for m in (nn.Embedding(6, 3, max_norm=1.0), nn.Embedding(6, 3, scale_grad_by_freq=True)):
        assert not rule_for(m).supports(m, ids, torch.zeros(3, 4, 3))
