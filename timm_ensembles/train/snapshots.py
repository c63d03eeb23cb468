"""Per-epoch snapshots of a training run: every member's predictions on a fixed held-out subset, and optionally
the members' weights, for the within-run vs between-run comparisons of Fort, Hu & Lakshminarayanan (2019).

A run trained with ``--snapshot-subset N`` holds, in ``<output>/snapshots/``, for every finished epoch ``e``
(0-based, as ``metrics.jsonl``) and for the model at initialisation, before its first update (epoch ``-1``,
``INIT_EPOCH``; files ``epoch_init.*``, written by a run that starts at epoch 0):

* ``epoch_{e:03d}.safetensors``: ``logits`` float32 ``[S, M, C]`` (every member's logits, eval mode; M = 1 for a
  plain model), ``targets`` int64 ``[S]`` and ``indices`` int64 ``[S]`` (the subset's indices into the validation
  set as the run used it, i.e. after ``--val-subset``);
* with ``--snapshot-weights``, ``epoch_{e:03d}.weights.safetensors``: ``member{m}.{name}`` float32 for every
  ``named_parameters()`` entry of each member m (parameters only: BatchNorm running statistics are buffers and are
  not included).

Both carry the safetensors metadata ``epoch``, ``model``, ``dataset``, ``num_classes``, ``num_members`` and
``format`` (``'1'``). The subset is drawn with a seed of its own (``SNAPSHOT_SEED``), not the run's ``--seed``, so
that independent runs snapshot the same inputs.
"""
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from ..files.run_folder import RunFolder
from ..utils.atomic import atomic_replace
from .engine import MemberPredictor

__all__ = ['Snapshots', 'read_snapshots', 'write_snapshot', 'snapshot_indices', 'member_parameters',
           'predict_members', 'remove_snapshots_from', 'snapshot_epoch', 'SNAPSHOT_FORMAT', 'SNAPSHOT_SEED',
           'INIT_EPOCH']

SNAPSHOT_FORMAT = '1'
# fixed, whatever --seed is: runs that differ only in their seed must snapshot the same inputs
SNAPSHOT_SEED = 0
# the snapshot of the model before its first update: Fort et al.'s trajectories start at the initialisation
INIT_EPOCH = -1
_HINT = 'run train.py with --snapshot-subset N (N held-out samples) to record them'


@dataclass
class Snapshots:
    """The snapshots of one run, stacked over epochs.

    Attributes:
        epochs: The epochs read (0-based; ``INIT_EPOCH`` = -1 for the initialisation), ascending.
        logits: float32 ``[E, S, M, C]``: every member's logits at every epoch.
        targets: int64 ``[S]`` labels of the subset.
        indices: int64 ``[S]`` indices of the subset into the run's validation set.
        weights: float32 ``[E, M, P]``: each member's parameters flattened in sorted-name order, or None when not
            asked for.
        meta: The files' metadata (str -> str: ``model``, ``dataset``, ``num_classes``, ``num_members``,
            ``format``), without the per-file ``epoch``.
    """
    epochs: list[int]
    logits: torch.Tensor
    targets: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor | None = None
    meta: dict[str, str] = field(default_factory=dict)


def _epoch_tag(epoch: int) -> str:
    if epoch == INIT_EPOCH:
        return 'init'
    if epoch < 0:
        raise ValueError(f'A snapshot epoch is a finished epoch >= 0 or {INIT_EPOCH} (the initialisation), got'
                         f' {epoch}.')
    return f'{epoch:03d}'


def _logits_name(epoch: int) -> str:
    return RunFolder.SNAPSHOT_LOGITS.format(_epoch_tag(epoch))


def _weights_name(epoch: int) -> str:
    return RunFolder.SNAPSHOT_WEIGHTS.format(_epoch_tag(epoch))


def _name_pattern(template: str) -> re.Pattern:
    """The names a ``RunFolder`` snapshot template gives the files of every epoch, the epoch's tag captured."""
    prefix, suffix = template.split('{}')
    return re.compile(rf'^{re.escape(prefix)}(\d+|init){re.escape(suffix)}$')


_NAME_PATTERNS = {False: _name_pattern(RunFolder.SNAPSHOT_LOGITS), True: _name_pattern(RunFolder.SNAPSHOT_WEIGHTS)}


def snapshot_epoch(name: str, weights: bool = False) -> int | None:
    """The epoch (``INIT_EPOCH`` for the initialisation) whose snapshot file is named ``name``: its logits file, or
    with ``weights`` its weights file; None for any other name."""
    match = _NAME_PATTERNS[weights].match(name)
    if match is None:
        return None
    return INIT_EPOCH if match.group(1) == 'init' else int(match.group(1))


def snapshot_indices(dataset, num_samples: int) -> np.ndarray:
    """The indices of the snapshot subset into the validation set ``dataset``: stratified by label when the dataset
    exposes its labels, else a fixed random choice, sorted; drawn with ``SNAPSHOT_SEED`` whatever the run's seed.

    Raises:
        ValueError: ``num_samples`` < 1, larger than the dataset, or an iterable (streamed) dataset.
    """
    from ..data import SubsetDataset, subset_dataset

    try:
        total = len(dataset)
    except TypeError:  # iterable: subset_dataset says why it cannot be subset
        total = None
    if total is not None and isinstance(num_samples, int) and num_samples > total:
        raise ValueError(f'--snapshot-subset {num_samples} is larger than the validation set ({total} samples, after'
                         f' any --val-subset): use at most {total}.')
    subset = subset_dataset(dataset, num_samples, seed=SNAPSHOT_SEED, arg='--snapshot-subset')
    if isinstance(subset, SubsetDataset) and subset is not dataset:
        return subset.indices.copy()
    return np.arange(len(dataset), dtype=np.int64)  # the whole set


def member_parameters(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Each member's ``named_parameters()``: the ``members`` of an ensemble, or the model itself as member 0.

    Raises:
        ValueError: The model has members (``forward_members``) but no ``members`` list: its members share layers,
            so they have no weight vectors of their own.
    """
    members = getattr(model, 'members', None)
    if isinstance(members, nn.ModuleList):
        return [dict(m.named_parameters()) for m in members]
    if hasattr(model, 'forward_members'):
        raise ValueError(
            f'{type(model).__name__} has no weights per member (its members share layers, no `members` list), so'
            f' --snapshot-weights cannot record them; snapshot the predictions only (drop --snapshot-weights).')
    return [dict(model.named_parameters())]


def predict_members(model: nn.Module, loader: Iterable, accelerator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every member's logits (``forward_members``, or ``model(x)`` as one member) in eval mode, on this process.

    Args:
        model: The unwrapped model; its training mode is restored afterwards.
        loader: Yields ``(x, target)`` batches.
        accelerator: An ``accelerate.Accelerator`` for its device and autocast; None: the model's device, no
            autocast.

    Returns:
        float32 ``[S, M, C]`` logits and int64 ``[S]`` targets, on the CPU.
    """
    logits, targets = [], []
    for out in MemberPredictor(model, loader, accelerator):
        logits.append(out.members.cpu())
        targets.append(out.target.long().cpu())
    return torch.cat(logits), torch.cat(targets)


def _meta(meta: Mapping[str, Any], epoch: int, num_classes: int, num_members: int) -> dict[str, str]:
    out = {k: str(v) for k, v in meta.items()}
    out.update(epoch=str(epoch), num_classes=str(num_classes), num_members=str(num_members), format=SNAPSHOT_FORMAT)
    return out


def write_snapshot(
        folder: str | Path,
        epoch: int,
        logits: torch.Tensor,
        targets: torch.Tensor,
        indices: torch.Tensor | np.ndarray,
        meta: Mapping[str, Any],
        member_params: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write one epoch's snapshot files into ``folder/snapshots/``, each atomically (weights first).

    Args:
        folder: The run's output folder.
        epoch: The finished epoch (0-based), or ``INIT_EPOCH`` for the model before its first update.
        logits: ``[S, M, C]`` member logits (stored as float32).
        targets: ``[S]`` labels.
        indices: ``[S]`` indices of the subset into the validation set.
        meta: Metadata, at least ``model`` and ``dataset``; values are stored as strings, and ``epoch``,
            ``num_classes``, ``num_members`` and ``format`` are set here.
        member_params: Each member's parameters by name (see :func:`member_parameters`), to also write the weights
            file; None for none.

    Returns:
        The path of the logits file.
    """
    folder = Path(folder) / RunFolder.SNAPSHOTS
    logits = logits.detach().float().cpu().contiguous()
    if logits.ndim != 3:
        raise ValueError(f'Snapshot logits must be [S, M, C], got shape {tuple(logits.shape)}.')
    num_samples, num_members, num_classes = logits.shape
    targets = torch.as_tensor(targets).long().cpu().contiguous()
    indices = torch.as_tensor(np.asarray(indices)).long().cpu().contiguous()
    if targets.shape != (num_samples,) or indices.shape != (num_samples,):
        raise ValueError(f'Snapshot targets {tuple(targets.shape)} and indices {tuple(indices.shape)} must be'
                         f' [{num_samples}], as the logits.')
    metadata = _meta(meta, epoch, num_classes, num_members)
    if member_params is not None:
        if len(member_params) != num_members:
            raise ValueError(f'{len(member_params)} members of weights for logits of {num_members} members.')
        # copies: safetensors refuses tensors that share storage (tied weights) or are views
        tensors = {f'member{m}.{name}': p.detach().to(device='cpu', dtype=torch.float32, copy=True).contiguous()
                   for m, params in enumerate(member_params) for name, p in params.items()}
        data = safetensors_save(tensors, metadata=metadata)
        atomic_replace(lambda f: f.write(data), folder / _weights_name(epoch))
    data = safetensors_save(dict(logits=logits, targets=targets, indices=indices), metadata=metadata)
    dest = folder / _logits_name(epoch)
    atomic_replace(lambda f: f.write(data), dest)
    return dest


def remove_snapshots_from(folder: str | Path, start_epoch: int) -> None:
    """Delete the snapshot files of epochs >= ``start_epoch`` (those a resumed run redoes), so that the folder never
    mixes a killed run's last epoch with the resumed one's. The initialisation's snapshot stays unless
    ``start_epoch`` is ``INIT_EPOCH``."""
    folder = Path(folder) / RunFolder.SNAPSHOTS
    if not folder.is_dir():
        return
    for epoch, paths in _epoch_files(folder).items():
        if epoch >= start_epoch:
            for path in paths:
                path.unlink(missing_ok=True)


def _epoch_files(folder: Path) -> dict[int, list[Path]]:
    files: dict[int, list[Path]] = {}
    for path in folder.iterdir():
        epoch = snapshot_epoch(path.name)
        epoch = snapshot_epoch(path.name, weights=True) if epoch is None else epoch
        if epoch is not None:
            files.setdefault(epoch, []).append(path)
    return files


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework='pt') as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"Snapshot file '{path}' cannot be read ({type(e).__name__}: {e}).") from e


def _flatten_members(tensors: dict[str, torch.Tensor], num_members: int, path: Path) -> torch.Tensor:
    flat = []
    for m in range(num_members):
        prefix = f'member{m}.'
        names = sorted(k for k in tensors if k.startswith(prefix))
        if not names:
            raise ValueError(f"Snapshot weights '{path}' hold no parameters of member {m}.")
        flat.append(torch.cat([tensors[k].float().reshape(-1) for k in names]))
    sizes = {v.numel() for v in flat}
    if len(sizes) != 1:
        raise ValueError(f"The members in '{path}' have different parameter counts {sorted(sizes)}; their weight"
                         f' vectors cannot be stacked.')
    return torch.stack(flat)


def read_snapshots(
        run_folder: str | Path,
        epochs: Sequence[int] | None = None,
        weights: bool = False,
        allow_missing: bool = False,
) -> Snapshots:
    """Read a run's snapshots (see the module docstring for the files).

    Args:
        run_folder: The run's output folder (or its ``snapshots`` folder).
        epochs: The epochs to read; None for every epoch from 0 to the last one the run recorded (in
            ``metrics.jsonl`` or as a snapshot file), preceded by the initialisation (``INIT_EPOCH``) when the run
            snapshotted it.
        weights: Also read the members' weights (the run must have used ``--snapshot-weights``).
        allow_missing: Read the epochs that exist and warn about the others, instead of raising.

    Returns:
        :class:`Snapshots`.

    Raises:
        FileNotFoundError: The run has no snapshots, or no weights snapshots when ``weights`` is set.
        ValueError: Epochs are missing (named in the message; see ``allow_missing``), or the files of different
            epochs disagree (subset, targets, shapes or run metadata) or cannot be read.
    """
    run_folder = Path(run_folder)
    folder = run_folder / RunFolder.SNAPSHOTS
    if not folder.is_dir() and run_folder.name == RunFolder.SNAPSHOTS and run_folder.is_dir():
        folder, run_folder = run_folder, run_folder.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"No snapshots in '{run_folder}' (no {RunFolder.SNAPSHOTS}/ folder): {_HINT}.")
    files = {e: folder / _logits_name(e) for e, paths in _epoch_files(folder).items()
             if (folder / _logits_name(e)) in paths}
    if not files:
        raise FileNotFoundError(f"No snapshot files in '{folder}': {_HINT}.")
    if epochs is None:
        logged = RunFolder(run_folder).last_logged_epoch()
        last = max(max(files), INIT_EPOCH if logged is None else logged)
        # runs from before the initialisation's snapshot have none: not a missing epoch
        wanted = [INIT_EPOCH] * (INIT_EPOCH in files) + list(range(last + 1))
    else:
        wanted = sorted({int(e) for e in epochs})
    missing = [e for e in wanted if e not in files]
    if weights:
        with_weights = [e for e in wanted if (folder / _weights_name(e)).is_file()]
        if not with_weights:
            raise FileNotFoundError(f"No weights snapshots in '{folder}': run train.py with --snapshot-weights (and"
                                    f' --snapshot-subset N) to record them.')
        missing = sorted(set(missing) | {e for e in wanted if e not in with_weights})
    if missing:
        what = 'snapshot (or weights) files' if weights else 'snapshot files'
        msg = f"'{folder}' has no {what} for epoch(s) {missing} of {wanted[0]}..{wanted[-1]}"
        if not allow_missing:
            raise ValueError(f'{msg}; pass allow_missing=True to read the epochs there are.')
        warnings.warn(f'{msg}; reading the other epochs.', stacklevel=2)
        wanted = [e for e in wanted if e not in missing]
        if not wanted:
            raise ValueError(f"'{folder}' has none of the epochs asked for.")

    logits, flat_weights, ref, ref_path, meta = [], [], None, None, {}
    for epoch in wanted:
        path = files[epoch]
        tensors, file_meta = _read(path)
        if not {'logits', 'targets', 'indices'} <= set(tensors):
            raise ValueError(f"Snapshot file '{path}' lacks logits, targets or indices; it was not written by"
                             f' train.py.')
        file_meta.pop('epoch', None)
        if ref is None:
            ref, ref_path, meta = tensors, path, file_meta
        else:
            for key in ('targets', 'indices'):
                if not torch.equal(tensors[key], ref[key]):
                    raise ValueError(f"'{path}' and '{ref_path}' snapshot different {key}: they are not of one"
                                     f' run with one --snapshot-subset.')
            if tensors['logits'].shape != ref['logits'].shape:
                raise ValueError(f"'{path}' holds logits of shape {tuple(tensors['logits'].shape)}, '{ref_path}'"
                                 f" {tuple(ref['logits'].shape)}.")
            changed = {k for k in set(meta) | set(file_meta) if meta.get(k) != file_meta.get(k)}
            if changed:
                raise ValueError(f"'{path}' and '{ref_path}' are from different runs (metadata {sorted(changed)}"
                                 f' differ).')
        logits.append(tensors['logits'].float())
        if weights:
            wpath = folder / _weights_name(epoch)
            wtensors, _ = _read(wpath)
            flat_weights.append(_flatten_members(wtensors, tensors['logits'].shape[1], wpath))
    stacked_weights = None
    if weights:
        sizes = {tuple(w.shape) for w in flat_weights}
        if len(sizes) != 1:
            raise ValueError(f"The weights snapshots in '{folder}' differ in shape across epochs: {sorted(sizes)}.")
        stacked_weights = torch.stack(flat_weights)
    return Snapshots(epochs=wanted, logits=torch.stack(logits), targets=ref['targets'].long(),
                     indices=ref['indices'].long(), weights=stacked_weights, meta=meta)
