"""The eNTK front ends agree: ``entk``, ``entk_fn``, ``jacobian`` then a Gram, and the ``entk kernel``
job, on fresh random models with odd shapes, for every kernel kind, cross-kernels, ``param_names``
(a string or a list) and ``per_layer`` (the same keys from every front end).

Reference: torch.func (``vmap(jacrev(functional_call))``) per-sample Jacobians contracted in plain
torch, in float32 and float64. Each front end's float32 error against the float64 reference may be a
few times the float32 reference's own (tests/_tolerance.py); per-layer keys must match exactly.

Models (all take (N, 3, 8, 8) images, so the kernel job can run them on a synthetic dataset):
a top-level parameter (``self.scale``), a transformer block built from ``nn.Linear`` on (N, L, d)
tokens with a learned positional parameter ``pos``, tied weights (one parameter in two modules and
read outside them), and a module used twice.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from engine.data import load_synthetic, normalize
from engine.jobs import kernel_job
from engine.ntk import entk, entk_fn, jacobian, open_kernel, parameter_layout
from tests._tolerance import assert_close_to_torch
from tests.seeding import seeded

C = 5
KINDS = ["full", "traced", "diagonal", "pntk"]


class ScaleNet(nn.Module):
    """A conv, BatchNorm (eval) and a Linear, times a parameter of the top-level module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, C)
        self.scale = nn.Parameter(torch.randn(C))

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1)) * self.scale


class Block(nn.Module):
    """One pre-norm transformer block on (N, L, d) tokens (4 patches of 4×4 pixels) with a learned ``pos``."""

    def __init__(self, d: int = 6, hidden: int = 7):
        super().__init__()
        self.embed = nn.Linear(48, d)
        self.pos = nn.Parameter(torch.randn(4, d) * 0.5)
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.head = nn.Linear(d, C)

    def forward(self, x):
        n = x.shape[0]
        tok = x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(n, 4, 48)
        h = self.embed(tok) + self.pos
        z = self.ln1(h)
        att = torch.softmax(self.q(z) @ self.k(z).transpose(1, 2) / math.sqrt(z.shape[-1]), dim=-1)
        h = h + self.o(att @ self.v(z))
        h = h + self.down(torch.tanh(self.up(self.ln2(h))))
        return self.head(h.mean(1))


class Tied(nn.Module):
    """``b.weight`` is ``a.weight``, and the same weight is read once more outside both modules."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(192, 6)
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.head = nn.Linear(6, C)

    def forward(self, x):
        h = torch.tanh(self.inp(x.flatten(1)))
        h = torch.tanh(self.b(torch.tanh(self.a(h))))
        return self.head(torch.tanh(F.linear(h, self.a.weight)))


class Twice(nn.Module):
    """One Linear applied twice in a row."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(192, 7)
        self.mid = nn.Linear(7, 7)
        self.head = nn.Linear(7, C)

    def forward(self, x):
        h = torch.tanh(self.inp(x.flatten(1)))
        return self.head(torch.tanh(self.mid(torch.tanh(self.mid(h)))))


MODELS = {"scale": ScaleNet, "block": Block, "tied": Tied, "twice": Twice}
# One string-valued selection per model (issue 19: a string is one name everywhere) and one list.
ONE_NAME = {"scale": "scale", "block": "pos", "tied": "a.weight", "twice": "mid.weight"}
SOME_NAMES = {"scale": ["conv.weight", "scale"], "block": ["pos", "q.weight", "ln2.bias"],
              "tied": ["a.weight", "head.bias"], "twice": ["mid.weight", "mid.bias", "inp.bias"]}
# per_layer keys: the owning module's name; a parameter of the top-level module keys by its own name.
KEYS = {"scale": ["bn", "conv", "fc", "scale"],
        "block": ["down", "embed", "head", "k", "ln1", "ln2", "o", "pos", "q", "up", "v"],
        "tied": ["a", "b", "head", "inp"], "twice": ["head", "inp", "mid"]}


def _fresh(name: str) -> nn.Module:
    gen, _ = seeded()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = MODELS[name]()
    for m in model.modules():  # BatchNorm off its initial statistics, so the eval-mode rule matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1, 0.3)
            m.bias.data.normal_(0, 0.3)
    return model.eval()


def _x(n: int) -> torch.Tensor:
    gen, _ = seeded()
    return torch.randn(n, 3, 8, 8, generator=gen)


def _layer(name: str) -> str:
    return name.rpartition(".")[0] or name


def _jac(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """{param name: (N, C, numel)} per-sample Jacobians by torch.func."""
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}

    def single(p, x1):
        return functional_call(model, p, (x1.unsqueeze(0),))[0]

    with torch.no_grad():
        j = vmap(jacrev(single), in_dims=(None, 0))(params, x)
    return {n: j[n].reshape(x.shape[0], C, -1) for n in names}


def _contract(ja: torch.Tensor, jb: torch.Tensor | None, kind: str) -> torch.Tensor:
    """ja (N1, C, P), jb (N2, C, P) or None: the kernel of that kind, plainly."""
    if kind == "diagonal":
        return torch.einsum("ncp,ndp->ncd", ja, ja)
    if kind == "pntk":
        ja = ja.sum(1, keepdim=True) / math.sqrt(C)
        jb = None if jb is None else jb.sum(1, keepdim=True) / math.sqrt(C)
    jb = ja if jb is None else jb
    if kind == "traced":
        return torch.einsum("ncp,mcp->nm", ja, jb)
    return ja.reshape(-1, ja.shape[2]) @ jb.reshape(-1, jb.shape[2]).T


def _reference(model, x1, x2, kind, names, per_layer) -> dict[str, torch.Tensor]:
    """{key: kernel} ("" without per_layer) by torch.func and plain contractions."""
    j1 = _jac(model, x1, names)
    j2 = None if x2 is None else _jac(model, x2, names)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(_layer(n) if per_layer else "", []).append(n)
    return {g: _contract(torch.cat([j1[n] for n in ns], 2), None if j2 is None else
                         torch.cat([j2[n] for n in ns], 2), kind) for g, ns in groups.items()}


def _from_jacobian(model, x1, x2, kind, param_names, per_layer) -> dict[str, torch.Tensor]:
    """``jacobian`` (structured) then a Gram, grouped by ``parameter_layout``'s columns."""
    def rows(x):
        if kind == "pntk":
            v = torch.full((C,), C ** -0.5, dtype=x.dtype)
            return jacobian(model, x, param_names=param_names, projection=v, dtype=x.dtype).unsqueeze(1)
        return jacobian(model, x, param_names=param_names, dtype=x.dtype).view(x.shape[0], C, -1)

    ja = rows(x1)
    jb = None if x2 is None else rows(x2)
    groups: dict[str, list[tuple[int, int]]] = {}
    for name, _, c0, c1 in parameter_layout(model, param_names):
        groups.setdefault(_layer(name) if per_layer else "", []).append((c0, c1))

    def cols(j, spans):
        return torch.cat([j[:, :, c0:c1] for c0, c1 in spans], 2)

    out = {}
    for g, spans in groups.items():
        a = cols(ja, spans)
        b = None if jb is None else cols(jb, spans)
        if kind == "pntk":  # the projected Jacobian already is Σ_c f_c / √C's
            b = a if b is None else b
            out[g] = a[:, 0] @ b[:, 0].T
        else:
            out[g] = _contract(a, b, kind)
    return out


def _front(front, model, x1, x2, kind, param_names, per_layer) -> dict[str, torch.Tensor]:
    if front == "entk":
        h = entk(model, x1, x2, kernel=kind, param_names=param_names, per_layer=per_layer)
    elif front == "entk_fn":
        h = entk_fn(lambda p, x: functional_call(model, p, (x,)), dict(model.named_parameters()), x1, x2,
                    kernel=kind, param_names=param_names, per_layer=per_layer)
    else:
        h = _from_jacobian(model, x1, x2, kind, param_names, per_layer)
        return h
    return h if per_layer else {"": h}


def _check(front, model_name, kind, cross, param_names, per_layer):
    model = _fresh(model_name)
    x1 = _x(7)
    x2 = _x(4) if cross else None
    all_names = [n for n, _ in model.named_parameters()]
    names = all_names if param_names is None else \
        [n for n in all_names if n in ([param_names] if isinstance(param_names, str) else param_names)]
    ref32 = _reference(model, x1, x2, kind, names, per_layer)
    model64 = _fresh_copy64(model)
    ref64 = _reference(model64, x1.double(), None if x2 is None else x2.double(), kind, names, per_layer)
    got = _front(front, model, x1, x2, kind, param_names, per_layer)
    assert sorted(got) == sorted(ref32), f"{front} per-layer keys {sorted(got)}, expected {sorted(ref32)}"
    for key in ref32:
        assert got[key].shape == ref32[key].shape, f"{front} [{key}]: shape {tuple(got[key].shape)}"
        assert_close_to_torch(got[key], ref32[key], ref64[key], what=f"{front} {model_name} {kind} [{key}]")


def _fresh_copy64(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double()


FRONTS = ["entk", "entk_fn", "jacobian"]


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_kind_agrees(front, model_name, kind):
    _check(front, model_name, kind, False, None, False)


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("kind", ["full", "traced", "pntk"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_cross_kernels_agree(front, model_name, kind):
    _check(front, model_name, kind, True, None, False)


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_per_layer_keys_and_kernels_agree(front, model_name):
    _check(front, model_name, "full", False, None, True)
    model = _fresh(model_name)
    got = _front(front, model, _x(3), None, "traced", None, True)
    assert sorted(got) == KEYS[model_name]


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_param_names_as_a_string_or_a_list(front, model_name):
    _check(front, model_name, "full", True, ONE_NAME[model_name], False)
    _check(front, model_name, "traced", False, SOME_NAMES[model_name], True)


def test_parameter_layout_takes_a_string():
    model = _fresh("block")
    assert [n for n, *_ in parameter_layout(model, "pos")] == ["pos"]


@pytest.fixture(scope="module")
def ds():
    return load_synthetic(30, 20, image_size=8, num_classes=C)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_kernel_job_agrees(tmp_path, ds, model_name, kind):
    model = _fresh(model_name)
    res = kernel_job(tmp_path / "k.h5", model=model, dataset=ds, x1="test:7", kernel=kind, tile_inputs=3,
                     log=None, quiet=True, deterministic=False)
    K = open_kernel(res.path)
    x = normalize(ds.x_test[torch.as_tensor(K.x1_index)], ds.mean, ds.std)
    names = [n for n, _ in model.named_parameters()]
    ref32 = _reference(model, x, None, kind, names, False)[""]
    ref64 = _reference(_fresh_copy64(model), x.double(), None, kind, names, False)[""]
    assert K.shape == tuple(ref32.shape) and K.is_complete
    assert_close_to_torch(torch.from_numpy(K[:]), ref32, ref64, what=f"kernel job {model_name} {kind}")


def test_small_budget_splits_only_the_calls_that_split():
    """A budget small enough that wide layers are formed a channel range at a time: a Linear on
    (N, L, d) tokens has L, not its features, on the output's dim 1, so its columns stay whole
    (this crashed with a shape error when it was split like a Linear on (N, I) rows)."""
    gen, _ = seeded()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Flatten(), nn.Linear(64 * 9, C)).eval()
    x = torch.randn(7, 9, 40, generator=gen)
    names = [n for n, _ in model.named_parameters()]
    ref32 = _reference(model, x, None, "full", names, False)[""]
    ref64 = _reference(_fresh_copy64(model), x.double(), None, "full", names, False)[""]
    for budget in (200_000, 120_000):
        assert_close_to_torch(entk(model, x, budget_bytes=budget), ref32, ref64, what=f"budget {budget}")
