"""C&W vs L2-PGD on a trained MLP, and attacks on sparsekern.SparseLinear models."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.attacks import CW, FGSM, PGD, DeepFool, accuracy, mean_l2

from attack_helpers import blobs, make_blobs, trained_mlp  # noqa: F401 (fixtures)


def test_cw_smaller_l2_than_pgd_at_matched_success(trained_mlp, blobs):
    x, y = blobs[2][:100], blobs[3][:100]
    assert accuracy(trained_mlp, x, y) >= 0.95
    cw = CW(trained_mlp, c=1.0, kappa=0.0, steps=100, lr=0.01, binary_search_steps=5)
    x_cw = cw(x, y)
    ok_cw = cw.last_success
    assert bool((trained_mlp(x_cw).argmax(1) != y)[ok_cw].all())
    assert float(x_cw.min()) >= 0 and float(x_cw.max()) <= 1
    assert torch.equal(x_cw[~ok_cw], x[~ok_cw])  # x itself where no adversarial was found
    rate_cw = float(ok_cw.float().mean())
    assert rate_cw > 0.9
    # the smallest L2-PGD radius on a grid whose success is comparable to C&W's
    for eps in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2, 1.5):
        x_pgd = PGD(trained_mlp, eps=eps, alpha=eps / 8, steps=20, norm="L2", seed=0)(x, y)
        ok_pgd = trained_mlp(x_pgd).argmax(1) != y
        if float(ok_pgd.float().mean()) >= rate_cw - 0.05:
            break
    else:
        pytest.fail("L2-PGD never reached C&W's success rate")
    both = ok_cw & ok_pgd
    assert int(both.sum()) >= 0.8 * len(y)
    l2_cw, l2_pgd = mean_l2(x, x_cw, both), mean_l2(x, x_pgd, both)
    assert l2_cw < l2_pgd, (l2_cw, l2_pgd, eps)


def test_cw_binary_search_improves_over_single_round(trained_mlp, blobs):
    x, y = blobs[2][:50], blobs[3][:50]
    one = CW(trained_mlp, c=10.0, steps=50, lr=0.02, binary_search_steps=1)
    five = CW(trained_mlp, c=10.0, steps=50, lr=0.02, binary_search_steps=5)
    x1, x5 = one(x, y), five(x, y)
    both = one.last_success & five.last_success
    assert int(both.sum()) > 40
    d1 = (x1 - x).norm(dim=1)[both]
    d5 = (x5 - x).norm(dim=1)[both]
    assert bool((d5 <= d1 + 1e-6).all())  # the best over all rounds includes round 1
    assert float(d5.mean()) < float(d1.mean())


def test_cw_kappa_gives_confident_adversarials(trained_mlp, blobs):
    x, y = blobs[2][:30], blobs[3][:30]
    attack = CW(trained_mlp, kappa=2.0, steps=60, lr=0.02, binary_search_steps=3)
    x_adv = attack(x, y)
    ok = attack.last_success
    assert float(ok.float().mean()) > 0.8
    z = trained_mlp(x_adv)
    real = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], float("-inf")).amax(1)
    assert bool((other - real >= 2.0 - 1e-4)[ok].all())


# ---- sparsekern models ---------------------------------------------------------------------------
def _dense_and_sparse(trained_mlp, blobs, sparsity=0.5):
    """(dense float64 MLP whose two hidden layers lost the `sparsity` fraction of their 4x4 weight
    blocks of smallest norm and were fine-tuned with the mask, the same model on SparseLinear)."""
    dense = copy.deepcopy(trained_mlp).double()
    masks = {}
    with torch.no_grad():
        for i in (0, 2):
            w = dense[i].weight
            out_f, in_f = w.shape
            norms = w.reshape(out_f // 4, 4, in_f // 4, 4).pow(2).sum((1, 3))
            keep = norms > norms.flatten().kthvalue(int(sparsity * norms.numel())).values
            masks[i] = keep.repeat_interleave(4, 0).repeat_interleave(4, 1).double()
            w.mul_(masks[i])
    x, y = blobs[0].double(), blobs[1]
    opt = torch.optim.Adam(dense.parameters(), lr=5e-3)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(dense(x), y).backward()
        opt.step()
        with torch.no_grad():
            for i, m in masks.items():
                dense[i].weight.mul_(m)
    dense.zero_grad(set_to_none=True)
    sparse = nn.Sequential(*[sparsekern.SparseLinear.from_dense(m, block_size=(4, 4))
                             if isinstance(m, nn.Linear) else copy.deepcopy(m) for m in dense])
    for i in (0, 2):
        assert sparse[i].density <= 1 - sparsity + 1e-9
    return dense.eval(), sparse.eval()


def test_attacks_on_sparse_model_match_dense(trained_mlp, blobs):
    dense, sparse = _dense_and_sparse(trained_mlp, blobs)
    x, y = blobs[2][:64].double(), blobs[3][:64]
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x))
    assert accuracy(sparse, x, y) > 0.9

    fd, fs = FGSM(dense, eps=0.1)(x, y), FGSM(sparse, eps=0.1)(x, y)
    assert float((fd != fs).float().mean()) < 1e-3  # sign(grad) only differs where grad ~ 0
    torch.testing.assert_close(fd, fs, atol=1e-3, rtol=0)

    for norm, kw in (("Linf", dict(eps=0.1, alpha=0.02)), ("L2", dict(eps=0.5, alpha=0.1))):
        pd_ = PGD(dense, norm=norm, steps=10, seed=5, **kw)(x, y)
        ps = PGD(sparse, norm=norm, steps=10, seed=5, **kw)(x, y)
        torch.testing.assert_close(pd_, ps, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(pd_, x)

    rd, sd = DeepFool(dense).perturbation(x, y)
    rs, ss = DeepFool(sparse).perturbation(x, y)
    assert torch.equal(sd, ss)
    torch.testing.assert_close(rd, rs, atol=1e-6, rtol=1e-6)

    assert all(p.grad is None for p in sparse.parameters())


def test_attacks_on_sparse_model_float32(trained_mlp, blobs):
    dense, sparse = _dense_and_sparse(trained_mlp, blobs)
    dense, sparse = dense.float(), sparse.float()
    x, y = blobs[2][:32], blobs[3][:32]
    pd_ = PGD(dense, eps=0.1, alpha=0.02, steps=5, seed=1)(x, y)
    ps = PGD(sparse, eps=0.1, alpha=0.02, steps=5, seed=1)(x, y)
    # float32 sums in another order can flip sign(grad) on a few ~0 coordinates
    assert float((pd_ - ps).abs().gt(1e-4).float().mean()) < 0.02
    assert all(p.grad is None for p in sparse.parameters())


def test_pgd_on_sparse_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    model = nn.Sequential(sparsekern.SparseConv2d.from_dense(conv, block_size=(1, 1)), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 3)).eval()
    x = torch.rand(5, 3, 6, 6)
    y = torch.tensor([0, 1, 2, 0, 1])
    x_adv = PGD(model, eps=0.05, alpha=0.01, steps=3, seed=0)(x, y)
    assert x_adv.shape == x.shape
    assert float((x_adv - x).abs().max()) <= 0.05 + 1e-6
    assert all(p.grad is None for p in model.parameters())
