"""Best-of-reps wall time of the two Jacobian implementations (structured, reference) on a zoo model.

Run: PYTHONPATH=. .venv/bin/python benchmarks/time_jacobian.py [model] [N] [reps]
(results: benchmarks/results/README.md, the jacobian-<model> groups).
"""

from __future__ import annotations

import sys
import time

import torch

from engine.models import build_model
from engine.ntk import jacobian
from engine.ntk.kinds import Implementation


def time_backends(model: str = "resnet20", n: int = 64, reps: int = 3, threads: int | None = None) -> dict[str, float]:
    """Best-of-``reps`` wall seconds of each backend on a zoo model (a timing aid, not a test).

    Backends alternate within each repetition so that load from other processes hits
    both alike; J is freshly allocated each call, as a caller without ``out=`` sees it.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    net = build_model(model).eval()
    x = torch.randn(n, 3, 32, 32)
    kinds = (Implementation.STRUCTURED, Implementation.REFERENCE)
    for kind in kinds:
        jacobian(net, x[:2], implementation=kind)  # warm-up: kernel selection, allocator
    best = dict.fromkeys(kinds, float("inf"))
    shape = ()
    for _ in range(reps):
        for kind in kinds:
            t0 = time.perf_counter()
            jac = jacobian(net, x, implementation=kind)
            best[kind] = min(best[kind], time.perf_counter() - t0)
            shape = tuple(jac.shape)
            del jac
    s, r = best[Implementation.STRUCTURED], best[Implementation.REFERENCE]
    print(
        f"{model}, N={n}, {torch.get_num_threads()} threads, J {shape[0]} x {shape[1]:,}: "
        f"structured {s:.3f} s vs reference {r:.3f} s ({r / s:.2f}x)"
    )
    return {k.value: v for k, v in best.items()}


if __name__ == "__main__":
    args = sys.argv[1:]
    time_backends(args[0] if args else "resnet20", int(args[1]) if len(args) > 1 else 64,
                  int(args[2]) if len(args) > 2 else 3)
