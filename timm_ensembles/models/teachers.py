"""Frozen teachers for distillation: loading them from any source, and feeding each its own preprocessing.

A teacher is given as a timm model name (loaded with ``pretrained=True``: timm's weights), an ``hf-hub:`` repo, a
``local-dir:`` folder, or a folder written by ``train.py`` (ensembles of this package included). Teachers are
frozen (no gradients) and kept in eval mode whatever ``train()`` is called on the task that holds them; a task keeps
them out of its module tree, so that they are neither in its ``state_dict`` (checkpoints, exports) nor wrapped by DDP.

Each model sees the input preprocessed its own way: the student's loader normalises with the student's mean and
std at the student's input size, and ``TeacherAdapter`` maps that batch to the teacher's mean, std and input size
(an exact per-channel affine map for normalisation, bilinear resizing for the size; crops are not redone).
"""
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import nn

from ..files.run_folder import RunFolder
from .hub import check_member_source
from .registry import create_model

__all__ = ['TeacherError', 'load_teacher', 'load_teachers', 'InputMap', 'TeacherAdapter']


class TeacherError(ValueError):
    """A teacher cannot be loaded or does not fit the student."""


def _model_name(spec: str) -> str:
    if spec.startswith(('hf-hub:', 'local-dir:', 'hf_hub:')):
        return spec
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / RunFolder.CONFIG).is_file():
            raise TeacherError(f"teacher '{spec}' is a folder without config.json: give a folder written by train.py"
                               f' (or by timm.models.save_for_hf).')
        return f'local-dir:{path.resolve()}'
    return spec


def load_teacher(spec: str | nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Load and freeze one teacher.

    Args:
        spec: A timm model name (timm's pretrained weights), ``hf-hub:<repo>``, ``local-dir:<folder>``, a folder
            written by ``train.py``, or a model.
        device: Where to put it.

    Raises:
        TeacherError: It cannot be loaded (the message says which teacher and why).
    """
    if isinstance(spec, nn.Module):
        teacher = spec
    else:
        if not isinstance(spec, str) or not spec:
            raise TeacherError(f'a teacher is a model name, hf-hub:/local-dir: source or folder, got {spec!r}.')
        name = _model_name(spec)
        try:
            check_member_source(name)  # a member named by a repo's config: Hub safetensors only
            teacher = create_model(name, pretrained=True)
        except Exception as e:  # noqa: BLE001  (any failure to load is reported with the teacher's name)
            hint = ''
            if not name.startswith(('hf-hub:', 'local-dir:')) and not Path(spec).exists():
                hint = (' (a plain timm name loads its pretrained weights, which needs the network or a filled cache;'
                        ' a folder must exist)')
            raise TeacherError(f"cannot load teacher '{spec}': {type(e).__name__}: {e}{hint}") from e
    teacher.requires_grad_(False)
    teacher.eval()
    if device is not None:
        teacher.to(device)
    return teacher


def load_teachers(specs: Sequence[str | nn.Module], device: torch.device | str | None = None) -> list[nn.Module]:
    """Load every teacher; an empty list is an error."""
    if isinstance(specs, (str, nn.Module)):
        specs = [specs]
    if not specs:
        raise TeacherError('no teacher given: pass at least one (train.py --teacher <name or folder>).')
    return [load_teacher(s, device) for s in specs]


class InputMap(nn.Module):
    """Maps a batch preprocessed one way (``src_cfg``: ``mean``, ``std``, ``input_size``) to another model's
    preprocessing (``dst_cfg``): an exact per-channel affine map of the normalisation (the pixels' channel mean for a
    gray model fed colour, the gray channel repeated for a colour model fed gray), bilinear resizing of the size
    (crops are not redone). What a teacher or an ensemble member of another architecture is fed through."""

    def __init__(self, src_cfg: dict[str, Any], dst_cfg: dict[str, Any]):
        super().__init__()
        src_chans, dst_chans = int(src_cfg['input_size'][0]), int(dst_cfg['input_size'][0])
        if src_chans != dst_chans and {src_chans, dst_chans} != {1, 3}:
            raise ValueError(f'Cannot map {src_chans}-channel input to a model that takes {dst_chans} channels.')
        s_mean, s_std = _per_channel(src_cfg['mean'], src_chans), _per_channel(src_cfg['std'], src_chans)
        t_mean, t_std = _per_channel(dst_cfg['mean'], dst_chans), _per_channel(dst_cfg['std'], dst_chans)
        self.channels = None if src_chans == dst_chans else dst_chans
        self.same_norm = self.channels is None and bool(torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std))
        for name, value in (('src_mean', s_mean), ('src_std', s_std), ('dst_mean', t_mean), ('dst_std', t_std)):
            self.register_buffer(name, value.view(1, -1, 1, 1), persistent=False)
        self.size = tuple(dst_cfg['input_size'][-2:])
        self.same_size = self.size == tuple(src_cfg['input_size'][-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.same_norm:
            pixels = x * self.src_std.to(x.dtype) + self.src_mean.to(x.dtype)
            if self.channels == 1:
                pixels = pixels.mean(1, keepdim=True)
            elif self.channels == 3:
                pixels = pixels.expand(-1, 3, -1, -1)
            x = (pixels - self.dst_mean.to(x.dtype)) / self.dst_std.to(x.dtype)
        if not self.same_size and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode='bilinear', align_corners=False)
        return x


def _per_channel(values, channels: int) -> torch.Tensor:
    values = torch.tensor(values if isinstance(values, (list, tuple)) else [values], dtype=torch.float32)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values.repeat(channels)
    return values.mean(0, keepdim=True) if channels == 1 else values


class TeacherAdapter(nn.Module):
    """Maps a batch preprocessed for the student to the teacher's normalisation and input size, then runs it.

    Args:
        teacher: The frozen teacher.
        student_cfg: The student's data config (``mean``, ``std``, ``input_size``).
        teacher_cfg: The teacher's; default ``resolve_data_config(model=teacher)``.
    """

    def __init__(self, teacher: nn.Module, student_cfg: dict[str, Any], teacher_cfg: dict[str, Any] | None = None):
        super().__init__()
        self.teacher = teacher
        self.input_map = InputMap(student_cfg, teacher_cfg or resolve_data_config(model=teacher))

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_map(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(self.adapt(x))

    def train(self, mode: bool = True) -> 'TeacherAdapter':
        # a frozen teacher stays in eval mode: train() on a parent must not switch its BatchNorm or dropout
        return super().train(False)
