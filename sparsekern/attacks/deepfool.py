"""DeepFool (Moosavi-Dezfooli et al., CVPR 2016), batched, l_2 and l_inf."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sparsekern.attacks.base import Attack, check_nonnegative, check_positive_int

_NORMS = ("L2", "Linf")
# Added to |f'_l| at every step (as in the reference implementation) so that a point exactly on
# a decision boundary still moves across it.
_PUSH = 1e-4
_TINY = 1e-12


class DeepFool(Attack):
    """DeepFool: iterated linearisation of the classifier towards the nearest decision boundary.

    At the current point x_i (for each example still classified as its label k0 = y), with
    f'_k = f_k(x_i) - f_k0(x_i) and w'_k = grad f_k(x_i) - grad f_k0(x_i) over candidate k != k0:

    * L2:   l = argmin_k |f'_k| / ||w'_k||_2,  r_i = (|f'_l| + 1e-4) / ||w'_l||_2^2 * w'_l
    * Linf: l = argmin_k |f'_k| / ||w'_k||_1,  r_i = (|f'_l| + 1e-4) / ||w'_l||_1 * sign(w'_l)

    r_tot accumulates r_i and x_{i+1} = clamp(x + (1 + overshoot) * r_tot, 0, 1). An example stops
    as soon as the model misclassifies it (or after ``steps`` updates). The perturbation reported
    is r = (1 + overshoot) * r_tot, before clamping; the returned adversarial is clamp(x + r, 0, 1).
    On an affine classifier, away from the box boundary, one step gives exactly
    r = (1 + overshoot) * r* of the DeepFool paper, eqs. 8-9 (up to the 1e-4 push).

    Note: k0 is the given label y (torchattacks convention); examples the model already
    misclassifies get r = 0 and count as successes. For the label-free robustness measure of the
    DeepFool paper (rho_2), pass y = model(x).argmax(1).

    Args:
        steps: maximal number of linearisation steps per example.
        overshoot: relative overshoot (0.02 in the paper).
        norm: "L2" or "Linf".
        num_classes: if given, only the ``num_classes`` classes with the highest clean logits
            (always including y) are candidates, as in the paper; None uses every class.

    Shapes: x [B, ...] in [0, 1], y int64 [B] -> x_adv [B, ...]. ``perturbation(x, y)`` returns
    (r [B, ...], success bool [B]); the last call's values are also kept in ``last_perturbation``
    and ``last_success``.
    """

    def __init__(self, model: nn.Module, steps: int = 50, overshoot: float = 0.02,
                 norm: str = "L2", num_classes: int | None = None):
        super().__init__(model)
        if norm not in _NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {_NORMS}")
        self.steps = check_positive_int("steps", steps, minimum=0)
        self.overshoot = check_nonnegative("overshoot", overshoot)
        self.norm = norm
        if num_classes is not None:
            num_classes = check_positive_int("num_classes", num_classes, minimum=2)
        self.num_classes = num_classes
        self.last_perturbation: Tensor | None = None
        self.last_success: Tensor | None = None

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        x_adv, _, _ = self._attack(x, y)
        return x_adv

    def perturbation(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(r [B, ...] minimal perturbation found, before clamping; success bool [B], i.e. the
        model misclassifies the returned clamp(x + r, 0, 1))."""
        _, r, success = self._run(self._attack, x, y)
        return r.detach(), success

    def _candidates(self, logits: Tensor, y: Tensor) -> Tensor:
        """Candidate classes [B, n] with column 0 = y."""
        K = logits.shape[1]
        n = K if self.num_classes is None else min(self.num_classes, K)
        order = logits.detach().clone()
        order.scatter_(1, y[:, None], float("inf"))
        return order.topk(n, dim=1).indices

    def _attack(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B = x.shape[0]
        scale = 1.0 + self.overshoot
        r_tot = torch.zeros_like(x)
        active = torch.ones(B, dtype=torch.bool, device=x.device)
        cand = None
        for it in range(self.steps + 1):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            x_i = (x[idx] + scale * r_tot[idx]).clamp(0.0, 1.0).requires_grad_(True)
            with torch.enable_grad():
                logits = self.logits(x_i)
                if cand is None:  # first iteration: every example, clean logits
                    if logits.shape[1] < 2:
                        raise ValueError("DeepFool needs a model with at least 2 output classes")
                    cand = self._candidates(logits, y)
                still = logits.argmax(1) == y[idx]
                active[idx[~still]] = False
                if it == self.steps or not bool(still.any()):
                    break
                f = logits.gather(1, cand[idx])  # [Ba, n]
                grads = []
                for j in range(f.shape[1]):
                    (g,) = torch.autograd.grad(f[:, j].sum(), x_i,
                                               retain_graph=j + 1 < f.shape[1])
                    grads.append(g)
            rows = still.nonzero().squeeze(1)
            g = torch.stack(grads, dim=1)[rows].flatten(2)  # [Ba', n, D]
            f = f.detach()[rows]
            f_diff = f[:, 1:] - f[:, :1]  # [Ba', n-1]
            w_diff = g[:, 1:] - g[:, :1]  # [Ba', n-1, D]
            if self.norm == "L2":
                w_norm = w_diff.norm(p=2, dim=2)
            else:
                w_norm = w_diff.norm(p=1, dim=2)
            dist = f_diff.abs() / (w_norm + _TINY)
            l = dist.argmin(dim=1)
            ar = torch.arange(l.shape[0], device=x.device)
            f_l, w_l, n_l = f_diff[ar, l].abs(), w_diff[ar, l], w_norm[ar, l]
            if self.norm == "L2":
                r_i = ((f_l + _PUSH) / (n_l ** 2 + _TINY))[:, None] * w_l
            else:
                r_i = ((f_l + _PUSH) / (n_l + _TINY))[:, None] * w_l.sign()
            upd = idx[rows]
            r_tot[upd] += r_i.view(-1, *x.shape[1:]).to(r_tot.dtype)
        r = scale * r_tot
        x_adv = (x + r).clamp(0.0, 1.0)
        with torch.no_grad():
            success = self.logits(x_adv).argmax(1) != y
        self.last_perturbation, self.last_success = r.detach(), success
        return x_adv.detach(), r.detach(), success
