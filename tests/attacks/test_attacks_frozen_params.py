"""Attacks freeze the model's parameters while they run (so sparse layers skip the weight
gradient kernel) and give every flag back afterwards, also on error."""
import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.attacks import FGSM, PGD


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = sparsekern.SparseLinear(6, 3, block_size=(1, 1), density=0.5)
        self.frozen_flag = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.seen = []

    def forward(self, x):
        self.seen.append([p.requires_grad for p in self.parameters()])
        return self.layer(x)


@pytest.mark.parametrize("attack_cls", [FGSM, PGD])
def test_parameters_frozen_during_attack_and_restored(attack_cls, monkeypatch):
    model = Recorder()
    calls = []
    real_sdd = sparsekern.ops.sdd

    def spy(*args, **kwargs):
        calls.append(1)
        return real_sdd(*args, **kwargs)
    monkeypatch.setattr(sparsekern.ops, "sdd", spy)
    x, y = torch.rand(4, 6), torch.tensor([0, 1, 2, 0])
    attack_cls(model, eps=0.1)(x, y)
    assert model.seen and all(not any(flags) for flags in model.seen)
    assert not model.frozen_flag.requires_grad  # restored to its own setting
    assert model.layer.values.requires_grad and model.layer.bias.requires_grad
    assert not calls  # no weight-gradient (sdd) work during the attack
    model.layer(x).sum().backward()  # training still reaches the values
    assert model.layer.values.grad is not None


def test_parameters_restored_when_the_attack_raises():
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError):
        FGSM(model, eps=0.1)(torch.rand(3, 4) + 2.0, torch.tensor([0, 1, 0]))
    assert all(p.requires_grad for p in model.parameters())
