"""FGSM / PGD / BIM behaviour, input validation, model-mode handling, no parameter grads."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.attacks import BIM, CW, FGSM, PGD, DeepFool

from attack_helpers import blobs, make_blobs, trained_mlp  # noqa: F401 (fixtures)


def _ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


# ---- FGSM ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.05, 8 / 255, 0.3])
def test_fgsm_equals_independent_formula(trained_mlp, blobs, eps):
    x, y = blobs[2][:64], blobs[3][:64]
    xr = x.clone().requires_grad_(True)
    loss = F.cross_entropy(trained_mlp(xr), y)  # mean reduction: same sign as the attack's
    (g,) = torch.autograd.grad(loss, xr)
    expected = torch.clamp(x + eps * g.sign(), 0, 1)
    torch.testing.assert_close(FGSM(trained_mlp, eps=eps)(x, y), expected, rtol=0, atol=0)


def test_fgsm_eps_zero_returns_x_exactly(trained_mlp, blobs):
    x, y = blobs[2][:16], blobs[3][:16]
    x = x.clone()
    x[0, 0] = 1.0 + 5e-7  # inside the tolerance: still not clamped when eps = 0
    out = FGSM(trained_mlp, eps=0.0)(x, y)
    assert torch.equal(out, x)
    assert out.data_ptr() != x.data_ptr()


# ---- errors --------------------------------------------------------------------------------------
def test_errors(trained_mlp, blobs):
    x, y = blobs[2][:8], blobs[3][:8]
    with pytest.raises(ValueError, match="eps must be >= 0"):
        FGSM(trained_mlp, eps=-0.1)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        PGD(trained_mlp, eps=-1.0)
    with pytest.raises(ValueError, match="unknown norm 'L3'"):
        PGD(trained_mlp, norm="L3")
    with pytest.raises(ValueError, match="unknown norm"):
        DeepFool(trained_mlp, norm="L1")
    with pytest.raises(ValueError, match="restarts"):
        PGD(trained_mlp, restarts=0)
    attack = FGSM(trained_mlp, eps=0.1)
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        attack(x + 1.0, y)
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        attack(torch.cat([x[:-1], torch.full_like(x[-1:], -1e-3)]), y)
    with pytest.raises(ValueError, match="matching x's batch"):
        attack(x, y[:5])
    with pytest.raises(ValueError, match="matching x's batch"):
        attack(x, y[:, None])
    with pytest.raises(ValueError, match="int64"):
        attack(x, y.to(torch.int32))
    with pytest.raises(ValueError, match="floating-point"):
        attack((x > 0.5).to(torch.int64), y)
    with pytest.raises(ValueError, match="NaN"):
        attack(torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match="batched"):
        attack(x[0], y[:1])
    # values within the 1e-6 tolerance are accepted
    attack(x.clamp(0, 1) * (1 + 1e-7), y)


# ---- PGD -----------------------------------------------------------------------------------------
PGD_SETTINGS = {"Linf": dict(eps=0.1, alpha=0.02, steps=10), "L2": dict(eps=0.4, alpha=0.08, steps=10)}


def _norms(d, norm):
    d = d.flatten(1)
    return d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_stays_in_ball_and_box_and_raises_loss(trained_mlp, blobs, norm, random_start):
    x, y = blobs[2], blobs[3]
    kw = PGD_SETTINGS[norm]
    x_adv = PGD(trained_mlp, norm=norm, random_start=random_start, seed=0, **kw)(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(_norms(x_adv - x, norm).max()) <= kw["eps"] * (1 + 1e-5)
    clean, adv = _ce(trained_mlp, x, y), _ce(trained_mlp, x_adv, y)
    assert float(adv.mean()) > float(clean.mean()) + 0.1
    assert float((adv >= clean - 1e-6).float().mean()) > 0.95


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_random_start_differs_and_seed_reproduces(trained_mlp, blobs, norm):
    x, y = blobs[2][:64], blobs[3][:64]
    kw = PGD_SETTINGS[norm]
    a = PGD(trained_mlp, norm=norm, random_start=True, seed=3, **kw)(x, y)
    b = PGD(trained_mlp, norm=norm, random_start=True, seed=3, **kw)(x, y)
    c = PGD(trained_mlp, norm=norm, random_start=False, **kw)(x, y)
    d = PGD(trained_mlp, norm=norm, random_start=True, seed=4, **kw)(x, y)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, d)
    # steps = 0: the random start itself, inside ball and box, and not x
    s = PGD(trained_mlp, norm=norm, random_start=True, seed=3, eps=kw["eps"], steps=0)(x, y)
    assert not torch.allclose(s, x)
    assert float(_norms(s - x, norm).max()) <= kw["eps"] * (1 + 1e-5)
    # the global RNG is used without a seed
    torch.manual_seed(7)
    e = PGD(trained_mlp, norm=norm, **kw)(x, y)
    torch.manual_seed(7)
    f = PGD(trained_mlp, norm=norm, **kw)(x, y)
    assert torch.equal(e, f)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_restarts_never_lower_the_loss(trained_mlp, blobs, norm):
    x, y = blobs[2], blobs[3]
    kw = dict(eps=0.05, alpha=0.01, steps=5) if norm == "Linf" else \
        dict(eps=0.25, alpha=0.05, steps=5)
    one = PGD(trained_mlp, norm=norm, restarts=1, seed=11, **kw)(x, y)
    many = PGD(trained_mlp, norm=norm, restarts=4, seed=11, **kw)(x, y)
    l1, l4 = _ce(trained_mlp, one, y), _ce(trained_mlp, many, y)
    assert bool((l4 >= l1 - 1e-6).all())
    assert float(_norms(many - x, norm).max()) <= kw["eps"] * (1 + 1e-5)
    # the setting leaves examples unbroken, so the restarts had something to do
    pred1 = trained_mlp(one).argmax(1)
    assert 0 < int((pred1 == y).sum()) < len(y)
    succ1, succ4 = pred1 != y, trained_mlp(many).argmax(1) != y
    assert bool((succ4 | ~succ1).all())  # a success is never lost


@pytest.mark.parametrize("restarts, passes", [(1, 5), (2, 5 + 1 + 5 + 1)])
def test_pgd_forward_passes(trained_mlp, blobs, restarts, passes):
    """One forward per step; the scoring pass only when there is a restart to compare with."""
    x, y = blobs[2][:32], blobs[3][:32]
    calls = []
    handle = trained_mlp.register_forward_hook(lambda *_: calls.append(1))
    try:
        PGD(trained_mlp, eps=0.5, alpha=0.01, steps=5, restarts=restarts, seed=0)(x, y)
    finally:
        handle.remove()
    assert len(calls) == passes


def test_bim_is_pgd_without_random_start(trained_mlp, blobs):
    x, y = blobs[2][:32], blobs[3][:32]
    a = BIM(trained_mlp, eps=0.1, alpha=0.02, steps=5)(x, y)
    b = PGD(trained_mlp, eps=0.1, alpha=0.02, steps=5, random_start=False)(x, y)
    assert torch.equal(a, b)
    assert BIM(trained_mlp).random_start is False


# ---- model mode and gradients --------------------------------------------------------------------
class Recorder(nn.Module):
    """Identity that records its training flag at every forward call."""

    def __init__(self):
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def _model_with_recorder():
    torch.manual_seed(0)
    rec = Recorder()
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Dropout(0.5), rec, nn.Linear(16, 4))
    return model, rec


ATTACKS = {
    "fgsm": lambda m: FGSM(m, eps=0.1),
    "pgd": lambda m: PGD(m, eps=0.1, alpha=0.02, steps=3, restarts=2),
    "pgd_l2": lambda m: PGD(m, eps=0.5, alpha=0.1, steps=3, norm="L2"),
    "bim": lambda m: BIM(m, eps=0.1, alpha=0.02, steps=3),
    "deepfool": lambda m: DeepFool(m, steps=5),
    "deepfool_linf": lambda m: DeepFool(m, steps=5, norm="Linf", num_classes=3),
    "cw": lambda m: CW(m, steps=5, binary_search_steps=2),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("start_training", [True, False])
def test_mode_restored_and_no_param_grads(name, start_training):
    model, rec = _model_with_recorder()
    model.train(start_training)
    model[2].train(not start_training)  # a mixed pattern must come back exactly
    before = [m.training for m in model.modules()]
    x, y = make_blobs(16, seed=5)
    x_adv = ATTACKS[name](model)(x, y)
    assert rec.seen and not any(rec.seen)  # eval during the attack
    assert [m.training for m in model.modules()] == before
    assert all(p.grad is None for p in model.parameters())
    assert x_adv.shape == x.shape and not x_adv.requires_grad and x_adv.grad_fn is None

    rec.seen.clear()
    ATTACKS[name](model).set_model_training_mode(True)(x, y)
    assert rec.seen and all(rec.seen)
    assert [m.training for m in model.modules()] == before
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("start_training", [True, False])
def test_mode_restored_on_exception(name, start_training):
    model = nn.Sequential(nn.Linear(20, 4), nn.Dropout(0.1), Boom())
    model.train(start_training)
    before = [m.training for m in model.modules()]
    x, y = make_blobs(4, seed=5)
    with pytest.raises(RuntimeError, match="boom"):
        ATTACKS[name](model)(x, y)
    assert [m.training for m in model.modules()] == before


def test_output_dtype_and_float64(trained_mlp, blobs):
    model = trained_mlp.double()
    x, y = blobs[2][:16].double(), blobs[3][:16]
    for attack in (FGSM(model), PGD(model, steps=2), DeepFool(model, steps=3),
                   CW(model, steps=3, binary_search_steps=1)):
        out = attack(x, y)
        assert out.dtype == torch.float64 and out.shape == x.shape
