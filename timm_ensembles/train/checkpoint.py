"""Training checkpoints and the model folders a run keeps, written so that a crash never leaves a half-written file.

Every file goes through ``utils.atomic`` (a temporary name beside its destination, flushed, then renamed over it; what a
kill leaves is swept by its ``TEMPORARY_PREFIX``). Checkpoints are read with ``torch.load(weights_only=True)``:
nothing is unpickled beyond tensors and plain containers.
"""
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files.model_folder import check_weights, export_folder, file_sha256
from ..files.run_folder import RunFolder
from ..utils.atomic import TEMPORARY_PREFIX, atomic_replace, fsync_dir, sweep_temporaries

__all__ = ['CheckpointError', 'save_checkpoint', 'load_checkpoint', 'find_checkpoint', 'export_new_folder',
           'rank_history', 'sweep_history', 'load_initial_checkpoint', 'model_identity']


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, or from another run."""


def _readable(path: Path) -> bool:
    """Whether a checkpoint file is whole: torch's zip format with every member's checksum intact."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def save_checkpoint(state: dict[str, Any], folder: str | Path) -> Path:
    """Write ``state`` as ``folder/checkpoint.pt``; the checkpoint it replaces is kept as ``checkpoint-prev.pt`` when it
    is readable (a corrupt one, which a run resumed from the backup leaves, never replaces a readable backup)."""
    folder = Path(folder)
    sweep_temporaries(folder)
    run = RunFolder(folder)
    dest, prev = run.checkpoint_path, run.previous_checkpoint_path
    new = dest.with_name(f'{TEMPORARY_PREFIX}{dest.name}.new')
    atomic_replace(lambda f: torch.save(state, f), new)
    if dest.exists() and _readable(dest):
        # a second name for the current checkpoint, so that checkpoint.pt exists at every instant
        prev_tmp = prev.with_name(f'{TEMPORARY_PREFIX}{prev.name}.new')
        prev_tmp.unlink(missing_ok=True)
        try:
            os.link(dest, prev_tmp)
        except OSError:  # no hard links on this file system
            shutil.copy2(dest, prev_tmp)
        os.replace(prev_tmp, prev)
    os.replace(new, dest)
    fsync_dir(folder)
    return dest


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint file that ``--resume path`` means: the file itself, or ``path/checkpoint.pt``."""
    path = Path(path)
    if path.is_dir():
        if RunFolder(path).checkpoint_path.is_file():
            return RunFolder(path).checkpoint_path
        raise CheckpointError(f"No {RunFolder.CHECKPOINT} in '{path}': it is not the output folder of a run that"
                              f" finished an epoch. --resume takes a run's output folder or a checkpoint file.")
    if path.is_file():
        return path
    raise CheckpointError(f"Cannot resume from '{path}': no such file or folder.")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``), with a clear error for a truncated or corrupt file."""
    path = find_checkpoint(path)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        prev = RunFolder(path.parent).previous_checkpoint_path
        hint = f" The checkpoint before it is '{prev}': --resume {prev}." if prev.is_file() and prev != path else ''
        raise CheckpointError(
            f"Checkpoint '{path}' is truncated or corrupt and cannot be read ({type(e).__name__}: {e}).{hint}"
        ) from e
    if not isinstance(state, dict) or 'task' not in state or 'epoch' not in state:
        raise CheckpointError(f"'{path}' is not a checkpoint written by train.py (no task state / epoch).")
    return state



def export_new_folder(model: nn.Module, folder: str | Path, **kwargs) -> Path:
    """:func:`export_folder` into a temporary folder beside ``folder``, then renamed to it: ``folder`` appears whole
    or not at all (one that exists is replaced). What a killed export leaves is removed by :func:`sweep_history`.

    Args:
        model: The model to export.
        folder: The folder to create.
        **kwargs: :func:`export_folder`'s ``model_config``, ``model_args``, ``data_config``.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f'{TEMPORARY_PREFIX}{folder.name}.new')
    old = folder.with_name(f'{TEMPORARY_PREFIX}{folder.name}.old')
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    export_folder(model, tmp, **kwargs)
    if folder.exists():
        # a folder is not renamed over a non-empty one: move the old one aside first
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def rank_history(
        history: list[dict[str, Any]], epoch: int, metric: str, value: float, size: int, lower_is_better: bool,
) -> list[dict[str, Any]]:
    """The ``size`` best epochs after ``epoch`` scored ``value``, best first, as timm's ``CheckpointSaver`` keeps
    them: an epoch enters when fewer are kept or it beats the worst kept one; among equal values the earlier epoch
    ranks first (so a tie never displaces a kept epoch).

    Args:
        history: The epochs kept so far, best first: ``[{'epoch': E, metric: value}, ...]``.
        epoch: The epoch just evaluated (an entry of the same epoch, from a redone epoch, is replaced).
        metric: The metric's name, the entries' key.
        value: Its value at ``epoch``.
        size: How many epochs to keep (0: none).
        lower_is_better: True for a loss.

    Returns:
        The new ranking; the epochs it leaves out are to be removed.
    """
    if size <= 0:
        return []
    kept = [h for h in history if h['epoch'] != epoch]
    # a stable sort of the ranking with the newcomer last: it stays behind kept epochs of the same value
    ranked = sorted([*kept, {'epoch': epoch, metric: float(value)}], key=lambda h: h[metric],
                    reverse=not lower_is_better)
    return ranked[:size]


def sweep_history(root: str | Path, keep: list[int]) -> list[Path]:
    """Remove from ``root`` the epochs' folders not in ``keep`` (epochs that fell out of the ranking, or that a
    resumed run redoes) and what killed exports left (``sweep_temporaries``). Returns the removed folders."""
    root = Path(root)
    if not root.is_dir():
        return []
    wanted = {RunFolder.history_name(e) for e in keep}
    stale = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and p.name not in wanted
             and RunFolder.is_history_name(p.name)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale + sweep_temporaries(root)



def load_initial_checkpoint(model: nn.Module, source: str | Path, exported: nn.Module | None = None) -> None:
    """Load weights into ``model`` strictly, as timm's train.py ``--initial-checkpoint`` does (its EMA weights where
    the checkpoint has them), from: a folder written by ``export_folder`` or timm's ``save_for_hf`` (its
    ``model.safetensors``, checked against the sha256 its config.json records), a ``.safetensors`` file, or a timm
    ``.pth`` checkpoint, read with ``torch.load(weights_only=True)``: nothing is ever unpickled.

    Args:
        model: The model to load into.
        source: Where the weights are.
        exported: The part of ``model`` a run exports, where that is not ``model`` itself (a student's bare
            network): weights that fit it, and not ``model``, are loaded into it (a student started from a trained
            network of its architecture, as MEAL V2 trains).

    Raises:
        ValueError: In one line: what the source is not, or how its weights do not fit the model.
        RuntimeError: The weights are not the ones their config.json was written with.
    """
    from timm.models import load_state_dict

    spec = str(source)
    path = Path(spec.removeprefix('local-dir:')).expanduser()
    if path.is_dir():
        weights = path / RunFolder.WEIGHTS
        if not weights.is_file():
            unfinished = f' (a run that has not finished: --resume {path} continues it)' \
                if RunFolder(path).checkpoint_path.is_file() else ''
            raise ValueError(f"--initial-checkpoint {spec}: the folder has no model.safetensors{unfinished}; give a"
                             f" folder written by train.py or timm's save_for_hf, a .safetensors file or a .pth file.")
        if (path / RunFolder.CONFIG).is_file():
            check_weights(json.loads((path / RunFolder.CONFIG).read_text()), weights, spec)
        path = weights
    try:
        state = load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as e:  # noqa: BLE001  (whatever the file is, one line says it cannot be read)
        raise ValueError(f"--initial-checkpoint {spec}: cannot read {path} as weights ({type(e).__name__}:"
                         f" {' '.join(str(e).split())[:300]})") from e
    if {'task', 'epoch', 'optimizer'} <= set(state):
        raise ValueError(f"--initial-checkpoint {spec} is a train.py checkpoint (training state): --resume continues"
                         f" its run; for its model, give the run's folder once it has finished (model.safetensors).")
    if exported is not None and exported is not model and set(state) == set(exported.state_dict()) \
            and set(state) != set(model.state_dict()):
        model = exported
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(getattr(state[k], 'shape', ())) != tuple(own[k].shape)]
    problems = [f'{len(keys)} {what} (e.g. {", ".join(keys[:3])})' for keys, what in (
        (missing, 'weights of the model missing'), (unexpected, 'weights the model does not have'),
        (shapes, 'weights of another shape')) if keys]
    if problems:
        raise ValueError(f"--initial-checkpoint {spec} does not fit {type(model).__name__}: {'; '.join(problems)}.")
    model.load_state_dict(state, strict=True)


def model_identity(source: str | Path) -> dict[str, Any]:
    """What identifies a model given as a folder (``local-dir:`` or a path), an ``hf-hub:`` repo or a timm name: the
    source, its config.json's architecture, and the sha256 of its model.safetensors, which changes when the folder
    is retrained in place (None where no file is at hand: a timm name's weights, a repo not in the local cache)."""
    spec = str(source)
    identity: dict[str, Any] = dict(source=spec, architecture=None, sha256=None)
    config = weights = None
    if spec.startswith(('hf-hub:', 'hf_hub:')):
        try:  # the files the load just read, from the cache; never a download
            from huggingface_hub import try_to_load_from_cache
            repo, _, revision = spec.split(':', 1)[1].partition('@')
            found = [try_to_load_from_cache(repo, name, revision=revision or None)
                     for name in (RunFolder.CONFIG, RunFolder.WEIGHTS)]
            config, weights = (Path(f) if isinstance(f, str) else None for f in found)
        except Exception:  # noqa: BLE001  (no hub package, a malformed name: nothing more to record)
            pass
    else:
        path = Path(spec.removeprefix('local-dir:')).expanduser()
        if path.is_dir():
            config, weights = path / RunFolder.CONFIG, path / RunFolder.WEIGHTS
        else:
            identity['architecture'] = spec  # a timm name
    if config is not None and config.is_file():
        try:
            identity['architecture'] = json.loads(config.read_text()).get('architecture')
        except (ValueError, AttributeError):
            pass
    if weights is not None and weights.is_file():
        identity['sha256'] = file_sha256(weights)
    return identity
