"""Magnitude pruning (exact counts, block GEMM view), cubic schedule, sparsify round trip,
argument checks."""
import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.prune import (GradualPruner, apply_masks, block_scores, compute_masks,
                              cubic_sparsity, magnitude_prune, prunable_layers, sparsity_report)


class Net(nn.Module):
    """conv 4->8 (3x3; GEMM view [8, 36]) -> linear 128->10 -> linear 10->3 (10, 3 not multiples
    of 4)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def _ceil(a, b):
    return -(-a // b)


def _gemm_col(c, r, s, C_in, S):
    """Column of conv weight element [o, c, r, s] in the (r, s, c)-ordered GEMM view."""
    return (r * S + s) * C_in + c


def _block_grid(module, block):
    w = module.weight_orig if hasattr(module, "weight_orig") else module.weight
    M = w.shape[0]
    K = w[0].numel()
    return _ceil(M, block[0]), _ceil(K, block[1])


def _pruned_blocks(mask, module, block):
    """Number of all-zero blocks of an element mask, computed with explicit loops."""
    bm, bk = block
    n_br, n_bc = _block_grid(module, block)
    if mask.dim() == 4:
        C_out, C_in, R, S = mask.shape
        g = torch.zeros(C_out, R * S * C_in)
        for c in range(C_in):
            for r in range(R):
                for s in range(S):
                    g[:, _gemm_col(c, r, s, C_in, S)] = mask[:, c, r, s]
    else:
        g = mask
    count = 0
    for i in range(n_br):
        for j in range(n_bc):
            blk = g[i * bm:(i + 1) * bm, j * bk:(j + 1) * bk]
            assert bool((blk == 0).all()) or bool((blk == 1).all())  # whole blocks only
            count += int((blk == 0).all())
    return count


def test_block_scores_match_loops_for_conv_gemm_view():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 2, 3)  # GEMM [6, 18]; blocks (4, 4): grid 2 x 5 with padding
    C_out, C_in, R, S = w.shape
    g = torch.zeros(C_out, R * S * C_in)
    for c in range(C_in):
        for r in range(R):
            for s in range(S):
                g[:, _gemm_col(c, r, s, C_in, S)] = w[:, c, r, s]
    for norm in ("l1", "l2"):
        got = block_scores(w, (4, 4), norm)
        assert got.shape == (2, 5)
        for i in range(2):
            for j in range(5):
                blk = g[i * 4:(i + 1) * 4, j * 4:(j + 1) * 4]
                want = blk.abs().sum() if norm == "l1" else blk.pow(2).sum().sqrt()
                torch.testing.assert_close(got[i, j], want)
    torch.testing.assert_close(block_scores(w, 1), g.abs())


@pytest.mark.parametrize("block", [(1, 1), (4, 4), (2, 3)])
@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.5, 0.9, 1.0])
def test_exact_counts_layerwise_and_global(block, norm, sparsity):
    model = Net()
    units = {n: _block_grid(model.get_submodule(n), block) for n in ("conv", "fc1", "fc2")}
    units = {n: a * b for n, (a, b) in units.items()}
    masks = compute_masks(model, sparsity, block_size=block, norm=norm, scope="layer")
    assert set(masks) == {"conv", "fc1", "fc2"}
    for name, mask in masks.items():
        module = model.get_submodule(name)
        assert mask.shape == module.weight.shape and mask.dtype == module.weight.dtype
        assert _pruned_blocks(mask, module, block) == round(sparsity * units[name])
    masks = compute_masks(model, sparsity, block_size=block, norm=norm, scope="global")
    total = sum(_pruned_blocks(m, model.get_submodule(n), block) for n, m in masks.items())
    assert total == round(sparsity * sum(units.values()))


def test_layerwise_prunes_lowest_blocks_and_conv_block_covers_all_rsc():
    model = Net(1)
    block = (4, 4)
    masks = compute_masks(model, 0.5, block_size=block, norm="l2", scope="layer")
    w = model.conv.weight.detach()
    scores = block_scores(w, block, "l2")
    mask = masks["conv"]
    C_out, C_in, R, S = w.shape
    n_br, n_bc = scores.shape
    pruned = torch.zeros(n_br, n_bc, dtype=torch.bool)
    for i in range(n_br):
        for j in range(n_bc):
            vals = [mask[o, c, r, s] for o in range(C_out) for c in range(C_in)
                    for r in range(R) for s in range(S)
                    if o // 4 == i and _gemm_col(c, r, s, C_in, S) // 4 == j]
            assert len(set(float(v) for v in vals)) == 1  # a block is all kept or all pruned
            pruned[i, j] = vals[0] == 0
    assert pruned.sum() == round(0.5 * n_br * n_bc)
    assert scores[pruned].max() <= scores[~pruned].min()


def test_global_ranks_across_layers_with_normalization():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)                                  # one 2x2 block, norm 4 / 2
        model[1].weight.copy_(torch.tensor([[1.5, 2.0], [3.0, 3.5]]))  # unstructured
    sizes = {"0": (2, 2), "1": (1, 1)}
    for norm in ("l1", "l2"):
        # normalized: block of 1.0s scores 1.0 < 1.5, so it goes first (raw norm would not)
        masks = compute_masks(model, 0.2, block_size=lambda n, m: sizes[n], norm=norm,
                              scope="global")
        assert masks["0"].sum() == 0 and masks["1"].sum() == 4
        masks = compute_masks(model, 0.4, block_size=lambda n, m: sizes[n], norm=norm,
                              scope="global")
        assert masks["0"].sum() == 0 and masks["1"][0, 0] == 0 and masks["1"].sum() == 3
    # global with one block size: largest-magnitude weights survive across layers
    model = Net(2)
    masks = compute_masks(model, 0.8, scope="global")
    kept = torch.cat([model.get_submodule(n).weight.detach().abs()[m == 1] for n, m in
                      masks.items()])
    cut = torch.cat([model.get_submodule(n).weight.detach().abs()[m == 0] for n, m in
                     masks.items()])
    assert cut.max() <= kept.min()


def test_layer_selection():
    model = Net()
    assert prunable_layers(model) == ["conv", "fc1", "fc2"]
    assert prunable_layers(model, skip_first=True, skip_last=True) == ["fc1"]
    assert set(compute_masks(model, 0.5, layers=["fc1"])) == {"fc1"}
    masks = compute_masks(model, 0.5, layers=lambda n, m: isinstance(m, nn.Linear))
    assert set(masks) == {"fc1", "fc2"}
    with pytest.raises(ValueError, match="not a module"):
        compute_masks(model, 0.5, layers=["fc9"])


def test_apply_masks_updates_in_place():
    model = Net()
    x = torch.randn(2, 4, 4, 4)
    orig = model.fc1.weight.detach().clone()
    m1 = magnitude_prune(model, 0.7, block_size=(2, 2))
    hooks = len(model.fc1._forward_pre_hooks)
    assert torch.equal(model.fc1.weight_mask, m1["fc1"])
    m2 = {"fc1": torch.ones_like(orig)}
    apply_masks(model, m2)  # replaces (not intersects): pruned weights come back
    assert len(model.fc1._forward_pre_hooks) == hooks
    assert torch.equal(model.fc1.weight_mask, m2["fc1"])
    torch.testing.assert_close(model.fc1.weight, orig)
    model(x)
    # scores use the masked weight: growing sparsity keeps earlier pruned units pruned
    magnitude_prune(model, 0.5)
    a = model.conv.weight_mask.clone()
    magnitude_prune(model, 0.8)
    assert not (model.conv.weight_mask.bool() & ~a.bool()).any()


@pytest.mark.parametrize("block,scope", [((1, 1), "layer"), ((4, 4), "global"),
                                         ((4, 4), "layer"), ((2, 4), "global")])
def test_sparsify_matches_masked_model(block, scope):
    model = Net(3).eval()
    x = torch.randn(5, 4, 4, 4)
    masks = magnitude_prune(model, 0.6, block_size=block, scope=scope, norm="l2")
    with torch.no_grad():
        ref = model(x)
    before = sparsity_report(model)
    assert before.total.zeros == sum(int((m == 0).sum()) for m in masks.values()) > 0
    report = sparsekern.sparsify(model, block_size=block)
    assert report.converted == ["conv", "fc1", "fc2"]
    assert isinstance(model.conv, sparsekern.SparseConv2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    after = sparsity_report(model)
    assert [(r.name, r.numel, r.zeros) for r in after.layers] == \
        [(r.name, r.numel, r.zeros) for r in before.layers]
    assert [r.kind for r in after.layers] == ["SparseConv2d", "SparseLinear", "SparseLinear"]
    assert after.total.sparsity == before.total.sparsity
    if scope == "layer":  # stored blocks are exactly the kept ones
        for e in report.entries:
            n_br, n_bc = _block_grid(Net().get_submodule(e.name), block)
            kept = n_br * n_bc - round(0.6 * n_br * n_bc)
            assert e.density == pytest.approx(kept / (n_br * n_bc))


def test_cubic_schedule_values():
    f = lambda step, **kw: cubic_sparsity(step, 0.9, 100, 200, **kw)  # noqa: E731
    assert f(0) == 0.0 and f(99) == 0.0
    assert f(100) == pytest.approx(0.0)
    assert f(150) == pytest.approx(0.9 - 0.9 * 0.5 ** 3)
    assert f(175) == pytest.approx(0.9 - 0.9 * 0.25 ** 3)
    assert f(200) == 0.9 and f(10_000) == 0.9
    assert f(50, initial_sparsity=0.2) == 0.2
    assert f(150, initial_sparsity=0.2) == pytest.approx(0.9 - 0.7 * 0.125)
    # frequency: held constant between pruning steps
    assert f(159, frequency=10) == pytest.approx(f(150))
    assert f(160, frequency=10) == pytest.approx(0.9 - 0.9 * 0.4 ** 3)
    assert f(199, frequency=30) == pytest.approx(f(190))
    assert f(200, frequency=30) == 0.9
    values = [f(s, frequency=7) for s in range(90, 210)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_gradual_pruner_follows_schedule():
    model = Net(4)
    pruner = GradualPruner(model, 0.8, begin_step=2, end_step=8, frequency=2,
                           block_size=(4, 4), scope="layer")
    updates, prev = [], None
    for step in range(12):
        if pruner.step(step):
            updates.append(step)
        if step >= 2:
            target = cubic_sparsity(step, 0.8, 2, 8, frequency=2)
            assert pruner.sparsity == target
            for name in ("conv", "fc1", "fc2"):
                module = model.get_submodule(name)
                n_br, n_bc = _block_grid(module, (4, 4))
                assert _pruned_blocks(module.weight_mask, module, (4, 4)) == \
                    round(target * n_br * n_bc)
            mask = model.fc1.weight_mask.clone()
            if prev is not None:
                assert not (mask.bool() & ~prev.bool()).any()  # monotone
            prev = mask
    assert updates == [2, 4, 6, 8]
    assert pruner.sparsity == 0.8


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\]"),
    (dict(sparsity=1.5), r"sparsity must be in \[0, 1\]"),
    (dict(sparsity=float("nan")), r"sparsity must be in \[0, 1\]"),
    (dict(sparsity="half"), r"sparsity must be a number"),
    (dict(norm="l3"), r"unknown norm 'l3': expected one of l1, l2"),
    (dict(scope="net"), r"unknown scope 'net': expected one of layer, global"),
    (dict(block_size=0), r"block_size must be positive"),
    (dict(block_size=(4, 0)), r"block_size must be positive"),
    (dict(block_size=(-2, 2)), r"block_size must be positive"),
    (dict(block_size=(1, 2, 3)), r"block_size must be a positive int or a pair"),
])
def test_bad_arguments(kwargs, match):
    args = dict(sparsity=0.5, block_size=(1, 1), norm="l1", scope="layer")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        compute_masks(Net(), **args)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match=r"final_sparsity must be in \[0, 1\]"):
        cubic_sparsity(0, 1.2, 0, 10)
    with pytest.raises(ValueError, match="frequency must be a positive integer"):
        cubic_sparsity(0, 0.5, 0, 10, frequency=0)
    with pytest.raises(ValueError, match="end_step"):
        cubic_sparsity(0, 0.5, 10, 5)
    with pytest.raises(ValueError, match="unknown scope"):
        GradualPruner(Net(), 0.5, 0, 10, scope="all")
    with pytest.raises(ValueError, match="block_size must be positive"):
        GradualPruner(Net(), 0.5, 0, 10, block_size=(0, 4))
