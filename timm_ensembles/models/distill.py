"""What the distillation methods share: the student model and the task that holds frozen teachers.

The student wrapper adds nothing to inference: ``forward`` is the student's, and the task exports the bare timm
model (``export_model``), so that a trained student is an ordinary model of its architecture that plain timm loads.
The teachers live in the task but outside its module tree (see ``teachers.py``): never in a checkpoint or an export,
never wrapped by DDP, always in eval mode.
"""
from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn

from ..task import Task
from ..utils.timm_compat import get_global_pool
from .ensemble import ModelArgsMixin, sub_group_matcher
from .registry import check_base_model
from .teachers import TeacherAdapter, TeacherError, load_teachers

__all__ = ['StudentModel', 'DistillationTask']


class StudentModel(ModelArgsMixin, nn.Module):
    """One timm model trained by a distillation method (the method's subclass picks the task). Scriptable
    (``torch.jit.script``) where its base is: the properties below are Python-only.

    Args:
        base_model: The student's architecture, any timm model name.
        pretrained_base: Start the student from timm's pretrained weights of ``base_model``.
        num_classes: Number of classes.
        in_chans: Number of input channels.
        device: Device to build the parameters on.
        dtype: Parameter dtype.
        **kwargs: Passed to ``timm.create_model`` (``img_size``, drop rates, ...).
    """

    __jit_unused_properties__ = ['model_args', '_model_args', 'num_classes', 'num_features', 'head_hidden_size',
                                 'global_pool', 'feature_info', 'output_fmt']

    def __init__(
            self,
            base_model: str,
            pretrained_base: bool = False,
            num_classes: int = 1000,
            in_chans: int = 3,
            device: str | torch.device | None = None,
            dtype: torch.dtype | None = None,
            **kwargs: Any,
    ):
        super().__init__()
        check_base_model(base_model, what='student model')
        self.base_model = base_model
        self.in_chans = in_chans
        self.student = timm.create_model(base_model, pretrained=pretrained_base, num_classes=num_classes,
                                         in_chans=in_chans, device=device, dtype=dtype, **kwargs)

    def _defining_args(self) -> dict[str, Any]:
        return dict(base_model=self.base_model)

    @property
    def num_classes(self) -> int:
        return self.student.num_classes

    @property
    def num_features(self) -> int:
        return self.student.num_features

    @property
    def head_hidden_size(self) -> int:
        return getattr(self.student, 'head_hidden_size', self.student.num_features)

    @property
    def global_pool(self) -> str | None:
        return get_global_pool(self.student)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """The student's feature levels (its modules under ``student.``)."""
        info = self.student.feature_info
        info = info.get_dicts() if hasattr(info, 'get_dicts') else info
        return [dict(level, module=f"student.{level['module']}") for level in info]

    @property
    def output_fmt(self) -> str:
        return getattr(self.student, 'output_fmt', 'NCHW')

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The student's parameter groups under ``student.`` (layer decay, see ``EnsembleModel.group_matcher``)."""
        return sub_group_matcher(self.student, r'^student\.', coarse)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        return self.student.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)

    def get_classifier(self) -> nn.Module:
        return self.student.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.temperature = 1.0  # fitted to the old classes
        if global_pool is None:
            self.student.reset_classifier(num_classes)
        else:
            self.student.reset_classifier(num_classes, global_pool)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.student.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        nwd = getattr(self.student, 'no_weight_decay', None)
        return {f'student.{n}' for n in nwd()} if callable(nwd) else set()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.student.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.student.forward_head(x, pre_logits=pre_logits)
        return x if pre_logits else self._tempered(x)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        return self.student.forward_intermediates(x, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._tempered(self.student(x))


class DistillationTask(Task):
    """Base of the distillation tasks: frozen teachers, each fed its own preprocessing, and the bare student exported.

    A ``Task`` of this package, not ``timm.task``'s (``Task`` says why); its name does not clash with
    timm's distillation tasks (``LogitDistillationTask``, ``FeatureDistillationTask``, ``TokenDistillationTask``).

    Args:
        model: The ``StudentModel``.
        teachers: One or more teachers: timm names (timm's pretrained weights), ``hf-hub:`` / ``local-dir:``
            sources, folders written by ``train.py`` (ensembles included), or models (fed the student's batches
            as they are). A teacher must have a ``num_classes`` attribute equal to the student's.
        label_smoothing: Label smoothing of the cross-entropy with the labels, where a method uses it.
    """

    def __init__(self, model: StudentModel, teachers: Sequence[str | nn.Module] | str | None = None,
                 label_smoothing: float = 0.0):
        super().__init__(model, label_smoothing=label_smoothing)
        if teachers is None or (not isinstance(teachers, (str, nn.Module)) and len(teachers) == 0):
            raise TeacherError(f'{type(self).__name__} needs at least one teacher (train.py --teacher <timm name,'
                               f' hf-hub: or local-dir: source, or a train.py output folder>).')
        specs = [teachers] if isinstance(teachers, (str, nn.Module)) else list(teachers)
        loaded = load_teachers(specs)
        for spec, teacher in zip(specs, loaded):
            t_classes = getattr(teacher, 'num_classes', None)
            if t_classes != model.num_classes:
                name = spec if isinstance(spec, str) else type(spec).__name__
                raise TeacherError(f"teacher '{name}' predicts {t_classes} classes, the student {model.num_classes}:"
                                   f' distillation needs the same classes (train the teacher on this dataset).')
        self.teacher_names = [s if isinstance(s, str) else type(s).__name__ for s in specs]
        # outside the module tree: not in state_dict, not moved by .to(), not switched by .train(), not seen by DDP
        self.__dict__['_teacher_models'] = loaded
        # a model handed over in Python says nothing reliable of its preprocessing (every timm model has an
        # ImageNet cfg): it is fed the student's batches; loaded teachers take the cfg they were saved with
        self.__dict__['_given_as_module'] = {id(t) for s, t in zip(specs, loaded) if isinstance(s, nn.Module)}
        self.__dict__['_teachers'] = None
        # random choices (which teacher, which permutation) come from a generator of the task's own, seeded from
        # the global RNG at construction (train.py seeds it alike on every process) and reseeded each epoch:
        # every DDP process then draws the same, and a resumed run the same as an uninterrupted one
        self._task_seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
        self.__dict__['_generator'] = torch.Generator().manual_seed(self._task_seed)

    @property
    def generator(self) -> torch.Generator:
        return self.__dict__['_generator']

    def set_label_names(self, label_names: list[str] | None) -> None:
        """Refuse a teacher whose saved class names differ from the dataset's (the same count of other classes)."""
        if not label_names:
            return
        for name, teacher in zip(self.teacher_names, self.__dict__['_teacher_models']):
            theirs = (getattr(teacher, 'pretrained_cfg', None) or {}).get('label_names')
            if theirs and list(theirs) != list(label_names):
                diff = next(i for i, (a, b) in enumerate(zip(theirs, label_names)) if a != b)
                raise TeacherError(
                    f"teacher '{name}' was trained on other classes: its class {diff} is {theirs[diff]!r}, this"
                    f" dataset's is {label_names[diff]!r}. Distillation needs a teacher of the same classes.")

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.generator.manual_seed(self._task_seed + epoch)

    @property
    def teachers(self) -> list[TeacherAdapter]:
        """The teachers, each behind the adapter that maps the student's batches to its preprocessing."""
        if self.__dict__['_teachers'] is None:
            self._build_adapters()
        return self.__dict__['_teachers']

    def _teacher_units(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(model run as a teacher, model whose preprocessing it takes)`` pairs; a method may expand an ensemble
        into its members."""
        return [(t, t) for t in self.__dict__['_teacher_models']]

    def _build_adapters(self) -> None:
        from timm.data import resolve_data_config
        cfg = self.data_config or resolve_data_config(model=self.model.student)
        ref = next(self.model.parameters())
        adapters = []
        for unit, parent in self._teacher_units():
            given = id(parent) in self.__dict__['_given_as_module'] or not getattr(parent, 'pretrained_cfg', None)
            t_cfg = cfg if given else resolve_data_config(model=parent)
            adapters.append(TeacherAdapter(unit, cfg, t_cfg).to(ref.device).eval())
        self.__dict__['_teachers'] = adapters

    def set_data_config(self, data_config: dict[str, Any]) -> None:
        super().set_data_config(data_config)
        self.__dict__['_teachers'] = None

    def on_device(self, x: torch.Tensor) -> list[TeacherAdapter]:
        """The teachers, moved to the batch's device if the task was moved since they were built."""
        teachers = self.teachers
        for t in teachers:
            if t.input_map.src_std.device != x.device:
                t.to(x.device)
        return teachers

    def export_model(self) -> nn.Module:
        return self.model.student
