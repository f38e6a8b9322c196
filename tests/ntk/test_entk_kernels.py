"""The one-pass eNTK engine (engine/ntk/onepass.py via engine.ntk.entk) against a float64 torch.func reference.

Every kernel shape, cross-kernels, parameter subsets, per-layer kernels, integer and
tuple inputs, bfloat16, on fresh random models with odd shapes. Seeds come from
``seeded()`` and are printed in every failure message.

Tolerances come from the precision. The float64 truth is J64 J64ᵀ with J64 from
torch.func in float64. Plain torch's own float32 answer is J32 J32ᵀ with J32 from
torch.func in float32 (the tutorial recipe's arithmetic). The engine computes the same
sums of products in another order (per layer, inner dimension split, closed-form
Linear products, backward run batched), so its rounding error obeys the same bound
as torch's, with a constant of order 1 from the different grouping; FACTOR = 8 allows
for that constant (observed ratios ≤ 3) and nothing more. In bfloat16 the comparison
is torch's product of the bfloat16-rounded J32 accumulated in float32.
"""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from engine.errors import ConfigError
from engine.ntk import entk
from engine.ntk.budget import headroom
from engine.ntk.contract import bf16_matrix_unit
from tests._tolerance import assert_close_to_torch, rel_err
from tests.ntk._jacobian_check import OddConvNet, OddSeqNet, SharingNet, off_kink_input, randomize_bn
from tests.seeding import seeded

FACTOR = 8.0


# --------------------------------------------------------------------------- reference


def ref_jacobian(model: nn.Module, xs: tuple[Tensor, ...], names=None) -> Tensor:
    """(N, C, P) per-sample Jacobian by torch.func in the model's dtype, P in named_parameters order."""
    params = {k: v.detach() for k, v in model.named_parameters() if names is None or k in names}

    def single(p, xs1):
        return functional_call(model, p, tuple(t.unsqueeze(0) for t in xs1))[0]

    n = xs[0].shape[0]
    c = single(params, tuple(t[0] for t in xs)).shape[0]
    # One vmap level per output (vmap of jacrev trips over PReLU's batching rule in torch 2.14).
    rows = [vmap(grad(lambda p, x1, j=j: single(p, x1)[j]), in_dims=(None, 0))(params, xs) for j in range(c)]
    return torch.stack([torch.cat([r[k].reshape(n, -1) for k in params], dim=1) for r in rows], dim=1).detach()


def kernels_of(j1: Tensor, j2: Tensor) -> dict[str, Tensor]:
    """Every kernel shape from per-sample Jacobians (N1, C, P), (N2, C, P)."""
    n1, c, p = j1.shape
    n2 = j2.shape[0]
    full = j1.reshape(n1 * c, p) @ j2.reshape(n2 * c, p).T
    f4 = full.view(n1, c, n2, c)
    return {
        "full": full,
        "traced": f4.diagonal(dim1=1, dim2=3).sum(-1),
        "pntk": f4.sum((1, 3)) / c,
        "diagonal": torch.einsum("ncp,ndp->ncd", j1, j1) if n1 == n2 else None,
    }


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def to64(x):
    return tuple(t.double() if t.is_floating_point() else t for t in as_tuple(x))


def check(model: nn.Module, x1, x2=None, *, seed: int, what: str, kinds=("full", "traced", "diagonal", "pntk"),
          names=None, **kw) -> None:
    """Engine float32 kernels vs float64 truth, within FACTOR x plain torch's float32 error."""
    m64 = copy.deepcopy(model).double()
    j64_1 = ref_jacobian(m64, to64(x1), names)
    j32_1 = ref_jacobian(model, as_tuple(x1), names)
    j64_2 = j64_1 if x2 is None else ref_jacobian(m64, to64(x2), names)
    j32_2 = j32_1 if x2 is None else ref_jacobian(model, as_tuple(x2), names)
    ref, plain = kernels_of(j64_1, j64_2), kernels_of(j32_1, j32_2)
    for kind in kinds:
        if kind == "diagonal" and x2 is not None:
            continue
        h = entk(model, x1, x2, kernel=kind, param_names=names, **kw)
        assert h.dtype == torch.float32 and torch.isfinite(h).all(), f"{what} {kind} seed {seed}"
        assert h.shape == ref[kind].shape, f"{what} {kind}: shape {tuple(h.shape)} vs {tuple(ref[kind].shape)}"
        if x2 is None and kind != "diagonal":
            assert torch.equal(h, h.T), f"{what} {kind}: not exactly symmetric (seed {seed})"
        assert_close_to_torch(h, plain[kind], ref[kind], factor=FACTOR, what=f"{what} {kind} (seed {seed})")


# --------------------------------------------------------------------------- odd models


class EmbedNet(nn.Module):
    """Token ids -> Embedding (with padding_idx) -> MultiheadAttention (fallback) -> LayerNorm -> Linear."""

    def __init__(self, c: int, vocab: int = 13, d: int = 6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, c)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.ln(h + a).mean(1))


class TiedNet(nn.Module):
    """Tied weights (decoder = embedding transposed), a module used twice, two inputs (tuple)."""

    def __init__(self, c: int):
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.proj = nn.Linear(3, 5, bias=False)
        self.mix = nn.Linear(5, 5)
        self.gn = nn.GroupNorm(1, 5)
        self.out = nn.Linear(11, c)

    def forward(self, ids: Tensor, feats: Tensor) -> Tensor:
        h = self.emb(ids).mean(1) + self.proj(feats)
        h = torch.tanh(self.mix(torch.tanh(self.mix(h))))  # reused
        h = self.gn(h.unsqueeze(-1)).squeeze(-1)
        logits = F.linear(h, self.emb.weight)  # tied: the embedding as decoder
        return self.out(torch.tanh(logits))


def _conv_model(c):
    m = OddConvNet(c)
    randomize_bn(m)
    return m.eval()


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(("n", "c"), [(3, 4), (5, 1)])
def test_odd_conv_every_kernel(n, c):
    g, seed = seeded()
    torch.manual_seed(seed)
    model = _conv_model(c)
    x = off_kink_input(model, lambda: torch.randn(n, 3, 7, 9, generator=g))
    check(model, x, seed=seed, what=f"OddConvNet n={n} c={c}")


@pytest.mark.parametrize(("n", "c"), [(4, 3)])
def test_odd_sequence_and_sharing_every_kernel(n, c):
    g, seed = seeded()
    torch.manual_seed(seed)
    seq = randomize_bn(OddSeqNet(c)).eval()
    check(seq, off_kink_input(seq, lambda: torch.randn(n, 5, 11, generator=g)), seed=seed, what="OddSeqNet")
    share = SharingNet(c).eval()
    check(share, torch.randn(n, 7, generator=g), seed=seed, what="SharingNet")


def test_integer_and_tuple_inputs_embedding_attention_tied():
    g, seed = seeded()
    torch.manual_seed(seed)
    emb = EmbedNet(3).eval()
    ids = torch.randint(0, 13, (5, 4), generator=g)
    ids[0, 1] = 0  # a padding token: no gradient into row 0
    check(emb, ids, seed=seed, what="EmbedNet")
    tied = TiedNet(4).eval()
    xs = (torch.randint(0, 11, (4, 3), generator=g), torch.randn(4, 3, generator=g))
    check(tied, xs, seed=seed, what="TiedNet", kinds=("full", "pntk"))
    # Integer inputs are passed through untouched (no cast to float).
    seen = []
    emb.emb.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    entk(emb, ids, kernel="traced")
    assert set(seen) == {torch.int64}


@pytest.mark.parametrize("kind", ["full", "traced", "pntk"])
def test_cross_kernel_is_block_of_concatenated_kernel(kind):
    g, seed = seeded()
    torch.manual_seed(seed)
    model = randomize_bn(OddSeqNet(3)).eval()
    x = off_kink_input(model, lambda: torch.randn(7, 5, 11, generator=g))
    x1, x2 = x[:4], x[4:]
    check(model, x1, x2, seed=seed, what="cross", kinds=(kind,))
    whole = entk(model, x, kernel=kind)
    cross = entk(model, x1, x2, kernel=kind)
    r = 1 if kind != "full" else 3
    block = whole[: 4 * r, 4 * r:]
    # Both are float32 results of the same sums; compare each against the float64 truth's scale.
    ref = kernels_of(ref_jacobian(copy.deepcopy(model).double(), (x1.double(),)),
                     ref_jacobian(copy.deepcopy(model).double(), (x2.double(),)))[kind]
    plain = kernels_of(ref_jacobian(model, (x1,)), ref_jacobian(model, (x2,)))[kind]
    assert_close_to_torch(block, plain, ref, factor=FACTOR, what=f"block of the whole kernel (seed {seed})")
    assert rel_err(cross, block) <= 2 * FACTOR * max(rel_err(plain, ref), torch.finfo(torch.float32).eps)


def test_parameter_subset_and_per_layer_sum():
    g, seed = seeded()
    torch.manual_seed(seed)
    model = _conv_model(3)
    x = off_kink_input(model, lambda: torch.randn(4, 3, 7, 9, generator=g))
    names = ["conv_b.weight", "bn_a.weight", "scale.gain", "fc.bias"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using padding='same'")
        check(model, x, seed=seed, what="subset", names=names, kinds=("full", "diagonal"))
        full = entk(model, x)
        layers = entk(model, x, per_layer=True)
        sub_layers = entk(model, x, per_layer=True, param_names=names)
    assert set(layers) == {n.rpartition(".")[0] for n, _ in model.named_parameters()}
    assert set(sub_layers) == {"conv_b", "bn_a", "scale", "fc"}
    m64 = copy.deepcopy(model).double()
    ref = kernels_of(*(2 * [ref_jacobian(m64, (x.double(),))]))["full"]
    plain = kernels_of(*(2 * [ref_jacobian(model, (x,))]))["full"]
    total = sum(layers.values())
    assert_close_to_torch(total, plain, ref, factor=FACTOR, what=f"sum of per-layer kernels (seed {seed})")
    assert_close_to_torch(full, plain, ref, factor=FACTOR, what=f"full (seed {seed})")
    # Each layer's kernel is that layer's parameters' kernel.
    for layer in ("conv_b", "bn_a"):
        pn = [n for n, _ in model.named_parameters() if n.rpartition(".")[0] == layer]
        r64 = kernels_of(*(2 * [ref_jacobian(m64, (x.double(),), pn)]))["full"]
        p32 = kernels_of(*(2 * [ref_jacobian(model, (x,), pn)]))["full"]
        assert_close_to_torch(layers[layer], p32, r64, factor=FACTOR, what=f"layer {layer} (seed {seed})")


def test_small_budget_blocks_and_chunks_and_strips_agree(monkeypatch):
    """Several row blocks (recomputed inner blocks), column chunks of a wide layer, and the
    upper-triangle strips of a large diagonal tile give the kernel within tolerance."""
    import engine.ntk.contract as ct
    import engine.ntk.onepass as op

    g, seed = seeded()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv1d(8, 64, 5, padding=2), nn.Tanh(), nn.Flatten(), nn.Linear(64 * 6, 30),
                          nn.Tanh(), nn.Linear(30, 10)).eval()
    x = torch.randn(110, 8, 6, generator=g)  # 1,100 rows: the diagonal tile splits into strips
    m64 = copy.deepcopy(model).double()
    ref = kernels_of(*(2 * [ref_jacobian(m64, (x.double(),))]))
    plain = kernels_of(*(2 * [ref_jacobian(model, (x,))]))
    seen = {"chunks": 0, "strips": 0}
    fill, mm = op._fill_structured, ct._mm_into

    def counting_fill(piece, *a):
        seen["chunks"] += piece.chunk is not None
        return fill(piece, *a)

    def counting_mm(out, a, b, mode):
        seen["strips"] += a.shape[0] != b.shape[0]
        return mm(out, a, b, mode)

    monkeypatch.setattr(op, "_fill_structured", counting_fill)
    monkeypatch.setattr(ct, "_mm_into", counting_mm)
    d = headroom()
    small = 4_000_000 * d // (d - 1) + 1  # 4 MB usable beside the headroom: blocks, chunks and strips
    for budget in (1 << 30, small):
        for kind in ("full", "traced"):
            h = entk(model, x, kernel=kind, budget_bytes=budget)
            assert torch.equal(h, h.T)
            assert_close_to_torch(h, plain[kind], ref[kind], factor=FACTOR,
                                  what=f"budget {budget} {kind} (seed {seed})")
    hx = entk(model, x[:50], x[50:], budget_bytes=small)
    assert_close_to_torch(hx, plain["full"][:500, 500:], ref["full"][:500, 500:], factor=FACTOR,
                          what=f"small-budget cross (seed {seed})")
    assert seen["chunks"] > 0 and seen["strips"] > 0, seen


def test_bfloat16_against_rounded_torch():
    g, seed = seeded()
    torch.manual_seed(seed)
    model = _conv_model(5)
    x = off_kink_input(model, lambda: torch.randn(6, 3, 7, 9, generator=g))
    m64 = copy.deepcopy(model).double()
    j64 = ref_jacobian(m64, (x.double(),))
    jb = ref_jacobian(model, (x,)).bfloat16().float()  # plain torch at bfloat16 inputs, float32 accumulation
    ref, plain = kernels_of(j64, j64), kernels_of(jb, jb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in ("full", "traced", "diagonal"):
            h = entk(model, x, kernel=kind, compute_dtype=torch.bfloat16)
            assert h.dtype == torch.float32
            e, e_t = rel_err(h, ref[kind]), rel_err(plain[kind], ref[kind])
            # Both round J to bfloat16 (the engine per layer chunk; with a bfloat16 unit it forms the
            # chunk from bfloat16-rounded operands, a second rounding of the same order).
            assert e <= FACTOR * max(e_t, torch.finfo(torch.bfloat16).eps), \
                f"bf16 {kind}: error {e:.3g} vs torch's {e_t:.3g} (seed {seed})"


def test_bfloat16_warns_without_matrix_unit():
    model = nn.Linear(3, 2)
    if bf16_matrix_unit():
        pytest.skip("this CPU has a bfloat16 matrix unit: no warning expected")
    import engine.ntk.kernel as kmod

    kmod._warned_bf16 = False
    with pytest.warns(RuntimeWarning, match="no bfloat16 matrix unit"):
        entk(model.eval(), torch.randn(2, 3), compute_dtype=torch.bfloat16)


# --------------------------------------------------------------------------- errors and API


def test_float_inputs_of_another_dtype_refused_in_one_line():
    model = nn.Sequential(nn.Linear(3, 2)).eval()
    with pytest.raises(ConfigError, match=r"x1 has dtype torch.float64 but the model's parameters are "
                                          r"torch.float32; pass x1.to\(torch.float32\)") as e:
        entk(model, torch.randn(2, 3, dtype=torch.float64))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"x2\[1\] has dtype torch.float16"):
        entk(nn.Bilinear(3, 3, 2).eval(), (torch.randn(2, 3), torch.randn(2, 3)),
             (torch.randn(2, 3), torch.randn(2, 3).half()))


def test_budget_below_one_sample_refused_up_front():
    model = nn.Sequential(nn.Linear(50, 400), nn.Tanh(), nn.Linear(400, 10)).eval()
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="budget_bytes=1 is below what one sample needs"):
        entk(model, torch.randn(64, 50), budget_bytes=1)
    assert time.perf_counter() - t0 < 5


def test_api_errors_and_deprecated_backend():
    model = nn.Sequential(nn.Linear(3, 2)).eval()
    x = torch.randn(3, 3)
    with pytest.raises(ConfigError, match="kernel must be one of full, traced, diagonal, pntk"):
        entk(model, x, kernel="trace")
    with pytest.raises(ConfigError, match="diagonal"):
        entk(model, x, x, kernel="diagonal")
    with pytest.raises(ConfigError, match="implementation must be one of"):
        entk(model, x, implementation="fast")
    with pytest.raises(ConfigError, match="compute_dtype"):
        entk(model, x, compute_dtype=torch.float16)
    with pytest.raises(ConfigError, match="same batch size"):
        entk(nn.Bilinear(3, 3, 2).eval(), (x, x[:2]))
    with pytest.warns(DeprecationWarning, match="implementation"):
        old = entk(model, x, backend="reference")
    torch.testing.assert_close(old, entk(model, x, implementation="reference"))
    # implementation="reference" (torch.func for every column) matches the structured default.
    torch.testing.assert_close(entk(model, x), old)
