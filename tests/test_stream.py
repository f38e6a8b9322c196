"""BatchStream: the batch at step t is a pure function of (seed, t)."""

from __future__ import annotations

import pytest
import torch

from engine.data.stream import BatchStream, hash_words, normalize
from engine.errors import ConfigError


def _data(n=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def test_same_seed_identical_bits_across_streams_and_call_orders():
    x, y = _data()
    a = BatchStream(x, y, batch_size=64, seed=7)
    b = BatchStream(x, y, batch_size=64, seed=7)
    steps = [0, 1, 15, 16, 47, 3, 200, 15]
    first = {t: a.batch(t) for t in steps}
    for t in reversed(steps):  # out of order, crossing epochs back and forth
        xb, yb = b.batch(t)
        assert torch.equal(xb, first[t][0]) and torch.equal(yb, first[t][1])


def test_tensor_step_matches_int_step():
    """The graph-capturable path (t as a device tensor) gives the same bits as the int path."""
    x, y = _data(333)
    s = BatchStream(x, y, batch_size=50, seed=3)
    for t in (0, 5, 6, 7, 123):
        xi, yi = s.batch(t)
        xt, yt = s.batch(torch.tensor(t))
        assert torch.equal(xi, xt) and torch.equal(yi, yt)


def test_different_seeds_differ():
    x, y = _data()
    a, b = BatchStream(x, y, seed=0), BatchStream(x, y, seed=1)
    assert not torch.equal(a.indices(0), b.indices(0))
    assert not torch.equal(a.batch(0)[0], b.batch(0)[0])


@pytest.mark.parametrize("n,bs", [(1000, 100), (1000, 128), (257, 16)])
def test_each_index_at_most_once_per_epoch_exactly_once_when_divisible(n, bs):
    x, y = _data(n)
    s = BatchStream(x, y, batch_size=bs, seed=11)
    spe = s.steps_per_epoch
    assert spe == n // bs
    for epoch in (0, 1, 4):
        idx = torch.cat([s.indices(epoch * spe + p) for p in range(spe)])
        assert len(idx) == spe * bs
        assert len(torch.unique(idx)) == len(idx), "an index repeated within an epoch"
        if n % bs == 0:
            assert torch.equal(idx.sort().values, torch.arange(n))
    # Epochs are shuffled differently.
    assert not torch.equal(s.epoch_permutation(0), s.epoch_permutation(1))


def test_labels_follow_images():
    x, y = _data(200)
    s = BatchStream(x, y, batch_size=20, seed=2, augment=False)
    idx = s.indices(13)
    xb, yb = s.batch(13)
    assert torch.equal(yb, y[idx])
    assert torch.allclose(xb, normalize(x[idx], s.mean, s.std))


def test_augmentation_is_crop_and_flip_of_the_source_image():
    """Every augmented image is a 32x32 window of the zero-padded image, possibly mirrored."""
    x, y = _data(64)
    s = BatchStream(x, y, batch_size=32, seed=5, augment=True)
    xb, _ = s.batch(9)
    raw = torch.round((xb * torch.tensor(s.std).view(1, 3, 1, 1)
                       + torch.tensor(s.mean).view(1, 3, 1, 1)) * 255).to(torch.uint8)
    src = torch.nn.functional.pad(x[s.indices(9)], (4, 4, 4, 4))
    flips = shifts = 0
    for i in range(32):
        found = None
        for dy in range(9):
            for dx in range(9):
                win = src[i, :, dy:dy + 32, dx:dx + 32]
                if torch.equal(win, raw[i]):
                    found = (dy, dx, False)
                elif torch.equal(win.flip(-1), raw[i]):
                    found = (dy, dx, True)
        assert found is not None, f"sample {i} is not a crop/flip of its source"
        flips += found[2]
        shifts += found[:2] != (4, 4)
    assert 4 <= flips <= 28 and shifts >= 16  # both augmentations are actually used


def test_batch_is_float_normalized_and_shaped():
    x, y = _data(100)
    s = BatchStream(x, y, batch_size=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), augment=False)
    xb, yb = s.batch(0)
    assert xb.shape == (10, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert xb.min() >= -2.0 and xb.max() <= 2.0


def test_hash_is_well_spread():
    h = hash_words(0, torch.arange(100000))
    assert len(torch.unique(h)) == 100000  # lowbias32 is a bijection on 32-bit words
    assert 0 <= h.min() and h.max() < 2**32
    assert abs(h.float().mean().item() / 2**32 - 0.5) < 0.01


def test_bad_arguments_are_named():
    x, y = _data(10)
    with pytest.raises(ConfigError, match="batch_size"):
        BatchStream(x, y, batch_size=11)
    with pytest.raises(ConfigError, match="uint8"):
        BatchStream(x.float(), y)
    with pytest.raises(ConfigError, match="labels"):
        BatchStream(x, y[:5])


@pytest.mark.cuda
def test_cuda_stream_matches_cpu_bits_and_is_graph_capturable():
    """Hash-keyed shuffling is device-independent; the tensor-t path captures in a CUDA graph."""
    x, y = _data(1000)
    cpu = BatchStream(x, y, batch_size=100, seed=9)
    gpu = BatchStream(x, y, batch_size=100, seed=9, device="cuda")
    for t in (0, 7, 12, 99):
        assert torch.equal(cpu.indices(t), gpu.indices(t).cpu())
        xc, yc = cpu.batch(t)
        xg, yg = gpu.batch(t)
        assert torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xc, xg.cpu(), rtol=0, atol=1e-6)  # FMA may round differently

    t_dev = torch.zeros((), dtype=torch.int64, device="cuda")
    gpu.batch(t_dev)  # warm up allocations outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        xs, ys = gpu.batch(t_dev)
    for t in (3, 42, 11):
        t_dev.fill_(t)
        graph.replay()
        xr, yr = gpu.batch(t)
        assert torch.equal(xs, xr) and torch.equal(ys, yr)
