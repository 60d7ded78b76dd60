"""Carlini-Wagner l_2 attack (Carlini & Wagner, S&P 2017)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sparsekern.attacks.base import Attack, check_nonnegative, check_positive_int

_ATANH_CLIP = 1.0 - 1e-6
_UPPER_INIT = 1e10


class CW(Attack):
    """Carlini-Wagner l_2 with the tanh change of variables, Adam, and a per-example binary search
    over the trade-off constant c.

    x_adv = (tanh(w) + 1) / 2 (always in [0, 1]); per example minimise
        ||x_adv - x||_2^2 + c * max(Z_y(x_adv) - max_{j != y} Z_j(x_adv), -kappa)
    with Z the logits, by ``steps`` Adam steps of learning rate ``lr`` started from x. After each of
    the ``binary_search_steps`` rounds, c is halved towards the last failure where the round
    succeeded and raised (bisected, or x10 while no success yet) where it failed.

    An iterate counts as successful when max_{j != y} Z_j - Z_y > 0 and >= kappa. The returned
    x_adv is, per example, the successful iterate of smallest l_2 distance over all rounds and
    steps, and x itself where none was found (``last_success`` [B] bool tells which).

    Shapes: x [B, ...] in [0, 1], y int64 [B] -> x_adv [B, ...].
    """

    def __init__(self, model: nn.Module, c: float = 1.0, kappa: float = 0.0, steps: int = 100,
                 lr: float = 0.01, binary_search_steps: int = 5):
        super().__init__(model)
        self.c = check_nonnegative("c", c)
        self.kappa = check_nonnegative("kappa", kappa)
        self.steps = check_positive_int("steps", steps, minimum=1)
        self.lr = check_nonnegative("lr", lr)
        self.binary_search_steps = check_positive_int("binary_search_steps", binary_search_steps)
        self.last_success: Tensor | None = None

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        B = x.shape[0]
        dev, dt = x.device, x.dtype
        w0 = torch.atanh((2.0 * x - 1.0).clamp(-_ATANH_CLIP, _ATANH_CLIP))
        const = torch.full((B,), self.c, device=dev, dtype=dt)
        lower = torch.zeros(B, device=dev, dtype=dt)
        upper = torch.full((B,), _UPPER_INIT, device=dev, dtype=dt)
        best_l2 = torch.full((B,), float("inf"), device=dev, dtype=dt)
        best_adv = x.clone()
        found = torch.zeros(B, dtype=torch.bool, device=dev)

        for _ in range(self.binary_search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=self.lr)
            round_success = torch.zeros(B, dtype=torch.bool, device=dev)
            for step in range(self.steps + 1):
                with torch.enable_grad():
                    x_adv = 0.5 * (torch.tanh(w) + 1.0)
                    logits = self.logits(x_adv)
                    real = logits.gather(1, y[:, None]).squeeze(1)
                    other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
                    l2sq = (x_adv - x).pow(2).flatten(1).sum(1)
                    f = torch.clamp(real - other, min=-self.kappa)
                    loss = (l2sq + const * f).sum()
                with torch.no_grad():
                    margin = other - real
                    success = (margin > 0) & (margin >= self.kappa)
                    l2 = l2sq.sqrt()
                    improve = success & (l2 < best_l2)
                    best_l2 = torch.where(improve, l2, best_l2)
                    best_adv[improve] = x_adv[improve].to(best_adv.dtype)
                    round_success |= success
                if step == self.steps:
                    break
                (grad,) = torch.autograd.grad(loss, w)
                w.grad = grad
                opt.step()
            found |= round_success
            with torch.no_grad():
                upper = torch.where(round_success, torch.minimum(upper, const), upper)
                lower = torch.where(round_success, lower, torch.maximum(lower, const))
                const = torch.where(upper < 1e9, (lower + upper) / 2, const * 10)
        self.last_success = found
        return best_adv.detach()
