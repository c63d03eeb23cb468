"""The dataset classes (in-memory arrays, mode conversion), the names a dataset source accepts and the split names."""
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from timm.data import ImageDataset
from torch.utils.data import Dataset

from .idx import FASHION_MNIST_DIR
from .splits import SubsetDataset

__all__ = ['DatasetInfo', 'ArrayImageDataset', 'ModeConvertDataset', 'set_img_mode', 'match_channels']

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
