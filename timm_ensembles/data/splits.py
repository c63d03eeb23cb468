"""Subsets and the holdout split: stratified, seeded, on the labels a dataset knows without decoding its images."""
import copy
from typing import Any

import numpy as np
from torch.utils.data import Dataset, IterableDataset

from ..utils.checks import is_whole

__all__ = ['SubsetDataset', 'subset_dataset', 'split_holdout', 'check_labels']


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
