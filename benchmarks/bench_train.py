"""Training throughput: steps/s of one SGD step, and batch sampling, side by side.

Groups (each has a reference member and the ratio table is printed at the end):
* ``sampling``: the engine's device-resident ``BatchStream.batch`` vs the standard
  torchvision pipeline (per-image RandomCrop(32, padding=4) + RandomHorizontalFlip +
  Normalize on uint8 tensors, then stack and copy to the device) for a batch of 128.
* ``train-step-<model>``: one full SGD step (sample, forward, backward, update) at
  batch 128 fed by ``BatchStream`` vs the same step fed by the torchvision pipeline.
  resnet20 always; vgg16 only on CUDA (a CPU step takes seconds).

Run: .venv/bin/python -m pytest benchmarks/bench_train.py --benchmark-json=benchmarks/results/train-<hw>.json
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _common import sync
from torchvision.transforms import v2 as T

from engine.data import load_synthetic
from engine.data.stream import BatchStream
from engine.determinism import set_deterministic
from engine.models import build_model

BATCH = 128


@pytest.fixture(scope="module")
def data():
    return load_synthetic(10_000, 100, seed=0)



def _torchvision_pipeline(ds, device):
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                    T.ToDtype(torch.float32, scale=True), T.Normalize(ds.mean, ds.std)])
    g = torch.Generator().manual_seed(0)

    def batch(t):
        idx = torch.randint(0, len(ds.y_train), (BATCH,), generator=g)
        xb = torch.stack([tf(ds.x_train[i]) for i in idx.tolist()])
        return xb.to(device, non_blocking=True), ds.y_train[idx].to(device, non_blocking=True)

    return batch


def _bench(benchmark, fn, device, role, unit, items):
    state = {"t": 0}

    def step():
        fn(state["t"])
        state["t"] += 1
        sync(device)

    benchmark.extra_info.update(role=role, unit=unit, items_per_call=items, device=str(device))
    benchmark.pedantic(step, rounds=10 if device.type == "cpu" else 50, warmup_rounds=2, iterations=1)


@pytest.mark.benchmark(group="sampling")
@pytest.mark.parametrize("impl", ["torchvision", "batchstream"])
def test_sampling(benchmark, data, device, impl):
    if impl == "batchstream":
        s = BatchStream.from_dataset(data, batch_size=BATCH, device=device)
        fn = s.batch
    else:
        fn = _torchvision_pipeline(data, device)
    _bench(benchmark, fn, device, "reference" if impl == "torchvision" else "engine", "samples", BATCH)


MODELS = ["resnet20"] + (["vgg16"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("impl", ["torchvision", "batchstream"])
def test_train_step(benchmark, data, device, model_name, impl):
    benchmark.group = f"train-step-{model_name}"
    set_deterministic(True)
    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sample = (BatchStream.from_dataset(data, batch_size=BATCH, device=device).batch
              if impl == "batchstream" else _torchvision_pipeline(data, device))

    def step(t):
        xb, yb = sample(t)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    _bench(benchmark, step, device, "reference" if impl == "torchvision" else "engine", "steps", 1)
