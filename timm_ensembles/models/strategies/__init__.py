"""How the members of an ``EnsembleModel`` run: one after another, vectorised, or fused into one grouped network.

Strategies (``EnsembleModel.set_member_strategy(name)``):

* ``loop``: each member runs on its own, one after another (the reference; works for every timm model).
* ``vmap``: one call of ``torch.func.vmap`` over the members' parameters and buffers, stacked from the members at
  every call (``torch.func.functional_call`` on member 0's modules). Gradients flow through the stacking back to each
  member's own parameters, BatchNorm running statistics are updated on the stacked buffers and copied back into
  every member's buffers after the call. Dropout and drop-path draw their masks per member
  (``randomness='different'``), from other random streams than the loop's. Works for every model vmap can trace
  (checked against the loop when it is set). It keeps a stacked copy of the weights for the backward pass (about one
  more copy of the parameters at the peak of memory), and autocast does not reach inside it (the members then
  compute in fp32; ``auto`` leaves it out under autocast).
* ``grouped``: the members fused into one network whose tensors hold the members side by side on the channel axis
  (member-major: member m owns channels ``m * C`` to ``(m + 1) * C``). Convolutions become grouped convolutions
  (``groups x N``), BatchNorm runs over ``N x C`` channels, the linear classifier becomes a batched matmul; the fused
  layers read their weights from the members at every call (concatenated), so the members stay the source of
  truth, and BatchNorm running statistics are written back into the members' buffers. Each fused convolution runs
  as one grouped convolution or as the members' convolutions on their channel slices, as its first batch of each
  shape timed them (``GroupedStrategy``). The container modules' own ``forward`` code (residual additions,
  pooling, heads) runs unchanged on the fused tensors, which is exact only when that code never mixes or splits
  channels: the strategy converts only known channel-local layers (Conv2d, BatchNorm2d and timm's BatchNormAct2d,
  Linear, DropPath, dropout, pooling, elementwise activations), refuses any other layer, and is checked numerically
  against the loop on a probe batch when it is set (outputs, stage features, a backward pass, running statistics),
  so that architectures whose code concatenates or splits channels (DenseNet, CSP and mixed convolutions) are
  refused rather than silently wrong. In practice: BatchNorm CNNs such as timm's
  ResNets / ResNeXts / SE-ResNets, EfficientNets and MobileNets.
* ``auto``: on the first call for a given input shape, dtype, device and mode, times a few forward (and, with
  gradients enabled, backward) passes of every strategy that accepts the model (checked once, as when it is set),
  interleaved, on that batch, and keeps the fastest for that kind of call (``EnsembleModel.member_strategy`` says which,
  ``member_strategy_info`` the timings and the refusals).

None of them adds a parameter or a buffer to the ensemble: its ``state_dict``, checkpoints and Hub repos keep the
plain per-member layout whatever strategy ran, and ``model_args`` do not record the strategy.

Numerics: ``vmap`` and ``grouped`` compute the same functions as the loop, but the grouped convolution kernels sum
their products in another order than separate convolutions, so results agree to float rounding (about 1e-6 relative
in fp32), not bitwise; BatchNorm statistics are per channel and come out bitwise equal where the convolutions do.
The check when a strategy is set runs in float64 on a CPU copy of the members (``verify_against_loop``): it asks
whether the strategy computes the loop's function, which fp32 rounding on a small probe cannot answer.

One module per strategy: ``base`` (the base class and the convolutions FDL taps), ``loop``, ``vmap``,
``grouped`` (with its fused layers), ``verify`` (the float64 check against the loop) and ``auto`` (the autotuner).
"""
import torch
from torch import nn

from .auto import AUTO_CANDIDATES, AutoStrategy
from .base import (
    DEFAULT_FEATURE_TAPS,
    FEATURE_TAPS,
    MEMBER_STRATEGIES,
    MemberStrategy,
    StrategyError,
    _LoopFailed,
    capture_conv_outputs,
    conv_modules,
    tapped_convs,
)
from .grouped import CONV_KERNELS, GROUPED_SUPPORT, GroupedStrategy
from .loop import LoopStrategy
from .verify import _build, _check, default_probe_input, verify_against_loop
from .vmap import VmapStrategy

__all__ = [
    'MEMBER_STRATEGIES', 'FEATURE_TAPS', 'DEFAULT_FEATURE_TAPS', 'MemberStrategy', 'LoopStrategy', 'VmapStrategy',
    'GroupedStrategy', 'AutoStrategy', 'StrategyError', 'create_member_strategy', 'verify_against_loop',
]


def create_member_strategy(
        name: str, members: nn.ModuleList, base_model: str = '', in_chans: int = 3,
        example_input: torch.Tensor | None = None,
) -> MemberStrategy:
    """Build a strategy and, for ``vmap`` and ``grouped``, check it against the loop.

    Args:
        name: One of ``MEMBER_STRATEGIES``.
        members: The ensemble's members.
        base_model: The base model's name, for messages.
        in_chans: Input channels of the default probe batch.
        example_input: The probe batch of the check (``auto``: the batch its choice is made on, instead of the
            first call's); default: ``default_probe_input``.

    Raises:
        StrategyError: The strategy does not apply to this model.
    """
    if name not in MEMBER_STRATEGIES:
        raise ValueError(f"Unknown member strategy '{name}', expected one of {MEMBER_STRATEGIES}.")
    if name == 'auto':
        strategy = AutoStrategy(members, base_model)
        if example_input is not None:
            strategy.prepare(example_input)
        return strategy
    strategy = _build(name, members, base_model)
    if name != 'loop':
        try:
            _check(strategy, in_chans, example_input)
        except _LoopFailed:
            if example_input is not None:
                raise
            # no default probe fits the model (a user's model for one input size its config does not state):
            # check on the first real batch instead
            return _CheckedOnFirstCall(strategy)
    return strategy


class _CheckedOnFirstCall(MemberStrategy):
    """A strategy whose check against the loop waits for the first batch it is given."""

    def __init__(self, strategy: MemberStrategy):
        super().__init__(strategy.members, strategy.base_model)
        self.inner = strategy
        self.name = strategy.name
        self.checked = False

    def _ensure_checked(self, x: torch.Tensor) -> None:
        if not self.checked:
            verify_against_loop(self.inner, x.detach())
            self.checked = True

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        self._ensure_checked(x)
        return self.inner.forward_members(x)

    def forward_members_with_features(self, x, taps=DEFAULT_FEATURE_TAPS, indices=None):
        self._ensure_checked(x)
        return self.inner.forward_members_with_features(x, taps, indices)
