"""Robustness and sparsity metrics.

All functions run the model in eval mode and restore every submodule's training flag afterwards.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from sparsekern.attacks.base import model_mode
from sparsekern.nn import FusedReLU


def _check_batch(batch_size: int, x: Tensor | None = None, y: Tensor | None = None) -> int:
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if x is not None and y is not None and x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    return int(batch_size)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Fraction of examples with argmax model(x) == y. x [N, ...], y int64 [N] -> float."""
    batch_size = _check_batch(batch_size, x, y)
    if x.shape[0] == 0:
        return float("nan")
    correct = 0
    with model_mode(model, False):
        for i in range(0, x.shape[0], batch_size):
            pred = model(x[i:i + batch_size]).argmax(1)
            correct += int((pred == y[i:i + batch_size].to(pred.device)).sum())
    return correct / x.shape[0]


def robust_accuracy(model: nn.Module, attack: Callable[[Tensor, Tensor], Tensor], x: Tensor,
                    y: Tensor, batch_size: int = 256) -> float:
    """Accuracy of ``model`` on ``attack(x, y)`` computed batch by batch.

    x [N, ...] in [0, 1], y int64 [N] -> float. ``attack`` is any callable with the Attack
    convention (it may target another model: transfer attacks).
    """
    batch_size = _check_batch(batch_size, x, y)
    if x.shape[0] == 0:
        return float("nan")
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        x_adv = attack(xb, yb)
        with torch.no_grad(), model_mode(model, False):
            pred = model(x_adv).argmax(1)
        correct += int((pred == yb.to(pred.device)).sum())
    return correct / x.shape[0]


def _norm(t: Tensor, p) -> Tensor:
    """[N, ...] -> per-example l_p norm [N] (p = 2 or inf)."""
    if p in (2, 2.0, "2", "L2"):
        return t.flatten(1).norm(p=2, dim=1)
    if p in (math.inf, float("inf"), "inf", "Linf"):
        return t.flatten(1).abs().amax(dim=1)
    raise ValueError(f"p must be 2 or inf, got {p!r}")


def rho(x: Tensor, x_adv: Tensor, p=2, mask: Tensor | None = None) -> float:
    """rho_p = mean over examples of ||x_adv - x||_p / ||x||_p (DeepFool paper's robustness).

    x, x_adv [N, ...]; p = 2 or inf (also "L2"/"Linf"); mask: optional bool [N] selecting the
    examples to average over (e.g. DeepFool successes). Raises ValueError if a selected example
    has ||x||_p = 0. Returns nan when no example is selected.
    """
    if x.shape != x_adv.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_adv {tuple(x_adv.shape)} differ in shape")
    num, den = _norm((x_adv - x).double(), p), _norm(x.double(), p)
    if mask is not None:
        num, den = num[mask], den[mask]
    if num.numel() == 0:
        return float("nan")
    if bool((den == 0).any()):
        raise ValueError("rho is undefined for an example with ||x||_p = 0")
    return float((num / den).mean())


def mean_l2(x: Tensor, x_adv: Tensor, success_mask: Tensor | None = None) -> float:
    """Mean ||x_adv - x||_2 over the examples with success_mask True (all when None).

    x, x_adv [N, ...], success_mask bool [N]. Returns nan when no example is selected.
    """
    if x.shape != x_adv.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_adv {tuple(x_adv.shape)} differ in shape")
    d = _norm((x_adv - x).double(), 2)
    if success_mask is not None:
        if success_mask.shape != d.shape:
            raise ValueError(f"success_mask must have shape [{d.shape[0]}], got "
                             f"{tuple(success_mask.shape)}")
        d = d[success_mask.to(d.device).bool()]
    return float(d.mean()) if d.numel() else float("nan")


@torch.no_grad()
def activation_sparsity(model: nn.Module, x: Tensor, batch_size: int = 256,
                        per_call: bool = False) -> dict[str, float]:
    """Per-layer activation sparsity: {name of each nn.ReLU submodule: fraction of its output
    elements that are exactly zero}, over all of x [N, ...] (model in eval mode).

    nn.ReLU modules (and subclasses) are seen, the FusedReLU placeholders sparsify(fuse_relu=True)
    leaves in their place (same names), and sparse layers built with activation="relu" (under
    the layer's name), through forward hooks that are removed afterwards, also on exception.
    Functional relu (torch.relu, F.relu) calls are invisible and
    out of scope. A ReLU module called several times in one forward accumulates over its calls,
    or with per_call=True gets one entry per call, "name[0]", "name[1]", ... in call order (one
    nn.ReLU shared by several layers, as in LeNet-300-100). ReLUs that never run are left out.
    """
    batch_size = _check_batch(batch_size)
    counts: dict[tuple[str, int], list[int]] = {}  # (name, call index in a forward): [zeros, total]
    calls: dict[str, int] = {}

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            k = calls.get(name, 0)
            calls[name] = k + 1
            c = counts.setdefault((name, k if per_call else 0), [0, 0])
            c[0] += int((output == 0).sum())
            c[1] += output.numel()
        return hook

    handles = [model.register_forward_pre_hook(lambda *_: calls.clear())]
    try:
        for name, module in model.named_modules():
            if isinstance(module, (nn.ReLU, FusedReLU)) or (
                    getattr(module, "activation", None) == "relu"
                    and not getattr(module, "relu_placeholder", None)):
                handles.append(module.register_forward_hook(make_hook(name)))
        with model_mode(model, False):
            for i in range(0, x.shape[0], batch_size):
                model(x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    n_calls = {name: max(calls.get(name, 1), 1) for name, _ in counts}
    return {(name if not per_call or n_calls[name] == 1 else f"{name}[{k}]"): z / t
            for (name, k), (z, t) in counts.items() if t > 0}
