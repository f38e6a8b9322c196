"""What the metrics tests share: seeded BatchNorm CNNs, data, and the loss tolerance."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from engine.models import build_model

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
# vmap and the plain loop run the same float32 network with different kernels (batched
# matmuls / grouped convs vs plain ones), so their logits differ by a few float32 ulps
# of the logit scale; cross-entropy is 1-Lipschitz per logit in the sense
# |dL| <= max|dz| * ||softmax - onehot||_1 <= 2 max|dz|, so the losses then agree to a
# few ulps of the loss scale. 4 ulps leaves ample room (observed: < 0.2 ulp).
ULPS = 4


def loss_tol(*losses: float) -> float:
    return ULPS * EPS32 * max(1.0, *(abs(v) for v in losses))


def randomize_bn(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                m.num_batches_tracked.fill_(int(torch.randint(1, 100, (), generator=gen)))
    return model


def cnn(seed: int, width: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(build_model("cnn", width=width), torch.Generator().manual_seed(seed + 1000))


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def labels(n: int, seed: int = 0, classes: int = 10) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def direct_loss(model: torch.nn.Module, state, x, y) -> float:
    """Mean cross-entropy of ``state`` loaded into a copy of ``model`` (eval mode)."""
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    m.eval()
    with torch.no_grad():
        return float(F.cross_entropy(m(x).double(), y))


def param_flat(model, state) -> torch.Tensor:
    return torch.cat([state[k].double().reshape(-1) for k, _ in model.named_parameters()])
