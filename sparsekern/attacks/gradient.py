"""First-order l_inf / l_2 attacks: FGSM, PGD (with restarts) and BIM."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsekern.attacks.base import Attack, check_nonnegative, check_positive_int

_NORMS = ("Linf", "L2")
_TINY = 1e-12


def _per_example_norm(t: Tensor) -> Tensor:
    """[B, ...] -> l2 norm per example [B]."""
    return t.flatten(1).norm(p=2, dim=1)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] broadcastable against ``like`` [B, ...]."""
    return v.view(-1, *([1] * (like.dim() - 1)))


class FGSM(Attack):
    """Fast gradient sign method (Goodfellow et al. 2015), l_inf.

    x_adv = clamp(x + eps * sign(d CE(model(x), y) / dx), 0, 1).

    Shapes: x [B, ...] in [0, 1], y int64 [B] -> x_adv [B, ...]. eps = 0 returns x unchanged
    (exactly, no clamping).
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255):
        super().__init__(model)
        self.eps = check_nonnegative("eps", eps)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if self.eps == 0.0:
            return x.clone()
        grad, _ = self.input_grad(lambda z: F.cross_entropy(self.logits(z), y, reduction="none"),
                                  x)
        return (x + self.eps * grad.sign()).clamp(0.0, 1.0)


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018) on the cross-entropy loss.

    Args:
        eps: radius of the threat ball (l_inf or l_2 per ``norm``).
        alpha: step size. Linf: x += alpha * sign(g). L2: x += alpha * g / ||g||_2 (per example).
        steps: number of steps (0 returns the random start, or x).
        random_start: Linf: uniform in [-eps, eps]^d; L2: uniform direction, radius uniform in
            [0, eps]. Either is then clipped to [0, 1].
        norm: "Linf" or "L2".
        restarts: number of runs; per example the first successful run (model misclassifies) is
            kept, otherwise the run of highest loss. Run 1 consumes the RNG exactly like
            ``restarts=1`` with the same seed, so restarts never lower the loss of a run.
        seed: if given, the random start uses a fresh ``torch.Generator`` seeded with it on each
            call (reproducible across models and calls); otherwise the global RNG.

    After every step x_adv is projected onto the eps-ball around x and then clipped to [0, 1]
    (clipping only shrinks |x_adv - x| coordinatewise, so the result stays in the ball).

    Shapes: x [B, ...] in [0, 1], y int64 [B] -> x_adv [B, ...].
    """

    def __init__(self, model: nn.Module, eps: float = 0.3, alpha: float = 0.01, steps: int = 40,
                 random_start: bool = True, norm: str = "Linf", restarts: int = 1,
                 seed: int | None = None):
        super().__init__(model)
        if norm not in _NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {_NORMS}")
        self.eps = check_nonnegative("eps", eps)
        self.alpha = check_nonnegative("alpha", alpha)
        self.steps = check_positive_int("steps", steps, minimum=0)
        self.restarts = check_positive_int("restarts", restarts, minimum=1)
        self.random_start = bool(random_start)
        self.norm = norm
        self.seed = seed

    # -- pieces ----------------------------------------------------------------------------------
    def _project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        delta = x_adv - x
        if self.norm == "Linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            n = _per_example_norm(delta)
            factor = torch.clamp(self.eps / (n + _TINY), max=1.0)
            delta = delta * _bcast(factor, delta)
        return (x + delta).clamp(0.0, 1.0)

    def _random_start(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        if self.norm == "Linf":
            u = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            delta = (2.0 * u - 1.0) * self.eps
        else:
            d = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            d = d / _bcast(_per_example_norm(d) + _TINY, d)
            r = torch.rand(x.shape[0], generator=gen, device=x.device, dtype=x.dtype) * self.eps
            delta = d * _bcast(r, d)
        return (x + delta).clamp(0.0, 1.0)

    def _loss(self, z: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self.logits(z), y, reduction="none")

    def _run_once(self, x: Tensor, y: Tensor, gen: torch.Generator | None) -> Tensor:
        x_adv = self._random_start(x, gen) if self.random_start else x.clone()
        for _ in range(self.steps):
            grad, _ = self.input_grad(lambda z: self._loss(z, y), x_adv)
            if self.norm == "Linf":
                step = grad.sign()
            else:
                step = grad / _bcast(_per_example_norm(grad) + _TINY, grad)
            x_adv = self._project(x_adv + self.alpha * step, x)
        return x_adv.detach()

    @torch.no_grad()
    def _evaluate(self, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(per-example CE loss [B], success = misclassified [B])."""
        logits = self.logits(x_adv)
        return F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) != y

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        gen = None
        if self.seed is not None and self.random_start:
            gen = torch.Generator(device=x.device)
            gen.manual_seed(int(self.seed))
        best = self._run_once(x, y, gen)
        if self.restarts == 1:  # nothing to compare against: no extra forward pass
            return best
        best_loss, best_success = self._evaluate(best, y)
        for _ in range(self.restarts - 1):
            todo = (~best_success).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            cand = self._run_once(x[todo], y[todo], gen)
            loss, success = self._evaluate(cand, y[todo])
            better = success | (loss > best_loss[todo])
            idx = todo[better]
            best[idx] = cand[better]
            best_loss[idx] = loss[better]
            best_success[idx] = success[better]
        return best


class BIM(PGD):
    """Basic iterative method (Kurakin et al. 2017): PGD without random start (one run).

    Shapes: x [B, ...] in [0, 1], y int64 [B] -> x_adv [B, ...].
    """

    def __init__(self, model: nn.Module, eps: float = 0.3, alpha: float = 0.01, steps: int = 40,
                 norm: str = "Linf"):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=False, norm=norm,
                         restarts=1)
