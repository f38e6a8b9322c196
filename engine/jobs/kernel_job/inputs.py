"""What a kernel job computes on: the model (a run's checkpoint or a factory's module) and the
selected inputs (seeded, class-balanced, within a run's own data subset)."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import torch
from torch import nn

from ...data import Dataset, balanced_indices, load_dataset
from ...errors import ConfigError, describe_mismatch
from ...models import build_model
from ...store import RunFile
from ...train import TrainConfig
from ..job_inputs import check_model, check_run_data, load_state_file


def parse_inputs(spec: str, what: str = "--x1") -> tuple[str, int]:
    """``"train:5000"`` → ``("train", 5000)``."""
    split, _, n = str(spec).partition(":")
    if split not in ("train", "test") or not n.strip().isdigit() or int(n) < 1:
        raise ConfigError(f"{what} must be SPLIT:N with SPLIT train or test and N >= 1 (e.g. train:5000), "
                          f"got {spec!r}")
    return split, int(n)


def state_hash(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=12)
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return "b2:" + h.hexdigest()


def load_model_fn(spec: str, state: str | Path | None = None) -> nn.Module:
    """``package.module:factory`` → ``factory()`` (an ``nn.Module``), with a state dict from ``state``."""
    mod, _, attr = str(spec).partition(":")
    if not mod or not attr:
        raise ConfigError(f"--model-fn must be package.module:factory, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--model-fn {spec}: cannot import it ({e})") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model-fn {spec} returned {type(model).__name__}, expected a torch.nn.Module")
    check_model(model, spec)
    if state is not None:
        sd = load_state_file(state, spec)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ConfigError(f"--state {state} does not fit --model-fn {spec}: {describe_mismatch(e)}") from None
    return model


def from_run(run_path, checkpoint, data_root, cache_dir, quiet):
    """The model at a run's checkpoint (default: its last completed one), its dataset, the run's
    subset sizes per split and subset seed, and the job fields naming them."""
    run = RunFile(run_path)
    cfg = TrainConfig.from_dict(run.config)
    done = run.completed_iterations()
    if not done:
        raise ConfigError(f"{run_path} has no completed checkpoints")
    it = done[-1] if checkpoint is None else int(checkpoint)
    if it not in done:
        raise ConfigError(f"checkpoint {it} is not completed in {run_path} (completed: {done})")
    root = data_root or cfg.data_root
    kwargs = {"cache_dir": cache_dir, "progress": False if quiet else None} if cfg.data == "cifar10" else {}
    ds = load_dataset(cfg.data, root, **kwargs)
    check_run_data(run_path, run.data, ds, cfg)
    model = build_model(cfg.model, num_classes=ds.num_classes)
    run.load_into(model, it)
    subset = {"train": cfg.n_train, "test": cfg.n_test}
    info = {"run": Path(run_path).name, "checkpoint": it, "model": cfg.model,
            "run_subset": [cfg.n_train, cfg.n_test, cfg.subset_seed]}
    return model, ds, subset, cfg.subset_seed, info


def select(ds: Dataset, split: str, n: int, seed: int, base_n: int | None, base_seed: int, what: str):
    """``n`` seeded, class-balanced inputs of ``split`` within the subset ``Dataset.subset(base_n,
    seed=base_seed)`` picks (a run's own data): their indices, uint8 images and labels."""
    x, y = (ds.x_train, ds.y_train) if split == "train" else (ds.x_test, ds.y_test)
    base = balanced_indices(y, base_n, base_seed, ds.num_classes)
    if n > len(base):
        raise ConfigError(f"{what} {split}:{n} asks for more than the {len(base)} {split} images available")
    idx = base[balanced_indices(y[base], n, seed, ds.num_classes)]
    return idx, x[idx].contiguous(), y[idx].contiguous()
