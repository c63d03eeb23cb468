"""Ensembles of models you already have: trained folders, Hub repos or timm names, of any architectures.

``timm.create_model('ensemble', members=[...])`` (or ``timm_ensembles.ensemble_of([...])``) loads every member with
its weights (a ``train.py`` folder, ``local-dir:`` / ``hf-hub:`` source, or a timm name with timm's pretrained
weights) and combines them: by averaged probabilities (default), averaged logits, majority vote or a trained linear
head. Members of different architectures each see the input preprocessed their own way: the ensemble's batch,
prepared with the ensemble's data config (the first member's unless ``data_config`` is given), is mapped to every
member's normalisation and input size as a distillation teacher's is (``teachers.InputMap``: an exact affine map of
the normalisation, bilinear resizing; crops are not redone).

The ensemble saves as one model (``save_for_hf``, ``train.py``, ``push_to_hub``): its ``model_args`` record every
member's architecture, arguments and data config, so that ``timm.create_model('local-dir:<folder>', pretrained=True)``
rebuilds the members and loads all weights from the one ``model.safetensors``.

Members must predict the same classes: the same count and, where their configs name them, the same label names.
"""
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.models import get_model_args
from torch import nn

from ..losses import member_cross_entropy
from ..models.builder import create_ensemble, register_models
from ..models.ensemble import COMBINE_MODES, EnsembleHead, ModelArgsMixin, refuse_script
from ..models.registry import register_task
from ..models.teachers import InputMap, load_teacher
from ..task import Task, TaskOutput

__all__ = ['ModelEnsemble', 'ModelEnsembleTask', 'ensemble_of', 'ENSEMBLE_COMBINES']

ENSEMBLE_COMBINES = (*COMBINE_MODES, 'vote')
_DATA_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')


def _member_spec(model: nn.Module) -> dict[str, Any]:
    """What rebuilds a member: its architecture, arguments and data config (JSON-friendly)."""
    cfg = resolve_data_config(model=model)
    return dict(architecture=model.pretrained_cfg['architecture'], args=dict(get_model_args(model)),
                data_config={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k in _DATA_KEYS})


class ModelEnsemble(ModelArgsMixin, nn.Module):
    """Trained models of any architectures, each fed its own preprocessing, combined into one prediction.

    Args:
        members: Two or more sources (``train.py`` folders, ``local-dir:`` / ``hf-hub:`` names, timm names for timm's
            pretrained weights, or models), loaded with their weights; or, on a reload, the member specs that
            ``model_args`` recorded (built empty, the ensemble's own weights then loaded).
        combine: 'mean_probs' (default), 'mean_logits', 'vote' (majority vote, ties broken by the averaged
            probabilities) or 'linear' (a head over the concatenated member logits, trained by this model's task).
        data_config: The preprocessing of the ensemble's input (default: the first member's).
        num_classes: Must equal the members' (timm passes it); another count is refused.
        in_chans: Must equal the ensemble input's channel count.
        device: Where to put the members.
        dtype: Their parameter dtype.
    """
    base_free = True  # built from its members, not from one base model (see models.builder.create_ensemble)

    def __init__(
            self,
            members: Sequence[str | dict | nn.Module],
            combine: str = 'mean_probs',
            data_config: dict[str, Any] | None = None,
            num_classes: int | None = None,
            in_chans: int | None = None,
            device: str | torch.device | None = None,
            dtype: torch.dtype | None = None,
            **kwargs: Any,
    ):
        super().__init__()
        if isinstance(members, (str, dict, nn.Module)) or len(members) < 2:
            raise ValueError(f'An ensemble needs two or more members, got {members!r}.')
        if combine not in ENSEMBLE_COMBINES:
            raise ValueError(f"Unknown combine '{combine}', expected one of {ENSEMBLE_COMBINES}.")
        if kwargs:
            raise TypeError(f'ensemble does not take {sorted(kwargs)}: its members keep the arguments they were'
                            f' trained with.')
        models = [self._build(m, i) for i, m in enumerate(members)]
        # a reload keeps the recorded specs (a model built empty only knows its registry's data config)
        self.member_specs = [dict(m) if isinstance(m, dict) else _member_spec(model)
                             for m, model in zip(members, models)]
        classes = [m.num_classes for m in models]
        if len(set(classes)) != 1:
            raise ValueError('The members predict different numbers of classes: ' + ', '.join(
                f"member {i} ({s['architecture']}) {c}" for i, (s, c) in enumerate(zip(self.member_specs, classes)))
                + '. An ensemble averages one set of classes.')
        labels = [m.pretrained_cfg.get('label_names') for m in models]
        named = [(i, tuple(lb)) for i, lb in enumerate(labels) if lb]
        if len({lb for _, lb in named}) > 1:
            first = named[0]
            other = next((i, lb) for i, lb in named if lb != first[1])
            raise ValueError(f'The members name their classes differently: member {first[0]} {list(first[1])[:5]}...,'
                             f' member {other[0]} {list(other[1])[:5]}...: they predict different classes.')
        if num_classes is not None and num_classes != classes[0]:
            raise ValueError(f'The members predict {classes[0]} classes; num_classes={num_classes} was asked (an'
                             f' ensemble of trained models keeps their classes).')
        self.num_classes = classes[0]
        self.data_config = dict(data_config or self.member_specs[0]['data_config'])
        self.in_chans = int(self.data_config['input_size'][0])
        if in_chans is not None and in_chans != self.in_chans:
            raise ValueError(f'The ensemble input has {self.in_chans} channels (its data config); in_chans={in_chans}'
                             f' was asked.')
        self.members = nn.ModuleList(models)
        # the map from the ensemble's preprocessing to each member's (buffers that are not saved: they follow from
        # the data configs)
        self.input_maps = nn.ModuleList(InputMap(self.data_config, spec['data_config']) for spec in self.member_specs)
        self.head = EnsembleHead(len(models), self.num_classes, 'linear' if combine == 'linear' else 'mean_probs')
        self.combine_rule = combine
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def __prepare_scriptable__(self) -> nn.Module:
        refuse_script(self, 'its members, of any architectures, run in a Python loop that TorchScript does not compile')

    @staticmethod
    def _build(member: str | dict | nn.Module, index: int) -> nn.Module:
        if isinstance(member, dict):  # a recorded spec: built empty, the ensemble's weights are loaded after
            from ..models.registry import create_model
            return create_model(member['architecture'], pretrained=False, **member.get('args', {}))
        try:
            model = load_teacher(member)
        except ValueError as e:
            raise ValueError(f'member {index}: {e}') from e
        return model.requires_grad_(True).train()

    def _defining_args(self) -> dict[str, Any]:
        return dict(members=self.member_specs, combine=self.combine_rule, data_config=self.data_config)

    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def combine_mode(self) -> str:
        return self.combine_rule

    @property
    def num_features(self) -> int:
        """The members' pooled features side by side."""
        return sum(m.num_features for m in self.members)

    @property
    def head_hidden_size(self) -> int:
        return sum(getattr(m, 'head_hidden_size', m.num_features) for m in self.members)

    @property
    def extra_classifiers(self) -> tuple[str, ...]:
        return ('head.fc',) if self.head.fc is not None else ()

    def get_classifier(self) -> tuple[nn.Module, ...]:
        return tuple(m.get_classifier() for m in self.members) + (
            (self.head,) if self.head.fc is not None else ())

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        raise NotImplementedError('An ensemble of trained models keeps its members\' classes; fine-tune each member'
                                  ' (or build the ensemble from fine-tuned members).')

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's logits ``[B, M, C]``, each on the input mapped to its own preprocessing."""
        return torch.stack([m(adapt(x)) for m, adapt in zip(self.members, self.input_maps)], dim=1)

    def combine(self, member_logits: torch.Tensor) -> torch.Tensor:
        """The ensemble's logits from member logits ``[B, M, C]``; for 'vote', the log of each class's share of the
        votes, ties broken by the averaged probabilities."""
        if self.combine_rule != 'vote':
            return self.head(member_logits)
        probs = member_logits.float().softmax(-1)
        votes = F.one_hot(probs.argmax(-1), self.num_classes).float().mean(1)
        # a tie-breaker smaller than one vote: the averaged probability over (M + 1)
        share = votes + probs.mean(1) / (self.num_members + 1)
        return torch.log(share / share.sum(-1, keepdim=True)).to(member_logits.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._tempered(self.combine(self.forward_members(x)))


@register_task(ModelEnsemble)
class ModelEnsembleTask(Task):
    """Training of an ensemble of trained models: its linear head on the members' (detached) logits, the members
    frozen; with ``train_members=True`` also every member on its own cross-entropy (as a deep ensemble).

    Args:
        model: A ``ModelEnsemble``.
        train_members: Fine-tune the members too.
        label_smoothing: Label smoothing of the cross-entropies.
    """
    accepts_soft_targets = True  # every cross-entropy of it takes probabilities (mixup, cutmix)

    def __init__(self, model: ModelEnsemble, train_members: bool = False, label_smoothing: float = 0.0):
        super().__init__(model, label_smoothing=label_smoothing)
        if not train_members and model.head.fc is None:
            raise ValueError(f"Nothing to train: combine='{model.combine_rule}' has no weights and the members are"
                             f" frozen. Use combine='linear' (a trained head) or train_members=True.")
        self.train_members = train_members
        model.members.requires_grad_(train_members)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> TaskOutput:
        model = self.model
        if self.train_members:
            logits = model.forward_members(x)
            ce = member_cross_entropy(logits, target, self.label_smoothing)
            loss, components = ce.sum(), dict(ce=ce.detach().mean())
        else:
            with torch.no_grad():
                was = model.members.training
                model.members.eval()  # frozen members predict as they will at test time
                logits = model.forward_members(x)
                model.members.train(was)
            loss, components = logits.new_zeros((), dtype=torch.float32), {}
        output = model.combine(logits.detach())
        if model.head.fc is not None:
            head_ce = self.cross_entropy(output, target)
            loss = loss + head_ce
            components['head_ce'] = head_ce.detach()
        return dict(loss=loss, output=output, components=components)


def ensemble_of(members: Sequence[str | nn.Module], combine: str = 'mean_probs', **kwargs: Any) -> ModelEnsemble:
    """``timm.create_model('ensemble', members=members, combine=combine)``: see ``ModelEnsemble``."""
    import timm
    return timm.create_model('ensemble', members=list(members), combine=combine, **kwargs)


def _create(variant: str, pretrained: bool = False, **kwargs) -> ModelEnsemble:
    return create_ensemble(ModelEnsemble, variant, pretrained, **kwargs)


default_cfgs = {}
register_models(__name__, ['ensemble'], _create,
                'Ensemble of trained models of any architectures: members=[folders, hf-hub:, local-dir:, timm names]',
                paper_name='Simple and Scalable Predictive Uncertainty Estimation using Deep Ensembles (NeurIPS 2017)')
