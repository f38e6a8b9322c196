"""Read damaged copies of an engine file, one flipped byte each (tests/test_corruption.py).

Usage: corrupt_reader.py KIND BASE WORKDIR OFFSET... ; prints one JSON line per offset:
{"offset": o, "result": "sha256 of everything read"} or {"offset": o, "refused": "message"}.
A crash (a signal, an unexpected exception) ends the process: the parent records it and goes on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np

from engine.errors import EngineError


def read(kind: str, path: Path) -> str:
    h = hashlib.sha256()

    def add(a) -> None:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())

    if kind == "run":
        from engine.store import RunFile

        r = RunFile(path)
        add(np.asarray(r.completed_iterations()))
        for it in r.completed_iterations():
            for name, t in sorted(r.load_state(it).items()):
                h.update(name.encode())
                add(t.view(-1).view(dtype=__import__("torch").uint8).numpy())
            for name, t in sorted(r.load_momentum(it).items()):
                h.update(name.encode())
                add(t.reshape(-1).numpy())
        add(r.loss_log())
        add(r.lr_log())
        h.update(json.dumps(r.summary(), sort_keys=True).encode())
        h.update(json.dumps(r.config, sort_keys=True).encode())
    elif kind == "kernel":
        from engine.store import open_kernel

        k = open_kernel(path)
        add(k[:, :])
        add(k.x1_index)
        add(k.x1_labels)
        h.update(json.dumps(k.attrs, sort_keys=True).encode())
    elif kind == "chaos":
        from engine.jobs import load_chaos

        c = load_chaos(path)
        add(c.metrics)
        add(c.realized)
        add(c.trace)
        add(c.store.complete)
        h.update(json.dumps(c.store.job, sort_keys=True, default=str).encode())
    else:
        raise SystemExit(f"unknown kind {kind}")
    return h.hexdigest()


def main() -> None:
    kind, base, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    warnings.simplefilter("ignore")
    for off in (int(v) for v in sys.argv[4:]):
        path = work / f"damaged-{off}{base.suffix}"
        shutil.copy(base, path)
        if off >= 0:
            with open(path, "r+b") as fh:
                fh.seek(off)
                b = fh.read(1)
                fh.seek(off)
                fh.write(bytes([b[0] ^ 0xFF]))
        print(json.dumps({"offset": off, "started": True}), flush=True)
        try:
            rec = {"offset": off, "result": read(kind, path)}
        except EngineError as e:
            if not isinstance(e, ValueError):
                raise
            rec = {"offset": off, "refused": str(e)}
        path.unlink()
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
