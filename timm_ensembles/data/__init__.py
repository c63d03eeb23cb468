"""Datasets and loaders for the training script.

Three sources, picked by the dataset name given to :func:`create_datasets`:

* the embedded default (``'digits'``, or no name and no folder): scikit-learn's 1797 real 8x8 handwritten digits,
  which ship inside scikit-learn, so that a fresh install trains offline;
* MNIST-format IDX folders (``'fashion-mnist'``, ``'idx:<folder>'`` or a folder path): MNIST, Fashion-MNIST, KMNIST
  and the like as they are distributed, read into memory;
* anything timm's ``create_dataset`` knows: ``torch/<name>``, ``hfds/<name>``, ``hfids/<name>``, image folders. No
  name with a folder (``root``) reads that folder, as timm's train.py reads ``--data-dir`` with ``--dataset ''``.
  Image folders are read strictly: the split folders must exist (timm falls back to the root, which would validate
  on the training images), hold the same classes, and neither contain the other.

Datasets yield ``(PIL image, int label)`` and take a settable ``transform`` (like timm's ``ImageDataset``).
:func:`create_loaders` sets timm's train / eval transforms and builds plain DataLoaders; the training script's
Accelerate ``prepare`` adds the distributed sampling.

Modules: ``sources`` (the names and ``create_datasets``), ``idx`` (the IDX reader), ``folders`` (image folders),
``datasets`` (the dataset classes), ``splits`` (subsets, the holdout), ``loaders`` (``create_loaders``,
``create_eval_loader``), ``tensors`` (in-memory preprocessed datasets and batch augmentation).
"""
from .datasets import ArrayImageDataset, DatasetInfo, ModeConvertDataset, match_channels, set_img_mode
from .idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_idx_folder, read_idx
from .loaders import create_eval_loader, create_loaders
from .sources import create_datasets, is_embedded, resolve_source
from .splits import SubsetDataset, check_labels, split_holdout, subset_dataset

__all__ = [
    'DatasetInfo', 'ArrayImageDataset', 'SubsetDataset', 'ModeConvertDataset', 'create_datasets', 'create_loaders',
    'is_embedded', 'read_idx', 'load_idx_folder', 'subset_dataset', 'set_img_mode', 'FASHION_MNIST_DIR',
    'FASHION_MNIST_CLASSES', 'match_channels', 'split_holdout', 'create_eval_loader', 'check_labels',
    'resolve_source',
]
