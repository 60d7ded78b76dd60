"""Attack base class: validation, model-mode handling and input-gradient helpers.

Calling convention (the torchattacks one): ``attack = SomeAttack(model, ...)`` then
``x_adv = attack(x, y)`` with

* ``x``: floating tensor ``[B, ...]`` (e.g. ``[B, C, H, W]`` or ``[B, D]``) with every value in
  ``[0, 1]`` (tolerance 1e-6),
* ``y``: int64 labels ``[B]`` (moved to ``x.device`` if needed),
* ``x_adv``: detached tensor of the same shape, dtype and device as ``x``, values in ``[0, 1]``.

The model must map ``[B, ...]`` to logits ``[B, K]`` and treat examples independently (true for
any model in eval mode without batch-coupling layers). Attacks never touch ``.grad`` of model
parameters: every gradient is taken with ``torch.autograd.grad`` w.r.t. the input only.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

_BOX_TOL = 1e-6


@contextlib.contextmanager
def model_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put ``model`` in train (``training=True``) or eval mode inside the block and restore every
    submodule's own ``training`` flag afterwards, also when the block raises."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.train(training)
        yield model
    finally:
        for m, flag in saved:
            m.training = flag


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Parameters stop requiring grad inside the block (restored afterwards, also on error).

    Attacks need d loss / d input only. Autograd skips the weight-gradient kernels of built-in
    layers by itself, but a custom op's backward (sparsekern's dds) only knows which inputs
    require grad, so without this every attack step would also compute the sdd weight gradient.
    """
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def validate_inputs(x: Tensor, y: Tensor) -> Tensor:
    """Check ``x`` [B, ...] floating in [0, 1] and ``y`` int64 [B]; return ``y`` on ``x.device``.

    Raises ValueError naming the problem.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(y, Tensor):
        raise ValueError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must be batched with shape [B, ...], got shape {tuple(x.shape)}")
    if x.numel() > 0:
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < -_BOX_TOL or hi > 1.0 + _BOX_TOL:
            raise ValueError(f"x must lie in [0, 1] (tolerance {_BOX_TOL}); got values in "
                             f"[{lo:.6g}, {hi:.6g}]")
    if y.dtype != torch.int64:
        raise ValueError(f"y must be int64 class labels, got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape [B] = [{x.shape[0]}] matching x's batch, got shape "
                         f"{tuple(y.shape)}")
    return y.to(x.device)


def check_nonnegative(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


class Attack:
    """Base class of all attacks.

    Subclasses implement ``forward(x, y) -> x_adv`` on validated inputs; ``__call__`` wraps it with
    input validation, model-mode handling (eval during the attack unless
    ``set_model_training_mode(True)``; the original modes are always restored) and detaching.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.model_training = False

    def set_model_training_mode(self, model_training: bool = False) -> "Attack":
        """Run the model in train mode (True) or eval mode (False, default) during the attack.

        Train mode makes dropout/batch-norm stochastic or batch-coupled; eval is the usual choice.
        """
        self.model_training = bool(model_training)
        return self

    # -- to implement ----------------------------------------------------------------------------
    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    # -- machinery -------------------------------------------------------------------------------
    def _run(self, fn: Callable, x: Tensor, y: Tensor):
        """Validate, switch the model mode, run ``fn(x, y)`` without touching param grads."""
        y = validate_inputs(x, y)
        x = x.detach()
        with model_mode(self.model, self.model_training), frozen_parameters(self.model):
            return fn(x, y)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """x [B, ...] in [0, 1], y int64 [B] -> x_adv [B, ...] (detached, in [0, 1])."""
        return self._run(self.forward, x, y).detach()

    def logits(self, x: Tensor) -> Tensor:
        """Model output [B, K] for input [B, ...]."""
        out = self.model(x)
        if out.dim() != 2:
            raise ValueError(f"the model must return logits of shape [B, K], got shape "
                             f"{tuple(out.shape)}")
        return out

    def input_grad(self, loss_fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        """(d loss_fn(x).sum() / dx [B, ...], per-example value of loss_fn [B]).

        The gradient is taken w.r.t. ``x`` only (torch.autograd.grad), so model parameters never
        get a ``.grad``.
        """
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            values = loss_fn(x)
            (grad,) = torch.autograd.grad(values.sum(), x)
        return grad.detach(), values.detach()

    def __repr__(self) -> str:
        skip = {"model"}
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                         if k not in skip and not k.startswith("_"))
        return f"{type(self).__name__}({args})"
