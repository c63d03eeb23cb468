"""The ensemble container shared by the ensemble methods: N timm models and a head that combines them.

The container holds only what inference needs. What a method adds for training (losses, phases,
teachers, discriminators) lives in its task (see ``_task.py``).
"""
import math
from collections.abc import Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ._registry import check_base_model
from ._strategies import (
    MEMBER_STRATEGIES,
    AutoStrategy,
    MemberStrategy,
    capture_conv_outputs,
    conv_modules,
    create_member_strategy,
    tapped_convs,
)
from ._timm_compat import get_global_pool

__all__ = ['EnsembleModel', 'EnsembleHead', 'ModelArgsMixin', 'COMBINE_MODES', 'FEATURE_TAPS', 'MEMBER_STRATEGIES',
           'capture_conv_outputs', 'conv_modules', 'tapped_convs']

COMBINE_MODES = ('linear', 'mean_logits', 'mean_probs')
FEATURE_TAPS = ('stages', 'convs')


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
    (a reload must not download the base's weights, which the wrapper's own weights replace) and ``member_strategy``
    (how the members run is a choice of the machine that runs them, not part of the model), plus the arguments that
    define the wrapper (``_defining_args``)."""
    _unrecorded_args = ('pretrained_base', 'member_strategy')

    def _defining_args(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def _model_args(self) -> dict[str, Any]:
        args = {k: v for k, v in self.__dict__.get('_recorded_model_args', {}).items()
                if k not in self._unrecorded_args}
        args.update(self._defining_args())
        return args

    @_model_args.setter
    def _model_args(self, value: dict[str, Any]) -> None:
        self.__dict__['_recorded_model_args'] = dict(value)

    @property
    def model_args(self) -> dict[str, Any]:
        """Arguments that rebuild this model with ``timm.create_model`` (what ``save_for_hf`` records)."""
        from timm.models import get_model_args
        return get_model_args(self)


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
        if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 2:
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
        ``_strategies.py``.

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
        return self.num_features

    @property
    def global_pool(self) -> str | None:
        return get_global_pool(self.members[0])

    def _defining_args(self) -> dict[str, Any]:
        return dict(base_model=self.base_model, num_members=self.num_members, combine=self.combine_mode)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        for member in self.members:
            if global_pool is None:
                member.reset_classifier(num_classes)
            else:
                member.reset_classifier(num_classes, global_pool)
        self.num_classes = num_classes
        self.member_num_features = self.members[0].num_features
        ref = next(self.members[0].parameters())
        self.head = EnsembleHead(self.num_members, num_classes, self.combine_mode, device=ref.device, dtype=ref.dtype)
        self._rebuild_member_strategy()

    def set_combine(self, mode: str) -> None:
        """Change how ``forward`` combines the members (one of ``COMBINE_MODES``); a new ``linear`` head starts as the
        average of the member logits, and leaving ``linear`` drops the trained head. ``model_args`` records the mode,
        so that a reload rebuilds the same model."""
        if mode not in COMBINE_MODES:
            raise ValueError(f"Unknown combine mode '{mode}', expected one of {COMBINE_MODES}.")
        if mode != self.combine_mode:
            ref = next(self.members[0].parameters())
            self.head = EnsembleHead(self.num_members, self.num_classes, mode, device=ref.device, dtype=ref.dtype)

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

    # ---- forward ----
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features of every member, stacked on dim 1: ``[B, M, ...]``."""
        return torch.stack([m.forward_features(x) for m in self.members], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Head of ``forward_features``' output: members' heads, then the ensemble head."""
        if pre_logits:
            return torch.cat([m.forward_head(x[:, i], pre_logits=True) for i, m in enumerate(self.members)], dim=1)
        return self.head(torch.stack([m.forward_head(x[:, i]) for i, m in enumerate(self.members)], dim=1))

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's logits, ``[B, M, C]`` (run by the member strategy)."""
        return self._member_strategy.forward_members(x)

    def combine(self, member_logits: torch.Tensor) -> torch.Tensor:
        """Ensemble logits ``[B, C]`` from member logits ``[B, M, C]`` (what ``forward`` returns)."""
        return self.head(member_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.forward_members(x))

    def forward_members_with_features(
            self,
            x: torch.Tensor,
            taps: str = 'stages',
            indices: int | Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """Member logits and intermediate features from one forward pass of the members (run by the member strategy).

        Args:
            x: Input batch.
            taps: ``'stages'``: the outputs of the stages (blocks for ViTs) from timm's
                ``forward_intermediates``; ``'convs'``: the outputs of the convolutions the FDL reference taps
                (``tapped_convs``: all but the shortcut projections).
            indices: With ``taps='stages'``, which intermediates (as ``forward_intermediates`` takes them:
                an int n for the last n, or a list of indices); None for all.

        Returns:
            ``([B, M, C] logits, features)`` where ``features[m]`` is the list of member m's feature tensors.
        """
        if taps not in FEATURE_TAPS:
            raise ValueError(f"Unknown feature taps '{taps}', expected one of {FEATURE_TAPS}.")
        return self._member_strategy.forward_members_with_features(x, taps, indices)
