"""Dataset.fingerprint: equal for equal bytes, different for any change a resumed job must notice."""

from __future__ import annotations

from dataclasses import replace

from engine.data import load_synthetic


def test_fingerprint_is_stable_and_content_sensitive():
    ds = load_synthetic(200, 50, seed=3)
    same = load_synthetic(200, 50, seed=3)
    assert ds.fingerprint == same.fingerprint
    assert ds.fingerprint.startswith("b2:")
    # Another seed, a subset, one flipped label, one changed pixel: all differ.
    assert load_synthetic(200, 50, seed=4).fingerprint != ds.fingerprint
    assert ds.subset(100, 50).fingerprint != ds.fingerprint
    y = ds.y_train.clone()
    y[7] = (y[7] + 1) % ds.num_classes
    assert replace(ds, y_train=y).fingerprint != ds.fingerprint
    x = ds.x_test.clone()
    x[0, 0, 0, 0] ^= 1
    assert replace(ds, x_test=x).fingerprint != ds.fingerprint
