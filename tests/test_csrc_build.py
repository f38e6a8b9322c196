"""The CUDA sources must compile for Hopper even on machines without a GPU.

CI has nvcc but no GPU: these tests compile and link ``csrc/kernel_pairs.cu`` for sm_90
with nvcc alone, and build the whole CUDA extension (binding included) with
torch.utils.cpp_extension, so that a broken CUDA file fails CI instead of the first GPU run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.ops import ext

CUDA_HOME = os.environ.get("CUDA_HOME") or next(
    (p for p in ("/usr/local/cuda", "/opt/cuda") if (Path(p) / "include" / "cuda_runtime.h").exists()), None)
NVCC = shutil.which("nvcc") or (str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else None)
needs_nvcc = pytest.mark.skipif(NVCC is None or not Path(NVCC).exists(), reason="nvcc is not installed here")


@pytest.mark.slow
@needs_nvcc
def test_cuda_kernel_compiles_and_links_for_sm90(tmp_path):
    out = tmp_path / "libentk_kernel_pairs.so"
    cmd = [NVCC, "-gencode=arch=compute_90,code=sm_90", "-O3", "-Xcompiler", "-fPIC", "-shared",
           "-Xptxas", "-v", str(ext.CSRC / "kernel_pairs.cu"), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.stat().st_size > 0
    # Register spills would move the accumulators to local memory: the kernel is designed without.
    spills = [ln for ln in res.stderr.splitlines() if "spill" in ln and not ln.strip().startswith("0 bytes")]
    assert not [ln for ln in spills if " 0 bytes spill stores" not in ln], "\n".join(spills)
    # Both exported entry points are there for the binding to call.
    sym = subprocess.run(["nm", "-D", str(out)], capture_output=True, text=True).stdout
    assert "entk_kernel_pairs_partials" in sym and "entk_kernel_pairs_grid" in sym


@pytest.mark.slow
@needs_nvcc
@pytest.mark.skipif(CUDA_HOME is None, reason="no CUDA toolkit headers (cuda_runtime.h) found")
def test_cuda_extension_builds_with_cpp_extension(tmp_path, monkeypatch):
    import torch.utils.cpp_extension as cpp

    # cpp_extension reads CUDA_HOME once, at import (and guesses from nvcc's location: wrong here).
    monkeypatch.setenv("CUDA_HOME", CUDA_HOME)
    monkeypatch.setattr(cpp, "CUDA_HOME", CUDA_HOME)
    monkeypatch.setenv("MAX_JOBS", "2")
    mod = cpp.load(name="entk_ops_cuda_build_check", sources=[str(ext.CSRC / s) for s in ext.SOURCES["cuda"]],
               build_directory=str(tmp_path), extra_cuda_cflags=ext.NVCC_FLAGS, verbose=False)
    assert callable(mod.kernel_pairs)


def test_sources_listed_exist_and_names_hash_them():
    for kind, sources in ext.SOURCES.items():
        for s in sources:
            assert (ext.CSRC / s).exists(), f"{kind}: {s}"
        assert ext.module_name(kind).startswith(f"entk_ops_{kind}_")


def test_build_folder_is_keyed_by_the_torch_installation(monkeypatch, tmp_path):
    """Two environments on one machine (same torch version, other install path) build into
    separate folders instead of rebuilding each other's modules."""
    import sys

    import torch

    monkeypatch.setenv("ENTK_EXT_DIR", str(tmp_path))
    key = ext.env_key()
    assert torch.__version__ in key and f"py{sys.version_info[0]}{sys.version_info[1]}" in key
    assert f"cuda{torch.version.cuda or 'cpu'}" in key
    assert ext.build_dir() == tmp_path / key
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    assert ext.env_key() != key and torch.__version__ in ext.env_key()
    assert ext.build_dir().parent == tmp_path


def test_auto_never_compiles_explicit_ext_does(monkeypatch, tmp_path):
    """Without a build, ``auto`` picks the next backend silently; ``backend="ext"`` builds."""
    import torch

    from engine.ops import BackendUnavailableError, kernel_pair_products, kernel_pairs_reference

    monkeypatch.setenv("ENTK_EXT_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(ext, "_modules", {})
    monkeypatch.setattr(ext, "_failures", {})
    builds = []
    monkeypatch.setattr(ext, "_run_build", lambda kind, verbose: builds.append(kind))
    x = torch.randn(3, 20, 20, dtype=torch.float32)
    assert not ext.available("cpu")
    assert torch.equal(kernel_pair_products(x, symmetric=True), kernel_pairs_reference(x, symmetric=True))
    assert builds == [], "auto started a build"
    if ext.unavailable_reason("cpu") is None:
        with pytest.raises(BackendUnavailableError, match="holds no module"):  # the stub built nothing
            kernel_pair_products(x, backend="ext")
        assert builds == ["cpu"]


def _marked(marker: str) -> list[tuple[int, str]]:
    """(pid, name) of every live process whose environment carries ``marker``."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            env = Path(f"/proc/{d}/environ").read_bytes()
            name = Path(f"/proc/{d}/comm").read_text().strip()
            state = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in env and state != "Z":
            found.append((int(d), name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists() or shutil.which(os.environ.get("CXX", "c++")) is None,
                    reason="needs Linux /proc and a C++ compiler")
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_killed_build_leaves_no_compiler_running(tmp_path, how):
    """Start a real build, kill the building process once a compiler runs (SIGKILL: no cleanup
    in it at all; SIGINT: Ctrl-C), and no ninja or compiler process may outlive it."""
    import signal
    import sys
    import time
    import uuid

    marker = f"ENTK_BUILD_TEST_{uuid.uuid4().hex}"
    env = {**os.environ, marker: "1", "ENTK_EXT_DIR": str(tmp_path / "ext"), "MAX_JOBS": "1"}
    env.pop("ENTK_EXT", None)
    code = "from engine.ops import ext; ext.load('cpu')"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=Path(ext.__file__).parents[2],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        compilers = {"ninja", "c++", "g++", "cc1plus", "gcc", "clang++", "as", "ld"}
        while time.monotonic() < deadline and not {n for _, n in _marked(marker)} & compilers:
            assert proc.poll() is None, f"the build ended before a compiler was seen: {proc.stderr.read()[-2000:]}"
            time.sleep(0.1)
        assert {n for _, n in _marked(marker)} & compilers, "no compiler started within 4 minutes"
        proc.send_signal(getattr(signal, how))
        proc.wait(timeout=60)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _marked(marker):
            time.sleep(0.1)
        assert _marked(marker) == [], f"left running after {how}: {_marked(marker)}"
    finally:
        for pid, _ in _marked(marker):  # do not leave a stray build behind if the check failed
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        if proc.poll() is None:
            proc.kill()
