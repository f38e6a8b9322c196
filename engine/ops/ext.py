"""The compiled ``csrc/`` extension: built on request, cached per torch installation, never required.

Two modules are built with :func:`torch.utils.cpp_extension.load` (ninja; the first build
takes ~30 s on 2 CPU cores, later loads are instant): ``cpu`` from
``csrc/kernel_pairs_cpu.cpp`` (C++/OpenMP) and ``cuda`` from ``csrc/kernel_pairs.cu`` plus
its binding ``csrc/kernel_pairs_cuda.cpp``.

When it is built: on ``entk ext build`` or on the first explicit ``backend="ext"`` (:func:`load`).
``auto`` never compiles (:func:`available`): it uses the extension only where a build for this
torch installation already exists, and otherwise picks the next backend without a word (Triton
or torch; ``entk ext status`` says which), so a first call never stalls for a build.

Where: ``$ENTK_EXT_DIR`` (default ``~/.cache/entk/ext``), in one folder per torch installation
(:func:`env_key`: torch version, Python version, CUDA version and a hash of torch's install
path), under a module name that hashes the sources, the flags and the CPU. Two environments on
one machine therefore never rebuild each other's modules, and an edit or an upgrade rebuilds
instead of loading a stale one.

The build runs in a child process in its own session: an interrupt (Ctrl-C, SIGTERM, or the
parent killed outright) ends ninja and every compiler it started, instead of leaving them
running orphaned.

``ENTK_EXT=0`` disables the extension (``auto`` then picks Triton or torch).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
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


def build_root() -> Path:
    """``$ENTK_EXT_DIR``, default ``~/.cache/entk/ext``: shared by every environment of a user."""
    return Path(os.environ.get("ENTK_EXT_DIR") or Path.home() / ".cache" / "entk" / "ext")


def env_key() -> str:
    """The torch installation this process runs on, as a folder name.

    torch's version, Python's, CUDA's (``cpu`` for a CPU-only torch) and a hash of torch's
    install path: two venvs with the same torch version still get separate folders, since
    ninja would rebuild on each switch (their include paths differ) and clobber the other's.
    """
    where = hashlib.sha256(str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:10]
    cuda = torch.version.cuda or "cpu"
    return f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-cuda{cuda}-{where}"


def build_dir() -> Path:
    """Where this torch installation's builds live: ``build_root() / env_key()``."""
    return build_root() / env_key()


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


def _build_spec(kind: str, verbose: bool) -> dict:
    name = module_name(kind)
    kwargs = dict(name=name, sources=[str(CSRC / s) for s in SOURCES[kind]], build_directory=str(build_dir() / name),
                  extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, verbose=verbose)
    spec = {"kwargs": kwargs, "cuda_home": None, "parent": os.getpid()}
    if kind == "cuda":
        spec["cuda_home"] = cuda_home()  # read by load() from the module, set at its import
        kwargs["extra_cuda_cflags"] = NVCC_FLAGS
        kwargs["extra_cflags"] = [f for f in CFLAGS if f != "-march=native"]
    return spec


# The build runs in a child process in its own session (so that the whole build can be found
# and ended). It dies with its parent (PR_SET_PDEATHSIG on Linux), and on SIGTERM or SIGINT it
# ends every process of its session before it exits: ninja puts each compiler in a process
# group of its own, so signalling one process group would miss them.


def _session_members(sid: int) -> list[int]:
    """Pids of every process in session ``sid`` (Linux /proc; empty elsewhere)."""
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for d in entries:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:  # after the name: state, ppid, pgrp, session
            pids.append(int(d))
    return pids


def reap_session(sid: int, *, exclude: int | None = None, grace: float = 2.0) -> None:
    """SIGTERM every process of session ``sid`` (but ``exclude``), then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for p in _session_members(sid) if p != exclude]
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 0.0)
        while time.monotonic() < deadline and [p for p in _session_members(sid) if p != exclude]:
            time.sleep(0.05)


def _child_main() -> None:  # pragma: no cover - runs in the build child
    spec = json.loads(sys.argv[1])
    sid = os.getsid(0)

    def stop(signum, frame):
        reap_session(sid, exclude=os.getpid())
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != spec["parent"]:  # the parent died before the death signal was armed
        stop(signal.SIGTERM, None)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch.utils.cpp_extension as cpp

    if spec["cuda_home"]:
        cpp.CUDA_HOME = spec["cuda_home"]
    Path(spec["kwargs"]["build_directory"]).mkdir(parents=True, exist_ok=True)
    try:
        cpp.load(**spec["kwargs"])
    except Exception as e:  # the compiler's log, for the parent's one-line reason
        print(str(e), file=sys.stderr)
        sys.exit(1)


def _run_build(kind: str, verbose: bool) -> None:
    """Build ``kind`` in a child process; on any interruption end the child's whole session."""
    spec = _build_spec(kind, verbose)
    directory = Path(spec["kwargs"]["build_directory"])
    print(f"entk: building the {kind} csrc extension in {directory} (once; ~30 s on 2 cores)", file=sys.stderr)
    root = str(Path(__file__).resolve().parents[2])
    code = f"import sys; sys.path.insert(0, {root!r}); from engine.ops.ext import _child_main; _child_main()"
    out = None if verbose else subprocess.PIPE
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], stdout=out, stderr=out, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate()
    except BaseException:  # KeyboardInterrupt, SystemExit, a signal turned into an exception
        proc.terminate()  # the child ends its session's processes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        reap_session(proc.pid)  # whatever is left (the child stuck or already gone)
        proc.kill()
        raise
    if proc.returncode != 0:
        raise RuntimeError(err or f"the build process exited with status {proc.returncode}")


def _import(kind: str, so: Path):
    """Import a built module (what cpp_extension.load does once the build is up to date)."""
    spec = importlib.util.spec_from_file_location(module_name(kind), so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load(device: torch.device | str = "cpu", *, verbose: bool = False):
    """The extension module for ``device``'s kind, building it if needed (an explicit request).

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
                so = built_path(kind)
                if so is None:
                    _run_build(kind, verbose)
                    so = built_path(kind)
                    if so is None:
                        raise RuntimeError(f"the build finished but {build_dir() / module_name(kind)} holds no module")
                _modules[kind] = _import(kind, so)
                return _modules[kind]
            except Exception as e:  # a compiler error arrives as RuntimeError with the build log
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                errors = [ln for ln in lines if "error" in ln.lower()] or lines[-3:] or [type(e).__name__]
                why = (f"building the {kind} csrc extension failed (rerun with entk ext build --verbose "
                       f"for the log): {errors[0][:300]}")
        _failures[kind] = f"ext backend unavailable: {why}"
        raise BackendUnavailableError(_failures[kind])


def available(device: torch.device | str = "cpu") -> bool:
    """Whether the extension can run on ``device`` now, without compiling (what ``auto`` asks).

    True when it is loaded or a build for this torch installation exists and imports; never
    builds, never raises. Build it with ``entk ext build`` or an explicit ``backend="ext"``.
    """
    kind = _kind(device)
    with _lock:
        if kind in _modules:
            return True
        if kind in _failures or disabled() or (kind == "cuda" and not torch.cuda.is_available()):
            return False
        so = built_path(kind)
        if so is None:
            return False
        try:
            _modules[kind] = _import(kind, so)
        except Exception as e:  # a damaged or foreign .so: explicit requests say why
            _failures[kind] = f"ext backend unavailable: the built module {so} does not import ({e})"
            return False
        return True
