"""The start-of-run summary: what a run is about to train, on what, where, and what it will write, logged before the
first batch so that a wrong dataset, class count or member count shows on screen before it costs anything.
"""
import argparse
import shutil
from pathlib import Path

import torch
from torch import nn

from .. import data as te_data
from ..files.run_folder import RunFolder
from ..models.registry import registered_sizes
from .optim import optimizer_state_ratio

__all__ = ['run_summary', 'format_bytes']

_SHOWN_CLASSES = 5


def format_bytes(num: float) -> str:
    """A size in decimal units, three significant digits: 512 B, 3.21 MB, 1.25 GB."""
    for unit in ('B', 'kB', 'MB', 'GB'):
        if num < 1000 or unit == 'GB':
            return f'{num:.0f} {unit}' if unit == 'B' else f'{num:.3g} {unit}'
        num /= 1000
    return ''  # unreachable


def _state_bytes(module: nn.Module) -> int:
    # what torch.save / safetensors write for the module's state dict: each storage once
    seen, total = set(), 0
    for tensor in module.state_dict().values():
        if isinstance(tensor, torch.Tensor) and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def _count(ds) -> str:
    try:
        size = len(ds)
    except TypeError:  # a streamed dataset
        return 'streamed'
    if isinstance(ds, te_data.SubsetDataset):
        return f'{size} (of {len(ds.dataset)})'
    return str(size)


def _members_line(model_name: str, model: nn.Module, member_bytes: int, checkpoint_bytes: int) -> str:
    sizes = registered_sizes(model_name)
    base = getattr(model, 'base_model', None)
    if sizes is not None:
        size_arg, num, registered = sizes
        what = 'heads' if size_arg == 'num_heads' else 'members'
        line = f'{what}: {num}' + (f' x {base}' if base else '') + f' ({format_bytes(member_bytes)} a member)'
        if registered and num > max(registered):
            variants = f'x{min(registered)}-x{max(registered)}' if len(registered) > 1 else f'x{registered[0]}'
            line += (f'; warning: more than any registered variant ({variants}): {num} networks,'
                     f' {format_bytes(checkpoint_bytes)} a checkpoint. Is {model_name} the name you meant?')
        return line
    members = getattr(model, 'members', None)
    if hasattr(model, 'forward_members') and members is not None:
        return f'members: {len(members)} ({format_bytes(member_bytes)} a member)'
    return 'members: 1 (a single network)' + (f' of {base}' if base else '')


def run_summary(args: argparse.Namespace, info: te_data.DatasetInfo, task: nn.Module, datasets: dict,
                data_config: dict, accelerator, optimizer: torch.optim.Optimizer,
                output: Path | None = None) -> list[str]:
    """The lines of the start-of-run summary: model and class, members, parameter count, dataset and path, classes,
    split sizes, input size and normalisation, device, world size, precision, member strategy, and the size one
    checkpoint and one exported model take on disk (a member count beyond the registered variants is flagged there).

    Args:
        args: The run's flags (``member_strategy`` resolved).
        info: The dataset's :class:`~timm_ensembles.data.DatasetInfo`.
        task: The task (not yet prepared).
        datasets: Split name -> dataset (None for a split the run does not have).
        data_config: The evaluation data config.
        accelerator: The run's ``accelerate.Accelerator``.
        optimizer: The run's optimizer (its parameters are what the checkpoint keeps state for).
        output: The run folder: a warning is added when its disk has less room than the run will take.
    """
    model = task.export_model()
    params = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for group in optimizer.param_groups for p in group['params'])
    export_bytes = _state_bytes(model)
    try:
        ratio = optimizer_state_ratio(args.opt, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    except Exception:  # noqa: BLE001  (an optimizer that cannot step a CPU tensor: its state is left out)
        ratio = 0.0
    optimizer_bytes = ratio * sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g['params'])
    checkpoint_bytes = _state_bytes(task) + optimizer_bytes + (export_bytes if args.model_ema else 0)
    sizes, members = registered_sizes(args.model), getattr(model, 'members', None)
    num_members = sizes[1] if sizes else len(members) if members is not None and hasattr(model, 'forward_members') \
        else 1
    member_bytes = export_bytes // max(num_members, 1)

    lines = [f'model: {args.model} ({type(model).__name__}, trained by {type(task).__name__})',
             '  ' + _members_line(args.model, model, member_bytes, checkpoint_bytes)]
    extra = f'; the task trains {trained / 1e6:.3g} M with its training-only parts' if trained != params else ''
    lines.append(f'  parameters: {params / 1e6:.3g} M{extra}')

    where = ''
    if info.split_paths:
        where = f' (image folder: training {info.split_paths[0]}, validation {info.split_paths[1]})'
    elif info.name == 'digits':
        where = " (scikit-learn's 8x8 digits, embedded)"
    elif args.data_dir and args.data_dir not in info.name:
        where = f' in {args.data_dir}'
    lines.append(f'  dataset: {info.name}{where}')
    names = info.class_names or []
    shown = ', '.join(names[:_SHOWN_CLASSES]) + (', ...' if len(names) > _SHOWN_CLASSES else '')
    lines.append(f'  classes: {info.num_classes}' + (f' ({shown})' if names else ''))
    lines.append('  splits: ' + ', '.join(f'{name} {_count(ds)}' for name, ds in datasets.items() if ds is not None))
    mean = ', '.join(f'{v:.4g}' for v in data_config['mean'])
    std = ', '.join(f'{v:.4g}' for v in data_config['std'])
    lines.append(f"  input: {'x'.join(map(str, data_config['input_size']))}, {data_config.get('interpolation')},"
                 f" crop_pct {data_config.get('crop_pct')}, mean ({mean}), std ({std})")
    mixed = str(accelerator.mixed_precision)
    precision = {'no': 'fp32', 'fp16': 'autocast, grad scaler', 'bf16': 'autocast'}.get(mixed)
    lines.append(f'  device: {accelerator.device}, world size {accelerator.num_processes}'
                 f' ({accelerator.distributed_type}), mixed precision {mixed}'
                 + (f' ({precision})' if precision else ''))
    if num_members > 1 and hasattr(model, 'set_member_strategy'):
        lines.append(f'  member strategy: {args.member_strategy}')
    lines.append(f'  on disk: {format_bytes(checkpoint_bytes)} a checkpoint ({RunFolder.CHECKPOINT}, kept twice with'
                 f' {RunFolder.PREVIOUS_CHECKPOINT}), {format_bytes(export_bytes)} an exported model'
                 f' ({RunFolder.WEIGHTS}, {RunFolder.BEST}/{f", {RunFolder.EMA}/" if args.model_ema else ""}'
                 f'{f", up to {args.checkpoint_hist} in {RunFolder.HISTORY}/" if args.checkpoint_hist else ""})')
    # two checkpoints (and a third while one is replaced), the final model, best/, ema/ and the kept epochs
    needed = 3 * checkpoint_bytes + (2 + bool(args.model_ema) + args.checkpoint_hist) * export_bytes
    free = _free_bytes(output) if output is not None else None
    if free is not None and free < needed:
        lines.append(f'  warning: {format_bytes(free)} free on the disk of {output}, where the run will take up to'
                     f' {format_bytes(needed)}: a save that finds the disk full stops the run (its last checkpoint'
                     f' kept)')
    return lines


def _free_bytes(path: Path) -> int | None:
    for p in (Path(path), *Path(path).parents):
        if p.is_dir():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None
