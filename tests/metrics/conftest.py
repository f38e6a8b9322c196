"""The pair of states every metrics test compares."""

from __future__ import annotations

import pytest

from tests.metrics._common import cnn, images, labels


@pytest.fixture(scope="module")
def pair():
    """Two distinct BN CNNs (width 4), their states, and tiny data."""
    ma, mb = cnn(0), cnn(1)
    return ma, ma.state_dict(), mb.state_dict(), images(48), labels(48)
