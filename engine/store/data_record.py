"""What a file records about the data its job used, and the check that a resumed job uses the same.

Files store the data's content fingerprint (``engine.data.Dataset.fingerprint``: a hash of
every image and label as used, so a subset, another source or a changed file all differ)
with its name, source and subset for people. A job that resumes a file, or reads a run
file's checkpoints, compares fingerprints, never paths: data may move, it may not change.
"""

from __future__ import annotations

from collections.abc import Mapping


def data_record(ds) -> dict:
    """The record of dataset ``ds`` (an ``engine.data.Dataset``; store imports nothing above ``errors``)."""
    subset = ds.meta.get("subset") if isinstance(ds.meta, Mapping) else None
    return {"fingerprint": str(ds.fingerprint), "name": str(ds.name), "source": str(ds.source or "?"),
            "n_train": len(ds.y_train), "n_test": len(ds.y_test),
            "subset_seed": None if subset is None else int(subset[2])}


def describe_data(rec: Mapping) -> str:
    """``b2:… (synthetic, 640 train / 200 test, subset seed 0, from …)``."""
    sub = "" if rec.get("subset_seed") is None else f", subset seed {rec['subset_seed']}"
    return (f"{rec.get('fingerprint')} ({rec.get('name')}, {rec.get('n_train')} train / {rec.get('n_test')} test"
            f"{sub}, from {rec.get('source')})")


def data_mismatch(path, stored: Mapping | None, current: Mapping, *, what: str, fix: str) -> str | None:
    """The one-line refusal of a job whose data is not the data ``path`` was made from; None if it is.

    ``what`` says what ``path`` holds ("holds a run trained"); ``fix`` what the user can do.
    A file that records no fingerprint (written before files recorded one) cannot be checked,
    so it is refused too. Callers raise it as their own error.
    """
    if not stored or not stored.get("fingerprint"):
        return (f"{path} records no data fingerprint (written by an older entk), so its data cannot "
                f"be checked against {describe_data(current)}; {fix}")
    if stored["fingerprint"] != current["fingerprint"]:
        return (f"{path} {what} on other data: {describe_data(stored)} in the file, "
                f"{describe_data(current)} now; {fix}")
    return None
