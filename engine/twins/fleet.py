"""Lockstep training of K members on one batch stream (identical SGD noise).

Member 0 is the base trajectory; member k is spawned from the base at its own
iteration t₀ (a deep copy of parameters, buffers and momentum, plus its
perturbation) and then trained on exactly the same batches and learning rates.

Two execution strategies share one interface:

* ``loop``: one ``nn.Module`` + ``torch.optim.SGD`` per member, stepped one after
  another with identical kernels; only spawned members are computed. The base
  member is bit-identical to :func:`engine.train.train` with the same config.
* ``vmap``: parameters, buffers and momentum of all K members stacked, one
  ``vmap(grad(functional_call))`` per step (BatchNorm running statistics update per
  member) and a hand-written SGD with the same update rule; every member is
  computed every step (static shapes), which lets CUDA capture the whole step
  (sampling, forward, backward, update, learning rate read from a device tensor)
  in one CUDA graph.

``auto`` picks ``vmap`` on CUDA and ``loop`` on the CPU: on 2 CPU cores, resnet20 at
batch 128, K=8 runs at 456 images/s with ``loop`` vs 140 with ``vmap`` (grouped
convolutions are slower than K plain ones there); ``benchmarks/bench_twins.py``.
On CUDA, batching K small networks into one kernel launch is the point of ``vmap``.
"""

from __future__ import annotations

import copy
import enum
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from ..data.stream import BatchStream
from ..errors import ConfigError, parse_enum
from ..train import TrainConfig, load_momentum, make_optimizer, momentum_state, sgd_step
from ..train.schedule import lr_at
from .perturb import Perturbation, perturb_


class Strategy(enum.StrEnum):
    AUTO = "auto"
    LOOP = "loop"
    VMAP = "vmap"


@dataclass(frozen=True)
class MemberSpec:
    """A fleet member: ``t0`` is the iteration it is spawned at (None for the base).

    Reference members: ``init_seed`` makes it an ``independent`` run (at t0 it starts from
    another initialisation, built under that seed, with the base's data order); ``data_seed``
    makes it a ``spawn`` (a copy of the base at t0 trained on the batch stream of that seed:
    Frankle et al.'s noise). Neither carries a perturbation.
    """

    name: str
    t0: int | None
    perturbation: Perturbation | None = None
    init_seed: int | None = None
    data_seed: int | None = None

    @property
    def kind(self) -> str:
        if self.t0 is None:
            return "base"
        if self.init_seed is not None:
            return "independent"
        if self.data_seed is not None:
            return "spawn"
        return "control" if self.perturbation is None or self.perturbation.eps == 0 else "perturbed"


def resolve_strategy(strategy: str, device: torch.device) -> Strategy:
    s = parse_enum(Strategy, strategy, "strategy")
    if s is Strategy.AUTO:
        return Strategy.VMAP if device.type == "cuda" else Strategy.LOOP
    return s


class Fleet:
    """K members trained in lockstep; see the module docstring. Build with :func:`make_fleet`."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, stream: BatchStream, specs: list[MemberSpec], *,
                 streams: dict[int, BatchStream] | None = None, inits: dict[int, dict] | None = None):
        if not specs or specs[0].t0 is not None:
            raise ConfigError("the first fleet member must be the base (t0=None)")
        self.cfg, self.stream, self.specs = cfg, stream, specs
        # Member k's own batch stream (a spawn reference) and its own initial state (an independent one).
        self.streams, self.inits = dict(streams or {}), dict(inits or {})
        self.k = len(specs)
        self.device = stream.device
        self.lrs = np.array([lr_at(s, steps=cfg.steps, **cfg.schedule_kwargs()) for s in range(cfg.steps)],
                            dtype=np.float64)
        self.spawned = [False] * self.k
        self.spawned[0] = True
        self.realized: list[dict | None] = [None] * self.k
        self.last_loss = torch.full((self.k,), float("nan"), device=self.device)

    # -- subclass interface ------------------------------------------------------------------
    def step(self, t: int) -> None:
        raise NotImplementedError

    def state(self, k: int) -> dict[str, torch.Tensor]:
        """Parameters and buffers of member k (``state_dict`` names, cloned)."""
        raise NotImplementedError

    def momentum(self, k: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load(self, k: int, state: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _param_list(self, k: int) -> list[tuple[str, torch.Tensor]]:
        """Live (writable) views of member k's trainable parameters."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    def spawn(self, k: int) -> dict:
        """Member k becomes a deep copy of the base now, plus its perturbation (an independent member:
        its own initial state, with zero momentum)."""
        spec = self.specs[k]
        if k in self.inits:
            self.load(k, self.inits[k], {n: torch.zeros_like(v) for n, v in self.momentum(0).items()})
        else:
            self.load(k, self.state(0), self.momentum(0))
        pert = spec.perturbation or Perturbation(0.0)
        params = self._param_list(k)
        if pert.weights_only:
            params = [(n, p) for n, p in params if p.ndim >= 2]
        info = perturb_(params, pert)
        self.spawned[k] = True
        self.realized[k] = info
        return info

    def _param_stacks(self, rows: list[int]):
        """Per trainable parameter, a (len(rows), numel) view or copy of those members' values."""
        raise NotImplementedError

    @torch.no_grad()
    def trace_into(self, out: torch.Tensor, j: int) -> None:
        """Record the divergence of every spawned member from the base into row ``j`` of ``out``.

        ``out`` is a preallocated (n, K, 3) float64 tensor on the fleet's device; ``out[j, k]``
        becomes (‖θ_k − θ_0‖₂, 1 − cos(θ_0, θ_k), ‖θ_k‖₂) over the trainable parameters, computed
        in float64 on the device with no host synchronisation (rows of unspawned members are left
        as they are). 1 − cos is formed as (‖δ‖² − (‖θ_k‖ − ‖θ_0‖)²) / (2‖θ_0‖‖θ_k‖) with
        ‖θ_k‖ − ‖θ_0‖ = Σ δ(θ_k + θ_0) / (‖θ_k‖ + ‖θ_0‖), δ = θ_k − θ_0: every term comes from the
        difference itself, so it keeps its relative precision for nearly parallel states (1 − cos
        ≈ 1e-14 after a 1e-7 perturbation) and is exactly 0 for identical ones (the control).
        """
        rows = [k for k in range(self.k) if self.spawned[k]]
        d2 = s = n2 = None
        for x in self._param_stacks(rows):
            x = x.double()
            x0 = x[:1]
            diff = x - x0
            terms = ((diff * diff).sum(1), (diff * (x + x0)).sum(1), (x * x).sum(1))
            d2, s, n2 = terms if d2 is None else (d2 + terms[0], s + terms[1], n2 + terms[2])
        nb = n2.sqrt()
        na = nb[:1]
        dn = s / (na + nb)
        vals = torch.stack([d2.sqrt(), (d2 - dn * dn).clamp_min(0) / (2 * na * nb), nb], dim=1)
        if len(rows) == self.k:
            out[j].copy_(vals)
        else:
            out[j].index_copy_(0, torch.tensor(rows, device=out.device), vals)


class LoopFleet(Fleet):
    """One module and optimizer per member; only spawned members are stepped."""

    strategy = Strategy.LOOP

    def __init__(self, model, cfg, stream, specs, **refs):
        super().__init__(model, cfg, stream, specs, **refs)
        self.models = [model] + [copy.deepcopy(model) for _ in specs[1:]]
        self.opts = [make_optimizer(m, cfg) for m in self.models]
        for m in self.models:
            m.train()

    def step(self, t: int) -> None:
        xb, yb = self.stream.batch(t)
        lr = float(self.lrs[t])
        for k, (m, opt) in enumerate(zip(self.models, self.opts, strict=True)):
            if not self.spawned[k]:
                continue
            if k in self.streams:  # a spawn reference: same step, its own data order
                self.last_loss[k] = sgd_step(m, opt, *self.streams[k].batch(t), lr)
            else:
                self.last_loss[k] = sgd_step(m, opt, xb, yb, lr)

    def state(self, k):
        return {n: v.detach().clone() for n, v in self.models[k].state_dict().items()}

    def momentum(self, k):
        mom = momentum_state(self.models[k], self.opts[k])
        return {n: (b.detach().clone() if b is not None else torch.zeros_like(p))
                for (n, p), b in zip(self.models[k].named_parameters(), mom.values(), strict=True)}

    def load(self, k, state, momentum):
        m = self.models[k]
        m.load_state_dict({n: v.clone() for n, v in state.items()})  # load_state_dict copies, clone is cheap insurance
        # Fresh optimizer, then fresh copies of the momentum buffers: never share the source's tensors
        # (Optimizer.load_state_dict would keep them, corrupting the base through the member).
        self.opts[k] = make_optimizer(m, self.cfg)
        load_momentum(m, self.opts[k], momentum)

    def _param_list(self, k):
        return [(n, p) for n, p in self.models[k].named_parameters() if p.requires_grad]

    def _param_stacks(self, rows):
        per_member = [[p for _, p in self._param_list(k)] for k in rows]
        return [torch.stack([ps[i].reshape(-1) for ps in per_member]) for i in range(len(per_member[0]))]


class VmapFleet(Fleet):
    """All members stacked; one batched step; optional CUDA-graph capture on CUDA."""

    strategy = Strategy.VMAP

    def __init__(self, model, cfg, stream, specs, *, cuda_graph: bool = True, **refs):
        super().__init__(model, cfg, stream, specs, **refs)
        if self.streams:
            raise ConfigError("spawn members train on their own data order, but the vmap strategy steps every "
                              "member on one batch: use strategy='loop' (--strategy loop)")
        if cfg.nesterov:
            raise ConfigError("the vmap strategy implements plain momentum SGD; use strategy='loop' for nesterov")
        self.template = model.train()
        k = self.k
        with torch.no_grad():
            self.P = {n: p.detach().unsqueeze(0).repeat(k, *([1] * p.ndim)).contiguous()
                      for n, p in model.named_parameters()}
            self.B = {n: b.detach().unsqueeze(0).repeat(k, *([1] * b.ndim)).contiguous()
                      for n, b in model.named_buffers()}
            self.M = {n: torch.zeros_like(p) for n, p in self.P.items()}
        self.names = list(model.state_dict().keys())
        tmpl = self.template

        def loss_fn(params, buffers, x, y):
            return F.cross_entropy(functional_call(tmpl, (params, buffers), (x,)), y)

        self._grad = vmap(grad_and_value(loss_fn), in_dims=(0, 0, None, None), randomness="error")
        self.lr_dev = torch.tensor(self.lrs, dtype=torch.float32, device=self.device)
        self.t_dev = torch.zeros((), dtype=torch.int64, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.use_graph = cuda_graph and self.device.type == "cuda"
        self.graph_failed: str | None = None

    def _step_body(self, t) -> None:
        xb, yb = self.stream.batch(t)
        grads, loss = self._grad(self.P, self.B, xb, yb)
        lr = self.lr_dev[t] if isinstance(t, torch.Tensor) else float(self.lrs[t])
        wd, mom = self.cfg.weight_decay, self.cfg.momentum
        with torch.no_grad():
            for n, p in self.P.items():
                d = grads[n].add(p, alpha=wd) if wd else grads[n]
                buf = self.M[n]
                buf.mul_(mom).add_(d)
                p.sub_(buf * lr)
            self.last_loss.copy_(loss)

    def _capture(self) -> None:
        """Capture one fleet step in a CUDA graph; warm-up steps run on saved copies."""
        saved = ({n: v.clone() for n, v in self.P.items()}, {n: v.clone() for n, v in self.B.items()},
                 {n: v.clone() for n, v in self.M.items()})
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(3):
                self._step_body(self.t_dev)
        torch.cuda.current_stream(self.device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._step_body(self.t_dev)
        with torch.no_grad():  # undo the warm-up and the capture's effects
            for live, keep in zip((self.P, self.B, self.M), saved, strict=True):
                for n, v in live.items():
                    v.copy_(keep[n])
        self.graph = g

    def step(self, t: int) -> None:
        if self.use_graph and self.graph is None and self.graph_failed is None:
            try:
                self._capture()
            except Exception as e:  # capture is an optimization: fall back to eager, loudly
                self.graph_failed = f"{type(e).__name__}: {e}"
                warnings.warn(f"CUDA graph capture of the fleet step failed ({self.graph_failed}); "
                              "running eagerly", RuntimeWarning, stacklevel=2)
        if self.graph is not None:
            self.t_dev.fill_(t)
            self.graph.replay()
        else:
            self._step_body(t)

    def state(self, k):
        out = {}
        for n in self.names:
            src = self.P[n] if n in self.P else self.B[n]
            out[n] = src[k].detach().clone()
        return out

    def momentum(self, k):
        return {n: m[k].clone() for n, m in self.M.items()}

    def load(self, k, state, momentum):
        with torch.no_grad():
            for n in self.names:
                (self.P[n] if n in self.P else self.B[n])[k].copy_(state[n])
            for n, m in self.M.items():
                m[k].copy_(momentum[n])

    def _param_list(self, k):
        return [(n, p[k]) for n, p in self.P.items()]

    def _param_stacks(self, rows):
        if len(rows) == self.k:
            return [p.reshape(self.k, -1) for p in self.P.values()]
        idx = torch.tensor(rows, device=self.device)
        return [p.reshape(self.k, -1).index_select(0, idx) for p in self.P.values()]


def make_fleet(model: nn.Module, cfg: TrainConfig, stream: BatchStream, specs: list[MemberSpec], *,
               strategy: str = "auto", cuda_graph: bool = True, streams: dict[int, BatchStream] | None = None,
               inits: dict[int, dict] | None = None) -> Fleet:
    """A fleet of ``specs`` (member 0 the base) from ``model`` (the base at iteration 0).

    ``streams[k]``: member k's own batch stream (spawn references; loop strategy only);
    ``inits[k]``: member k's own initial state, loaded at its t0 (independent references).
    """
    s = resolve_strategy(strategy, stream.device)
    if s is Strategy.LOOP:
        return LoopFleet(model, cfg, stream, specs, streams=streams, inits=inits)
    return VmapFleet(model, cfg, stream, specs, cuda_graph=cuda_graph, streams=streams, inits=inits)
