"""The dataset sources, picked by name in ``create_datasets``: the embedded digits, MNIST-format IDX folders, timm's
datasets and image folders.
"""
import logging
import math
import os

import numpy as np
from timm.data import create_dataset
from torch.utils.data import Dataset

from ..utils.extras import require
from .datasets import _ACCEPTED, _EVAL_SPLITS, _TRAIN_SPLITS, ArrayImageDataset, DatasetInfo, ModeConvertDataset
from .folders import _create_image_folder
from .idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, _has_idx_files, load_idx_folder
from .splits import _check_subset_size, subset_dataset

__all__ = ['create_datasets', 'is_embedded', 'resolve_source']

_logger = logging.getLogger(__name__)

_TIMM_PREFIXES = ('torch', 'hfds', 'hfids', 'tfds', 'wds')
# torchvision datasets of small images (28x28 or 32x32) whose natural model input is 32x32
_TORCH_SMALL = ('cifar10', 'cifar100', 'mnist', 'kmnist', 'qmnist', 'fashion_mnist')
# sets of digits / characters, which a horizontal flip turns into other (or no) classes
_NO_HFLIP = ('digits', 'mnist', 'qmnist', 'kmnist', 'emnist', 'svhn', 'usps')


def is_embedded(name: str | None) -> bool:
    """Whether ``name`` selects the embedded default dataset (scikit-learn's digits): None, '' or 'digits'."""
    return name is None or name.strip().lower() in ('', 'digits')


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


def resolve_source(name: str | None, root: str | None) -> tuple[str, str | None, str | None]:
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
    kind, path, alias = resolve_source(name, root)
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
