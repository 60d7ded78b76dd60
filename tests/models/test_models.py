"""sparsekern.models: the study's reference models, dense and directly block-sparse."""
import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.models import (DEFAULT_KEEP_DENSE, MODELS, build_model, model_names,
                               weight_layers)
from sparsekern.nn import SparseConv2d, SparseLinear
from sparsekern.prune import magnitude_prune

NAMES = ("lenet-300-100", "lenet-5", "vgg-like", "resnet20", "resnet32")
BLOCKS = ((1, 1), (4, 4), (16, 16))
SPARSE = (SparseLinear, SparseConv2d)


def pid(value):
    """Test ids: model names as they are, blocks as 4x4."""
    return value if isinstance(value, str) else "x".join(map(str, value))


def sparse_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SPARSE)]


def keep_for(name, block):
    """The default keep_dense, plus LeNet-5's conv2 (20 input channels) when 16 does not fit."""
    keep = DEFAULT_KEEP_DENSE[name]
    return keep + ("indivisible",) if block == (16, 16) else keep


def random_input(model, n=3):
    return torch.rand(n, *model.input_shape, generator=torch.Generator().manual_seed(0))


def test_registry():
    assert model_names() == list(NAMES)
    assert set(MODELS) == set(NAMES)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'lenet-4'") as err:
        build_model("lenet-4")
    for name in NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_dense_build(name):
    model = build_model(name, seed=0)
    assert not sparse_layers(model)
    x = random_input(model)
    assert x.shape[1:] == ((1, 28, 28) if name.startswith("lenet") else (3, 32, 32))
    assert model(x).shape == (3, 10)


@pytest.mark.parametrize("block", BLOCKS, ids=pid)
@pytest.mark.parametrize("name", NAMES)
def test_sparse_build_forward_backward(name, block):
    """Output [N, 10]; the gradient reaches every layer's stored blocks."""
    model = build_model(name, sparse=True, block_size=block, density=0.25, seed=1,
                        keep_dense=keep_for(name, block))
    layers = sparse_layers(model)
    dense = [n for n, _ in weight_layers(model)]
    assert dense == list(model.keep_dense)
    assert len(layers) + len(dense) >= 3
    for n, m in layers:
        assert m.block_size == block, n
    y = model(random_input(model, n=2))
    assert y.shape == (2, 10)
    y.square().sum().backward()
    for n, m in layers:
        assert m.values.grad is not None and m.values.grad.shape == m.values.shape, n
        assert m.values.grad.abs().sum() > 0, n


def test_indivisible_block_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'conv2'.*block width 16 does not divide "
                                         r"in_channels=20.*indivisible"):
        build_model("lenet-5", sparse=True, block_size=(16, 16), density=0.5)
    # with every layer sparse, the 3-channel first conv cannot take 4-wide blocks
    with pytest.raises(ValueError, match="'conv1'.*in_channels=3"):
        build_model("resnet20", sparse=True, block_size=(4, 4), density=0.5, keep_dense=())


def test_keep_dense_choices():
    every = build_model("resnet20", sparse=True, density=0.5, keep_dense=())
    assert every.keep_dense == () and not weight_layers(every)
    named = build_model("vgg-like", sparse=True, density=0.5, keep_dense=("fc1", "first"))
    assert named.keep_dense == ("features.0", "fc1")
    assert isinstance(named.fc2, SparseLinear) and type(named.fc1) is nn.Linear
    with pytest.raises(ValueError, match="'conv9'.*neither a role.*conv1, conv2, fc1, fc2"):
        build_model("lenet-5", sparse=True, density=0.5, keep_dense=("conv9",))
    assert build_model("lenet-5").keep_dense == ("conv1", "fc2")  # recorded on dense builds


def test_dense_build_rejects_density():
    with pytest.raises(ValueError, match="sparse=True"):
        build_model("lenet-5", density=0.5)


def test_parameter_counts():
    def count(model):
        return sum(p.numel() for p in model.parameters())

    assert count(build_model("lenet-300-100")) == 266_610
    assert count(build_model("lenet-5")) == 431_080
    # He et al. 2016, Table 6: 0.27 M and 0.46 M
    assert round(count(build_model("resnet20")) / 1e6, 2) == 0.27
    assert round(count(build_model("resnet32")) / 1e6, 2) == 0.46


@pytest.mark.parametrize("name,n_convs", [("resnet20", 19), ("resnet32", 31)])
def test_resnet_depth(name, n_convs):
    for sparse in (False, True):
        model = build_model(name, sparse=sparse, density=0.5 if sparse else 1.0)
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, SparseConv2d))]
        fcs = [m for m in model.modules() if isinstance(m, (nn.Linear, SparseLinear))]
        assert (len(convs), len(fcs)) == (n_convs, 1)


@pytest.mark.parametrize("name,block", [("lenet-300-100", (1, 1)), ("lenet-5", (1, 1)),
                                        ("lenet-300-100", (4, 4)), ("vgg-like", (4, 4))],
                         ids=pid)
def test_sparse_build_density(name, block):
    """Each sparse layer stores round(d * n_blocks) blocks; with (1, 1) blocks about d of the
    weights of the sparse layers are stored."""
    d = 0.2
    model = build_model(name, sparse=True, block_size=block, density=d, seed=2)
    stored = total = 0
    for n, m in sparse_layers(model):
        n_br, n_bc = m.weight.block_grid
        assert m.weight.nnz_blocks == round(d * n_br * n_bc), n
        stored += m.values.numel()
        total += m.weight_shape[0] * m.weight_shape[1]
    if block == (1, 1):
        assert abs(stored / total - d) < 1e-3
    else:
        assert abs(stored / total - d) < 0.05  # padding of the last block row / column


def test_seed_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_model("resnet20", sparse=True, block_size=(4, 4), density=0.3, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_model("resnet20", sparse=True, block_size=(4, 4), density=0.3, seed=7)
    c = build_model("resnet20", sparse=True, block_size=(4, 4), density=0.3, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layer1.0.conv1.values"], sc["layer1.0.conv1.values"])


def test_num_classes_and_in_channels():
    mlp = build_model("lenet-300-100", in_channels=3, num_classes=7)
    assert mlp.fc1.in_features == 3 * 28 * 28
    assert mlp(torch.rand(2, 3, 28, 28)).shape == (2, 7)
    net = build_model("resnet20", sparse=True, density=0.5, num_classes=100, in_channels=1)
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name,block", [("lenet-300-100", (1, 1)), ("lenet-5", (1, 1)),
                                        ("vgg-like", (4, 4)), ("resnet20", (4, 4))],
                         ids=pid)
def test_pruned_then_sparsified_matches(name, block):
    """Magnitude-prune the layers a sparse build would make sparse, sparsify: same outputs."""
    model = build_model(name, seed=3).eval()
    prunable = [n for n, _ in weight_layers(model) if n not in model.keep_dense]
    magnitude_prune(model, 0.7, block_size=block, layers=prunable)
    x = random_input(model, n=4)
    with torch.no_grad():
        expected = model(x)
    report = sparsekern.sparsify(model, block_size=block,
                                 include=lambda n, m: n not in model.keep_dense)
    assert report.converted == prunable
    assert [n for n, _ in sparse_layers(model)] == prunable
    with torch.no_grad():
        actual = model(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
