"""Dynamic Network Surgery: mask rule, refresh schedule, straight-through gradient, c_rate."""
import math

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.prune import (DNS, dns_mask_update, refresh_probability, solve_c_rate,
                              sparsity_report)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 5))


def test_mask_rule_cut_splice_hysteresis():
    t = 1.0
    w = torch.tensor([0.5, 0.9, 0.95, 1.05, 1.1, 1.11, 2.0, -0.89, -1.2, -1.0])
    ones = torch.ones_like(w)
    zeros = torch.zeros_like(w)
    # from all-kept: cut iff |w| <= 0.9 t, the band (0.9t, 1.1t] keeps its state
    assert dns_mask_update(w, ones, t).tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 1, 1]
    # from all-cut: splice iff |w| > 1.1 t, the band stays cut
    assert dns_mask_update(w, zeros, t).tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 1, 0]


def test_cut_weight_returns_when_it_grows():
    torch.manual_seed(0)
    layer = nn.Linear(4, 6)
    model = nn.Sequential(layer)
    dns = DNS(model, c_rate=0.0, seed=0, initial_update=True)
    t = dns.thresholds["0"]
    assert t == pytest.approx(layer.weight_orig.detach().abs().mean().item())
    mask = layer.weight_mask
    cut = (mask == 0).nonzero()[0].tolist()
    kept = (mask == 1).nonzero()[0].tolist()
    with torch.no_grad():
        layer.weight_orig[tuple(cut)] = 1.0 * t   # into the band: stays cut
        layer.weight_orig[tuple(kept)] = 0.95 * t  # into the band: stays kept
    dns.update_masks()
    assert mask[tuple(cut)] == 0 and mask[tuple(kept)] == 1
    with torch.no_grad():
        layer.weight_orig[tuple(cut)] = -1.2 * t  # past 1.1 t: spliced back
        layer.weight_orig[tuple(kept)] = 0.9 * t  # at 0.9 t: cut
    dns.update_masks()
    assert mask[tuple(cut)] == 1 and mask[tuple(kept)] == 0
    # the forward uses w * mask
    x = torch.randn(3, 4)
    w = layer.weight_orig.detach() * mask
    torch.testing.assert_close(model(x), x @ w.T + layer.bias.detach())


def test_threshold_is_clamped_and_stats_are_fixed():
    model = _mlp()
    dns = DNS(model, c_rate={"0": -100.0, "2": 0.5}, seed=0)
    assert dns.thresholds["0"] == 0.0
    a = model[2].weight_orig.detach().abs()
    assert dns.thresholds["2"] == pytest.approx(a.mean().item() + 0.5 * a.std(unbiased=False)
                                                .item(), rel=1e-6)
    before = dict(dns.thresholds)
    with torch.no_grad():
        model[2].weight_orig.mul_(10)
    dns.update_masks()
    assert dns.thresholds == before  # mu, sigma computed once


def test_refresh_probability_schedule():
    assert refresh_probability(0, 1e-4, 1.0) == 1.0
    assert refresh_probability(10000, 1e-4, 1.0) == pytest.approx(0.5)
    assert refresh_probability(30000, 1e-4, 1.0) == pytest.approx(0.25)
    assert refresh_probability(100, 0.01, 2.0) == pytest.approx(0.25)
    assert refresh_probability(99, 1e-4, 1.0, iter_stop=100) == pytest.approx(1 / 1.0099)
    assert refresh_probability(100, 1e-4, 1.0, iter_stop=100) == 0.0


def test_refresh_frequency_matches_probability_and_seed():
    def run(seed):
        dns = DNS(_mlp(), c_rate=0.0, gamma=0.01, power=1.0, iter_stop=300, seed=seed)
        return [dns.step() for _ in range(400)], dns

    refreshed, dns = run(1)
    assert dns.iteration == 400
    assert all(r == [] for r in refreshed[300:])  # nothing after iter_stop
    assert refreshed[0] == ["0", "2"]              # p(0) = 1
    expected = 2 * sum(refresh_probability(i, 0.01, 1.0) for i in range(300))
    got = sum(len(r) for r in refreshed)
    assert abs(got - expected) < 4 * math.sqrt(expected)
    assert run(1)[0] == refreshed                   # reproducible with a seed


def test_gradient_reaches_cut_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    DNS(model, target_sparsity=0.5, seed=0, initial_update=True)
    layer = model[0]
    assert (layer.weight_mask == 0).sum() == 9
    x = torch.randn(8, 6)
    model(x).pow(2).sum().backward()
    # d/dW of sum(y^2) = 2 y^T x, for every weight, masked or not
    y = x @ (layer.weight_orig * layer.weight_mask).T.detach() + layer.bias.detach()
    torch.testing.assert_close(layer.weight_orig.grad, 2 * y.T @ x)
    assert (layer.weight_orig.grad[layer.weight_mask == 0] != 0).all()


def test_c_rate_solved_for_target():
    torch.manual_seed(0)
    w = torch.randn(50, 40)
    for target in (0.0, 0.3, 0.7, 0.9, 1.0):
        c = solve_c_rate(w, target)
        a = w.abs()
        t = max(a.mean().item() + c * a.std(unbiased=False).item(), 0.0)
        frac = (a <= 0.9 * t).float().mean().item()
        assert abs(frac - target) <= 1e-3, (target, frac)
    model = _mlp(3)
    dns = DNS(model, target_sparsity={"0": 0.6, "2": 0.8}, seed=0, initial_update=True)
    rep = sparsity_report(model).by_name()
    assert abs(rep["0"].sparsity - 0.6) < 0.01 and abs(rep["2"].sparsity - 0.8) < 0.01
    assert dns.c_rates["2"] > dns.c_rates["0"]


def test_training_then_finalize_and_sparsify():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 5 * 5, 6))
    dns = DNS(model, target_sparsity=0.7, gamma=1e-2, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 4, 5, 5), torch.randint(0, 6, (16,))
    for _ in range(20):
        dns.step()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    masks = dns.masks()
    model.eval()
    with torch.no_grad():
        ref = model(x)
    before = sparsity_report(model)
    assert 0.5 < before.sparsity < 0.9
    dns.finalize()
    for name, m in [("0", model[0]), ("3", model[3])]:
        assert not hasattr(m, "weight_orig") and isinstance(m.weight, nn.Parameter)
        assert (m.weight[masks[name] == 0] == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
    assert [tuple(r) for r in sparsity_report(model).layers] == \
        [tuple(r) for r in before.layers]
    sparsekern.sparsify(model, block_size=(1, 1))
    assert isinstance(model[0], sparsekern.SparseConv2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    after = sparsity_report(model)
    assert [(r.name, r.numel, r.zeros) for r in after.layers] == \
        [(r.name, r.numel, r.zeros) for r in before.layers]


def test_finalize_keep_mask_gives_prune_pair():
    model = _mlp()
    dns = DNS(model, c_rate=0.2, seed=0, initial_update=True)
    masks = dns.masks()
    dns.finalize(keep_mask=True)
    assert torch.equal(model[0].weight_mask, masks["0"])
    rep = sparsekern.sparsify(model, block_size=(1, 1))
    assert rep.converted == ["0", "2"]


def test_dns_bad_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        DNS(_mlp(), seed=0)
    with pytest.raises(ValueError, match="exactly one"):
        DNS(_mlp(), c_rate=1.0, target_sparsity=0.5, seed=0)
    with pytest.raises(ValueError, match=r"target_sparsity must be in \[0, 1\]"):
        DNS(_mlp(), target_sparsity=1.5, seed=0)
    with pytest.raises(ValueError, match="no entry for layer '2'"):
        DNS(_mlp(), c_rate={"0": 1.0}, seed=0)
