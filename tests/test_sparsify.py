"""sparsekern.sparsify(model) and its SparsifyReport, on a small LeNet-5-like CNN and an MLP,
and SparseConv2d.from_dense as the mapping target of torch.ao.pruning's convert."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from sparsekern import SparseConv2d, SparseLinear, SparsifyReport, sparsify
from sparsekern.nn import FusedReLU
from conftest import assert_close, oracle_blocks, seeded_generator

LENET_LAYERS = ["features.0", "features.3", "classifier.0", "classifier.2", "classifier.4"]
LENET_BLOCKS = {"features.0": (1, 1), "features.3": (1, 2), "classifier.0": (8, 8),
                "classifier.2": (4, 4), "classifier.4": (2, 4)}


def lenet5() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2),
                               nn.Conv2d(6, 16, 5), nn.ReLU(), nn.AvgPool2d(2)),
        flatten=nn.Flatten(),
        classifier=nn.Sequential(nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84),
                                 nn.ReLU(), nn.Linear(84, 10)),
    )).double()


FC1_KEPT_BLOCKS = 0.3


def pruned_lenet5() -> nn.Sequential:
    """conv1: l1_unstructured 50%; conv2: ln_structured (4 of 16 output channels); fc1: zeroed by
    hand in an (8, 8) block pattern (30% of the blocks kept); fc2 dense; fc3: l1_unstructured
    60%."""
    model = lenet5()
    prune.l1_unstructured(model.features[0], "weight", amount=0.5)
    prune.ln_structured(model.features[3], "weight", amount=0.25, n=2, dim=0)
    gen = seeded_generator("fc1-blocks")
    keep = (torch.randperm(750, generator=gen) < int(FC1_KEPT_BLOCKS * 750)).reshape(15, 50)
    with torch.no_grad():
        model.classifier[0].weight *= keep.repeat_interleave(8, 0).repeat_interleave(8, 1)
    prune.l1_unstructured(model.classifier[4], "weight", amount=0.6)
    return model


def mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 10)).double()


def _zero_fraction(linear: nn.Linear, n_zero: int, seed: int) -> None:
    """Zeroes exactly n_zero weights of `linear`, at random positions."""
    gen = seeded_generator("zero", seed)
    idx = torch.randperm(linear.weight.numel(), generator=gen)[:n_zero]
    with torch.no_grad():
        linear.weight.view(-1)[idx] = 0


def _x(*shape, key="x"):
    return torch.randn(*shape, generator=seeded_generator(key, shape), dtype=torch.float64)


def _entry(report: SparsifyReport, name: str):
    (entry,) = [e for e in report.entries if e.name == name]
    return entry


def _forward_backward(model, x, g):
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(g)
    return y.detach(), x.grad


# ---- LeNet-5 -------------------------------------------------------------------------------------
def test_lenet_converted_and_skipped_layers_with_reasons():
    model = pruned_lenet5()
    calls = []

    def block_size(name, module):
        calls.append((name, type(module)))
        return LENET_BLOCKS[name]

    report = sparsify(model, block_size=block_size)
    assert report.model is model
    assert [e.name for e in report.entries] == LENET_LAYERS
    assert [e.kind for e in report.entries] == ["Conv2d", "Conv2d", "Linear", "Linear", "Linear"]
    assert report.converted == ["features.0", "features.3", "classifier.0", "classifier.4"]
    assert report.skipped == ["classifier.2"]
    # the callable is asked exactly for the layers that get converted, with the dense module
    assert calls == [("features.0", nn.Conv2d), ("features.3", nn.Conv2d),
                     ("classifier.0", nn.Linear), ("classifier.4", nn.Linear)]
    for name in report.converted:
        assert _entry(report, name).reason == f"block {LENET_BLOCKS[name]}"
    fc2 = _entry(report, "classifier.2")
    assert fc2.reason == "not pruned (0.0% zeros <= min_sparsity 0.0%)"
    assert fc2.density is None and fc2.sparsity == 0.0
    # sparsity of the dense weights and density of the converted block grids
    conv1, conv2 = _entry(report, "features.0"), _entry(report, "features.3")
    fc1, fc3 = _entry(report, "classifier.0"), _entry(report, "classifier.4")
    assert conv1.sparsity == pytest.approx(0.5) and conv1.density == pytest.approx(0.5)
    assert conv2.sparsity == pytest.approx(0.25) and conv2.density == pytest.approx(0.75)
    assert fc1.sparsity == pytest.approx(1 - FC1_KEPT_BLOCKS, abs=1e-6)
    assert fc1.density == pytest.approx(FC1_KEPT_BLOCKS, abs=1e-6)
    assert fc3.sparsity == pytest.approx(0.6, abs=1e-6)
    # the modules themselves
    assert isinstance(model.features[0], SparseConv2d)
    assert isinstance(model.features[3], SparseConv2d)
    assert isinstance(model.classifier[0], SparseLinear)
    assert type(model.classifier[2]) is nn.Linear
    assert isinstance(model.classifier[4], SparseLinear)
    for name in report.converted:
        layer = model.get_submodule(name)
        assert layer.block_size == LENET_BLOCKS[name]
        assert layer.values.dtype == torch.float64
        assert layer.density == pytest.approx(_entry(report, name).density)
    assert model.features[0].values.shape[0] == 75  # (1, 1) blocks: one per kept weight
    assert model.features[3].padding == (0, 0) and model.features[0].padding == (2, 2)


def test_lenet_outputs_and_gradients_agree():
    model = pruned_lenet5()
    x = _x(3, 1, 28, 28)
    g = _x(3, 10, key="g")
    y_before, dx_before = _forward_backward(model, x, g)
    conv1_grad = model.features[0].weight_orig.grad.clone()  # masked dense gradient
    fc2_grad = model.classifier[2].weight.grad.clone()
    fc1_grad = model.classifier[0].weight.grad.clone()

    report = sparsify(model, block_size=lambda name, m: LENET_BLOCKS[name])
    assert len(report.converted) == 4
    y_after, dx_after = _forward_backward(model, x, g)
    assert_close(y_after, y_before)
    assert_close(dx_after, dx_before)
    assert_close(model.classifier[2].weight.grad, fc2_grad)
    # gradients reach every converted layer's stored blocks, and only those
    for name in report.converted:
        layer = model.get_submodule(name)
        assert layer.values.grad is not None and layer.values.grad.shape == layer.values.shape
        assert layer.values.grad.abs().sum() > 0, name
        assert layer.bias.grad is not None and layer.bias.grad.shape == layer.bias.shape
    conv1 = model.features[0]  # (1, 1) blocks: values.grad = the dense gradient at kept weights
    gemm = conv1_grad.permute(0, 2, 3, 1).reshape(6, -1)
    assert_close(conv1.values.grad, oracle_blocks(gemm, conv1.row_idx, conv1.col_idx, 1, 1))
    fc1 = model.classifier[0]  # (8, 8) blocks of a 120 x 400 matrix: no padding
    assert_close(fc1.values.grad, oracle_blocks(fc1_grad, fc1.row_idx, fc1.col_idx, 8, 8))


def test_include_keeps_first_and_last_layers_dense():
    model = pruned_lenet5()
    x = _x(2, 1, 28, 28)
    y_before = model(x).detach()
    seen = []

    def include(name, module):
        seen.append(name)
        assert isinstance(module, (nn.Conv2d, nn.Linear))
        return name not in ("features.0", "classifier.4")

    report = sparsify(model, block_size=lambda n, m: LENET_BLOCKS[n], include=include)
    assert seen == LENET_LAYERS
    assert report.converted == ["features.3", "classifier.0"]
    assert report.skipped == ["features.0", "classifier.2", "classifier.4"]
    for name in ("features.0", "classifier.4"):
        assert _entry(report, name).reason == "excluded by `include`"
        assert _entry(report, name).density is None
    assert _entry(report, "classifier.2").reason.startswith("not pruned")
    assert type(model.features[0]) is nn.Conv2d and hasattr(model.features[0], "weight_mask")
    assert type(model.classifier[4]) is nn.Linear
    assert isinstance(model.features[3], SparseConv2d)
    assert_close(model(x), y_before)


def test_block_width_not_dividing_in_channels_is_skipped_with_reason():
    model = pruned_lenet5()
    x = _x(2, 1, 28, 28)
    y_before = model(x).detach()
    conv2 = model.features[3]
    report = sparsify(model, block_size=lambda n, m: (4, 4) if n == "features.3"
                      else LENET_BLOCKS[n])
    assert report.skipped == ["features.3", "classifier.2"]
    reason = _entry(report, "features.3").reason
    assert "block width 4 does not divide in_channels=6" in reason
    assert model.features[3] is conv2  # left untouched, still pruned
    assert_close(model(x), y_before)


def test_unsupported_convs_are_skipped_with_reason():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, padding=1)).double()
    for i in (0, 2, 4):
        prune.l1_unstructured(model[i], "weight", amount=0.5)
    x = _x(2, 4, 6, 6)
    y_before = model(x).detach()
    report = sparsify(model, block_size=(1, 1))
    assert report.converted == ["4"]
    assert report.skipped == ["0", "2"]
    assert "groups=1 only, got groups=2" in _entry(report, "0").reason
    assert "padding_mode='zeros' only, got 'reflect'" in _entry(report, "2").reason
    assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Conv2d
    assert_close(model(x), y_before)


def _snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def _check_inplace_false(model, blocks, expected_converted):
    x = _x(2, 1, 28, 28)
    y_before = model(x).detach()
    modules_before, state_before = _snapshot(model)
    report = sparsify(model, block_size=lambda n, m: blocks[n], inplace=False)
    assert report.model is not model
    assert report.converted == expected_converted
    # the original: same module types and the same state, and still the same function
    modules_after, state_after = _snapshot(model)
    assert modules_after == modules_before
    assert sorted(state_after) == sorted(state_before)
    for k in state_before:
        assert torch.equal(state_after[k], state_before[k]), k
    assert_close(model(x), y_before)
    # the copy is converted and computes the same function
    for name in expected_converted:
        assert isinstance(report.model.get_submodule(name), (SparseConv2d, SparseLinear))
        assert type(model.get_submodule(name)) in (nn.Conv2d, nn.Linear)
    assert report.model.classifier[2] is not model.classifier[2]
    assert_close(report.model(x), y_before)


def test_inplace_false_leaves_the_original_untouched():
    model = lenet5()  # pruned by hand (no torch.nn.utils.prune state)
    with torch.no_grad():
        w1 = model.features[0].weight
        w1.view(-1)[torch.randperm(w1.numel(), generator=seeded_generator("c1"))[:75]] = 0
        model.features[3].weight[::3] = 0
        model.classifier[4].weight[:, 40:] = 0
    _check_inplace_false(model, LENET_BLOCKS, ["features.0", "features.3", "classifier.4"])


# Regression: deepcopy of a torch.nn.utils.prune'd model used to fail (non-leaf `weight`).
def test_inplace_false_with_torch_prune_state():
    _check_inplace_false(pruned_lenet5(), LENET_BLOCKS,
                         ["features.0", "features.3", "classifier.0", "classifier.4"])


def test_report_str_lists_every_layer():
    model = pruned_lenet5()
    report = sparsify(model, block_size=lambda n, m: LENET_BLOCKS[n])
    text = str(report)
    lines = text.splitlines()
    assert len(lines) == 1 + len(LENET_LAYERS)
    assert lines[0].split() == ["layer", "kind", "zeros", "blocks", "result"]
    for line, entry in zip(lines[1:], report.entries):
        assert line.split()[0] == entry.name
        assert entry.kind in line and entry.reason in line
        assert ("converted:" if entry.converted else "skipped:") in line
    assert "50.0%" in lines[1]  # conv1: 50% zeros, 50% of the (1, 1) blocks kept
    assert "75.0%" in lines[2]  # conv2: 75% of the blocks kept
    fc2_line = lines[4]
    assert fc2_line.split()[1:4] == ["Linear", "0.0%", "-"]


def test_sparsify_rejects_a_bare_layer():
    with pytest.raises(ValueError, match="converts the layers inside a model"):
        sparsify(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="SparseConv2d.from_dense"):
        sparsify(nn.Conv2d(4, 4, 3))


# ---- MLP: min_sparsity ---------------------------------------------------------------------------
def _mlp_with_sparsities():
    """Layer "0": 30% zeros by hand (exactly 192 of 640); "2": 60% by hand (exactly 614 of 1024,
    59.96%); "4": l1_unstructured 20% (carries weight_mask)."""
    model = mlp()
    _zero_fraction(model[0], 192, 0)
    _zero_fraction(model[2], 614, 2)
    prune.l1_unstructured(model[4], "weight", amount=0.2)
    return model


def test_min_sparsity_threshold():
    model = _mlp_with_sparsities()
    x = _x(7, 20)
    g = _x(7, 10, key="g")
    y_before, dx_before = _forward_backward(model, x, g)
    report = sparsify(model, block_size=(1, 1), min_sparsity=0.5)
    assert report.converted == ["2", "4"]  # "4" carries a prune mask: always a candidate
    assert report.skipped == ["0"]
    assert _entry(report, "0").reason == "not pruned (30.0% zeros <= min_sparsity 50.0%)"
    assert _entry(report, "0").sparsity == pytest.approx(0.3, abs=1e-6)
    assert _entry(report, "2").density == pytest.approx(1 - 614 / 1024)
    assert _entry(report, "4").density == pytest.approx(0.8, abs=1e-3)
    assert type(model[0]) is nn.Linear and isinstance(model[2], SparseLinear)
    y_after, dx_after = _forward_backward(model, x, g)
    assert_close(y_after, y_before)
    assert_close(dx_after, dx_before)
    assert model[2].values.grad.shape == (410, 1, 1)

    # a lower threshold converts all three, a higher one keeps both hand-zeroed layers dense
    low = sparsify(_mlp_with_sparsities(), block_size=(1, 1), min_sparsity=0.25)
    assert low.converted == ["0", "2", "4"]
    high = sparsify(_mlp_with_sparsities(), block_size=(1, 1), min_sparsity=0.7)
    assert high.converted == ["4"]
    assert _entry(high, "2").reason == "not pruned (60.0% zeros <= min_sparsity 70.0%)"
    # a layer with no zero at all is never converted by default (min_sparsity=0)
    dense = sparsify(mlp(), block_size=(4, 4))
    assert dense.converted == [] and dense.skipped == ["0", "2", "4"]


# Regression: the zero fraction was a float32 mean (192/640 read as 0.30000001 > 0.3).
def test_min_sparsity_boundary_is_not_more_than():
    model = _mlp_with_sparsities()
    report = sparsify(model, block_size=(1, 1), min_sparsity=0.3)
    assert report.skipped == ["0"], str(report)
    assert _entry(report, "0").reason == "not pruned (30.0% zeros <= min_sparsity 30.0%)"
    # 614 / 1024 zeros (59.96%) is more than 0.5996 but not more than 0.599609375 (= 614/1024)
    assert sparsify(_mlp_with_sparsities(), block_size=(1, 1), min_sparsity=0.5996).converted \
        == ["2", "4"]
    assert sparsify(_mlp_with_sparsities(), block_size=(1, 1),
                    min_sparsity=614 / 1024).converted == ["4"]


def test_mlp_per_layer_blocks_and_gradients():
    model = mlp()
    prune.ln_structured(model[0], "weight", amount=0.5, n=1, dim=1)  # half the input features
    _zero_fraction(model[2], 700, 3)
    x = _x(5, 20)
    g = _x(5, 10, key="g")
    y_before, dx_before = _forward_backward(model, x, g)
    blocks = {"0": (8, 1), "2": (3, 5)}  # (3, 5): 32 x 32 is padded to 33 x 35
    report = sparsify(model, block_size=lambda n, m: blocks[n])
    assert report.converted == ["0", "2"] and report.skipped == ["4"]
    # ln_structured on dim=1 prunes whole input columns: with (8, 1) blocks exactly half the
    # block columns remain
    assert _entry(report, "0").density == pytest.approx(0.5)
    y_after, dx_after = _forward_backward(model, x, g)
    assert_close(y_after, y_before)
    assert_close(dx_after, dx_before)
    for name, block in blocks.items():
        layer = model.get_submodule(name)
        assert layer.block_size == block
        assert layer.values.grad.shape == layer.values.shape
    assert model[2].weight.padded_shape == (33, 35)


# ---- torch.ao.pruning-style conversion -----------------------------------------------------------
def test_from_dense_with_the_module_alone():
    torch.manual_seed(4)
    conv = nn.Conv2d(32, 40, 3, padding=1)
    with torch.no_grad():
        conv.weight[:, :, 0, :] = 0  # three of the nine taps
    layer = SparseConv2d.from_dense(conv)  # defaults: (32, 32) blocks, nonzero blocks, auto
    assert layer.block_size == (32, 32) and layer.backend == "auto"
    assert layer.weight.block_grid == (2, 9)
    assert layer.density == pytest.approx(12 / 18)
    x = torch.randn(2, 32, 5, 6, generator=seeded_generator("x-ao"))
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-4)


def test_torch_ao_pruning_convert_with_sparse_conv_mapping():
    from torch.ao.pruning import BaseSparsifier

    class TapSparsifier(BaseSparsifier):
        """Zeroes the `n_taps` filter taps of smallest norm (whole [C_out, C_in] slices)."""

        def update_mask(self, module, tensor_name, n_taps, **kwargs):
            param = getattr(module.parametrizations, tensor_name)
            w = param.original.detach()
            norms = w.pow(2).sum((0, 1)).flatten()
            mask = torch.ones_like(norms)
            mask[norms.argsort()[:n_taps]] = 0
            param[0].mask.data = mask.reshape(1, 1, *w.shape[2:]).expand_as(w).to(
                param[0].mask.dtype).clone()

    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(32, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 6))
    sparsifier = TapSparsifier(defaults={"n_taps": 4})
    sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    x = torch.randn(3, 32, 4, 4, generator=seeded_generator("x-ao2"))
    y_dense = model(x).detach()
    converted = sparsifier.convert(model, mapping={nn.Conv2d: SparseConv2d,
                                                   nn.Linear: SparseLinear})
    assert isinstance(converted[0], SparseConv2d)
    assert type(converted[3]) is nn.Linear  # not in the sparsifier's config: left alone
    assert converted[0].block_size == (32, 32)
    assert converted[0].density == pytest.approx(5 / 9)  # one (32, 32) block per kept tap
    y = converted(x)
    torch.testing.assert_close(y, y_dense, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    assert converted[0].values.grad.shape == (5, 32, 32)


# ---- fuse_relu -----------------------------------------------------------------------------------
def test_fuse_relu_folds_relus_after_converted_layers():
    """Every nn.ReLU right after a converted layer in an nn.Sequential becomes a FusedReLU and
    the layer gets activation="relu"; the model's outputs and gradients do not change. ReLUs
    after a layer left dense stay."""
    x, g = _x(3, 1, 28, 28), _x(3, 10, key="g")
    reference = pruned_lenet5()
    sparsify(reference, block_size=lambda name, m: LENET_BLOCKS[name])
    y_ref, dx_ref = _forward_backward(reference, x, g)
    model = pruned_lenet5()
    report = sparsify(model, block_size=lambda name, m: LENET_BLOCKS[name], fuse_relu=True)
    # fc2 (classifier.2) is dense, so its ReLU (classifier.3) stays
    assert report.fused == ["features.1", "features.4", "classifier.1"]
    assert "ReLU fused into the layer before it" in str(report)
    for relu, layer in (("features.1", "features.0"), ("features.4", "features.3"),
                        ("classifier.1", "classifier.0")):
        assert type(model.get_submodule(relu)) is FusedReLU
        assert model.get_submodule(layer).activation == "relu"
        assert "activation='relu'" in repr(model.get_submodule(layer))
    assert type(model.classifier[3]) is nn.ReLU
    assert model.classifier[4].activation is None  # the last layer: no ReLU after it
    y, dx = _forward_backward(model, x, g)
    assert_close(y, y_ref)
    assert_close(dx, dx_ref)
    for name in report.converted:
        assert_close(model.get_submodule(name).values.grad,
                     reference.get_submodule(name).values.grad)
        assert_close(model.get_submodule(name).bias.grad, reference.get_submodule(name).bias.grad)


def test_fused_layer_to_dense_keeps_the_relu():
    model = pruned_lenet5()
    sparsify(model, block_size=lambda name, m: LENET_BLOCKS[name], fuse_relu=True)
    x = _x(2, 1, 28, 28)
    conv = model.features[0]
    dense = conv.to_dense()
    assert isinstance(dense, nn.Sequential) and type(dense[1]) is nn.ReLU
    assert_close(dense(x), conv(x))
    fc = model.classifier[0]
    h = _x(2, 400, key="h")
    assert_close(fc.to_dense()(h), fc(h))


def test_bad_activation_is_rejected():
    with pytest.raises(ValueError, match="activation"):
        SparseLinear(8, 8, block_size=4, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        SparseConv2d(4, 8, 3, block_size=4, activation="tanh")
