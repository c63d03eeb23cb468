"""The training and evaluation loaders: timm's transforms, in-memory preprocessing and batch augmentation where they
fit, and seeded workers.
"""
import functools
import logging
import math
import random
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import posterize as timm_posterize
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .datasets import ArrayImageDataset, match_channels, set_img_mode
from .splits import SubsetDataset
from .tensors import FAST_INTERPOLATIONS, BatchAugmentDataset, PreprocessedDataset, batch_collate

__all__ = ['create_loaders', 'create_eval_loader']

_logger = logging.getLogger(__name__)


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
    boxes and flips follow timm's distributions (see ``data/tensors.py``). Auto-augment and colour jitter work on PIL
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
    # in-memory images: augmented a batch at a time, evaluation images transformed once (see data/tensors.py)
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
