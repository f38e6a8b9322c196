"""Gram matrices: in memory and out of core (tiles, column chunks, prefetch) vs float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import ConfigError
from engine.ntk.gram import gram, plan_tiles
from engine.ops.tf32x3 import tf32x3
from engine.store import JacobianStore
from tests._tolerance import assert_close_to_torch, rel_err


def _store(tmp_path, J, dtype=torch.float32, c=1):
    store = JacobianStore.create_for(tmp_path / "j.h5", job={"t": 1}, n_inputs=J.shape[0] // c, num_outputs=c,
                                     n_params=J.shape[1], block_inputs=max(1, J.shape[0] // c // 3), dtype=dtype)
    with store.writer() as w:
        w.write("jacobian", 0, J.to(dtype))
        for u in range(store.n_units):
            w.mark_complete(u)
    return store


def _traced_ref(J64, c):
    n = J64.shape[0] // c
    h = J64 @ J64.T
    return h.view(n, c, n, c).diagonal(dim1=1, dim2=3).sum(-1)


@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 13), (37, 1001), (130, 257)])
def test_in_memory_matches_float64(rows, cols):
    J = torch.randn(rows, cols)
    ref = J.double() @ J.double().T
    h = gram(J)
    assert h.dtype == torch.float32 and h.shape == (rows, rows)
    assert torch.equal(h, h.T)  # exactly symmetric
    assert_close_to_torch(h, J @ J.T, ref, what="in-memory gram")


@pytest.mark.parametrize("budget", [4_000, 40_000, 1 << 30])
@pytest.mark.parametrize("rows,cols", [(37, 1001), (64, 129)])
def test_out_of_core_from_store_float32(tmp_path, rows, cols, budget):
    """Tiny budgets force many row blocks and column chunks; the result must not change."""
    J = torch.randn(rows, cols)
    store = _store(tmp_path, J)
    h = gram(store, budget_bytes=budget, block_rows=8 if budget < 1e6 else None)
    assert torch.equal(h, h.T)
    assert_close_to_torch(h, J @ J.T, J.double() @ J.double().T, what=f"budget {budget}")
    # Also from the raw memory map and from a NumPy array.
    h2 = gram(store.jacobian_memmap(), budget_bytes=budget, block_rows=8)
    assert_close_to_torch(h2, J @ J.T, J.double() @ J.double().T, what="memmap")


def test_bfloat16_store_accumulates_in_float32(tmp_path):
    J = torch.randn(45, 333)
    Jb = J.to(torch.bfloat16)
    store = _store(tmp_path, J, dtype=torch.bfloat16)
    h = gram(store, budget_bytes=20_000, block_rows=8)
    ref = Jb.double() @ Jb.double().T          # exact product of the stored bf16 values
    torch_bf16 = (Jb.float() @ Jb.float().T)   # torch at the same (fp32-accumulated) precision
    assert_close_to_torch(h, torch_bf16, ref, what="bf16 store")


@pytest.mark.parametrize("c", [1, 3, 10])
def test_traced_kernel(tmp_path, c):
    n, p = 11, 301
    J = torch.randn(n * c, p)
    ref = _traced_ref(J.double(), c)
    h = gram(J, kernel="traced", num_outputs=c)
    assert h.shape == (n, n)
    assert_close_to_torch(h, _traced_ref(J, c), ref, what="traced in memory")
    hs = gram(_store(tmp_path, J, c=c), kernel="traced", num_outputs=c, budget_bytes=10_000, block_rows=2 * c)
    assert_close_to_torch(hs, _traced_ref(J, c), ref, what="traced out of core")
    with pytest.raises(ConfigError, match="divisible"):
        gram(torch.randn(10, 5), kernel="traced", num_outputs=3)


def test_float64_accumulation_is_more_exact():
    J = torch.randn(50, 20000)
    ref = J.double() @ J.double().T
    e32, e64 = rel_err(gram(J), ref), rel_err(gram(J, dtype=torch.float64), ref)
    assert e64 < e32 / 1e4


def test_out_and_accumulate_write_every_element():
    J1, J2 = torch.randn(23, 40), torch.randn(23, 60)
    out = torch.full((23, 23), float("nan"))
    gram(J1, out=out)                  # poisoned buffer: every element must be written
    assert torch.isfinite(out).all()
    gram(J2, out=out, accumulate=True)  # groups of columns add up to the whole
    J = torch.cat([J1, J2], 1)
    assert_close_to_torch(out, J @ J.T, J.double() @ J.double().T, what="accumulated groups")
    with pytest.raises(ConfigError, match="shape"):
        gram(J1, out=torch.zeros(5, 5))


def test_plan_tiles_respects_budget():
    for rows, cols, budget in [(10_000, 14_728_266, 1 << 30), (640, 269_722, 64 << 20), (10, 10, 1 << 20)]:
        br, bc = plan_tiles(rows, cols, itemsize=4, budget_bytes=budget, multiple=10)
        assert br % 10 == 0 or br == rows
        assert 3 * br * bc * 4 <= max(budget, 3 * br * 4)
        assert 1 <= bc <= cols


def test_bad_inputs():
    with pytest.raises(ConfigError, match="2-D"):
        gram(torch.randn(3, 4, 5))
    with pytest.raises(ConfigError, match="kernel must be one of"):
        gram(torch.randn(3, 4), kernel="diag")
    with pytest.raises(ConfigError, match="NumPy array or JacobianStore"):
        gram([[1.0]])
    assert gram(np.ones((2, 3), np.float32)).tolist() == [[3.0, 3.0], [3.0, 3.0]]


# (device, C, rows, params, block_rows): small in the CPU interpreter, several tiles and column chunks on CUDA.
TRITON_CASES = [pytest.param("cpu", 3, 33, 47, 9, marks=pytest.mark.triton_interp),
                pytest.param("cuda", 10, 1230, 3001, 400, marks=pytest.mark.cuda)]


@pytest.mark.parametrize("kind", ["full", "traced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device,c,rows,cols,block_rows", TRITON_CASES)
def test_triton_backend_out_of_core(tmp_path, kind, dtype, device, c, rows, cols, block_rows):
    """The fused tile op (Triton; the interpreter on the CPU) inside the out-of-core loop."""
    J = torch.randn(rows, cols).to(dtype)
    store = _store(tmp_path, J.float(), dtype=dtype, c=c)
    kw = dict(kernel=kind, num_outputs=c, device=device, block_rows=block_rows,
              budget_bytes=block_rows * (cols // 2) * 4 * 3)
    ref = gram(store, backend="torch", **kw)
    fast = gram(store, backend="triton", **kw)
    assert fast.device.type == device
    assert torch.equal(fast, fast.T)  # diagonal tiles wrote only their upper triangles, then mirrored
    J64 = J.double()
    ref64 = J64 @ J64.T if kind == "full" else _traced_ref(J64, c)
    e_fast, e_torch = rel_err(fast.cpu(), ref64), rel_err(ref.cpu(), ref64)
    if device == "cuda" and dtype == torch.float32:
        # float32 runs as tf32x3 on the tensor cores: its emulation is the same-precision yardstick.
        def op(p, q):
            h = p @ q.T
            return h if kind == "full" else h.view(rows // c, c, rows // c, c).diagonal(dim1=1, dim2=3).sum(-1)
        e_torch = max(e_torch, rel_err(tf32x3(op, J, J), ref64))
    # float32 sums: within 4x of torch's float32 error. bfloat16 on CUDA runs on tensor cores, whose
    # float32 accumulator truncates at every step: a random walk of about sqrt(P) float32 ulps.
    floor = torch.finfo(torch.float32).eps * (cols ** 0.5 if dtype == torch.bfloat16 and device == "cuda" else 1)
    assert e_fast <= 4 * max(e_torch, floor), f"triton gram {kind} {dtype}: {e_fast:.3g} vs torch {e_torch:.3g}"
    if device == "cuda":  # auto on CUDA is the fused path: the same bits
        assert torch.equal(gram(store, **kw), fast)


def test_triton_backend_refuses_float64_accumulation():
    with pytest.raises(ConfigError, match="float32"):
        gram(torch.randn(4, 5), dtype=torch.float64, backend="triton")
    with pytest.raises(ConfigError, match="no ext backend"):
        gram(torch.randn(4, 5), backend="ext")


def test_fused_blocks_are_padded_to_aligned_rows(tmp_path):
    """The fused path gets rows of a multiple of 16 elements, zero-padded (products unchanged)."""
    from engine.ntk.gram import _Source

    J = torch.randn(10, 23)
    for source in (J, _store(tmp_path, J)):
        blk = _Source(source, torch.device("cpu"), torch.float32, fused=True).load(2, 7, 3, 20)
        assert blk.shape == (5, 32) and blk.stride(0) % 16 == 0
        assert torch.equal(blk[:, :17], J[2:7, 3:20]) and not blk[:, 17:].any()
        plain = _Source(source, torch.device("cpu"), torch.float32).load(2, 7, 3, 20)
        assert plain.shape == (5, 17)
