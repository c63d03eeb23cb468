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
"""
import copy
import functools
import gzip
import logging
import math
import os
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import ImageDataset, create_dataset, create_transform, get_img_extensions
from timm.data.auto_augment import posterize as timm_posterize
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..utils.checks import is_whole
from ..utils.extras import require
from .tensors import FAST_INTERPOLATIONS, BatchAugmentDataset, PreprocessedDataset, batch_collate

__all__ = [
    'DatasetInfo', 'ArrayImageDataset', 'SubsetDataset', 'ModeConvertDataset', 'create_datasets', 'create_loaders',
    'is_embedded', 'read_idx', 'load_idx_folder', 'subset_dataset', 'set_img_mode', 'FASHION_MNIST_DIR',
    'FASHION_MNIST_CLASSES', 'match_channels', 'split_holdout', 'create_eval_loader', 'check_labels',
]

_logger = logging.getLogger(__name__)

# where Debian's dataset-fashion-mnist package installs the (gzipped) IDX files
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim
_IDX_STEMS = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}

_TIMM_PREFIXES = ('torch', 'hfds', 'hfids', 'tfds', 'wds')
# torchvision datasets of small images (28x28 or 32x32) whose natural model input is 32x32
_TORCH_SMALL = ('cifar10', 'cifar100', 'mnist', 'kmnist', 'qmnist', 'fashion_mnist')
# sets of digits / characters, which a horizontal flip turns into other (or no) classes
_NO_HFLIP = ('digits', 'mnist', 'qmnist', 'kmnist', 'emnist', 'svhn', 'usps')

_TRAIN_SPLITS = ('train', 'training')
_EVAL_SPLITS = ('validation', 'val', 'valid', 'eval', 'evaluation', 'test', 't10k')

_ACCEPTED = (
    "Accepted dataset names: 'digits' (the embedded default, when neither a name nor --data-dir is given); "
    f"'fashion-mnist' (IDX files in {FASHION_MNIST_DIR}, or in --data-dir when given); "
    "'idx:<folder>' or the path of a folder holding MNIST-format IDX files (train-images-idx3-ubyte, "
    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each optionally .gz); "
    "the path of an image folder (<split>/<class>/<image>), or no name with --data-dir naming one; "
    "or a timm dataset name such as 'torch/cifar10' or 'hfds/<hub name>' with --data-dir.")


@dataclass
class DatasetInfo:
    """What the training script needs to know about a dataset.

    Attributes:
        name: Canonical name: 'digits', 'idx:<absolute folder>', the path of an image folder, or the timm name.
        num_classes: Number of classes; -1 when the dataset does not expose them (the caller must then pass it).
        class_names: Class names indexed by label, None when unknown.
        default_img_size: Natural model input size for datasets of small images, None for others.
        default_hflip: Horizontal flip probability that suits the data (0 for digits, which flips would corrupt).
        split_paths: For an image folder, the (training, validation) split folders it was read from.
    """
    name: str
    num_classes: int
    class_names: list[str] | None
    default_img_size: int | None
    default_hflip: float
    split_paths: tuple[str, str] | None = None


class ArrayImageDataset(Dataset):
    """In-memory grayscale images as a map-style dataset.

    Yields ``(PIL image in img_mode, int label)``, with ``transform`` / ``target_transform`` applied when set.
    """

    def __init__(
            self,
            images: np.ndarray,
            targets: Any,
            img_mode: str = 'RGB',
            transform: Callable | None = None,
            target_transform: Callable | None = None,
    ):
        """
        Args:
            images: uint8 array [N, H, W].
            targets: N integer labels.
            img_mode: PIL mode of the yielded images ('L', 'RGB', ...).
            transform: Applied to each image.
            target_transform: Applied to each label.
        """
        images = np.asarray(images)
        targets = np.asarray(targets, dtype=np.int64)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f'Expected uint8 images [N, H, W], got {images.dtype} of shape {images.shape}.')
        if targets.shape != (len(images),):
            raise ValueError(f'Expected {len(images)} labels, got shape {targets.shape}.')
        self.images = images
        self.targets = targets
        self.img_mode = img_mode
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index])  # uint8 [H, W] -> mode 'L'
        if self.img_mode and self.img_mode != img.mode:
            img = img.convert(self.img_mode)
        target = int(self.targets[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


class SubsetDataset(Dataset):
    """A subset of a map-style dataset whose ``transform`` is that of the dataset it selects from.

    Unlike ``torch.utils.data.Subset``, setting ``transform`` here sets it on the underlying dataset, so that
    :func:`create_loaders` treats a subset like any other dataset. Each subset should own its underlying dataset.
    """

    def __init__(self, dataset: Dataset, indices: Any):
        """
        Args:
            dataset: Map-style dataset to select from.
            indices: Indices into ``dataset``, in the order the subset yields them.
        """
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)

    @property
    def transform(self):
        return getattr(self.dataset, 'transform', None)

    @transform.setter
    def transform(self, transform):
        self.dataset.transform = transform

    @property
    def targets(self) -> np.ndarray | None:
        """Labels of the subset, None when the underlying dataset does not expose its labels."""
        targets = _get_targets(self.dataset)
        return None if targets is None else targets[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[int(self.indices[index])]


class ModeConvertDataset(Dataset):
    """Converts the images of a ``(PIL image, label)`` dataset to ``img_mode``, then applies its own transform.

    torchvision datasets yield their native mode (MNIST 'L', CIFAR 'RGB') and apply their transform inside
    ``__getitem__``, before any conversion could happen, so this wrapper takes their transform over.
    """

    def __init__(self, dataset: Dataset, img_mode: str | None = 'RGB', transform: Callable | None = None):
        """
        Args:
            dataset: Map-style dataset yielding (PIL image, label); its own ``transform`` is cleared.
            img_mode: PIL mode of the yielded images, None to keep the native one.
            transform: Applied to each converted image.
        """
        self.dataset = dataset
        if getattr(dataset, 'transform', None) is not None:
            dataset.transform = None
        self.img_mode = img_mode
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, target = self.dataset[index][:2]
        if self.img_mode and isinstance(img, Image.Image) and img.mode != self.img_mode:
            img = img.convert(self.img_mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def is_embedded(name: str | None) -> bool:
    """Whether ``name`` selects the embedded default dataset (scikit-learn's digits): None, '' or 'digits'."""
    return name is None or name.strip().lower() in ('', 'digits')


def read_idx(path: str, expected_magic: int | None = None) -> np.ndarray:
    """Read one MNIST-format IDX file of unsigned bytes, gzipped when the name ends with '.gz'.

    Args:
        path: File path.
        expected_magic: 0x00000803 to accept only images, 0x00000801 only labels, None for either.

    Returns:
        uint8 array: [N, rows, cols] for images, [N] for labels.

    Raises:
        ValueError: The file is not a (valid gzip of an) IDX file of unsigned bytes, the wrong kind, truncated,
            or longer than its header says.
    """
    try:
        opener = gzip.open if path.endswith('.gz') else open
        with opener(path, 'rb') as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f'IDX file {path} is not a valid gzip file or is truncated: {e}') from e

    if len(data) < 4:
        raise ValueError(f'IDX file {path} is truncated: {len(data)} bytes, less than the 4-byte magic number.')
    magic = int.from_bytes(data[:4], 'big')
    accepted = (expected_magic,) if expected_magic is not None else (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC)
    if magic not in accepted:
        expected = ' or '.join(
            f'0x{m:08x} ({"images" if m == _IDX_IMAGES_MAGIC else "labels"})' for m in accepted)
        raise ValueError(
            f'Bad magic number 0x{magic:08x} in IDX file {path}: expected {expected}, '
            f'as in MNIST-format files of unsigned bytes.')

    ndim = magic & 0xff
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f'IDX file {path} is truncated: {len(data)} bytes, less than its {header_len}-byte header.')
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    count = math.prod(shape)
    expected_len = header_len + count
    if len(data) < expected_len:
        raise ValueError(
            f'IDX file {path} is truncated: its header says shape {shape} ({expected_len} bytes) '
            f'but it has {len(data)} bytes.')
    if len(data) > expected_len:
        raise ValueError(
            f'IDX file {path} is corrupt: its header says shape {shape} ({expected_len} bytes) '
            f'but it has {len(data)} bytes.')
    return np.frombuffer(data, dtype=np.uint8, count=count, offset=header_len).reshape(shape)


def _find_idx_file(folder: str, stem: str) -> str | None:
    # 'train-images.idx3-ubyte' is how some MNIST mirrors spell the names
    for name in (stem, stem.replace('-idx', '.idx')):
        for candidate in (name, name + '.gz'):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    return None


def _has_idx_files(folder: str) -> bool:
    return any(_find_idx_file(folder, stem) for stems in _IDX_STEMS.values() for stem in stems)


def load_idx_folder(folder: str, part: str = 'train') -> tuple[np.ndarray, np.ndarray]:
    """Read the images and labels of one part of an MNIST-format IDX folder.

    Args:
        folder: Folder holding the IDX files (raw or .gz).
        part: 'train' for train-*, 'test' for t10k-*.

    Returns:
        uint8 images [N, rows, cols] and uint8 labels [N].

    Raises:
        FileNotFoundError: A file of that part is missing.
        ValueError: A file is invalid, holds no images or images of no pixels, or images and labels differ in number.
    """
    paths = []
    for stem in _IDX_STEMS[part]:
        path = _find_idx_file(folder, stem)
        if path is None:
            raise FileNotFoundError(
                f'IDX folder {folder} has no {stem} (nor {stem}.gz); an IDX dataset folder needs '
                f'{", ".join(s for stems in _IDX_STEMS.values() for s in stems)} (each optionally .gz).')
        paths.append(path)
    images = read_idx(paths[0], _IDX_IMAGES_MAGIC)
    labels = read_idx(paths[1], _IDX_LABELS_MAGIC)
    if len(images) == 0 or 0 in images.shape[1:]:
        what = 'no images' if len(images) == 0 else f'images of {images.shape[1]}x{images.shape[2]} pixels'
        raise ValueError(f'IDX file {paths[0]} holds {what} (its header says shape {images.shape}): an IDX dataset'
                         f' needs at least one image, of 1x1 pixels or more, in each part (here: {part}).')
    if len(images) != len(labels):
        raise ValueError(
            f'IDX image / label count mismatch: {paths[0]} holds {len(images)} images '
            f'but {paths[1]} holds {len(labels)} labels.')
    return images, labels


def _fixed_split(split: str, source: str) -> str:
    # sources with a fixed train / test partition: map timm's split names onto it
    name = split.split('[')[0].strip().lower()
    if name in _TRAIN_SPLITS:
        return 'train'
    if name in _EVAL_SPLITS:
        return 'test'
    raise ValueError(
        f"Split {split!r} does not exist in {source}: use 'train' or 'validation' (also 'val' or 'test').")


def _natural_img_size(side: int) -> int:
    # smallest multiple of 32 that holds the image: 8x8 digits and 28x28 MNIST -> 32, the minimum most
    # timm models (5 stride-2 stages) accept
    return max(32, 32 * math.ceil(side / 32))


def _create_digits(train_split: str, val_split: str, img_mode: str):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # values are 0..16 (counts of set pixels in 4x4 blocks of the 32x32 originals)
    images = np.rint(digits.images * (255. / 16.)).clip(0, 255).astype(np.uint8)
    targets = digits.target.astype(np.int64)
    # fixed split, independent of any training seed, so runs with different seeds validate on the same images
    train_idx, val_idx = train_test_split(
        np.arange(len(targets)), test_size=0.2, stratify=targets, random_state=0)
    parts = {'train': train_idx, 'test': val_idx}

    def _part(split):
        idx = parts[_fixed_split(split, "the 'digits' dataset")]
        return ArrayImageDataset(images[idx], targets[idx], img_mode=img_mode)

    info = DatasetInfo(
        name='digits',
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        default_img_size=32,
        default_hflip=0.,
    )
    return _part(train_split), _part(val_split), info


def _create_idx(folder: str, train_split: str, val_split: str, img_mode: str, alias: str | None = None):
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(folder):
        hint = ''
        if alias == 'fashion-mnist' and folder == FASHION_MNIST_DIR:
            hint = ' (Debian\'s dataset-fashion-mnist package installs it there; or pass its folder as --data-dir)'
        raise FileNotFoundError(f'IDX dataset folder {folder} does not exist{hint}. {_ACCEPTED}')
    source = f'the IDX dataset {folder}'
    parts = {_fixed_split(train_split, source), _fixed_split(val_split, source)}
    # read each part once, the two datasets share the arrays when both splits name the same part
    arrays = {part: load_idx_folder(folder, part) for part in sorted(parts)}
    train_images, train_labels = arrays[_fixed_split(train_split, source)]
    val_images, val_labels = arrays[_fixed_split(val_split, source)]

    max_label = int(max(train_labels.max(initial=0), val_labels.max(initial=0)))
    present = np.union1d(np.unique(train_labels), np.unique(val_labels))
    if len(present) != max_label + 1:
        # one corrupt label byte would otherwise make a model of 201 classes without a word
        missing = sorted(set(range(max_label + 1)) - set(present.tolist()))
        counts = {int(c): int((train_labels == c).sum() + (val_labels == c).sum()) for c in present}
        rare = sorted(counts, key=counts.get)[:3]
        raise ValueError(
            f'IDX dataset {folder}: its labels are not the classes 0..K-1 (the highest is {max_label}, but'
            f' {len(missing)} classes below it never occur, e.g. {missing[:5]}); the rarest labels are'
            f' {", ".join(f"{c} ({counts[c]} images)" for c in rare)}: a corrupt label file?')
    # Fashion-MNIST's names and flips only for Fashion-MNIST itself, not for any folder whose name says 'fashion'
    is_fashion = (alias == 'fashion-mnist' or folder == FASHION_MNIST_DIR) and max_label < len(FASHION_MNIST_CLASSES)
    if is_fashion:
        class_names = list(FASHION_MNIST_CLASSES)
    else:
        class_names = [str(i) for i in range(max_label + 1)]
    info = DatasetInfo(
        name=f'idx:{folder}',
        num_classes=len(class_names),
        class_names=class_names,
        default_img_size=_natural_img_size(max(train_images.shape[1:])),
        default_hflip=0.5 if is_fashion else 0.,
    )
    train_ds = ArrayImageDataset(train_images, train_labels, img_mode=img_mode)
    val_ds = ArrayImageDataset(val_images, val_labels, img_mode=img_mode)
    return train_ds, val_ds, info


def _class_names(ds) -> list[str] | None:
    classes = getattr(ds, 'classes', None)  # torchvision datasets
    if classes is not None and len(classes):
        return [str(c) for c in classes]
    class_to_idx = getattr(ds, 'class_to_idx', None)
    if not class_to_idx:
        class_to_idx = getattr(getattr(ds, 'reader', None), 'class_to_idx', None)  # timm readers
    if not class_to_idx:
        return None
    try:
        num_classes = max(int(i) for i in class_to_idx.values()) + 1
    except (TypeError, ValueError):
        return None
    names = [str(i) for i in range(num_classes)]
    for name, index in class_to_idx.items():
        names[int(index)] = str(name)
    return names


def _timm_img_size(name: str) -> int | None:
    prefix, _, rest = name.partition('/')
    if prefix.lower() == 'torch' and rest.lower() in _TORCH_SMALL:
        return 32
    return None


def _create_timm(
        name: str,
        root: str | None,
        train_split: str,
        val_split: str,
        img_mode: str,
        download: bool,
        is_folder: bool = False,
        label: str = '',
):
    prefix = name.partition('/')[0].lower()
    if prefix in ('hfds', 'hfids'):
        require('datasets', f'--dataset {name} (a dataset on the Hugging Face Hub, read by timm)')
    if prefix == 'torch':
        if not root:
            raise ValueError(
                f'{name} needs --data-dir (root): torchvision datasets are read from (and, with --dataset-download, '
                f'downloaded to) a folder.')
        if not download and not os.path.isdir(root):
            raise FileNotFoundError(
                f'--data-dir {root} does not exist: point it to where {name} is stored, or pass --dataset-download '
                f'to fetch {name} there.')

    kwargs = dict(root=root, download=download, input_img_mode=img_mode)
    split_paths = None
    if is_folder:
        train_ds, val_ds, split_paths = _create_image_folder(root, train_split, val_split, img_mode,
                                                                label or f'--data-dir {root}')
    else:
        train_ds = create_dataset(name, split=train_split, is_training=True, **kwargs)
        val_ds = create_dataset(name, split=val_split, **kwargs)

    class_names = _class_names(train_ds)
    if prefix == 'torch':
        train_ds, val_ds = ModeConvertDataset(train_ds, img_mode), ModeConvertDataset(val_ds, img_mode)

    canonical = os.path.abspath(root) if is_folder else name
    info = DatasetInfo(
        name=canonical,
        num_classes=len(class_names) if class_names else -1,
        class_names=class_names,
        default_img_size=None if is_folder else _timm_img_size(name),
        default_hflip=0. if name.rstrip('/').rsplit('/', 1)[-1].lower() in _NO_HFLIP else 0.5,
        split_paths=split_paths,
    )
    return train_ds, val_ds, info


# timm's split synonyms (timm.data.dataset_factory): a split folder may be named by any of its group
_FOLDER_SYNONYMS = (('train', 'training'), ('validation', 'val', 'valid', 'eval', 'evaluation'))


def _has_images(folder: str) -> bool:
    """Whether ``folder`` holds an image timm's folder reader would read, at any depth (stops at the first)."""
    types = get_img_extensions(as_set=True)
    for _, _, files in os.walk(folder, followlinks=True):
        if any(os.path.splitext(f)[1].lower() in types for f in files):
            return True
    return False


def _subfolders(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def _holds_images_directly(folder: str) -> bool:
    """Whether ``folder`` itself holds images (not only in subfolders): a class folder, not a split folder."""
    types = get_img_extensions(as_set=True)
    return any(os.path.splitext(e.name)[1].lower() in types for e in os.scandir(folder) if e.is_file())


def _split_folder(root: str, split: str) -> str | None:
    """The folder of ``split`` under ``root``: ``root/<split>``, else a folder named by one of its timm synonyms
    (``val`` for ``validation``, ...); None when there is none. timm's ``create_dataset`` falls back to ``root``
    itself, which would validate on the training images."""
    name = split.split('[')[0]
    candidates = [name] + [s for group in _FOLDER_SYNONYMS if name in group for s in group if s != name]
    for candidate in candidates:
        path = os.path.join(root, candidate)
        if candidate and os.path.isdir(path):
            return path
    return None


def _check_image_folder(root: str, label: str) -> None:
    """A folder given as an image dataset exists, is not empty and holds images, or one line says which it is not."""
    if not os.path.exists(root):
        raise FileNotFoundError(f'{label} does not exist.')
    if not os.path.isdir(root):
        raise ValueError(f'{label} is a file; expected a folder. {_ACCEPTED}')
    if not os.listdir(root):
        raise ValueError(f'{label} is empty: an image folder holds <split>/<class>/<image> files (e.g.'
                         f' train/cat/1.png and validation/cat/2.png).')
    if not _has_images(root):
        raise ValueError(f"{label} holds no images (timm reads {', '.join(get_img_extensions())}) and no"
                         f' MNIST-format IDX files. {_ACCEPTED}')


def _class_folders(split_path: str, split: str, split_arg: str) -> set[str]:
    """The class folders of one split folder, each holding images; an empty one, or images outside any, are
    refused (timm would drop the class, or make a class named ''). A hidden folder (``.ipynb_checkpoints``) counts
    only when it holds images, as timm then makes it a class."""
    if _holds_images_directly(split_path):
        raise ValueError(f'{split_arg} {split!r}: {split_path} holds images directly; put each class\'s images in'
                         f' a subfolder named after the class ({split_path}/<class>/<image>).')
    classes, empty = set(), []
    for name in _subfolders(split_path):
        if _has_images(os.path.join(split_path, name)):
            classes.add(name)
        elif not name.startswith('.'):
            empty.append(name)
    if empty:
        raise ValueError(f'{split_arg} {split!r}: the class folder{"s" if len(empty) > 1 else ""}'
                         f' {", ".join(os.path.join(split_path, e) for e in empty)} hold{"" if len(empty) > 1 else "s"}'
                         f' no images: fill {"them" if len(empty) > 1 else "it"} or remove'
                         f' {"them" if len(empty) > 1 else "it"} (from every split).')
    return classes


def _create_image_folder(root: str, train_split: str, val_split: str, img_mode: str, label: str):
    """The training and validation sets of an image folder (``root/<split>/<class>/<image>``), read by timm's
    ``create_dataset`` as timm's train.py reads ``--data-dir``, but strictly: each split folder must exist (timm
    falls back to ``root``), neither may contain the other, both hold the same two or more classes, none empty."""
    if os.path.isfile(root) and root.endswith('.tar'):  # a tar of class folders: no split folders to tell apart
        raise ValueError(f'{root} is one tar file of images: training and validation would read the same images;'
                         f' give a folder with {train_split}/ and {val_split}/ split folders.')
    _check_image_folder(root, label)
    paths = {}
    for split, arg in ((train_split, '--train-split'), (val_split, '--val-split')):
        path = _split_folder(root, split)
        if path is None:
            folders = [f for f in _subfolders(root) if not f.startswith('.')]
            if folders and all(_holds_images_directly(os.path.join(root, f)) for f in folders):
                hint = (f'its folders ({", ".join(folders)}) are class folders, and class folders alone have no'
                        f' validation split: make {root}/{train_split}/<class> and {root}/{val_split}/<class>')
            else:
                there = f'the folders there are {", ".join(folders)}' if folders else 'it has no subfolders'
                hint = f'{there}: name the split folders with --train-split and --val-split'
            raise ValueError(f'{arg} {split!r}: {root} has no {split!r} folder; {hint} (timm would read the whole'
                             f' folder in its place, training images included).')
        paths[arg] = os.path.realpath(path)
    train_path, val_path = paths['--train-split'], paths['--val-split']
    if train_path == val_path:
        raise ValueError(f'--train-split {train_split!r} and --val-split {val_split!r} are the same folder'
                         f' ({train_path}): validation would measure the training images.')
    for inner, outer, what in ((train_path, val_path, 'the validation folder contains the training folder'),
                               (val_path, train_path, 'the training folder contains the validation folder')):
        if inner.startswith(outer + os.sep):
            raise ValueError(f'--train-split {train_split!r} ({train_path}) and --val-split {val_split!r}'
                             f' ({val_path}): {what}, so both would read the same images; give two separate folders.')
    train_classes = _class_folders(train_path, train_split, '--train-split')
    val_classes = _class_folders(val_path, val_split, '--val-split')
    if len(train_classes) < 2:
        found = f'one class only ({next(iter(train_classes))!r})' if train_classes else 'no class folders'
        raise ValueError(f'{label}: {train_path} holds {found}: a classifier needs two or more class'
                         f' folders in each split.')
    if train_classes != val_classes:
        missing, extra = sorted(train_classes - val_classes), sorted(val_classes - train_classes)
        parts = ([f'{val_path} has no class folder {", ".join(map(repr, missing))}'] if missing else []) + \
                ([f'{train_path} has no class folder {", ".join(map(repr, extra))}'] if extra else [])
        raise ValueError(f'{label}: the splits hold different classes: {"; ".join(parts)}. Training and'
                         f' validation need the same class folders.')
    kwargs = dict(search_split=False, input_img_mode=img_mode)
    train_ds = create_dataset('', root=train_path, split=train_split, is_training=True, **kwargs)
    # the same label for the same class folder in both splits
    val_ds = create_dataset('', root=val_path, split=val_split, class_map=dict(train_ds.reader.class_to_idx),
                            **kwargs)
    return train_ds, val_ds, (train_path, val_path)


def _resolve_source(name: str | None, root: str | None) -> tuple[str, str | None, str | None]:
    """Source kind ('digits', 'idx', 'folder', 'timm'), the path to read (or timm name) and the alias used. No name
    (None or '') with ``root`` reads ``root``, as timm's train.py reads ``--data-dir`` with its default ``--dataset
    ''``; 'digits' never reads a folder."""
    if (name is None or not name.strip()) and root:
        path = os.path.expanduser(root)
        if os.path.isdir(path) and _has_idx_files(path):
            return 'idx', path, None
        return 'folder', path, None
    if is_embedded(name):
        return 'digits', None, None
    name = name.strip()
    lower = name.lower()
    if lower in ('fashion-mnist', 'fashion_mnist'):
        return 'idx', root or FASHION_MNIST_DIR, 'fashion-mnist'
    if lower.startswith('idx:'):
        folder = name[4:] or root
        if not folder:
            raise ValueError(f"{name!r} names no folder: use 'idx:<folder>', or 'idx:' with --data-dir. {_ACCEPTED}")
        return 'idx', folder, None
    prefix, sep, _ = lower.partition('/')
    if sep and prefix in _TIMM_PREFIXES:
        return 'timm', name, None

    path = os.path.expanduser(name)
    if not os.path.exists(path) and root and os.sep not in name and not name.startswith(('.', '~')):
        # a bare name with --data-dir, as with timm's train.py ('--dataset imagenet --data-dir /data/imagenet')
        path = os.path.expanduser(root)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f'Dataset {name!r} with --data-dir {root}: neither the name nor the folder {os.path.abspath(path)} '
                f'exists. {_ACCEPTED}')
    if os.path.isdir(path):
        return ('idx' if _has_idx_files(path) else 'folder'), path, None
    if os.path.isfile(path):
        if path.endswith('.tar'):  # timm reads a tar of class subfolders as an image folder
            return 'folder', path, None
        raise ValueError(f'Dataset path {path} is a file; expected a folder. {_ACCEPTED}')
    raise FileNotFoundError(
        f'Dataset {name!r} is not a known name and the path {os.path.abspath(path)} does not exist. {_ACCEPTED}')


def _get_targets(ds) -> np.ndarray | None:
    """Labels of a map-style dataset as a 1-D int array, None when it does not expose them."""
    targets = None
    for attr in ('targets', 'labels'):  # labels: torchvision's SVHN
        targets = getattr(ds, attr, None)
        if targets is not None:
            break
    if targets is None:
        reader = getattr(ds, 'reader', None)
        samples = getattr(reader, 'samples', None)
        if samples is not None:  # timm image folder
            targets = [t for _, t in samples]
        elif hasattr(reader, 'iter_targets'):  # timm HF datasets reader, skips image decoding
            targets = list(reader.iter_targets())
    if targets is None:
        inner = getattr(ds, 'dataset', None)  # wrappers
        return _get_targets(inner) if inner is not None else None
    try:
        targets = np.asarray(targets, dtype=np.int64)
    except (TypeError, ValueError):
        return None
    return targets if targets.ndim == 1 and len(targets) == len(ds) else None


def _stratified_indices(targets: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
    # proportional allocation with largest remainders, so any size works (sklearn's stratified split refuses
    # fewer samples than classes and classes with a single member)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(targets, return_counts=True)
    quota = counts * num_samples / len(targets)
    take = np.floor(quota).astype(np.int64)
    remaining = num_samples - int(take.sum())
    if remaining:
        order = np.argsort(-(quota - take), kind='stable')
        take[order[:remaining]] += 1
    chosen = [rng.permutation(np.flatnonzero(targets == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def _check_subset_size(num_samples: int | None, arg: str):
    if num_samples is None:
        return
    if not is_whole(num_samples, ge=1, numpy=True):
        raise ValueError(f'{arg}={num_samples!r} is invalid: it must be a whole number of samples >= 1 (or None).')


def check_labels(dataset: Dataset, num_classes: int, split: str) -> None:
    """Refuse a dataset whose labels (where it exposes them) fall outside ``0..num_classes - 1``.

    Raises:
        ValueError: Naming the split, the offending labels and the class count.
    """
    targets = _get_targets(dataset)
    if targets is None or not len(targets):
        return
    bad = targets[(targets < 0) | (targets >= num_classes)]
    if len(bad):
        raise ValueError(f'The {split} split has labels outside 0..{num_classes - 1} ({len(bad)} samples, e.g.'
                         f' {sorted(set(bad.tolist()))[:5]}) for {num_classes} classes: pass the right --num-classes,'
                         f' or check the labels.')


def subset_dataset(dataset: Dataset, num_samples: int | None, seed: int = 0, arg: str = 'subset') -> Dataset:
    """Deterministic subset of ``num_samples`` samples, stratified by label when the dataset exposes its labels.

    Args:
        dataset: Map-style dataset.
        num_samples: Subset size, None to keep the whole dataset.
        seed: Seed of the selection; kept apart from the training seed so that every run sees the same subset.
        arg: Argument name for error messages.

    Returns:
        The dataset itself when ``num_samples`` is None or its length, else a :class:`SubsetDataset`.
    """
    _check_subset_size(num_samples, arg)
    if num_samples is None:
        return dataset
    if isinstance(dataset, IterableDataset):
        raise ValueError(f'{arg}={num_samples} needs a map-style dataset; this one is iterable (streamed).')
    total = len(dataset)
    if num_samples > total:
        raise ValueError(f'{arg}={num_samples} is larger than the dataset: use a size between 1 and {total}.')
    if num_samples == total:
        return dataset
    targets = _get_targets(dataset)
    if targets is not None:
        indices = _stratified_indices(targets, num_samples, seed)
    else:
        indices = np.sort(np.random.default_rng(seed).permutation(total)[:num_samples])
    return SubsetDataset(dataset, indices)


def split_holdout(train_ds: Dataset, num_samples: int, seed: int = 1) -> tuple[Dataset, Dataset]:
    """Hold ``num_samples`` training samples out as validation data, stratified by label where labels are known.

    When ``train_ds`` is a subset (``--train-subset``), the held-out samples come from the samples it leaves out, so
    the training data stays what it was; otherwise they are removed from it. The held-out set reads a shallow copy of
    the underlying dataset, so that it keeps its own (evaluation) transform.

    Returns:
        (training dataset, held-out dataset).

    Raises:
        ValueError: A size below 1, or more samples than are left to hold out.
    """
    _check_subset_size(num_samples, 'holdout')
    if isinstance(train_ds, IterableDataset):
        raise ValueError('holdout needs a map-style training set; this one is iterable (streamed).')
    if isinstance(train_ds, SubsetDataset):
        full, kept = train_ds.dataset, train_ds.indices
    else:
        full, kept = train_ds, np.zeros(0, dtype=np.int64)
    free = np.setdiff1d(np.arange(len(full)), kept)
    if num_samples > len(free):
        raise ValueError(f'holdout={num_samples} is more than the {len(free)} training samples left to hold out.')
    targets = _get_targets(full)
    if targets is not None:
        chosen = free[_stratified_indices(targets[free], num_samples, seed)]
    else:
        chosen = np.sort(np.random.default_rng(seed).permutation(free)[:num_samples])
    holdout = SubsetDataset(copy.copy(full), chosen)
    if not isinstance(train_ds, SubsetDataset):
        train_ds = SubsetDataset(full, np.setdiff1d(np.arange(len(full)), chosen))
    return train_ds, holdout


def create_datasets(
        name: str | None = None,
        root: str | None = None,
        train_split: str = 'train',
        val_split: str = 'validation',
        train_subset: int | None = None,
        val_subset: int | None = None,
        img_mode: str = 'RGB',
        download: bool = False,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Create the training and validation datasets.

    ``name`` selects the source:

    * 'digits', or None / '' without ``root``: scikit-learn's 8x8 digits with a fixed stratified 80 / 20 split
      (1437 / 360); 'digits' ignores ``root``.
    * None or '' with ``root``: ``root`` read as below (an IDX folder, or an image folder), as timm's train.py reads
      ``--data-dir`` with its default ``--dataset ''``.
    * 'fashion-mnist': the IDX files in ``root``, or in /usr/share/datasets/fashion-mnist (Debian's
      dataset-fashion-mnist) when ``root`` is None.
    * 'idx:<folder>' ('idx:' alone reads ``root``), or the path of a folder holding the MNIST-format files
      ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``: train-* is the train split, t10k-* validation.
    * The path of an image folder (``<split>/<class>/<image>``, split folders found by their name or a timm
      synonym: ``val`` for ``validation``), or a bare name with ``root`` pointing to such a folder. Unlike timm, a
      missing split folder, split folders that contain one another, one class only, or classes that differ between
      the splits (an empty or missing class folder) are errors.
    * A timm dataset name ('torch/cifar10', 'hfds/<hub name>', ...), created by ``timm.data.create_dataset``.

    Datasets yield ``(PIL image in img_mode, int label)`` and take a settable ``transform``.
    :func:`create_loaders` sets the mode from the model's input channels, so ``img_mode`` only matters when the
    datasets are used without it. Subsets are deterministic and stratified when labels are known, with seed 0
    whatever the training seed.

    Args:
        name: Dataset name or path, see above.
        root: Data folder (--data-dir): torchvision root, HF datasets cache dir, or the folder of a bare name.
        train_split: Training split; IDX folders and digits accept 'train' / 'validation' (or 'val', 'test').
        val_split: Validation split.
        train_subset: Keep this many training samples, None for all.
        val_subset: Keep this many validation samples, None for all.
        img_mode: PIL mode of the yielded images ('RGB' or 'L').
        download: Let timm / torchvision download the dataset (the embedded and IDX sources never download).

    Returns:
        Training dataset, validation dataset and :class:`DatasetInfo`. ``info.num_classes`` is -1 (and
        ``class_names`` None) when a timm dataset does not expose its classes; the caller must then pass the number
        of classes.

    Raises:
        FileNotFoundError: The dataset path, or a required IDX file, does not exist.
        ValueError: Invalid IDX files, a folder that is neither an IDX nor an image folder (or is empty), an unknown
            or missing split, an image folder's splits that overlap or differ in classes, fewer than two classes, or
            subset sizes < 1 or larger than the dataset.
    """
    _check_subset_size(train_subset, 'train_subset')
    _check_subset_size(val_subset, 'val_subset')
    kind, path, alias = _resolve_source(name, root)
    if kind == 'digits':
        train_ds, val_ds, info = _create_digits(train_split, val_split, img_mode)
    elif kind == 'idx':
        train_ds, val_ds, info = _create_idx(path, train_split, val_split, img_mode, alias=alias)
    elif kind == 'folder':
        from_root = root and not (name or '').strip()
        train_ds, val_ds, info = _create_timm(
            name or '', path, train_split, val_split, img_mode, download, is_folder=True,
            label=f'--data-dir {root}' if from_root else f'dataset folder {path}')
    else:
        train_ds, val_ds, info = _create_timm(name, root, train_split, val_split, img_mode, download)

    train_ds = subset_dataset(train_ds, train_subset, seed=0, arg='train_subset')
    val_ds = subset_dataset(val_ds, val_subset, seed=0, arg='val_subset')
    return train_ds, val_ds, info


def set_img_mode(dataset: Dataset, img_mode: str) -> bool:
    """Set the PIL mode a dataset yields its images in.

    Returns:
        Whether the dataset supports it (this module's datasets and timm's ImageDataset / HF iterable readers).
    """
    if isinstance(dataset, SubsetDataset):
        return set_img_mode(dataset.dataset, img_mode)
    if isinstance(dataset, (ArrayImageDataset, ModeConvertDataset)):
        dataset.img_mode = img_mode
        return True
    if isinstance(dataset, ImageDataset) and not dataset.load_bytes:
        dataset.input_img_mode = img_mode
        return True
    reader = getattr(dataset, 'reader', None)
    if reader is not None and hasattr(reader, 'input_img_mode'):
        reader.input_img_mode = img_mode
        return True
    return False


def match_channels(data_config: dict) -> dict:
    """A copy of a timm data config whose ``mean`` and ``std`` have one value per channel of its ``input_size``.

    A model's config often carries ImageNet's three values while the run feeds it one gray channel (``--in-chans
    1``): the gray image stands for three equal channels, so the channel average is the matching statistic. timm
    refuses to save a config whose statistics do not fit its channels.
    """
    in_chans = int(data_config['input_size'][0])
    out = dict(data_config)
    for key in ('mean', 'std'):
        out[key] = _match_channels(data_config[key], in_chans, key)
    return out


def _match_channels(values, num_chans: int, key: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in (values if isinstance(values, (list, tuple)) else (values,)))
    if len(values) == num_chans:
        return values
    if len(values) == 1:
        return values * num_chans
    if num_chans == 1:
        # an RGB model config (e.g. ImageNet statistics) on 1-channel input: the gray image stands for three equal
        # channels, so the channel average is the matching statistic
        return (sum(values) / len(values),)
    raise ValueError(f"data_config['{key}'] has {len(values)} values for {num_chans} input channels.")


def _safe_len(dataset) -> int:
    try:
        return len(dataset)
    except TypeError:  # iterable dataset of unknown length
        return 0


# the largest preprocessed tensor kept in memory (beyond it, the per-image path)
_MAX_PREPROCESSED_BYTES = 2 << 30


def _array_source(dataset: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """The uint8 images and labels of an in-memory dataset of this module without transforms of its own making."""
    inner, indices = dataset, None
    if isinstance(dataset, SubsetDataset):
        inner, indices = dataset.dataset, dataset.indices
    if not isinstance(inner, ArrayImageDataset) or inner.target_transform is not None:
        return None
    if inner.img_mode not in ('L', 'RGB'):
        return None
    if indices is None:
        return inner.images, inner.targets
    return inner.images[indices], inner.targets[indices]


def _batch_augment_dataset(
        dataset: Dataset, common: dict, scale, hflip: float, **erasing,
) -> BatchAugmentDataset | None:
    """The training set as a :class:`BatchAugmentDataset` when the batched path gives timm's augmentation: in-memory
    grayscale images, bilinear or bicubic interpolation, 1 or 3 channels; ``erasing``: its random erasing options."""
    source = _array_source(dataset)
    in_chans = common['input_size'][0]
    if source is None or common['interpolation'] not in FAST_INTERPOLATIONS or in_chans not in (1, 3):
        return None
    images, targets = source
    return BatchAugmentDataset(
        images, targets, common['input_size'], common['mean'], common['std'],
        scale=scale, ratio=(3. / 4., 4. / 3.), hflip=hflip, interpolation=common['interpolation'], **erasing)


def _preprocessable(dataset: Dataset, input_size) -> bool:
    """Whether a dataset's (deterministic) transform can be applied once up front and the result kept in memory."""
    if _array_source(dataset) is None:
        return False
    return len(dataset) * math.prod(input_size) * 4 <= _MAX_PREPROCESSED_BYTES


def create_loaders(
        train_ds: Dataset,
        val_ds: Dataset,
        data_config: dict,
        batch_size: int,
        val_batch_size: int | None = None,
        workers: int = 2,
        hflip: float = 0.5,
        scale: tuple[float, float] = (0.5, 1.0),
        train_transform: bool | Callable = True,
        seed: int = 0,
        rank: int = 0,
        auto_augment: str | None = None,
        color_jitter: float | None = None,
        re_prob: float = 0.,
        re_mode: str = 'pixel',
        re_count: int = 1,
        pin_memory: bool | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Set timm's transforms on the datasets and build the training and validation loaders.

    The datasets yield 'L' images when ``data_config['input_size'][0]`` is 1 and 'RGB' when it is 3 (for datasets
    that support it, see :func:`set_img_mode`). A 3-valued mean / std with 1-channel input is averaged to one value.
    Training augmentation is timm's ``create_transform(is_training=True)``: random-resized-crop and horizontal flip,
    and, when asked, its auto-augment policy, colour jitter and random erasing (none by default); evaluation resizes
    and center-crops with the config's crop_pct. In-memory sources (digits, IDX folders) take a faster path with the
    same semantics: their training batches are augmented a whole batch at a time (random erasing included), their
    evaluation images transformed once, in the training process (``workers`` applies to the other sources); the crop
    boxes and flips follow timm's distributions (see ``_tensor_data.py``). Auto-augment and colour jitter work on PIL
    images one at a time: with either, in-memory training images take timm's per-image transform like the others.

    Args:
        train_ds: Training dataset (settable ``transform``).
        val_ds: Validation dataset (settable ``transform``), a different object from ``train_ds``.
        data_config: ``timm.data.resolve_data_config`` output (input_size, interpolation, mean, std, crop_pct,
            crop_mode).
        batch_size: Training batch size (per process).
        val_batch_size: Validation batch size, ``batch_size`` when None.
        workers: Loader worker processes (image folders, timm and Hub datasets).
        hflip: Horizontal flip probability (``DatasetInfo.default_hflip`` suits the data).
        scale: Area range of the random resized crop.
        train_transform: True for the augmenting transform, False to train on the eval transform, or a transform.
        seed: Seed of the training shuffle (a ``torch.Generator``, which also seeds the workers).
        rank: The process's rank under DDP: its loader workers draw their augmentation from seeds of their own (the
            shuffle's seed is shared by every process, so that they split one permutation).
        auto_augment: timm's auto-augment policy (``--aa``), e.g. 'rand-m9-mstd0.5-inc1' for RandAugment; None: off.
            As in timm, it turns colour jitter off (but for its '3a' policy).
        color_jitter: timm's colour jitter factor for brightness, contrast and saturation; None or 0: off.
        re_prob: timm's random erasing probability, after normalisation; 0: off.
        re_mode: Random erasing fill: 'pixel', 'rand' or 'const'.
        re_count: Random erasing: at most this many boxes per image.
        pin_memory: Pin the batches' host memory (for copies to a GPU); default: where CUDA is available.

    Returns:
        Training loader (shuffled, last partial batch dropped when the dataset holds more than one batch) and
        validation loader (in order, nothing dropped). Plain DataLoaders, for ``accelerator.prepare``.
    """
    if train_ds is val_ds:
        raise ValueError('train_ds and val_ds must be distinct objects: each gets its own transform.')
    _set_channels(train_ds, data_config)
    common, eval_tf = _common_and_eval_transform(data_config)
    color_jitter = color_jitter or None  # a factor of 0 jitters nothing: no transform, and the batched path stays
    if auto_augment and color_jitter and '3a' not in auto_augment:
        _logger.warning(f'colour jitter {color_jitter} is not applied with auto-augment {auto_augment!r}: timm turns'
                        f' colour jitter off under its auto-augment policies (but for 3a).')
    if callable(train_transform):
        train_tf = train_transform
    elif train_transform:
        train_tf = create_transform(
            **common,
            is_training=True,
            scale=tuple(scale),
            ratio=(3. / 4., 4. / 3.),
            hflip=hflip,
            vflip=0.,
            color_jitter=color_jitter,
            auto_augment=auto_augment,
            re_prob=re_prob,
            re_mode=re_mode,
            re_count=re_count,
        )
    else:
        train_tf = eval_tf
    _keep_zero_bit_posterize(train_tf)
    train_ds.transform = train_tf

    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    generator = torch.Generator()
    generator.manual_seed(seed)
    # in-memory images: augmented a batch at a time, evaluation images transformed once (see _tensor_data.py)
    fast_train = None
    if train_transform is True and (auto_augment or color_jitter):
        if _array_source(train_ds) is not None:
            # both are PIL operations of timm's, drawn per image: no batched equivalent would be timm's
            _logger.info(f"{'auto-augment ' + repr(auto_augment) if auto_augment else 'colour jitter'}: the in-memory"
                         f" training images take timm's per-image transform (slower than the batched path)")
    elif train_transform is True:
        fast_train = _batch_augment_dataset(train_ds, common, scale=tuple(scale), hflip=hflip, re_prob=re_prob,
                                            re_mode=re_mode, re_count=re_count)
    elif train_transform is False and _preprocessable(train_ds, common['input_size']):
        fast_train = PreprocessedDataset(train_ds)
    # iterable datasets shuffle in their reader, a DataLoader refuses shuffle=True for them
    train_iterable = isinstance(train_ds, IterableDataset)
    train_loader = DataLoader(
        fast_train or train_ds,
        batch_size=batch_size,
        shuffle=not train_iterable,
        drop_last=_safe_len(train_ds) > batch_size,
        # in-memory batches are cheaper to make here than to pickle to worker processes
        num_workers=0 if fast_train else workers,
        generator=generator,
        pin_memory=pin_memory,
        collate_fn=batch_collate if fast_train else None,
        worker_init_fn=functools.partial(_seed_worker, rank),
        # new workers every epoch: their seeds then come from the generator as it stands at the epoch's start,
        # so reseeding it per epoch fixes each epoch's order and augmentation (a resumed run repeats them)
        persistent_workers=False,
    )
    val_loader = create_eval_loader(val_ds, data_config, val_batch_size or batch_size, workers, pin_memory)
    return train_loader, val_loader


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, keeping 0 bits as Pillow before 13 did: a black image. timm's RandAugment asks for 0 bits
    at magnitude 10 of its increasing posterize ('inc1' policies, reached with 'mstd'), which Pillow 13 refuses
    with a ValueError that would stop training."""
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return timm_posterize(img, bits_to_keep, **kwargs)


def _keep_zero_bit_posterize(transform) -> None:
    """Give the posterize operations of timm's auto-augment transforms within ``transform`` :func:`_posterize`."""
    for t in getattr(transform, 'transforms', [transform]):
        # RandAugment and AugMix hold their operations in ops, AutoAugment in sub-policies
        ops = [*getattr(t, 'ops', ()), *(op for sub_policy in getattr(t, 'policy', ()) for op in sub_policy)]
        for op in ops:
            if getattr(op, 'aug_fn', None) is timm_posterize:
                op.aug_fn = _posterize


def _seed_worker(rank: int, worker_id: int) -> None:
    """Seed a loader worker's generators (torch, ``random``, numpy) from its own seed and the process's rank: the
    worker seeds derive from one base seed that every DDP process shares, and the k-th sample of every rank would
    otherwise get the same crop and flip."""
    seed = (torch.utils.data.get_worker_info().seed + 1_000_003 * rank) % 2 ** 63
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


def _set_channels(dataset: Dataset, data_config: dict) -> None:
    # 'L' images for 1 input channel, 'RGB' for 3, where the dataset supports it
    in_chans = int(data_config['input_size'][0])
    img_mode = {1: 'L', 3: 'RGB'}.get(in_chans)
    if img_mode is not None and not set_img_mode(dataset, img_mode):
        _logger.warning(f'{type(dataset).__name__} cannot be set to yield {img_mode!r} images for {in_chans}-channel'
                        f' input; create it with img_mode={img_mode!r}.')


def _common_and_eval_transform(data_config: dict) -> tuple[dict, Callable]:
    """The arguments shared by timm's train and eval transforms of a data config, and the eval transform."""
    matched = match_channels(data_config)
    common = dict(input_size=tuple(data_config['input_size']),
                  interpolation=data_config.get('interpolation', 'bilinear'), mean=matched['mean'], std=matched['std'])
    eval_tf = create_transform(**common, is_training=False, crop_pct=data_config.get('crop_pct'),
                               crop_mode=data_config.get('crop_mode'))
    return common, eval_tf


def create_eval_loader(dataset: Dataset, data_config: dict, batch_size: int, workers: int = 2,
                       pin_memory: bool | None = None) -> DataLoader:
    """An evaluation loader (in order, nothing dropped) with timm's eval transform: ``create_loaders``' validation
    loader, and the loader of a third split (the test set of a run that validates on held-out training data).

    Args:
        dataset: The dataset (settable ``transform``; its images are switched to the config's channels).
        data_config: ``timm.data.resolve_data_config`` output.
        batch_size: Batch size.
        workers: Loader worker processes (image folders, timm and Hub datasets).
        pin_memory: Pin the batches' host memory (for copies to a GPU); default: where CUDA is available.
    """
    _set_channels(dataset, data_config)
    dataset.transform = _common_and_eval_transform(data_config)[1]
    # in-memory images are transformed once (a deterministic transform) and served as tensors
    fast = PreprocessedDataset(dataset) if _preprocessable(dataset, data_config['input_size']) else None
    return DataLoader(
        fast or dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=0 if fast else workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        collate_fn=batch_collate if fast else None,
        persistent_workers=workers > 0 and not fast,
    )
