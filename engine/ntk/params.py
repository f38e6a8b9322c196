"""The columns of J (which parameters, in which order), per-layer keys, and the checks every front end
makes on a model, its inputs and its outputs before any long work."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError, EngineError
from .rules import is_batch_dependent

__all__ = ["Entry", "as_names", "check_mode", "eval_mode", "layer_of", "owner_names", "parameter_layout",
           "selected_entries"]


@dataclass(frozen=True)
class Entry:
    name: str
    param: nn.Parameter
    start: int
    end: int


def model_name(model: nn.Module) -> str:
    return str(getattr(model, "arch", type(model).__name__))


def layer_of(name: str) -> str:
    """The per-layer key of a parameter: its owning module's name ("layer1.0.conv1" for
    "layer1.0.conv1.weight"); a parameter of the top-level module keys by its own name ("scale")."""
    return name.rpartition(".")[0] or name


def owner_names(model: nn.Module | None, entries: list[Entry]) -> tuple[dict[int, str], dict[int, str], set[int]]:
    """Module id -> its name; param id -> its per-layer key (:func:`layer_of`); the ids of tied
    parameters (held by several modules: their columns sum over holders, which the fallback does).
    ``model`` None (a function of a parameter dict): no modules, nothing tied."""
    names = {} if model is None else {id(m): n for n, m in model.named_modules()}
    holders: dict[int, list[str]] = {}
    for mname, m in [] if model is None else model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append(mname)
    owner = {}
    shared = set()
    for e in entries:
        owner[id(e.param)] = layer_of(e.name)
        if len(set(holders.get(id(e.param), []))) > 1:
            shared.add(id(e.param))
    return names, owner, shared


def as_names(param_names: str | Iterable[str] | None) -> list[str] | None:
    """``param_names`` as a list: one name as a string, or an iterable of names (None: all)."""
    if param_names is None:
        return None
    if isinstance(param_names, str):
        return [param_names]
    try:
        names = list(param_names)
    except TypeError:
        raise ConfigError(f"param_names must be a parameter name or an iterable of names, got "
                          f"{type(param_names).__name__}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ConfigError(f"param_names must hold parameter names (str), got {bad[0]!r}")
    return names


def selected_entries(model: nn.Module, param_names: str | Iterable[str] | None) -> list[Entry]:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    wanted: set[str] | None = None
    param_names = as_names(param_names)
    if param_names is not None:
        wanted = set(param_names)
        if not wanted:
            raise ConfigError("param_names is empty; pass None for all trainable parameters")
        known = {n for n, _ in named}
        unknown = sorted(wanted - known)
        if unknown:
            sample = ", ".join(n for n, _ in named[:6]) + (", ..." if len(named) > 6 else "")
            raise ConfigError(
                f"unknown parameter name(s) {', '.join(map(repr, unknown))} for model {model_name(model)}; "
                f"names look like: {sample}"
            )
        frozen = sorted(n for n, p in named if n in wanted and not p.requires_grad)
        if frozen:
            raise ConfigError(
                f"parameter(s) {', '.join(map(repr, frozen))} do not require grad; the Jacobian has columns "
                "only for trainable parameters"
            )
    out: list[Entry] = []
    col = 0
    for name, p in named:
        if not p.requires_grad or (wanted is not None and name not in wanted):
            continue
        out.append(Entry(name, p, col, col + p.numel()))
        col += p.numel()
    if not out:
        raise ConfigError(f"model {model_name(model)} has no trainable parameters")
    return out


def parameter_layout(
    model: nn.Module, param_names: str | Iterable[str] | None = None
) -> list[tuple[str, torch.Size, int, int]]:
    """Column layout of J: ``(name, shape, col_start, col_end)`` per trainable parameter.

    In ``model.named_parameters()`` order (shared parameters once, under their first
    name), restricted to ``param_names`` (one name, or an iterable of names) when given; ``col_end - col_start`` is the
    parameter's numel. Raises ``ConfigError`` naming unknown or frozen names.
    """
    return [(e.name, e.param.shape, e.start, e.end) for e in selected_entries(model, param_names)]



def params_dtype_device(model: nn.Module, entries: Sequence[Entry]) -> tuple[torch.dtype, torch.device]:
    dtypes = {e.param.dtype for e in entries}
    devices = {e.param.device for e in entries}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ConfigError(
            f"the selected parameters of {model_name(model)} mix dtypes {sorted(map(str, dtypes))} or devices "
            f"{sorted(map(str, devices))}; cast the model to one dtype and device"
        )
    dtype = dtypes.pop()
    if not dtype.is_floating_point:
        raise ConfigError(f"parameters of {model_name(model)} have non-float dtype {dtype}")
    return dtype, devices.pop()


def check_x(x: object, dtype: torch.dtype, device: torch.device) -> Tensor:
    if not isinstance(x, Tensor):
        raise ConfigError(f"x must be a torch.Tensor of shape (N, ...), got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ConfigError(f"x must have shape (N, ...) with N >= 1 samples, got shape {tuple(x.shape)}")
    # Integer inputs (token ids) pass untouched; float inputs must match the parameters.
    if (x.is_floating_point() or x.is_complex()) and x.dtype != dtype:
        raise ConfigError(
            f"x has dtype {x.dtype} but the model's parameters are {dtype}; convert x (e.g. x.to({dtype})) "
            "or the model so they match"
        )
    if x.device != device:
        raise ConfigError(f"x is on {x.device} but the model's parameters are on {device}")
    return x


def check_mode(model: nn.Module, force_eval: bool) -> None:
    if not force_eval and any(m.training for m in model.modules()):
        raise ConfigError(
            f"model {model_name(model)} is in train mode; BatchNorm must use running statistics: "
            "call model.eval() or pass force_eval=True"
        )
    for name, m in model.named_modules():
        if is_batch_dependent(m):
            raise ConfigError(
                f"BatchNorm {name or model_name(model)} has track_running_stats=False, so each output depends "
                "on the whole batch and per-sample Jacobians are undefined; use running statistics"
            )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside; each module's own flag restored after, even on error."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def probe(model: nn.Module, x: Tensor) -> int:
    """Run one sample through the model to validate shapes; returns C."""
    try:
        with torch.no_grad():
            y = model(x[:1])
    except EngineError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"x of shape {tuple(x.shape)} does not fit model {model_name(model)} (one sample failed: {first})"
        ) from exc
    if not isinstance(y, Tensor) or y.dim() != 2 or y.shape[0] != 1:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ConfigError(
            f"model {model_name(model)} must return logits of shape (N, C); for x[:1] it returned {shape}"
        )
    return int(y.shape[1])


def check_projection(v: object, c: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if not isinstance(v, Tensor) or not (v.dtype.is_floating_point) or tuple(v.shape) != (c,):
        what = f"shape {tuple(v.shape)} dtype {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
        raise ConfigError(f"projection must be a float tensor of shape ({c},) (one weight per output), got {what}")
    return v.detach().to(device=device, dtype=dtype)


def check_out(out: object, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, Tensor):
        raise ConfigError(f"out must be a torch.Tensor of shape {shape}, got {type(out).__name__}")
    if tuple(out.shape) != shape:
        raise ConfigError(f"out has shape {tuple(out.shape)}; expected {shape} (rows N·C or N, columns P)")
    if out.dtype != dtype:
        raise ConfigError(f"out has dtype {out.dtype} but dtype={dtype} was requested; pass dtype={out.dtype}")
    if out.device != device:
        raise ConfigError(f"out is on {out.device} but the model is on {device}")
    if not out.is_contiguous():
        raise ConfigError("out must be contiguous (row-major), e.g. torch.empty(shape)")
    if out.requires_grad:
        raise ConfigError("out must not require grad")
    return out


def check_chunk(chunk_size: object) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return chunk_size
