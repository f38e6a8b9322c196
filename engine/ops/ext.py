"""The compiled ``csrc/`` extension: built lazily on first use, cached, never required.

Two modules are built with :func:`torch.utils.cpp_extension.load` (ninja; the first build
takes ~30 s on 2 CPU cores, later loads are instant): ``cpu`` from
``csrc/kernel_pairs_cpu.cpp`` (C++/OpenMP) and ``cuda`` from ``csrc/kernel_pairs.cu`` plus
its binding ``csrc/kernel_pairs_cuda.cpp``. Build products live in ``$ENTK_EXT_DIR``
(default ``~/.cache/entk/ext``) under a name that hashes the sources, the flags, the torch
version and the CPU, so an edit or an upgrade rebuilds instead of loading a stale module.

``ENTK_EXT=0`` disables the extension (``auto`` then picks Triton or torch). Build it ahead
of time with ``entk ext build``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch

from .backend import BackendUnavailableError

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = {
    "cpu": ["kernel_pairs_cpu.cpp"],
    "cuda": ["kernel_pairs_cuda.cpp", "kernel_pairs.cu"],
}
# No -std: cpp_extension picks the standard the installed torch headers need (C++20 for 2.14).
CFLAGS = ["-O3", "-fopenmp", "-march=native"]
LDFLAGS = ["-fopenmp"]
# sm_90 machine code for Hopper (H100/H200); PTX for anything newer. No fast math: NaN must propagate.
NVCC_FLAGS = ["-O3", "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]

_lock = threading.Lock()
_modules: dict[str, object] = {}
_failures: dict[str, str] = {}


def _kind(device: torch.device | str) -> str:
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def disabled() -> bool:
    return os.environ.get("ENTK_EXT", "1") in ("0", "off", "false")


def build_dir() -> Path:
    return Path(os.environ.get("ENTK_EXT_DIR", Path.home() / ".cache" / "entk" / "ext"))


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    return line
    except OSError:
        pass
    return platform.processor()


def module_name(kind: str) -> str:
    h = hashlib.sha256()
    for src in SOURCES[kind]:
        h.update((CSRC / src).read_bytes())
    h.update(repr((CFLAGS, LDFLAGS, NVCC_FLAGS, torch.__version__, sys.version_info[:2], platform.machine(),
                   _cpu_id())).encode())
    return f"entk_ops_{kind}_{h.hexdigest()[:12]}"


def _cpp():
    # Importing cpp_extension on a machine without a CUDA runtime logs a warning about CUDA_HOME
    # that is irrelevant to the CPU build; keep it out of users' output.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch.utils.cpp_extension as cpp

    return cpp


def built_path(kind: str) -> Path | None:
    """The built module of ``kind`` (cpu/cuda) for the current sources, if it exists."""
    if any(not (CSRC / s).exists() for s in SOURCES[kind]):
        return None
    name = module_name(kind)
    so = build_dir() / name / f"{name}.so"
    return so if so.exists() else None


def unavailable_reason(kind: str) -> str | None:
    """Why the extension of ``kind`` cannot be built here (None when it can be)."""
    return _why_not(kind)


def _why_not(kind: str) -> str | None:
    if disabled():
        return "the csrc extension is disabled (ENTK_EXT=0)"
    missing = [s for s in SOURCES[kind] if not (CSRC / s).exists()]
    if missing:
        return f"csrc sources {missing} not found under {CSRC} (install the engine from a source checkout)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH; install g++ or set CXX)"
    if kind == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if cuda_home() is None:
            return "no CUDA toolkit found (nvcc and include/cuda_runtime.h; set CUDA_HOME)"
    return None


def cuda_home() -> str | None:
    """The CUDA toolkit root: torch's guess when it has the headers, else the usual places.

    torch guesses from nvcc's location, which is wrong where nvcc is a wrapper in /usr/local/bin.
    """
    cpp = _cpp()
    for root in (os.environ.get("CUDA_HOME"), cpp.CUDA_HOME, "/usr/local/cuda", "/opt/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime.h").exists() and (Path(root) / "bin" / "nvcc").exists():
            return root
    return None


def _build(kind: str, verbose: bool):
    cpp = _cpp()
    name = module_name(kind)
    directory = build_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / f"{name}.so").exists():
        print(f"entk: building the {kind} csrc extension in {directory} (once; ~30 s on 2 cores)", file=sys.stderr)
    kwargs = dict(name=name, sources=[str(CSRC / s) for s in SOURCES[kind]], build_directory=str(directory),
                  extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, verbose=verbose)
    if kind == "cuda":
        cpp.CUDA_HOME = cuda_home()  # read by load() from the module, set at its import
        kwargs["extra_cuda_cflags"] = NVCC_FLAGS
        kwargs["extra_cflags"] = [f for f in CFLAGS if f != "-march=native"]
    return cpp.load(**kwargs)


def load(device: torch.device | str = "cpu", *, verbose: bool = False):
    """The extension module for ``device``'s kind, building it if needed.

    Raises :class:`BackendUnavailableError` with the reason (no compiler, no nvcc, a failed
    build: the compiler's last lines) — once per process; later calls re-raise at once.
    """
    kind = _kind(device)
    with _lock:
        if kind in _modules:
            return _modules[kind]
        if kind in _failures:
            raise BackendUnavailableError(_failures[kind])
        why = _why_not(kind)
        if why is None:
            try:
                _modules[kind] = _build(kind, verbose)
                return _modules[kind]
            except Exception as e:  # a compiler error arrives as RuntimeError with the build log
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                errors = [ln for ln in lines if "error" in ln.lower()] or lines[-3:]
                why = (f"building the {kind} csrc extension failed (rerun with entk ext build --verbose "
                       f"for the log): {errors[0][:300]}")
        _failures[kind] = f"ext backend unavailable: {why}"
        raise BackendUnavailableError(_failures[kind])


def available(device: torch.device | str = "cpu") -> bool:
    """Whether the extension can run on ``device`` (builds it on first call; never raises)."""
    try:
        load(device)
        return True
    except BackendUnavailableError:
        return False
