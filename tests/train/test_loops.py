"""Adversarial training on truly sparse weights equals masked dense training."""
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

import sparsekern
from sparsekern.attacks import PGD
from sparsekern.nn import conv_weight_to_gemm, gemm_to_conv_weight
from sparsekern.train import (adversarial_step, evaluate, fast_adversarial_step, train_epoch,
                              train_step)


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def block_mask_for(weight, block, keep, generator):
    """An element mask (weight's shape) made of whole (bm, bk) blocks of the GEMM view."""
    gemm = conv_weight_to_gemm(weight) if weight.dim() == 4 else weight
    M, K = gemm.shape
    bm, bk = block
    grid = torch.rand(M // bm, K // bk, generator=generator) < keep
    grid[0, 0] = True
    elem = grid.repeat_interleave(bm, 0).repeat_interleave(bk, 1).float()
    if weight.dim() == 4:
        return gemm_to_conv_weight(elem, weight.shape[1], weight.shape[2:])
    return elem


def masked_and_sparse_models():
    dense = small_cnn()
    g = torch.Generator().manual_seed(1)
    blocks = {"2": (16, 16), "6": (16, 16)}
    for name, block in blocks.items():
        layer = dense.get_submodule(name)
        prune.custom_from_mask(layer, "weight", block_mask_for(layer.weight, block, 0.4, g))
    sparse = sparsekern.sparsify(dense, block_size=lambda n, m: blocks[n],
                                 include=lambda n, m: n in blocks, inplace=False).model
    return dense, sparse, blocks


def effective_weight(dense_layer):
    return (dense_layer.weight_orig * dense_layer.weight_mask).detach()


@pytest.mark.parametrize("kind", ["fast", "fgsm-attack", "pgd"])
def test_sparse_adversarial_training_matches_masked_dense(kind):
    dense, sparse, blocks = masked_and_sparse_models()
    assert isinstance(sparse[2], sparsekern.SparseConv2d)
    assert isinstance(sparse[6], sparsekern.SparseLinear)
    # only stored blocks are parameters of the converted layers
    assert sparse[2].values.numel() == int(dense[2].weight_mask.sum())
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt_s = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    data = torch.Generator().manual_seed(2)
    for step in range(4):
        x = torch.rand(8, 3, 8, 8, generator=data, dtype=torch.float64).float()
        y = torch.randint(0, 10, (8,), generator=data)
        if kind == "fast":
            ld = fast_adversarial_step(dense, x, y, opt_d, eps=0.1,
                                       generator=torch.Generator().manual_seed(step))
            ls = fast_adversarial_step(sparse, x, y, opt_s, eps=0.1,
                                       generator=torch.Generator().manual_seed(step))
        elif kind == "pgd":
            ld = adversarial_step(dense, x, y, opt_d, PGD(dense, eps=0.05, alpha=0.02, steps=3,
                                                          seed=step))
            ls = adversarial_step(sparse, x, y, opt_s, PGD(sparse, eps=0.05, alpha=0.02, steps=3,
                                                           seed=step))
        else:
            ld = adversarial_step(dense, x, y, opt_d, fgsm(dense, 0.05))
            ls = adversarial_step(sparse, x, y, opt_s, fgsm(sparse, 0.05))
        assert ld == pytest.approx(ls, rel=1e-4, abs=1e-5)
    for name in blocks:
        torch.testing.assert_close(sparse.get_submodule(name).to_dense().weight,
                                   effective_weight(dense.get_submodule(name)),
                                   rtol=1e-4, atol=1e-5)
    for a, b in ((dense[0].weight, sparse[0].weight), (dense[8].weight, sparse[8].weight)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the weights moved: the test compares trained, not initial, parameters
    assert not torch.allclose(sparse[8].weight, small_cnn()[8].weight)


def fgsm(model, eps):
    def attack(x, y):
        model.eval()
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
        return (x + eps * g.sign()).clamp(0, 1).detach()
    return attack


def test_train_step_and_evaluate_restore_mode_and_learn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(256, 4)
    y = (x[:, 0] + x[:, 1] > 0).long()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    first = train_step(model, x, y, opt)
    for _ in range(3):
        last = train_epoch(model, [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)], opt)
    assert last < first
    model.eval()
    assert evaluate(model, [(x, y)]) > 0.9
    assert not model.training
    model.train()
    evaluate(model, [(x, y)])
    assert model.training


def test_fast_adversarial_step_rejects_negative_eps():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="eps"):
        fast_adversarial_step(model, torch.rand(2, 3), torch.tensor([0, 1]), opt, eps=-0.1)
