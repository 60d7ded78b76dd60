"""Training steps, plain and adversarial (Madry PGD-AT and "fast" FGSM with random start).

On models built from SparseLinear / SparseConv2d only the stored blocks (``values``) are
parameters, so only they receive gradients and optimizer state: adversarial training runs on the
truly sparse weights.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsekern.attacks.base import frozen_parameters, model_mode

AttackFn = Callable[[Tensor, Tensor], Tensor]


def train_step(model: nn.Module, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer,
               loss_fn=F.cross_entropy) -> float:
    """One optimizer step on (x [B, ...], y [B]); returns the loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def adversarial_step(model: nn.Module, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer,
                     attack: AttackFn, loss_fn=F.cross_entropy) -> float:
    """Madry et al.: craft x_adv = attack(x, y) against the current weights, then one optimizer
    step on the adversarial batch. `attack` is any torchattacks-style callable, e.g.
    sparsekern.attacks.PGD(model, eps=0.3, alpha=0.01, steps=40). Returns the loss."""
    x_adv = attack(x, y).detach()
    return train_step(model, x_adv, y, optimizer, loss_fn)


def fast_adversarial_step(model: nn.Module, x: Tensor, y: Tensor,
                          optimizer: torch.optim.Optimizer, eps: float, alpha: float | None = None,
                          generator: torch.Generator | None = None,
                          loss_fn=F.cross_entropy) -> float:
    """Wong et al. 2020 ("fast is better than free"): FGSM from a uniform random start in the
    eps-ball, step alpha (default 1.25 eps), projected to the ball and [0, 1]; then one
    optimizer step on that batch. Inputs x in [0, 1]. Returns the loss."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    alpha = 1.25 * eps if alpha is None else alpha
    # Same guards as the attacks: eval mode (every submodule's flag restored) and frozen
    # parameters, so sparse layers do not compute a weight gradient for the input step.
    with model_mode(model, False), frozen_parameters(model):
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        delta = ((noise * 2 - 1) * eps).requires_grad_(True)
        loss = loss_fn(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
        x_adv = (x + delta).clamp(0, 1).detach()
    return train_step(model, x_adv, y, optimizer, loss_fn)


def train_epoch(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                optimizer: torch.optim.Optimizer, attack: AttackFn | None = None) -> float:
    """One pass over (x, y) batches, adversarial when `attack` is given; returns the mean loss."""
    total, count = 0.0, 0
    for x, y in batches:
        step = train_step(model, x, y, optimizer) if attack is None else \
            adversarial_step(model, x, y, optimizer, attack)
        total += step * len(y)
        count += len(y)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Clean accuracy over (x, y) batches; the model's mode is restored."""
    correct = count = 0
    with model_mode(model, False):
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            count += len(y)
    return correct / max(count, 1)
