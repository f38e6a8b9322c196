"""entk kernel: tiles equal the in-memory eNTK, budgets, strategies, resume after SIGKILL, the run-file path."""

from __future__ import annotations

import copy
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.data import load_synthetic, normalize
from engine.errors import ConfigError
from engine.jobs import kernel_job
from engine.jobs.kernel_job import PROCESS_ALLOWANCE, KernelKind, balanced_indices, choose_tile_inputs, tile_bytes
from engine.ntk import entk, open_kernel
from engine.store import KernelTiles, StoreError
from tests._tolerance import assert_close_to_torch
from tests.helpers.kernel_job_driver import tiny_cnn

DRIVER = Path(__file__).parent / "helpers" / "kernel_job_driver.py"


@pytest.fixture(autouse=True)
def one_thread():
    # The driver processes run one thread; in-process references match them bit for bit.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ds():
    return load_synthetic(120, 80)


def _inputs(ds, K, side=1):
    idx = torch.as_tensor(K.x1_index if side == 1 else K.x2_index)
    split = K.attrs["x1_split" if side == 1 else "x2_split"]
    u8 = (ds.x_train if split == "train" else ds.x_test)[idx]
    return normalize(u8, ds.mean, ds.std)


def _reference(model, x, kind, x2=None):
    """The kernel by engine.ntk.entk on the concatenated inputs (cross: its off-diagonal block)."""
    n1 = len(x)
    xs = x if x2 is None else torch.cat([x, x2])
    c = 10
    if kind == "pntk":
        h = entk(model, xs, projection=torch.full((c,), c**-0.5, dtype=xs.dtype))
    else:
        h = entk(model, xs, kernel="traced" if kind == "traced" else "full",
                 dtype=torch.float64 if xs.dtype == torch.float64 else torch.float32)
    if kind == "diagonal":
        return h.view(n1, c, n1, c).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    r = n1 * (1 if kind in ("traced", "pntk") else c)
    return h if x2 is None else h[:r, r:]


@pytest.mark.parametrize("kind", ["full", "traced", "pntk", "diagonal"])
def test_tiles_equal_the_in_memory_kernel(tmp_path, ds, kind):
    model = tiny_cnn().eval()
    res = kernel_job(tmp_path / "k.h5", model=model, dataset=ds, x1="test:11", kernel=kind, tile_inputs=4,
                     log=None, quiet=True)
    K = open_kernel(res.path)
    x = _inputs(ds, K)
    ref32 = _reference(model, x, kind)
    ref64 = _reference(model.double(), x.double(), kind)
    assert K.shape == tuple(ref32.shape) and K.is_complete
    assert_close_to_torch(torch.from_numpy(K[:]), ref32, ref64, what=kind)
    if kind != "diagonal":
        assert res.n_tiles == 3 * 4 // 2  # 3x3 grid of 4-input tiles, upper triangle
        assert np.array_equal(K[:], K[:].T)  # mirrored exactly, diagonal tiles symmetric too


def _torch_func_kernel(model64, x1, kind, x2=None):
    """The kernel from torch.func Jacobians of the float64 model (independent of engine.ntk)."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model64.named_parameters()}

    def jac(x):  # (N, C, P)
        J = vmap(jacrev(lambda p, xi: functional_call(model64, p, (xi[None],))[0]), (None, 0))(params, x)
        return torch.cat([J[k].reshape(x.shape[0], J[k].shape[1], -1) for k in params], dim=2)

    ja = jac(x1)
    jb = ja if x2 is None else jac(x2)
    n, c, _ = ja.shape
    if kind == "full":
        return ja.reshape(n * c, -1) @ jb.reshape(len(jb) * c, -1).T
    if kind == "traced":
        return torch.einsum("ncp,mcp->nm", ja, jb)
    if kind == "pntk":
        return (ja.sum(1) / c**0.5) @ (jb.sum(1) / c**0.5).T
    return torch.einsum("ncp,ndp->ncd", ja, ja)


@pytest.mark.parametrize("kind,strategy", [(k, s) for k in ("full", "traced", "pntk") for s in
                                           ("recompute", "stored-jacobian")] + [("diagonal", "recompute")])
def test_float64_tiles_are_float64_throughout(tmp_path, ds, kind, strategy):
    # float64 tiles come from a float64 copy of the model (through the same one-pass engine, or float64 J
    # blocks): their error against float64 torch.func is float64's, not that of float32 Jacobians (~1e-7).
    model = tiny_cnn().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x2 = None if kind == "diagonal" else "train:5"
    res = kernel_job(tmp_path / "k.h5", model=model, dataset=ds, x1="test:7", x2=x2, kernel=kind, tile_inputs=3,
                     compute_dtype="float64", strategy=strategy, log=None, quiet=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the caller's model untouched
    K = open_kernel(res.path)
    assert K[:].dtype == np.float64 and res.strategy == strategy
    x1 = _inputs(ds, K).double()
    xb = None if x2 is None else _inputs(ds, K, 2).double()
    model64 = copy.deepcopy(model).double()
    ref64 = _torch_func_kernel(model64, x1, kind, xb)
    same = _reference(model64, x1, kind, xb)  # plain float64 eNTK of the joint inputs: float64's own error
    got = torch.from_numpy(K[:]).reshape(ref64.shape)
    assert_close_to_torch(got, same.reshape(ref64.shape), ref64, what=f"{kind} {strategy}")


def test_cross_kernel_is_the_block_of_the_joint_kernel(tmp_path, ds):
    model = tiny_cnn().eval()
    res = kernel_job(tmp_path / "c.h5", model=model, dataset=ds, x1="test:7", x2="train:9", kernel="full",
                     tile_inputs=4, log=None, quiet=True)
    K = open_kernel(res.path)
    assert K.shape == (70, 90) and not K.symmetric and res.n_tiles == 2 * 3
    x1, x2 = _inputs(ds, K, 1), _inputs(ds, K, 2)
    ref32 = _reference(model, x1, "full", x2)
    ref64 = _reference(model.double(), x1.double(), "full", x2.double())
    assert_close_to_torch(torch.from_numpy(K[:]), ref32, ref64, what="cross")
    assert np.array_equal(K.x1_labels, ds.y_test[K.x1_index].numpy())
    assert np.bincount(K.x2_labels, minlength=10).max() == 1  # class-balanced: 9 inputs, 9 classes


def test_stored_and_recomputed_jacobian_blocks_agree(tmp_path, ds):
    model = tiny_cnn().eval()
    lines = []
    a = kernel_job(tmp_path / "a.h5", model=model, dataset=ds, x1="train:13", kernel="traced", tile_inputs=3,
                   strategy="stored-jacobian", log=lines.append, quiet=True)
    b = kernel_job(tmp_path / "b.h5", model=model, dataset=ds, x1="train:13", kernel="traced", tile_inputs=3,
                   strategy="recompute", log=lines.append, quiet=True)
    assert a.strategy == "stored-jacobian" and b.strategy == "recompute"
    # Stored J blocks are contracted directly; recomputed tiles come from the one-pass engine, which
    # sums per-layer products in another order: equal to float32's error, not bit for bit.
    x = _inputs(ds, a.kernel)
    ref32 = _reference(model, x, "traced")
    ref64 = _reference(copy.deepcopy(model).double(), x.double(), "traced")
    for res in (a, b):
        assert_close_to_torch(torch.from_numpy(res.kernel[:]), ref32, ref64, what=res.strategy)
    assert "5 block Jacobians instead of 25" in a.reason
    # each phase timed: stored J blocks take Jacobian time, recomputed ones none; the phases are the job
    for res in (a, b):
        ph = res.phase_seconds
        assert set(ph) == {"setup", "jacobian", "tiles"} and min(ph.values()) >= 0
        assert sum(ph.values()) <= res.seconds
    assert a.phase_seconds["jacobian"] > 0 and b.phase_seconds["jacobian"] < a.phase_seconds["jacobian"]
    assert sum(line.startswith("J blocks: ") for line in lines) == 2
    assert not list(tmp_path.glob("a.h5.jacobian*"))  # removed once every tile was on disk
    # auto: stores J when it fits the disk budget, recomputes (and says why) when it does not
    c = kernel_job(tmp_path / "c.h5", model=model, dataset=ds, x1="train:13", kernel="traced", tile_inputs=3,
                   disk_budget_bytes=1000, log=None, quiet=True)
    assert c.strategy == "recompute" and "> disk budget" in c.reason
    d = kernel_job(tmp_path / "d.h5", model=model, dataset=ds, x1="train:13", kernel="traced", tile_inputs=3,
                   disk_budget_bytes=1 << 30, log=None, quiet=True)
    assert d.strategy == "stored-jacobian" and "<= disk budget" in d.reason


def test_memory_sets_the_tile_and_too_small_is_refused_before_work(tmp_path, ds):
    kw = {"c": 10, "p": 24_346, "kind": KernelKind.FULL, "compute_dtype": torch.float32}
    t_small, t_big = choose_tile_inputs(1 << 30, n_max=10**6, **kw), choose_tile_inputs(4 << 30, n_max=10**6, **kw)
    assert 1 <= t_small < t_big
    assert tile_bytes(t_big, **kw) <= 4 << 30 < tile_bytes(t_big + 1, **kw)
    from engine.models import build_model

    model = build_model("cnn").eval()  # 24,346 parameters: ~4 MB of estimate per input
    est = {"c": 10, "p": 24_346, "kind": KernelKind.TRACED, "compute_dtype": torch.float32}
    first = kernel_job(tmp_path / "a.h5", model=model, dataset=ds, x1="test:30", kernel="traced", log=None,
                       quiet=True)
    assert first.kernel.attrs["tile_inputs"] == 30  # 2 GiB: one tile
    # The memory holds the tiles beside a fixed allowance for the process, model and data (deterministic).
    assert first.memory_in_use > PROCESS_ALLOWANCE
    memory = first.memory_in_use + tile_bytes(10, **est)
    res = kernel_job(tmp_path / "k.h5", model=model, dataset=ds, x1="test:30", kernel="traced",
                     memory_bytes=memory, log=None, quiet=True)
    assert res.memory_in_use == first.memory_in_use and res.kernel.attrs["tile_inputs"] == 10
    out = tmp_path / "tiny.h5"
    with pytest.raises(ConfigError, match=r"--memory-gb .*\(memory_bytes=10,000\) is too small") as e:
        kernel_job(out, model=tiny_cnn(), dataset=ds, x1="test:30", memory_bytes=10_000, log=None, quiet=True)
    assert len(str(e.value).splitlines()) == 1 and not out.exists()
    with pytest.raises(ConfigError, match="more than the 80 test images"):
        kernel_job(out, model=tiny_cnn(), dataset=ds, x1="test:81", log=None, quiet=True)
    with pytest.raises(ConfigError, match="SPLIT:N"):
        kernel_job(out, model=tiny_cnn(), dataset=ds, x1="val:3", log=None, quiet=True)


@pytest.mark.parametrize("kind", ["traced", "diagonal"])
def test_recomputed_tile_fits_the_memory_its_estimate_claims(tmp_path, ds, monkeypatch, kind):
    """A recomputed tile holds no J block: its entk call holds the block data of the tile's inputs. The
    plan sizes the tile by that (tile_bytes with sample_bytes), gives entk exactly the working memory
    the estimate set aside (recompute_working), and entk, planning by its own accounting, then keeps
    every input of the tile in one block (nothing recomputed within a tile)."""
    from engine.jobs.kernel_job.plan import recompute_working
    from engine.models import build_model
    from engine.ntk import onepass
    from engine.ntk.kernel import entk_sample_bytes

    model = build_model("cnn").eval()  # its block data per input (~3 MB) outweighs its J rows (~1 MB)
    x = normalize(ds.x_test[:1], ds.mean, ds.std)
    k = KernelKind(kind)
    sb = entk_sample_bytes(model, x, kernel=k)
    est = {"c": 10, "p": 24_346, "kind": k, "compute_dtype": torch.float32}
    first = kernel_job(tmp_path / "a.h5", model=model, dataset=ds, x1="test:30", kernel=kind, strategy="recompute",
                       log=None, quiet=True)
    memory = first.memory_in_use + tile_bytes(10, **est, sample_bytes=sb)
    if k is KernelKind.TRACED:  # the stored path's estimate (two J blocks) would have set aside too little
        assert tile_bytes(10, **est) < tile_bytes(10, **est, sample_bytes=sb)

    calls, blocks = [], []
    tiles_mod = sys.modules["engine.jobs.kernel_job.tiles"]
    real_entk, real_blocks = tiles_mod.entk, onepass._entk_blocks

    def spy_entk(model, xa, xb=None, **kw):
        calls.append((len(xa), 0 if xb is None else len(xb), kw["budget_bytes"]))
        return real_entk(model, xa, xb, **kw)

    def spy_blocks(s, x1, n1, n2, budget_bytes, itemsize):
        blocks.append((n1, n2, *real_blocks(s, x1, n1, n2, budget_bytes, itemsize)))
        return blocks[-1][2:]

    monkeypatch.setattr(tiles_mod, "entk", spy_entk)
    monkeypatch.setattr(onepass, "_entk_blocks", spy_blocks)
    res = kernel_job(tmp_path / "k.h5", model=model, dataset=ds, x1="test:30", kernel=kind, strategy="recompute",
                     memory_bytes=memory, log=None, quiet=True)
    t = res.kernel.attrs["tile_inputs"]
    assert res.strategy == "recompute" and t == 10 and res.memory_in_use == first.memory_in_use
    assert res.memory_in_use + tile_bytes(t, **est, sample_bytes=sb) <= memory
    assert calls and all(b == recompute_working(t, kind=k, sample_bytes=sb) for _, _, b in calls)
    assert len(blocks) == len(calls) and all(b1 >= n1 and (n2 == 0 or b2 >= n2) for n1, n2, b1, b2 in blocks)
    # A file started with larger recomputed tiles than this memory now plans is still resumed, not refused
    # (its tiles' entk calls get what is left beside the tile, and split a tile into inner blocks).
    kernel_job(tmp_path / "b.h5", model=model, dataset=ds, x1="test:30", kernel=kind, strategy="recompute",
               tile_inputs=30, log=None, quiet=True)
    again = kernel_job(tmp_path / "b.h5", model=model, dataset=ds, x1="test:30", kernel=kind, strategy="recompute",
                       memory_bytes=memory, log=None, quiet=True)
    assert again.kernel.attrs["tile_inputs"] == 30 and again.computed == 0 and "resuming" in again.reason


def test_deprecated_budget_bytes_is_memory_bytes(tmp_path, ds):
    """kernel_job(budget_bytes=) is the old name of memory_bytes (whole-process memory): it warns, naming the
    new name, and plans and computes the same file; giving both is refused."""
    kj = importlib.import_module("engine.jobs.kernel_job")  # the package (engine.jobs.kernel_job is the function)

    model = tiny_cnn()
    first = kernel_job(tmp_path / "first.h5", model=model, dataset=ds, x1="test:30", kernel="traced", log=None,
                       quiet=True)
    est = {"c": 10, "p": first.kernel.attrs["n_params"], "kind": KernelKind.TRACED, "compute_dtype": torch.float32}
    memory = first.memory_in_use + tile_bytes(10, **est)  # tiles of 10 of the 30 inputs
    new = kernel_job(tmp_path / "new.h5", model=model, dataset=ds, x1="test:30", kernel="traced",
                     memory_bytes=memory, log=None, quiet=True)
    with pytest.warns(DeprecationWarning, match=r"budget_bytes=.*deprecated; use memory_bytes="):
        old = kernel_job(tmp_path / "old.h5", model=model, dataset=ds, x1="test:30", kernel="traced",
                         budget_bytes=memory, log=None, quiet=True)
    assert new.kernel.attrs["tile_inputs"] == 10
    assert old.kernel.attrs["tile_inputs"] == new.kernel.attrs["tile_inputs"] and old.strategy == new.strategy
    np.testing.assert_array_equal(old.kernel[:], new.kernel[:])
    with pytest.raises(ConfigError, match="deprecated name of memory_bytes"):
        kernel_job(tmp_path / "both.h5", model=model, dataset=ds, x1="test:30", memory_bytes=memory,
                   budget_bytes=memory, log=None, quiet=True)
    with pytest.warns(DeprecationWarning, match="DEFAULT_PROCESS_MEMORY"):
        assert kj.DEFAULT_PROCESS_BUDGET == kj.DEFAULT_PROCESS_MEMORY == 2 << 30


def test_rerun_resumes_the_same_job_and_refuses_another(tmp_path, ds):
    out = tmp_path / "k.h5"
    kw = {"model": tiny_cnn(), "dataset": ds, "x1": "test:9", "kernel": "pntk", "quiet": True}
    first = kernel_job(out, tile_inputs=4, log=None, **kw)
    lines = []
    again = kernel_job(out, log=lines.append, **kw)  # another budget: the file's tile size is kept
    assert again.computed == 0 and "resuming" in again.reason and again.kernel.attrs["tile_inputs"] == 4
    assert np.array_equal(first.kernel[:], again.kernel[:])
    with pytest.raises(StoreError, match="differs in seed") as e:
        kernel_job(out, seed=1, log=None, **kw)
    assert len(str(e.value).splitlines()) == 1
    other = tiny_cnn()
    with torch.no_grad():
        other.fc.bias.add_(1)
    with pytest.raises(StoreError, match="state_hash"):
        kernel_job(out, log=None, **{**kw, "model": other})


@pytest.mark.slow  # a fresh process imports the engine (~10-40 s on 2 shared cores)
def test_sigkill_mid_job_then_rerun_is_bit_identical(tmp_path, ds):
    args = ["full", "test:16", "-", "2", "stored-jacobian"]
    ref = tmp_path / "ref.h5"
    kernel_job(ref, model=tiny_cnn(), dataset=ds, model_name="tiny_cnn", x1="test:16", kernel="full", tile_inputs=2,
               strategy="stored-jacobian", log=None, quiet=True)
    out = tmp_path / "killed.h5"
    # Each tile is followed by a pause, so the poll below sees the job mid-way on a machine of any
    # speed (on a fast CI machine the whole job once finished between two successful reads).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ENTK_DRIVER_TILE_PAUSE": "0.3"}
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(out), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, killed_at = time.time() + 180, None
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
        try:
            done = int(KernelTiles(out).complete[:-1].sum())
        except StoreError:
            continue  # not created yet
        if done >= 6:
            proc.send_signal(signal.SIGKILL)
            killed_at = done
            break
    proc.wait()
    assert killed_at is not None and killed_at < 36, f"not killed mid-job: {proc.stderr.read()[-2000:]}"
    # The same job again (here in-process: same code, same single thread) resumes and finishes it.
    again = kernel_job(out, model=tiny_cnn(), dataset=ds, model_name="tiny_cnn", x1="test:16", kernel="full",
                       tile_inputs=2, strategy="stored-jacobian", log=None, quiet=True)
    assert 0 < again.computed <= 36 - killed_at
    assert out.read_bytes() == ref.read_bytes()  # the whole file, layout and every tile
    assert not list(tmp_path.glob("killed.h5.jacobian*"))


def test_run_file_inputs_come_from_the_runs_own_subset(tmp_path, monkeypatch, capsys):
    from engine.models import build_model
    from engine.store import RunFile
    from engine.train import TrainConfig

    small = load_synthetic(200, 100)
    # (engine.jobs.kernel_job.inputs names the function there; the module is in sys.modules)
    monkeypatch.setattr(sys.modules["engine.jobs.kernel_job.inputs"], "load_dataset", lambda *a, **k: small)
    cfg = TrainConfig(model="cnn", data="synthetic", n_train=60, n_test=40, subset_seed=3, steps=5,
                      checkpoints=[0, 5])
    torch.manual_seed(0)
    model = build_model("cnn")
    from engine.store import data_record
    run = RunFile.create(tmp_path / "run.h5", config=cfg.to_dict(), steps=5, iterations=[0, 5],
                         state=model.state_dict(), param_names=[n for n, _ in model.named_parameters()],
                         data=data_record(small.subset(60, 40, seed=3)))  # the run's own data, as train() records it
    with run.writer() as w:
        w.write_checkpoint(0, model.state_dict())
    common = ["--run", str(tmp_path / "run.h5"), "--kernel", "traced", "--quiet", "--memory-gb", "4"]
    assert main(["kernel", *common, "--x1", "train:20", "--out", str(tmp_path / "tr.h5")]) == 0
    assert main(["kernel", *common, "--x1", "test:10", "--x2", "train:20", "--out", str(tmp_path / "te.h5")]) == 0
    text = capsys.readouterr().out
    assert "J blocks: " in text and "traced kernel 20x20" in text
    # --budget-gb: the deprecated alias of --memory-gb, one line on stderr, the same job
    old = [a if a != "--memory-gb" else "--budget-gb" for a in common]
    assert main(["kernel", *old, "--x1", "train:20", "--out", str(tmp_path / "tr_old.h5")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["entk kernel: warning: --budget-gb is deprecated; use --memory-gb (the same whole-process memory)"]
    k_old, k_new = open_kernel(tmp_path / "tr_old.h5"), open_kernel(tmp_path / "tr.h5")
    assert k_old.attrs["tile_inputs"] == k_new.attrs["tile_inputs"]
    np.testing.assert_array_equal(k_old[:], k_new[:])
    K = open_kernel(tmp_path / "tr.h5")
    assert K.attrs["checkpoint"] == 0 and K.attrs["data_fingerprint"] == small.fingerprint
    run_subset = balanced_indices(small.y_train, 60, 3, 10).numpy()
    assert set(K.x1_index) <= set(run_subset) and len(set(K.x1_index)) == 20
    assert main(["kernel-predict", "--train", str(tmp_path / "tr.h5"), "--cross", str(tmp_path / "te.h5"),
                 "--ridge", "1e-2"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(["kernel-info", str(tmp_path / "tr.h5"), "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "top eigenvalues" in out and "participation ratio" in out
    # errors for people: one line, exit 2
    assert main(["kernel", "--x1", "train:5", "--out", str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--run" in err and len(err.splitlines()) == 1
    assert main(["kernel", *common, "--checkpoint", "5", "--x1", "train:5", "--out", str(tmp_path / "x.h5")]) == 2
    assert "checkpoint 5 is not completed" in capsys.readouterr().err


def test_balanced_indices_are_dataset_subset(ds):
    sub = ds.subset(37, 13, seed=5)
    i_tr, i_te = balanced_indices(ds.y_train, 37, 5, 10), balanced_indices(ds.y_test, 13, 5, 10)
    assert torch.equal(ds.x_train[i_tr], sub.x_train) and torch.equal(ds.y_test[i_te], sub.y_test)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("rank_world", [(0, 1), (1, 2), (0, 3)])
def test_block_reader_serves_every_tiles_blocks(tmp_path, symmetric, prefetch, rank_world):
    # The tile loop's J blocks come from reused buffers, the next one read in the background: every tile
    # gets exactly the blocks a direct read gives, in any rank's share of the grid, and a prefetch never
    # overwrites a block still in use (checked after the background read has finished).
    from concurrent.futures import ThreadPoolExecutor

    from engine.jobs.kernel_job.blocks import BlockReader, read_block
    from engine.store import JacobianStore
    from tests.seeding import seeded

    g, _ = seeded()
    k, p, block, sides = 3, 7, 4, (1 if symmetric else 2)
    n = (13, 9)
    stores = []
    for s in range(sides):
        st = JacobianStore.create_for(tmp_path / f"j{s}.h5", job={"side": s}, n_inputs=n[s], num_outputs=k,
                                      n_params=p, block_inputs=block)
        with st.writer() as w:
            w.write("jacobian", 0, torch.randn(n[s] * k, p, generator=g))
        stores.append(JacobianStore(tmp_path / f"j{s}.h5"))
    b1, b2 = -(-n[0] // block), -(-n[-1] // block)
    grid = [(i, j) for i in range(b1) for j in range(i if symmetric else 0, b2)]
    rank, world = rank_world
    tiles = [ij for q, ij in enumerate(grid) if q % world == rank]
    with ThreadPoolExecutor(1) as io:
        reader = BlockReader(stores, tiles, symmetric, torch.device("cpu"), io, prefetch=prefetch)
        for q, (i, j) in enumerate(tiles):
            a, b = reader.blocks(q)
            if reader.pending is not None:
                reader.pending[2].result()
            assert torch.equal(a, read_block(stores[0], i)), (q, i, j)
            if symmetric and i == j:
                assert b is None
            else:
                assert torch.equal(b, read_block(stores[-1], j)), (q, i, j)
