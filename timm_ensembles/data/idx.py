"""The MNIST IDX format: ``read_idx`` reads one file (gzipped or not), ``load_idx_folder`` a folder of them."""
import gzip
import math
import os
import zlib

import numpy as np

__all__ = ['read_idx', 'load_idx_folder', 'FASHION_MNIST_DIR', 'FASHION_MNIST_CLASSES']

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
