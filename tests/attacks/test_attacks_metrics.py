"""rho, mean_l2, accuracy, robust_accuracy and activation_sparsity on known answers."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attack_helpers import blobs, trained_mlp  # noqa: F401 (fixtures)
from sparsekern.attacks import FGSM, PGD, accuracy, activation_sparsity, mean_l2, rho, \
    robust_accuracy


def _known():
    x = torch.full((2, 4), 0.5)  # ||x||_2 = 1, ||x||_inf = 0.5
    r = torch.tensor([[0.1, 0.0, 0.0, 0.0], [0.1, 0.1, -0.1, 0.1]])  # l2 0.1, 0.2; linf 0.1, 0.1
    return x, x + r


def test_rho_known_perturbations():
    x, x_adv = _known()
    assert rho(x, x_adv, p=2) == pytest.approx(0.15)
    assert rho(x, x_adv, p="L2") == pytest.approx(0.15)
    assert rho(x, x_adv, p=math.inf) == pytest.approx(0.2)
    assert rho(x, x_adv, p="inf") == pytest.approx(0.2)
    assert rho(x, x_adv, p=2, mask=torch.tensor([False, True])) == pytest.approx(0.2)
    assert math.isnan(rho(x, x_adv, mask=torch.tensor([False, False])))
    assert rho(x, x) == 0.0
    # image-shaped inputs flatten per example
    xi = torch.full((3, 1, 2, 2), 0.5)
    assert rho(xi, xi * 1.1, p=2) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="p must be 2 or inf"):
        rho(x, x_adv, p=1)
    with pytest.raises(ValueError, match="differ in shape"):
        rho(x, x_adv[:1])
    with pytest.raises(ValueError, match=r"\|\|x\|\|_p = 0"):
        rho(torch.zeros(2, 4), x_adv)


def test_mean_l2_known():
    x, x_adv = _known()
    assert mean_l2(x, x_adv) == pytest.approx(0.15)
    assert mean_l2(x, x_adv, torch.tensor([True, False])) == pytest.approx(0.1)
    assert math.isnan(mean_l2(x, x_adv, torch.tensor([False, False])))
    with pytest.raises(ValueError, match="success_mask"):
        mean_l2(x, x_adv, torch.tensor([True]))


@pytest.mark.parametrize("start_training", [True, False])
def test_accuracy_and_robust_accuracy(trained_mlp, blobs, start_training):
    x, y = blobs[2], blobs[3]
    trained_mlp.train(start_training)
    acc = accuracy(trained_mlp, x, y)
    assert acc >= 0.95
    assert accuracy(trained_mlp, x, y, batch_size=7) == acc
    assert robust_accuracy(trained_mlp, FGSM(trained_mlp, eps=0.0), x, y, batch_size=33) == acc
    attack = PGD(trained_mlp, eps=0.15, alpha=0.03, steps=10, seed=0)
    rob = robust_accuracy(trained_mlp, attack, x, y, batch_size=64)
    assert rob < acc - 0.2
    # the same number as attacking everything at once and scoring
    x_adv = torch.cat([attack(x[i:i + 64], y[i:i + 64]) for i in range(0, len(y), 64)])
    assert rob == accuracy(trained_mlp, x_adv, y)
    assert trained_mlp.training == start_training
    assert all(p.grad is None for p in trained_mlp.parameters())
    with pytest.raises(ValueError, match="batch_size"):
        accuracy(trained_mlp, x, y, batch_size=0)


def _hand_built():
    """Linear(2, 4) -> ReLU -> Linear(4, 3) -> ReLU -> Linear(3, 2) with known sign patterns:
    for x > 0, layer-1 pre-activations are (x0, -x0, x1, -x1) -> 2/4 zeros; layer-2 ones are
    (sum, -sum, -sum) -> 2/3 zeros."""
    l1, l2, l3 = nn.Linear(2, 4, bias=False), nn.Linear(4, 3, bias=False), nn.Linear(3, 2)
    with torch.no_grad():
        l1.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
        l2.weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4, [-1.0] * 4]))
    return nn.Sequential(l1, nn.ReLU(), l2, nn.ReLU(inplace=True), l3)


def test_activation_sparsity_known_fractions():
    model = _hand_built().train()
    x = torch.rand(10, 2) * 0.9 + 0.05
    sp = activation_sparsity(model, x, batch_size=3)
    assert sp.keys() == {"1", "3"}
    assert sp["1"] == pytest.approx(0.5)
    assert sp["3"] == pytest.approx(2 / 3)
    assert model.training  # mode restored
    for m in model.modules():
        assert not m._forward_hooks
    # a half-zero input changes layer 1: x = (0, c) -> pre-activations (0, 0, c, -c) -> 3/4 zeros
    x2 = torch.cat([x, torch.stack([torch.zeros(10), x[:, 1]], 1)])
    sp2 = activation_sparsity(model, x2)
    assert sp2["1"] == pytest.approx((10 * 2 + 10 * 3) / 80)


def test_activation_sparsity_reused_relu_and_nested_names():
    relu = nn.ReLU()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Identity(), relu)

        def forward(self, x):
            return relu(self.block(x) - 0.5)  # same ReLU twice

    x = torch.tensor([[0.2, 0.6, 0.9, 1.0]])
    # call 1: relu(x): 0 zeros of 4; call 2: relu(x - 0.5): 1 zero of 4 -> 1/8
    sp = activation_sparsity(Net(), x)
    assert sp == {"block.1": pytest.approx(1 / 8)}


def test_activation_sparsity_hooks_removed_on_exception():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x):
            self.relu(x)
            raise RuntimeError("fails after the relu")

    model = Bad()
    with pytest.raises(RuntimeError, match="fails after the relu"):
        activation_sparsity(model, torch.rand(2, 3))
    assert not model.relu._forward_hooks
    assert model.training


def test_activation_sparsity_on_trained_mlp(trained_mlp, blobs):
    sp = activation_sparsity(trained_mlp, blobs[2])
    assert set(sp) == {"1", "3"}
    assert all(0.0 <= v <= 1.0 for v in sp.values())
    # cross-check layer 1 against a manual forward
    with torch.no_grad():
        h = torch.relu(trained_mlp[0](blobs[2]))
    assert sp["1"] == pytest.approx(float((h == 0).float().mean()))


def test_activation_sparsity_per_call_splits_a_shared_relu():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.relu(x) - 0.5)  # second call: more zeros

    x = torch.tensor([[-1.0, 0.2, 0.7, 2.0]])
    pooled = activation_sparsity(Shared(), x)
    split = activation_sparsity(Shared(), x, per_call=True)
    assert split == {"relu[0]": 0.25, "relu[1]": 0.5}
    assert pooled == {"relu": 0.375}
    # across batches too, with a module called once beside it
    relu = nn.ReLU()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu, self.own = relu, nn.ReLU()

        def forward(self, x):
            return self.own(-self.relu(x) + self.relu(-x))  # relu[0] = x+, relu[1] = x-

    x = torch.tensor([[1.0, -2.0, 3.0, 0.5], [1.0, -2.0, 3.0, 0.5]])
    got = activation_sparsity(Net(), x, batch_size=1, per_call=True)
    assert got == {"relu[0]": 0.25, "relu[1]": 0.75, "own": 0.75}


def test_activation_sparsity_sees_fused_relus():
    """After sparsify(fuse_relu=True) the FusedReLU placeholders report under the names the
    nn.ReLU modules had, with the same fractions; a layer built with activation="relu" reports
    under its own name."""
    import sparsekern
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    for layer in (model[0], model[2]):
        torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=0.5)
    x = torch.rand(64, 16)
    before = activation_sparsity(model, x)
    sparsekern.sparsify(model, block_size=(1, 1), fuse_relu=True)
    after = activation_sparsity(model, x)
    assert set(before) == set(after) == {"1", "3"}
    assert after["1"] == pytest.approx(before["1"]) and after["3"] == pytest.approx(before["3"])
    assert 0 < after["1"] < 1
    built = nn.Sequential(sparsekern.SparseLinear(16, 32, block_size=4, density=0.5,
                                                  activation="relu"), nn.Linear(32, 4))
    assert set(activation_sparsity(built, x)) == {"0"}
