"""Readers (and the one writer) for the standard dataset files: IDX (MNIST, Fashion-MNIST) and
CIFAR-10 python batches. Everything is checked against the format before it is trusted, so a
corrupt or truncated file raises DatasetFormatError naming the file instead of yielding garbage.
"""
from __future__ import annotations

import gzip
import io
import pickle
import zlib
from pathlib import Path

import numpy as np

IDX_UBYTE = 0x08            # the only IDX element type these datasets use
IDX_IMAGES_MAGIC = 0x00000803  # ubyte, 3 dims [N, H, W]
IDX_LABELS_MAGIC = 0x00000801  # ubyte, 1 dim [N]


class DatasetFormatError(ValueError):
    """A dataset file exists but does not hold what its format promises."""

    def __init__(self, path, problem: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}")


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when the name ends in .gz."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DatasetFormatError(path, f"not a valid gzip file ({e})") from e


def read_idx(path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `ndim` dimensions (gzipped or not) -> uint8 array of
    the shape its header declares, e.g. [N, 28, 28] for MNIST images (ndim=3), [N] for labels."""
    path = Path(path)
    data = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetFormatError(path, f"{len(data)} bytes, shorter than the {header}-byte IDX "
                                       "header (truncated?)")
    magic = int.from_bytes(data[:4], "big")
    expected = (IDX_UBYTE << 8) | ndim
    if magic != expected:
        raise DatasetFormatError(path, f"IDX magic number 0x{magic:08x}, expected "
                                       f"0x{expected:08x} (unsigned bytes, {ndim} dims)")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    size = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != size:
        what = "truncated" if len(data) < size else "trailing bytes"
        raise DatasetFormatError(path, f"{len(data)} bytes but the header {list(dims)} implies "
                                       f"{size} ({what})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def write_idx(path, array: np.ndarray) -> None:
    """Write a uint8 array (any ndim) as an IDX file, gzipped when the name ends in .gz. The
    write goes through a temporary file, so an interrupted write never leaves a partial file."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"write_idx writes uint8 arrays only, got {array.dtype}")
    header = ((IDX_UBYTE << 8) | array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.tobytes()
    if path.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)  # mtime=0: same input, same bytes
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    tmp.replace(path)


def read_idx_pair(images_path, labels_path, image_shape=(28, 28),
                  num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Matching IDX images and labels files -> (images uint8 [N, H, W], labels uint8 [N]),
    checking the image size, the label range and that both files hold the same number of items."""
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if images.shape[1:] != tuple(image_shape):
        raise DatasetFormatError(images_path, f"images of {list(images.shape[1:])} pixels, "
                                              f"expected {list(image_shape)}")
    if len(labels) != len(images):
        raise DatasetFormatError(labels_path, f"{len(labels)} labels for the {len(images)} "
                                              f"images of {images_path}")
    if labels.size and labels.max() >= num_classes:
        raise DatasetFormatError(labels_path, f"label {labels.max()} outside [0, {num_classes})")
    return images, labels


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, nothing else: a data file should never be
    able to run code."""
    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
                ("_codecs", "encode")}  # how Python 3 writes bytes at pickle protocol 2

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            # numpy 2 renamed numpy.core (named by the real CIFAR files) to numpy._core.
            module = module.replace("numpy.core", "numpy._core")
        return super().find_class(module, name)


def read_cifar_batch(path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 python batch (a pickled dict with b'data' uint8 [N, 3072] and b'labels' [N])
    -> (images uint8 [N, 3, 32, 32], labels uint8 [N])."""
    path = Path(path)
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError) as e:
        raise DatasetFormatError(path, f"not a readable CIFAR python batch ({e})") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetFormatError(path, f"expected a dict with b'data' and b'labels', got {found}")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetFormatError(path, f"b'data' is {data.dtype} {list(data.shape)}, expected "
                                       "uint8 [N, 3072]")
    if labels.ndim != 1 or len(labels) != len(data):
        raise DatasetFormatError(path, f"{labels.size} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetFormatError(path, f"labels outside [0, {num_classes})")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.uint8)
