"""Single-run SGD training with crash-safe checkpoints and resume."""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import Dataset, load_dataset
from ..data.stream import BatchStream, normalize
from ..determinism import resolve_device, set_deterministic
from ..errors import ConfigError, NonFiniteLossError, RunFileError
from ..models import build_model
from ..progress import progress
from .config import TrainConfig
from .runfile import RunFile
from .schedule import lr_at

# Fields that may differ between the run that created a file and the one resuming it:
# they do not change the bits of any checkpoint.
_RESUME_FREE = {"data_root", "eval_train", "eval_batch_size"}


@dataclass
class TrainResult:
    """What a finished run reports (also stored in the run file's ``/summary``)."""

    out: Path | None
    steps: int
    resumed_from: int | None
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    steps_per_sec: float
    wall_s: float
    device: str

    def describe(self) -> str:
        resumed = f" (resumed from iteration {self.resumed_from})" if self.resumed_from else ""
        return (f"{self.steps} steps{resumed} on {self.device}: "
                f"train acc {self.train_acc:.2%} (loss {self.train_loss:.4f}), "
                f"test acc {self.test_acc:.2%} (loss {self.test_loss:.4f}), "
                f"{self.steps_per_sec:.2f} steps/s")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay on every trainable parameter."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)


def momentum_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor | None]:
    """Momentum buffers by parameter name (None before the first step)."""
    return {name: opt.state.get(p, {}).get("momentum_buffer")
            for name, p in model.named_parameters() if p.requires_grad}


def load_momentum(model: torch.nn.Module, opt: torch.optim.Optimizer,
                  buffers: dict[str, torch.Tensor]) -> None:
    """Install momentum buffers as fresh copies (never shared with the source)."""
    for name, p in model.named_parameters():
        if name in buffers:
            opt.state[p]["momentum_buffer"] = buffers[name].to(p.device, p.dtype).clone()


def sgd_step(model: torch.nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
             lr: float) -> torch.Tensor:
    """One training step at learning rate ``lr``; returns the batch loss (detached, on the device).

    The trainer and the loop fleet both step through here: a twin's base member is
    bit-identical to ``entk train`` only because the two run the very same operations.
    """
    for g in opt.param_groups:
        g["lr"] = lr
    loss = F.cross_entropy(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             mean, std, device: torch.device, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on uint8 images ``x``."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        xb = normalize(x[i:i + batch_size].to(device), mean, std)
        yb = y[i:i + batch_size].to(device)
        out = model(xb)
        loss_sum += F.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
    model.train(was_training)
    n = max(x.shape[0], 1)
    return loss_sum / n, correct / n


def prepare_data(cfg: TrainConfig, *, cache_dir=None, quiet: bool = False) -> Dataset:
    """Load the configured dataset (and subset), with the config's seeds."""
    kwargs = {}
    if cfg.data == "cifar10":
        kwargs = {"cache_dir": cache_dir, "progress": False if quiet else None}
    ds = load_dataset(cfg.data, cfg.data_root, **kwargs)
    if cfg.n_train or cfg.n_test:
        ds = ds.subset(cfg.n_train, cfg.n_test, seed=cfg.subset_seed)
    return ds


def train(cfg: TrainConfig, *, out: str | Path | None = None, dataset: Dataset | None = None,
          device: str | torch.device = "auto", overwrite: bool = False, quiet: bool = False,
          cache_dir=None, check_every: int = 50) -> TrainResult:
    """Train one run; checkpoint into ``out`` (HDF5), resuming from it if it exists.

    Args:
        cfg: the run. Validated before any data is loaded.
        out: run file path; ``None`` trains without saving.
        dataset: an already loaded dataset (else loaded from ``cfg``).
        overwrite: replace an existing ``out`` instead of resuming it.
        check_every: steps between finiteness checks of the loss (each is one host sync).

    Raises:
        NonFiniteLossError: the loss became NaN/inf; checkpoints before it are kept.
    """
    cfg.validate()
    dev = resolve_device(device)
    if check_every < 1:
        raise ConfigError(f"check_every must be >= 1, got {check_every}")
    run = None
    if out is not None and Path(out).exists() and not overwrite:
        run = RunFile(out)
        diff = [k for k in cfg.differences(run.config) if k not in _RESUME_FREE]
        if diff:
            raise RunFileError(f"{out} holds a run with a different config ({', '.join(diff)}); "
                               f"pass overwrite (--overwrite) or choose another --out")
    set_deterministic(cfg.deterministic)
    ds = dataset if dataset is not None else prepare_data(cfg, cache_dir=cache_dir, quiet=quiet)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=ds.num_classes).to(dev)
    opt = make_optimizer(model, cfg)
    stream = BatchStream.from_dataset(ds, "train", batch_size=cfg.batch_size, seed=cfg.stream_seed,
                                      augment=cfg.augment, device=dev)
    if cfg.steps and stream.steps_per_epoch < 1:
        raise ConfigError(f"batch_size {cfg.batch_size} exceeds the {len(ds.y_train)} training samples")

    meta = {"device": str(dev), "torch": torch.__version__, "python": platform.python_version(),
            "dataset": ds.describe(), "stream": stream.config(),
            "num_params": sum(p.numel() for p in model.parameters())}
    if out is not None and run is None:
        run = RunFile.create(out, config=cfg.to_dict(), steps=cfg.steps, iterations=cfg.checkpoints,
                             state=model.state_dict(), param_names=[n for n, _ in model.named_parameters()],
                             meta=meta, overwrite=overwrite)

    start, resumed_from = 0, None
    if run is not None:
        done = run.completed_iterations()
        if done:
            start = resumed_from = done[-1]
            run.load_into(model, start)
            if start > 0:
                load_momentum(model, opt, run.load_momentum(start))
    ckpt_set = set(cfg.checkpoints)
    writer = run.writer() if run is not None else None

    losses = torch.full((cfg.steps,), float("nan"), device=dev)
    lrs = np.array([lr_at(s, steps=cfg.steps, **cfg.schedule_kwargs()) for s in range(cfg.steps)],
                   dtype=np.float32)
    logged = start  # steps [.., logged) have been written to the run file's log

    def check_and_log(upto: int) -> float:
        """Host sync: verify losses [logged, upto) are finite, write them; return the last."""
        nonlocal logged
        chunk = losses[logged:upto].cpu().numpy()
        bad = np.nonzero(~np.isfinite(chunk))[0]
        if len(bad):
            step = logged + int(bad[0])
            if writer is not None:
                writer.write_log(logged, chunk[:bad[0] + 1], lrs[logged:step + 1])
            raise NonFiniteLossError(step, float(chunk[bad[0]]), str(out) if out else None)
        if writer is not None and upto > logged:
            writer.write_log(logged, chunk, lrs[logged:upto])
        logged = upto
        return float(chunk[-1]) if len(chunk) else float("nan")

    model.train()
    t_start = time.perf_counter()
    try:
        if writer is not None and start == 0 and 0 in ckpt_set and not run.complete[run.index(0)]:
            writer.write_checkpoint(0, model.state_dict(), None)
        bar = progress(range(start, cfg.steps), total=cfg.steps, initial=start,
                       desc=f"train {cfg.model}", enabled=None if not quiet else False, unit="step")
        for t in bar:
            xb, yb = stream.batch(t)
            losses[t] = sgd_step(model, opt, xb, yb, float(lrs[t]))
            it = t + 1
            if it in ckpt_set or it % check_every == 0 or it == cfg.steps:
                last = check_and_log(it)
                bar.set_postfix(loss=f"{last:.4f}", refresh=False)
                if writer is not None and it in ckpt_set:
                    writer.write_checkpoint(it, model.state_dict(), momentum_state(model, opt), last)
        bar.close()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        wall = time.perf_counter() - t_start
        steps_done = cfg.steps - start

        # Final accuracy: the whole test set and a fixed seeded subset of train (eval mode).
        if cfg.eval_train and cfg.eval_train < len(ds.y_train):
            g = torch.Generator().manual_seed(12345)
            idx = torch.randperm(len(ds.y_train), generator=g)[:cfg.eval_train].sort().values
            xtr, ytr = ds.x_train[idx], ds.y_train[idx]
        else:
            xtr, ytr = ds.x_train, ds.y_train
        ev = {"mean": ds.mean, "std": ds.std, "device": dev, "batch_size": cfg.eval_batch_size}
        train_loss, train_acc = evaluate(model, xtr, ytr, **ev)
        test_loss, test_acc = evaluate(model, ds.x_test, ds.y_test, **ev)
        result = TrainResult(out=Path(out) if out else None, steps=cfg.steps, resumed_from=resumed_from,
                             train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                             test_acc=test_acc, wall_s=wall, device=str(dev),
                             steps_per_sec=steps_done / wall if steps_done and wall > 0 else math.nan)
        if steps_done == 0 and run is not None and run.summary():
            # Nothing left to train: keep the timing of the run that did the work.
            prev = run.summary()
            result.steps_per_sec, result.wall_s = prev["steps_per_sec"], prev["wall_s"]
        if writer is not None:
            writer.write_summary({k: getattr(result, k) for k in
                                  ("train_loss", "train_acc", "test_loss", "test_acc",
                                   "steps_per_sec", "wall_s")})
        return result
    finally:
        if writer is not None:
            writer.close()
