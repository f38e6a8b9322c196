"""The Triton kernels must compile for Hopper even where there is no GPU, with this venv's
Triton and with the GPU image's (3.6).

The CPU interpreter checks what the kernels compute, not that they compile: a type error
in a dot, an unsupported op or a tile that overflows shared memory only shows on a GPU.
tests/helpers/triton_aot_sm90.py records every configuration the launchers pick and
compiles each for sm_90 ahead of time (Triton's own ptxas; no driver needed).

An opt-in group (marker ``triton_aot``, deselected by default): it leans on private Triton
internals and needs the GPU image's Triton, which is lab tooling, not part of the product.
``.ci/run`` runs it as its own step, with Triton 3.6 installed outside the venv:
``ENTK_GPU_IMAGE_TRITON=DIR .venv/bin/python -m pytest -m triton_aot``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.triton_aot, pytest.mark.slow]

HELPER = Path(__file__).parent / "helpers" / "triton_aot_sm90.py"
SMEM_LIMIT = 227 * 1024  # the most shared memory one block may opt into on an H100/H200


# The GPU machine runs Triton 3.6 and cannot install anything; .ci/run installs that version
# (pip --target, outside the venv) so the kernels are compiled against both.
GPU_IMAGE_TRITON_SET = bool(os.environ.get("ENTK_GPU_IMAGE_TRITON"))
GPU_IMAGE_TRITON = Path(os.environ.get("ENTK_GPU_IMAGE_TRITON") or
                        Path(__file__).parents[1] / ".ci" / "cache" / "triton-3.6")


@pytest.fixture(scope="module", params=["venv", "gpu-image"])
def compiled(request, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if request.param == "gpu-image":
        if not (GPU_IMAGE_TRITON / "triton").is_dir():
            msg = (f"no Triton of the GPU image at {GPU_IMAGE_TRITON} (install it with: python -m pip install "
                   f"--no-deps --target {GPU_IMAGE_TRITON} triton==3.6.0)")
            if GPU_IMAGE_TRITON_SET:
                pytest.fail(msg + "; ENTK_GPU_IMAGE_TRITON names it")
            pytest.skip(msg)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GPU_IMAGE_TRITON), env.get("PYTHONPATH")]))
        env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    res = subprocess.run([sys.executable, str(HELPER)], capture_output=True, text=True, timeout=900, env=env)
    if res.returncode != 0 and "No module named 'triton.backends" in res.stderr:
        pytest.skip("this Triton has no CUDA backend to compile for")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    if request.param == "gpu-image":
        assert {c["triton"] for c in lines} == {"3.6.0"}, "the GPU image's Triton was not the one used"
    return lines


def test_every_launch_configuration_compiles_for_sm90(compiled):
    kernels = {c["kernel"] for c in compiled}
    assert kernels == {"_kernel_pairs_kernel", "_gram_tile_kernel"}
    assert len(compiled) >= 10  # dtypes x T blocks x symmetry x Gram flags


def test_shared_memory_fits_an_h200_block(compiled):
    over = [c for c in compiled if c["shared"] > SMEM_LIMIT]
    assert not over, over


def test_bfloat16_products_use_tensor_cores(compiled):
    for c in compiled:
        if c["dtype"] == "*bf16" and (c["kernel"] == "_gram_tile_kernel" or c["constexprs"].get("USE_DOT")):
            assert c["mma"], c
        if c["kernel"] == "_gram_tile_kernel" and c["dtype"] == "*bf16":
            assert c["wgmma"], f"the Gram tile should use Hopper's wgmma: {c}"


def test_float32_dots_use_tf32_tensor_cores(compiled):
    """tf32x3 must really reach the tensor cores (tf32 mma); "ieee" must not touch them."""
    seen = set()
    for c in compiled:
        if c["dtype"] != "*fp32" or not (c["kernel"] == "_gram_tile_kernel" or c["constexprs"].get("USE_DOT")):
            continue
        precision = c["constexprs"]["PRECISION"]
        seen.add(precision)
        assert c["tf32_mma"] == (precision == "tf32x3"), c
    assert seen == {"tf32x3", "ieee"}, seen


# The Gram tile's accumulate epilogue holds the prior tile beside the accumulator once per
# tile (128 × 256: 2 × 128 registers per thread); ptxas spills about 400 bytes there.
EPILOGUE_SPILL_ALLOWANCE = 512


def test_no_register_spills_in_the_main_loops(compiled):
    """ptxas -v on every configuration: spills in a streaming loop cost local-memory traffic on
    every iteration, so kernel 1 and the Gram tile's K loop must have none."""
    for c in compiled:
        epilogue_only = c["kernel"] == "_gram_tile_kernel" and c["constexprs"].get("ACCUMULATE") \
            and c["constexprs"].get("SINGLE")
        limit = EPILOGUE_SPILL_ALLOWANCE if epilogue_only else 0
        assert c["spill_bytes"] <= limit, c
    assert any(c["kernel"] == "_gram_tile_kernel" and not c["constexprs"].get("ACCUMULATE") for c in compiled)
