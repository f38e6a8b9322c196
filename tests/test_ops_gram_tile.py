"""gram_tile (torch and Triton backends) against a float64 reference on fresh random inputs.

Outputs are strided views into larger matrices poisoned with a marked NaN: every element
that should be written must be finite and close, every other one must keep its exact bits.
On a machine without CUDA the Triton kernels run in the interpreter (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from engine.errors import ConfigError
from engine.ops.backend import triton_unavailable_reason
from engine.ops.gram_tile import gram_tile
from engine.ops.tf32x3 import tf32x3
from tests._tolerance import assert_close_to_torch
from tests.seeding import seeded

POISON = -0x0021_5253  # int32 bits 0xFFDEADAD: a quiet NaN whose payload differs from torch's NaN
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# The Triton cases run in the interpreter on a CPU machine: their own CI step (marker triton_interp).
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton_interp)]
# (C, samples in a, samples in b, P): C = 1 is the common case; odd sizes straddle tile edges.
SHAPES = [(1, 130, 67, 129), (3, 13, 7, 7), (10, 9, 5, 1), (3, 45, 45, 40)]



def _poisoned(rows: int, cols: int, device: str) -> torch.Tensor:
    """A (rows, cols) float32 view with strides (2·cols + 3, 2) into a NaN-poisoned matrix."""
    big = torch.full((rows + 3, 2 * cols + 3), POISON, dtype=torch.int32, device=device).view(torch.float32)
    return big[2:2 + rows, 1:1 + 2 * cols:2]


def _poisoned_t(rows: int, cols: int, device: str) -> torch.Tensor:
    """Same, column-major (a transposed slice): the kernels must honour both stride orders."""
    big = torch.full((cols + 4, rows + 3), POISON, dtype=torch.int32, device=device).view(torch.float32)
    return big[1:1 + cols, 2:2 + rows].T


def _traced_of(a: torch.Tensor, b: torch.Tensor, c: int) -> torch.Tensor:
    """Σ_c a[n·C + c] · b[m·C + c], in the inputs' dtype."""
    return torch.einsum("ncp,mcp->nm", a.reshape(-1, c, a.shape[1]), b.reshape(-1, c, b.shape[1]))


def _is_poison(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32) == POISON


def _skip_unless_runnable(backend: str, device: str) -> None:
    if backend == "triton" and (why := triton_unavailable_reason(torch.device(device))):
        pytest.skip(why)


def _check_output(got, prior, written, ref64, same_precision, what):
    """Written elements close to the reference (plus prior), the rest bitwise untouched."""
    assert torch.equal(_is_poison(got), ~written), f"{what}: written/untouched pattern differs"
    vals = got[written]
    assert torch.isfinite(vals).all(), f"{what}: non-finite values written"
    assert_close_to_torch(vals, (same_precision + prior)[written], (ref64 + prior.double())[written], what=what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "C{}-{}x{}-P{}".format(*s))
@pytest.mark.parametrize("want", ["full", "traced", "both"])
@pytest.mark.parametrize("upper", [False, True], ids=["rect", "upper"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "acc"])
def test_matches_float64_reference(device, backend, dtype, shape, want, upper, accumulate):
    _skip_unless_runnable(backend, device)
    gen, seed = seeded()
    c, na, nb, p = shape
    nb = na if upper else nb
    a = torch.randn(na * c, p, generator=gen).to(dtype)
    b = a if upper else torch.randn(nb * c, p, generator=gen).to(dtype)
    # Plain torch at the same precision: float32 matmul. For bfloat16 inputs that means the
    # upcast inputs — their products are exact in float32, like the kernel's tensor-core
    # products, whereas torch's own bfloat16 matmul rounds its *output* to bfloat16 and would
    # make a needlessly loose yardstick.
    a32, b32 = a.float(), b.float()
    a64, b64 = a.double(), b.double()
    full32, full64 = a32 @ b32.T, a64 @ b64.T
    traced32, traced64 = _traced_of(a32, b32, c), _traced_of(a64, b64, c)
    if backend == "triton" and dtype == torch.float32 and device == "cuda":
        # On tensor cores float32 runs as tf32x3: its emulation is the same-precision yardstick.
        full32 = tf32x3(lambda p, q: p @ q.T, a32, b32)
        traced32 = tf32x3(lambda p, q: _traced_of(p, q, c), a32, b32)

    tri_full = torch.ones(na * c, nb * c, dtype=torch.bool).triu() if upper else torch.ones(na * c, nb * c).bool()
    tri_traced = torch.ones(na, nb, dtype=torch.bool).triu() if upper else torch.ones(na, nb).bool()
    out = _poisoned(na * c, nb * c, device) if want != "traced" else None
    traced = _poisoned_t(na, nb, device) if want != "full" else None
    prior_full, prior_traced = torch.zeros(na * c, nb * c), torch.zeros(na, nb)
    if accumulate:
        prior_full, prior_traced = torch.randn(na * c, nb * c, generator=gen), torch.randn(na, nb, generator=gen)
        for dst, prior, mask in ((out, prior_full, tri_full), (traced, prior_traced, tri_traced)):
            if dst is not None:
                dst[mask.to(device)] = prior[mask].to(device)

    got_full, got_traced = gram_tile(a.to(device), b.to(device), want=want, num_outputs=c, out=out, traced=traced,
                                     accumulate=accumulate, upper=upper, backend=backend)
    what = f"{backend} {dtype} C={c} {na}x{nb} P={p} want={want} upper={upper} acc={accumulate} seed={seed}"
    if want == "traced":
        assert got_full is None, what
    else:
        assert got_full is out, what
        _check_output(got_full.cpu(), prior_full, tri_full, full64, full32, what + " [full]")
    if want == "full":
        assert got_traced is None, what
    else:
        assert got_traced is traced, what
        _check_output(got_traced.cpu(), prior_traced, tri_traced, traced64, traced32, what + " [traced]")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("upper", [False, True], ids=["rect", "upper"])
def test_allocates_missing_outputs_with_zeros_below_diagonal(device, backend, upper):
    _skip_unless_runnable(backend, device)
    gen, seed = seeded()
    c, n = 3, 11
    a = torch.randn(n * c, 17, generator=gen).to(device)
    full, traced = gram_tile(a, a, want="both", num_outputs=c, upper=upper, backend=backend)
    assert full.shape == (n * c, n * c) and traced.shape == (n, n), seed
    assert full.dtype == traced.dtype == torch.float32 and full.device == a.device, seed
    a64 = a.double()
    for got, ref in ((full, a64 @ a64.T), (traced, _traced_of(a64, a64, c))):
        ref = ref.triu() if upper else ref
        torch.testing.assert_close(got.double().cpu(), ref.cpu(), rtol=1e-5, atol=1e-4, msg=f"seed={seed}")


def test_many_small_tiles(monkeypatch):
    """Tiny blocks exercise the grouped program order, tile edges and the upper-tile skip."""
    _skip_unless_runnable("triton", "cpu")
    import engine.ops.triton.gram_tile as gt

    monkeypatch.setattr(gt, "_config", lambda *args: (16, 16, 16, 1, 1))
    gen, seed = seeded()
    for c, n, upper in ((1, 150, True), (1, 150, False), (2, 70, True)):
        a = torch.randn(n * c, 37, generator=gen)
        out, traced = _poisoned(n * c, n * c, "cpu"), _poisoned(n, n, "cpu")
        gram_tile(a, a, want="both", num_outputs=c, out=out, traced=traced, upper=upper, backend="triton")
        a64 = a.double()
        for got, ref64, ref32 in ((out, a64 @ a64.T, a @ a.T), (traced, _traced_of(a64, a64, c), _traced_of(a, a, c))):
            mask = torch.ones_like(ref64, dtype=torch.bool)
            mask = mask.triu() if upper else mask
            _check_output(got, torch.zeros_like(got), mask, ref64, ref32, f"C={c} n={n} upper={upper} seed={seed}")


def test_empty_width_gives_zeros():
    _skip_unless_runnable("triton", "cpu")
    a = torch.empty(6, 0)
    full, traced = gram_tile(a, a, want="both", num_outputs=2, backend="triton")
    assert torch.equal(full, torch.zeros(6, 6)) and torch.equal(traced, torch.zeros(3, 3))


def _bad_calls():
    a, b = torch.randn(6, 5), torch.randn(4, 5)
    return [
        ("2-D", dict(a=torch.randn(6), b=b)),
        ("float32 or bfloat16", dict(a=a.double(), b=b.double())),
        ("share dtype", dict(a=a, b=b.bfloat16())),
        ("share dtype", dict(a=a, b=torch.randn(4, 3))),
        ("want must be", dict(a=a, b=b, want="diag")),
        ("divisible by num_outputs", dict(a=a, b=b, num_outputs=4)),
        ("divisible by num_outputs", dict(a=a, b=b, num_outputs=0)),
        ("same row block", dict(a=a, b=b, upper=True)),
        ("out must have shape", dict(a=a, b=b, out=torch.zeros(4, 6))),
        ("out must be a float32", dict(a=a, b=b, out=torch.zeros(6, 4, dtype=torch.float64))),
        ("traced must have shape", dict(a=a, b=b, want="traced", num_outputs=2, traced=torch.zeros(3, 3))),
        ("accumulate=True needs", dict(a=a, b=b, accumulate=True)),
        ("accumulate=True needs", dict(a=a, b=b, want="both", out=torch.zeros(6, 4), accumulate=True)),
        ("backend must be", dict(a=a, b=b, backend="cuda")),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_inputs_raise_one_line_config_error(backend, case):
    _skip_unless_runnable(backend, "cpu")
    needle, kwargs = _bad_calls()[case]
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(ConfigError, match=needle) as info:
        gram_tile(kwargs.pop("a"), kwargs.pop("b"), **kwargs)
    assert "\n" not in str(info.value)
