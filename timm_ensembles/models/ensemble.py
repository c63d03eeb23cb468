"""The ensemble container shared by the ensemble methods: N timm models and a head that combines them.

The container holds only what inference needs. What a method adds for training (losses, phases,
teachers, discriminators) lives in its task (see ``task.py``).
"""
import math
import re
from collections.abc import Sequence
from typing import Any, NoReturn

import timm
import torch
import torch.nn.functional as F
from timm.optim import auto_group_layers
from torch import nn

from ..utils.checks import check_number, is_whole
from ..utils.timm_compat import get_global_pool
from .registry import check_base_model
from .strategies import (
    DEFAULT_FEATURE_TAPS,
    FEATURE_TAPS,
    MEMBER_STRATEGIES,
    AutoStrategy,
    MemberStrategy,
    capture_conv_outputs,
    conv_modules,
    create_member_strategy,
    tapped_convs,
)

__all__ = ['EnsembleModel', 'EnsembleHead', 'ModelArgsMixin', 'prefix_group_matcher', 'sub_group_matcher',
           'refuse_script', 'COMBINE_MODES', 'FEATURE_TAPS', 'DEFAULT_FEATURE_TAPS', 'MEMBER_STRATEGIES',
           'capture_conv_outputs', 'conv_modules', 'tapped_convs']

COMBINE_MODES = ('linear', 'mean_logits', 'mean_probs')


class EnsembleHead(nn.Module):
    """Combines member logits ``[B, M, C]`` into ensemble logits ``[B, C]``.

    Modes:
        linear: a learned linear map over the concatenated member logits (the FDL paper's ensemble head,
            a kernel-1 Conv1d over ``M * C`` channels in its reference code). Initialised to the average of
            the member logits, so that an untrained head already gives ``mean_logits`` (the reference
            initialises it randomly; averaging is a better starting point and changes nothing once trained).
        mean_logits: the average of the member logits.
        mean_probs: logits whose softmax is the average of the member probabilities (log of the mean
            probability), the usual deep-ensemble prediction.
    """

    def __init__(
            self,
            num_members: int,
            num_classes: int,
            mode: str = 'mean_probs',
            device: torch.device | None = None,
            dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if mode not in COMBINE_MODES:
            raise ValueError(f"Unknown combine mode '{mode}', expected one of {COMBINE_MODES}.")
        self.num_members = num_members
        self.num_classes = num_classes
        self.mode = mode
        if mode == 'linear' and num_classes > 0:
            self.fc = nn.Linear(num_members * num_classes, num_classes, device=device, dtype=dtype)
            self.reset_parameters()
        else:
            self.fc = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.fc is None:
            return
        # concatenation is member-major (index m * C + c), as torch.cat of the members' logits along dim 1
        eye = torch.eye(self.num_classes, device=self.fc.weight.device, dtype=self.fc.weight.dtype)
        self.fc.weight.copy_(eye.repeat(1, self.num_members) / self.num_members)
        self.fc.bias.zero_()

    def forward(self, member_logits: torch.Tensor) -> torch.Tensor:
        if self.num_classes <= 0:
            # members are feature extractors (num_classes=0): their pooled features side by side
            return member_logits.flatten(1)
        if self.fc is not None:
            return self.fc(member_logits.flatten(1))
        if self.mode == 'mean_logits':
            return member_logits.mean(1)
        log_probs = F.log_softmax(member_logits.float(), dim=-1)
        return (torch.logsumexp(log_probs, dim=1) - math.log(self.num_members)).to(member_logits.dtype)

    def extra_repr(self) -> str:
        return f'mode={self.mode}, num_members={self.num_members}, num_classes={self.num_classes}'


class ModelArgsMixin:
    """``model_args`` for wrappers built by timm's factory: what the factory recorded, less ``pretrained_base``
    (a reload must not download the base's weights, which the wrapper's own weights replace), ``member_strategy``
    (how the members run is a choice of the machine that runs them, not part of the model) and ``trust_member_repos``
    (an opt-in of the one who loads, never of a config), plus the arguments that define the wrapper
    (``_defining_args``) and a calibration ``temperature`` when one is set.

    Temperature scaling (Guo et al. 2017): ``forward`` divides its logits by ``temperature`` (1: off). It is fitted
    after training on validation data (``uncertainty.calibrate``), recorded in ``model_args`` so that a saved or pushed
    model reloads calibrated (``timm.create_model(..., temperature=T)``), never seen by the training losses (they
    use ``forward_members``/``combine`` or the bare student), and set back to 1 by ``reset_classifier`` (new classes
    need a new fit).
    """
    _unrecorded_args = ('pretrained_base', 'member_strategy', 'temperature', 'trust_member_repos')

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.temperature = 1.0  # an instance attribute, which TorchScript sees (a class attribute it does not)

    def set_temperature(self, temperature: float) -> None:
        """Divide ``forward``'s logits by ``temperature`` from now on (1 turns calibration off)."""
        check_number('temperature', temperature, 'a finite number > 0 (1: no calibration)', gt=0)
        if temperature != 1.0 and getattr(self, 'num_classes', 1) <= 0:
            raise ValueError('This model has no classifier (num_classes=0): its outputs are features, which a'
                             ' temperature does not apply to. Give it classes first (reset_classifier).')
        self.temperature = float(temperature)

    def _tempered(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.temperature == 1.0 else logits / self.temperature

    def _defining_args(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def _model_args(self) -> dict[str, Any]:
        args = {k: v for k, v in self.__dict__.get('_recorded_model_args', {}).items()
                if k not in self._unrecorded_args}
        args.update(self._defining_args())
        if self.temperature != 1.0:
            args['temperature'] = self.temperature
        return args

    @_model_args.setter
    def _model_args(self, value: dict[str, Any]) -> None:
        self.__dict__['_recorded_model_args'] = dict(value)

    @property
    def model_args(self) -> dict[str, Any]:
        """Arguments that rebuild this model with ``timm.create_model`` (what ``save_for_hf`` records)."""
        from timm.models import get_model_args
        return get_model_args(self)


def prefix_group_matcher(matcher: dict[str, Any], prefix: str) -> dict[str, Any]:
    r"""A timm ``group_matcher`` of a sub-model, for its parameters under ``prefix`` (a regex such as
    ``r'^members\.\d+\.'``): every pattern anchored there, its ordinal groups kept."""
    def shift(pattern):
        if isinstance(pattern, str):
            # non-capturing: a pattern's alternatives ('^conv1|bn1') all start at the prefix, and its numbered
            # groups (the layer ordinals) keep their numbers
            return f"{prefix}(?:{pattern.lstrip('^')})"
        if isinstance(pattern, tuple) and all(isinstance(v, (int, float)) for v in pattern):
            return pattern  # an ordinal, e.g. (99999,)
        if isinstance(pattern, (list, tuple)):
            return type(pattern)(shift(p) for p in pattern)
        return pattern
    return {k: shift(v) for k, v in matcher.items()}


def sub_group_matcher(model: nn.Module, prefix: str, coarse: bool = False) -> dict[str, Any]:
    r"""The timm ``group_matcher`` of a sub-model (a member, a head, a student) for its parameters under ``prefix``
    (see ``prefix_group_matcher``). A model without one (a user's own) is grouped as timm's layer decay groups such a
    model: ``auto_group_layers``, its parameters in order and the classifier last."""
    matcher = getattr(model, 'group_matcher', None)
    if matcher is not None:
        return prefix_group_matcher(matcher(coarse=coarse), prefix)
    layers = auto_group_layers(model)
    last = max(layers.values(), default=0)
    # the classifier (auto_group_layers' last group) is left unmatched, as timm's own matchers leave classifiers: in
    # the last group, with an ensemble's head
    return {'layers': [(f'{prefix}{re.escape(name)}$', (layer,)) for name, layer in layers.items() if layer < last]}


def refuse_script(model: nn.Module, why: str) -> NoReturn:
    """What ``torch.jit.script`` meets in a model it cannot compile (its ``__prepare_scriptable__``, which TorchScript
    calls before compiling): one line saying why, and the export that gives one graph instead, rather than the
    compiler's error about the first Python construct it does not know."""
    raise RuntimeError(f'torch.jit.script cannot compile {type(model).__name__}: {why}. For one graph, export it:'
                       f" timm_ensembles.export(model, 'model.onnx'), or format='torch.export' for a .pt2 program"
                       f' (the command timm-ensembles-export).')


class EnsembleModel(ModelArgsMixin, nn.Module):
    """N independently initialised timm models of one architecture and a head that combines them.

    A timm classifier like any other: ``forward(x)`` gives ``[B, C]`` logits in train and eval mode,
    ``forward_members(x)`` the members' logits ``[B, M, C]`` (batch first, as
    ``accelerator.gather_for_metrics`` needs). With ``num_classes=0`` the members are feature extractors and
    ``forward`` gives their pooled features side by side, ``[B, M * F]``, and ``num_features`` is ``M * F``.

    Args:
        base_model: Any timm model name (a tag selects pretrained weights for ``pretrained_base``), including
            models a user registered with timm.
        num_members: Number of members N (>= 2).
        combine: How ``forward`` combines the members, one of ``COMBINE_MODES`` (see ``EnsembleHead``). Each
            method sets its own default.
        pretrained_base: Initialise every member from timm's pretrained weights of ``base_model``. The members
            are then identical but for their re-initialised classifiers, where ``num_classes`` differs from the
            weights'. (``pretrained=True`` on the ensemble means the ensemble's own published weights.)
        num_classes: Number of classes (0: no classifier).
        in_chans: Number of input channels.
        member_strategy: How the members run, one of ``MEMBER_STRATEGIES`` (see ``set_member_strategy``); not
            recorded in ``model_args``.
        device: Device to build the parameters on.
        dtype: Parameter dtype.
        **kwargs: Passed to every member's ``timm.create_model`` (``global_pool``, ``img_size``, ``drop_rate``,
            ``drop_path_rate`` and any other argument of the base model).
    """
    default_combine = 'mean_probs'

    def __init__(
            self,
            base_model: str,
            num_members: int = 2,
            combine: str | None = None,
            pretrained_base: bool = False,
            num_classes: int = 1000,
            in_chans: int = 3,
            member_strategy: str = 'loop',
            device: str | torch.device | None = None,
            dtype: torch.dtype | None = None,
            **kwargs: Any,
    ):
        super().__init__()
        check_base_model(base_model, what='base model')
        if not is_whole(num_members, ge=2):
            raise ValueError(
                f'An ensemble needs num_members >= 2 (an integer), got {num_members!r}. For one network,'
                f" train the base model '{base_model}' itself."
            )
        combine = combine or self.default_combine
        if combine not in COMBINE_MODES:
            raise ValueError(f"Unknown combine mode '{combine}', expected one of {COMBINE_MODES}.")
        self.base_model = base_model
        self.num_members = num_members
        self.num_classes = num_classes
        self.in_chans = in_chans
        member_args = dict(num_classes=num_classes, in_chans=in_chans, device=device, dtype=dtype, **kwargs)
        # one create_model call per member: each draws its own initialisation from the global RNG
        self.members = nn.ModuleList([
            timm.create_model(base_model, pretrained=pretrained_base, **member_args) for _ in range(num_members)
        ])
        member = self.members[0]
        self.member_num_features = member.num_features
        self.head = EnsembleHead(num_members, num_classes, combine, device=device, dtype=dtype)
        self.set_member_strategy(member_strategy)

    def __prepare_scriptable__(self) -> nn.Module:
        refuse_script(self, 'its members run through a member strategy, Python code that TorchScript does not compile')

    # ---- how the members run ----
    def set_member_strategy(self, name: str, example_input: torch.Tensor | None = None) -> None:
        """Choose how ``forward_members`` and ``forward_members_with_features`` run the members.

        ``'loop'`` (default): one member after another. ``'vmap'``: ``torch.func.vmap`` over the members' stacked
        parameters and buffers. ``'grouped'``: the members fused into one network of grouped convolutions (BatchNorm
        CNNs only). ``'auto'``: on the first call for each input shape, dtype, device and mode, times the strategies
        that accept the model on that batch and keeps the fastest (``member_strategy`` then says which;
        ``'grouped:split'`` / ``'grouped:grouped'`` are the grouped strategy with one kind of kernel throughout).
        ``vmap`` and ``grouped`` are checked against the loop when set (outputs, features, gradients, BatchNorm
        statistics on a probe batch, in float64 on a CPU copy of the members, which stay untouched) and refused with a
        ``StrategyError`` (a ``ValueError``) that says why. Every strategy reads the members' own parameters and writes
        their own BatchNorm statistics, so the state_dict, checkpoints and Hub repos are the same whichever ran. See
        ``models/strategies``.

        Changing the members' modules afterwards (``reset_classifier`` and ``set_grad_checkpointing`` do this
        themselves) needs ``set_member_strategy`` again.

        Args:
            name: One of ``MEMBER_STRATEGIES``.
            example_input: Probe batch of the check (``auto``: make the choice now, on this batch); default: a
                random batch of 2 at the base's input size capped at 64 px (a ViT's own size; the full size if the
                base does not take 64 px).
        """
        self._member_strategy: MemberStrategy = create_member_strategy(
            name, self.members, self.base_model, self.in_chans, example_input)

    @property
    def member_strategy(self) -> str:
        """The strategy that runs the members: for ``auto``, the one it chose for the latest call (``'auto'``
        before its first)."""
        strategy = self._member_strategy
        if isinstance(strategy, AutoStrategy):
            return strategy.last_choice or 'auto'
        return strategy.name

    @property
    def member_strategy_info(self) -> dict[str, Any]:
        """The strategy set and, for ``auto``, the eligible strategies, refusals, choices and timings."""
        strategy = self._member_strategy
        info = dict(strategy=strategy.name)
        if isinstance(strategy, AutoStrategy):
            info.update(strategy.info())
        return info

    def _rebuild_member_strategy(self) -> None:
        # strategies hold references to the members' layers (grouped) or their layout (vmap): rebuild them
        strategy = getattr(self, '_member_strategy', None)
        if strategy is not None and strategy.name != 'loop':
            self.set_member_strategy(strategy.name)

    # ---- timm model interface ----
    @property
    def extra_classifiers(self) -> tuple[str, ...]:
        """Classifiers of the ensemble itself (beside its members'), re-initialised on a fine-tune to another class
        count: the linear ensemble head."""
        return ('head.fc',) if self.head.fc is not None else ()

    @property
    def combine_mode(self) -> str:
        return self.head.mode

    @property
    def num_features(self) -> int:
        return self.member_num_features * self.num_members

    @property
    def head_hidden_size(self) -> int:
        member = self.members[0]
        return self.num_members * getattr(member, 'head_hidden_size', member.num_features)

    @property
    def global_pool(self) -> str | None:
        return get_global_pool(self.members[0])

    def _defining_args(self) -> dict[str, Any]:
        return dict(base_model=self.base_model, num_members=self.num_members, combine=self.combine_mode)

    def get_classifier(self) -> tuple[nn.Module, ...]:
        """Every classifier: the members', then the ensemble head where it has weights (timm accepts a tuple)."""
        return tuple(m.get_classifier() for m in self.members) + ((self.head,) if self.head.fc is not None else ())

    def _new_head(self, num_classes: int, mode: str) -> None:
        ref = next(self.members[0].parameters())
        self.head = EnsembleHead(self.num_members, num_classes, mode, device=ref.device, dtype=ref.dtype)
        self.head.train(self.training)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        for member in self.members:
            if global_pool is None:
                member.reset_classifier(num_classes)
            else:
                member.reset_classifier(num_classes, global_pool)
        self.num_classes = num_classes
        self.temperature = 1.0  # fitted to the old classes
        self.member_num_features = self.members[0].num_features
        self._new_head(num_classes, self.combine_mode)
        self._rebuild_member_strategy()

    def set_combine(self, mode: str) -> None:
        """Change how ``forward`` combines the members (one of ``COMBINE_MODES``); a new ``linear`` head starts as the
        average of the member logits, and leaving ``linear`` drops the trained head. ``model_args`` records the mode,
        so that a reload rebuilds the same model."""
        if mode not in COMBINE_MODES:
            raise ValueError(f"Unknown combine mode '{mode}', expected one of {COMBINE_MODES}.")
        if mode != self.combine_mode:
            self._new_head(self.num_classes, mode)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for member in self.members:
            member.set_grad_checkpointing(enable)
        self._rebuild_member_strategy()

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        names = set()
        for i, member in enumerate(self.members):
            if hasattr(member, 'no_weight_decay'):
                names |= {f'members.{i}.{n}' for n in member.no_weight_decay()}
        return names

    # ---- features: the members' maps side by side, as timm's API shapes them ----
    @property
    def output_fmt(self) -> str:
        return getattr(self.members[0], 'output_fmt', 'NCHW')

    def _feature_dim(self, fmt: str | None = None) -> int:
        # the channel axis of a feature map: 1 for NCHW, the last for NHWC and token sequences (NLC)
        return 1 if (fmt or self.output_fmt) == 'NCHW' else -1

    def _side_by_side(self, maps: Sequence[torch.Tensor], fmt: str | None = None) -> torch.Tensor:
        return torch.cat(list(maps), dim=self._feature_dim(fmt))

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """The members' feature levels, each with ``num_chs`` M times the member's: an ensemble's feature map at a
        level is its members' maps concatenated along the channels (member-major), what ``forward_intermediates``
        and ``features_only=True`` give."""
        info = getattr(self.members[0], 'feature_info', None)
        if info is None:
            raise AttributeError(f"Base model '{self.base_model}' has no feature_info: its members cannot give"
                                 f" feature maps.")
        info = info.get_dicts() if hasattr(info, 'get_dicts') else info
        return [dict(level, num_chs=level['num_chs'] * self.num_members, module=f"members.0.{level['module']}")
                for level in info]

    @property
    def pool_size(self) -> tuple[int, int] | None:
        return self.pretrained_cfg.get('pool_size') if hasattr(self, 'pretrained_cfg') else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features: every member's, concatenated along the channels (``num_features`` channels)."""
        return self._side_by_side([m.forward_features(x) for m in self.members])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Head of ``forward_features``' output: each member's head on its share of the channels, then the ensemble
        head; with ``pre_logits``, the members' pooled features side by side (``head_hidden_size`` wide)."""
        parts = x.chunk(self.num_members, dim=self._feature_dim())
        outputs = [m.forward_head(part, pre_logits=pre_logits) for m, part in zip(self.members, parts)]
        if pre_logits or self.num_classes <= 0:
            return self._side_by_side(outputs, 'NCHW' if outputs[0].ndim == 2 else None)
        return self._tempered(self.head(torch.stack(outputs, dim=1)))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | Sequence[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates`` of every member (same arguments), their maps concatenated along the
        channels level by level; the final features are ``forward_features``'."""
        per_member = [m.forward_intermediates(x, indices=indices, norm=norm, stop_early=stop_early,
                                              output_fmt=output_fmt, intermediates_only=intermediates_only)
                      for m in self.members]
        if intermediates_only:
            return [self._side_by_side(level, output_fmt) for level in zip(*per_member)]
        finals, inters = zip(*per_member)
        return self._side_by_side(finals), [self._side_by_side(level, output_fmt) for level in zip(*inters)]

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Prune every member past the last intermediate taken (timm's ``features_only``); returns the indices."""
        kept = [m.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
                for m in self.members]
        if prune_head:
            self.num_classes = 0
            self.temperature = 1.0
            self._new_head(0, self.combine_mode)
        return kept[0]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The members' parameter groups (timm's ``group_matcher``) for every member at once: layer k of every member
        falls in group k, so that ``layer_decay`` decays each member by its own depth; the ensemble head goes with
        the classifiers, in the last group."""
        return sub_group_matcher(self.members[0], r'^members\.\d+\.', coarse)

    # ---- forward ----
    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's logits, ``[B, M, C]`` (run by the member strategy)."""
        return self._member_strategy.forward_members(x)

    def combine(self, member_logits: torch.Tensor) -> torch.Tensor:
        """Ensemble logits ``[B, C]`` from member logits ``[B, M, C]`` (what ``forward`` returns). Without classifiers
        (``num_classes=0``) the members' outputs are features: side by side, pooled ``[B, M * F]`` or unpooled maps
        concatenated along their channels."""
        if self.num_classes <= 0:
            return self._side_by_side(member_logits.unbind(1), 'NCHW' if member_logits.ndim == 3 else None)
        return self.head(member_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._tempered(self.combine(self.forward_members(x)))

    def forward_members_with_features(
            self,
            x: torch.Tensor,
            taps: str = DEFAULT_FEATURE_TAPS,
            indices: int | Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """Member logits and intermediate features from one forward pass of the members (run by the member strategy).

        Args:
            x: Input batch.
            taps: ``'preact'``: the outputs of the stages (blocks for ViTs) from timm's ``forward_intermediates``,
                each taken before the activation module that produced it, where one did (``strategies.stage_features``:
                post-ReLU features are non-negative, so two members' could be at most orthogonal); ``'stages'``:
                those outputs as they are; ``'convs'``: the outputs of the convolutions the FDL reference taps
                (``tapped_convs``: all but the shortcut projections).
            indices: With ``taps='preact'`` or ``'stages'``, which intermediates (as ``forward_intermediates``
                takes them: an int n for the last n, or a list of indices); None for all.

        Returns:
            ``([B, M, C] logits, features)`` where ``features[m]`` is the list of member m's feature tensors.
        """
        if taps not in FEATURE_TAPS:
            raise ValueError(f"Unknown feature taps '{taps}', expected one of {FEATURE_TAPS}.")
        return self._member_strategy.forward_members_with_features(x, taps, indices)
