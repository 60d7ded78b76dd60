"""DeepFool against the closed forms of PAPER.md on affine classifiers, and on a trained MLP."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attack_helpers import blobs, trained_mlp  # noqa: F401 (fixtures)
from sparsekern.attacks import DeepFool


def _affine_problem(n=64, d=10, k=5, seed=0):
    """nn.Linear(d, k) in float64 with f(0.5) ~ 0, inputs near 0.5: the minimal perturbations are
    small, so x + 1.02 r* stays inside the box (checked by the tests)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d, k).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(k, d, generator=g, dtype=torch.float64))
        lin.bias.copy_(-lin.weight @ torch.full((d,), 0.5, dtype=torch.float64)
                       + 0.05 * torch.randn(k, generator=g, dtype=torch.float64))
    x = (0.5 + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)).clamp(0.3, 0.7)
    return lin, x


def closed_form_l2(lin: nn.Linear, x: torch.Tensor, top: int | None = None) -> torch.Tensor:
    """DeepFool paper eqs. 8-9, per example, with plain loops: r* = |f'_l| / ||w'_l||^2 w'_l
    (PAPER.md writes (f_l - f_k0), whose sign is negative: the magnitude is meant).
    top: only the `top` classes of highest f(x) are candidates (the argmax included)."""
    W, b = lin.weight.detach(), lin.bias.detach()
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        f = W @ x[i] + b
        k0 = int(f.argmax())
        best = None
        allowed = f.argsort(descending=True)[:top].tolist() if top else range(W.shape[0])
        for k in allowed:
            if k == k0:
                continue
            fk, wk = f[k] - f[k0], W[k] - W[k0]
            dist = abs(float(fk)) / float(wk.norm())
            if best is None or dist < best[0]:
                best = (dist, fk, wk)
        _, fl, wl = best
        out[i] = fl.abs() / wl.norm() ** 2 * wl
    return out


@pytest.mark.parametrize("num_classes", [None, 5, 3])
def test_deepfool_l2_equals_closed_form_on_affine(num_classes):
    lin, x = _affine_problem()
    y = lin(x).argmax(1)
    r_star = closed_form_l2(lin, x, top=num_classes)
    assert float((x + 1.02 * r_star).min()) > 0 and float((x + 1.02 * r_star).max()) < 1
    attack = DeepFool(lin, overshoot=0.02, norm="L2", num_classes=num_classes)
    r, success = attack.perturbation(x, y)
    assert bool(success.all())
    # atol: DeepFool's 1e-4 push adds at most 1e-4 / ||w'_l|| ~ 2e-5 per coordinate here
    torch.testing.assert_close(r, 1.02 * r_star, rtol=1e-3, atol=3e-5)
    cos = torch.nn.functional.cosine_similarity(r, r_star, dim=1)
    assert float(cos.min()) > 1 - 1e-9
    x_adv = attack(x, y)
    torch.testing.assert_close(x_adv, x + 1.02 * r_star, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(attack.last_perturbation, 1.02 * r_star, rtol=1e-3, atol=1e-4)
    if num_classes == 3:  # restricting the candidates really changes some answers here
        assert not torch.allclose(r_star, closed_form_l2(lin, x), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("overshoot", [0.0, 0.02, 0.1])
def test_deepfool_linf_binary_linear(overshoot):
    g = torch.Generator().manual_seed(1)
    d = 12
    w = torch.randn(d, generator=g, dtype=torch.float64)
    b = float(-w.sum() * 0.5) + 0.02
    lin = nn.Linear(d, 2).double()
    with torch.no_grad():  # logits [0, f(x)] with f(x) = w.x + b
        lin.weight.zero_()
        lin.weight[1] = w
        lin.bias.copy_(torch.tensor([0.0, b], dtype=torch.float64))
    x = (0.5 + 0.03 * torch.randn(40, d, generator=g, dtype=torch.float64)).clamp(0.3, 0.7)
    f = x @ w + b
    y = (f > 0).long()
    assert 0 < int(y.sum()) < len(y)
    # smallest l_inf perturbation: |f| / ||w||_1 along -sign(f) sign(w)
    expected = (1 + overshoot) * (f.abs() / w.abs().sum() * -f.sign())[:, None] * w.sign()
    r, success = DeepFool(lin, norm="Linf", overshoot=overshoot).perturbation(x, y)
    assert bool(success.all()) or overshoot == 0.0  # no overshoot: lands (almost) on the boundary
    torch.testing.assert_close(r, expected, rtol=1e-3, atol=1e-4)
    # and the l_2 version gives |f| / ||w||_2 along w
    expected2 = 1.02 * (f.abs() / w.norm() ** 2 * -f.sign())[:, None] * w
    r2, success2 = DeepFool(lin, norm="L2").perturbation(x, y)
    assert bool(success2.all())
    torch.testing.assert_close(r2, expected2, rtol=1e-3, atol=1e-4)


def test_deepfool_on_trained_mlp(trained_mlp, blobs):
    x, y = blobs[2][:100], blobs[3][:100]
    attack = DeepFool(trained_mlp, steps=50)
    x_adv = attack(x, y)
    r, success = attack.last_perturbation, attack.last_success
    assert float(success.float().mean()) > 0.95
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert bool((trained_mlp(x_adv).argmax(1) != y)[success].all())
    torch.testing.assert_close(x_adv, (x + r).clamp(0, 1))
    # minimality sanity check: halving the perturbation mostly undoes the attack
    back = trained_mlp((x + 0.5 * r).clamp(0, 1)).argmax(1) == y
    assert float(back[success].float().mean()) > 0.9


def test_deepfool_already_misclassified_gets_zero():
    lin, x = _affine_problem(n=8)
    pred = lin(x).argmax(1)
    wrong = (pred + 1) % 5
    r, success = DeepFool(lin).perturbation(x, wrong)
    assert bool(success.all()) and float(r.abs().max()) == 0.0


def test_deepfool_zero_steps_returns_x():
    lin, x = _affine_problem(n=8)
    y = lin(x).argmax(1)
    r, success = DeepFool(lin, steps=0).perturbation(x, y)
    assert float(r.abs().max()) == 0.0 and not bool(success.any())
