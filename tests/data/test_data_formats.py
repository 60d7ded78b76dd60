"""IDX and CIFAR-10 readers: round trips through load_dataset on files written here (the IDX bytes
are built by hand from the format, not with sparsekern's writer), and every kind of corrupt file
giving a DatasetFormatError that names the file."""
import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from sparsekern.data import (DatasetFormatError, load_dataset, read_cifar_batch, read_idx,
                             read_idx_pair, write_idx)

IMAGES, LABELS = 0x00000803, 0x00000801


def idx_bytes(magic: int, dims, payload: bytes) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def put(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def random_split(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n, dtype=np.uint8))


def write_mnist_files(directory, images, labels, split="train", gz=True):
    """The two IDX files of one split, as MNIST distributes them."""
    prefix = "train" if split == "train" else "t10k"
    ext = ".gz" if gz else ""
    put(directory / f"{prefix}-images-idx3-ubyte{ext}",
        idx_bytes(IMAGES, images.shape, images.tobytes()))
    put(directory / f"{prefix}-labels-idx1-ubyte{ext}", idx_bytes(LABELS, labels.shape,
                                                                  labels.tobytes()))


def check_loaded(x, y, images, labels):
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (len(images), 1, 28, 28) and y.shape == (len(labels),)
    torch.testing.assert_close(x, torch.from_numpy(images).float().unsqueeze(1) / 255)
    assert y.tolist() == labels.tolist()


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name, subdir", [("mnist", "MNIST/raw"), ("mnist", "MNIST"),
                                          ("fashion-mnist", "FashionMNIST/raw"),
                                          ("fashion-mnist", "FashionMNIST")])
def test_idx_round_trip_torchvision_layouts(tmp_path, name, subdir, gz):
    train, test = random_split(7, 0), random_split(3, 1)
    write_mnist_files(tmp_path / subdir, *train, "train", gz)
    write_mnist_files(tmp_path / subdir, *test, "test", gz)
    check_loaded(*load_dataset(name, "train", root=tmp_path), *train)
    check_loaded(*load_dataset(name, "test", root=str(tmp_path)), *test)


def test_gz_preferred_over_plain(tmp_path):
    """torchvision's raw/ keeps both; `data fetch` writes .gz, which must win over stale files."""
    fresh, stale = random_split(4, 2), random_split(5, 3)
    write_mnist_files(tmp_path / "MNIST/raw", *stale, gz=False)
    write_mnist_files(tmp_path / "MNIST/raw", *fresh, gz=True)
    check_loaded(*load_dataset("mnist", root=tmp_path), *fresh)


@pytest.mark.parametrize("shape", [(1,), (5,), (2, 3, 4), (0, 28, 28)])
def test_write_idx_matches_the_format(tmp_path, shape):
    a = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape)
    for name in ("a.idx", "a.idx.gz"):
        write_idx(tmp_path / name, a)
        raw = (tmp_path / name).read_bytes()
        raw = gzip.decompress(raw) if name.endswith(".gz") else raw
        assert raw == idx_bytes(0x800 | len(shape), shape, a.tobytes())
        np.testing.assert_array_equal(read_idx(tmp_path / name, len(shape)), a)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(TypeError, match="uint8"):
        write_idx(tmp_path / "b.idx", a.astype(np.int32))


def _corrupt_cases():
    images, labels = random_split(4, 4)
    good_images = idx_bytes(IMAGES, images.shape, images.tobytes())
    good_labels = idx_bytes(LABELS, labels.shape, labels.tobytes())
    bad_labels = labels.copy()
    bad_labels[2] = 10
    # (case id, images file bytes, labels file bytes, which file is blamed, message pattern)
    return [
        ("magic", idx_bytes(LABELS, images.shape, images.tobytes()), good_labels, "images",
         "magic number 0x00000801, expected 0x00000803"),
        ("magic-int32", idx_bytes(0x00000C03, images.shape, images.tobytes()), good_labels,
         "images", "magic"),
        ("wrong-dims", idx_bytes(IMAGES, (4, 28, 27), images.tobytes()[:4 * 28 * 27]),
         good_labels, "images", r"\[28, 27\] pixels, expected \[28, 28\]"),
        ("truncated", good_images[:-100], good_labels, "images", "truncated"),
        ("trailing", good_images + b"\0", good_labels, "images", "trailing bytes"),
        ("short-header", good_images[:10], good_labels, "images", "shorter than the 16-byte"),
        ("empty", b"", good_labels, "images", "shorter than"),
        ("count-mismatch", good_images, idx_bytes(LABELS, (3,), labels[:3].tobytes()), "labels",
         "3 labels for the 4 images"),
        ("label-range", good_images, idx_bytes(LABELS, labels.shape, bad_labels.tobytes()),
         "labels", r"label 10 outside \[0, 10\)"),
    ]


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("case, images, labels, blamed, pattern", _corrupt_cases(),
                         ids=[c[0] for c in _corrupt_cases()])
def test_corrupt_idx_names_the_file(tmp_path, case, images, labels, blamed, pattern, gz):
    ext = ".gz" if gz else ""
    paths = {"images": tmp_path / f"MNIST/raw/train-images-idx3-ubyte{ext}",
             "labels": tmp_path / f"MNIST/raw/train-labels-idx1-ubyte{ext}"}
    put(paths["images"], images)
    put(paths["labels"], labels)
    with pytest.raises(DatasetFormatError, match=pattern) as info:
        load_dataset("mnist", "train", root=tmp_path)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(str(paths[blamed]))
    assert info.value.path == paths[blamed]


def test_broken_gzip_names_the_file(tmp_path):
    images, labels = random_split(4, 5)
    path = tmp_path / "imgs.gz"
    path.write_bytes(gzip.compress(idx_bytes(IMAGES, images.shape, images.tobytes()))[:-30])
    with pytest.raises(DatasetFormatError, match="not a valid gzip file") as info:
        read_idx(path, 3)
    assert str(path) in str(info.value)
    path.write_bytes(b"definitely not gzip data")
    with pytest.raises(DatasetFormatError, match=str(path)):
        read_idx(path, 3)


def test_read_idx_pair_custom_shape(tmp_path):
    x = np.zeros((2, 5, 6), np.uint8)
    put(tmp_path / "x", idx_bytes(IMAGES, x.shape, x.tobytes()))
    put(tmp_path / "y", idx_bytes(LABELS, (2,), bytes([1, 2])))
    images, labels = read_idx_pair(tmp_path / "x", tmp_path / "y", (5, 6))
    assert images.shape == (2, 5, 6) and labels.tolist() == [1, 2]


# ---- CIFAR-10 -----------------------------------------------------------------------------------
def cifar_batch_bytes(data, labels, old_numpy_names=True) -> bytes:
    """A batch pickled like the real files (protocol 2; numpy.core, as numpy 1.x named it)."""
    raw = pickle.dumps({b"batch_label": b"synthetic", b"labels": list(labels), b"data": data,
                        b"filenames": [b"x.png"] * len(labels)}, protocol=2)
    return raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray") if old_numpy_names \
        else raw


def write_cifar(root, sizes=(3, 2, 4, 1, 2), test_size=3, seed=0):
    rng = np.random.default_rng(seed)
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    out = {"train": ([], []), "test": ([], [])}
    names = [(f"data_batch_{i + 1}", "train", n) for i, n in enumerate(sizes)]
    for name, split, n in names + [("test_batch", "test", test_size)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        (directory / name).write_bytes(cifar_batch_bytes(data, labels, old_numpy_names=n != 2))
        out[split][0].append(data)
        out[split][1].extend(labels)
    return {k: (np.concatenate(v[0]), v[1]) for k, v in out.items()}


def test_cifar10_round_trip(tmp_path):
    expected = write_cifar(tmp_path)
    for split, n in (("train", 12), ("test", 3)):
        x, y = load_dataset("cifar10", split, root=tmp_path)
        data, labels = expected[split]
        assert x.shape == (n, 3, 32, 32) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.tolist() == labels
        # A row is the red plane, then green, then blue, each 32x32 row-major.
        assert x[1, 1, 2, 3] == data[1, 1024 + 2 * 32 + 3] / 255
        torch.testing.assert_close(x.reshape(n, -1), torch.from_numpy(data).float() / 255)


def test_cifar10_missing_batches_listed(tmp_path):
    write_cifar(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3") as info:
        load_dataset("cifar10", root=tmp_path)
    assert "cifar-10-python.tar.gz" in str(info.value)
    load_dataset("cifar10", "test", root=tmp_path)  # the test split is still complete


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless, but code: must not run


@pytest.mark.parametrize("case, payload, pattern", [
    ("truncated", cifar_batch_bytes(np.zeros((2, 3072), np.uint8), [1, 2])[:-40],
     "not a readable CIFAR"),
    ("code", pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2), "refusing to load"),
    ("not-a-dict", pickle.dumps([1, 2, 3], protocol=2), "expected a dict"),
    ("missing-key", pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "b'labels'"),
    ("wrong-shape", cifar_batch_bytes(np.zeros((2, 3000), np.uint8), [1, 2]), r"\[2, 3000\]"),
    ("wrong-dtype", cifar_batch_bytes(np.zeros((2, 3072), np.float32), [1, 2]), "float32"),
    ("count-mismatch", cifar_batch_bytes(np.zeros((2, 3072), np.uint8), [1]),
     "1 labels for 2 images"),
    ("label-range", cifar_batch_bytes(np.zeros((2, 3072), np.uint8), [1, 10]), "outside"),
])
def test_corrupt_cifar_batch_names_the_file(tmp_path, case, payload, pattern):
    path = tmp_path / "data_batch_1"
    path.write_bytes(payload)
    with pytest.raises(DatasetFormatError, match=pattern) as info:
        read_cifar_batch(path)
    assert str(info.value).startswith(str(path))
