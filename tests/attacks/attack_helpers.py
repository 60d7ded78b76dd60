"""Helpers and fixtures for the attack tests: seeded synthetic data and a tiny MLP trained on it
(no downloads). Not a conftest.py: tests/conftest.py is imported as `conftest` by other test
modules, so test modules here import these fixtures by name instead."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

N_FEATURES, N_CLASSES = 20, 4


def make_blobs(n: int, seed: int, dtype=torch.float32):
    """x [n, 20] in [0, 1] drawn around 4 class centres, y int64 [n]."""
    g = torch.Generator().manual_seed(1234)  # the centres are fixed across calls
    centres = 0.2 + 0.6 * torch.rand(N_CLASSES, N_FEATURES, generator=g)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    x = centres[y] + 0.12 * torch.randn(n, N_FEATURES, generator=g)
    return x.clamp(0.0, 1.0).to(dtype), y


def make_mlp(seed: int = 0, hidden: int = 32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, N_CLASSES))


def train(model: nn.Module, x, y, steps: int = 300, lr: float = 1e-2) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@functools.lru_cache(maxsize=1)
def _data():
    return (*make_blobs(800, seed=1), *make_blobs(200, seed=2))


@functools.lru_cache(maxsize=1)
def _trained_state():
    x, y, _, _ = _data()
    return train(make_mlp(0), x, y).state_dict()


@pytest.fixture
def blobs():
    """(x_train [800, 20], y_train [800], x_test [200, 20], y_test [200])."""
    return tuple(t.clone() for t in _data())


@pytest.fixture
def trained_mlp():
    """A fresh copy (eval mode, no .grad) of the MLP trained once on the blobs."""
    model = make_mlp(0)
    model.load_state_dict(_trained_state())
    return model.eval()
