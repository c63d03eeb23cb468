"""What every member strategy shares: the base class, its errors, and the convolutions FDL taps."""
import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ['MEMBER_STRATEGIES', 'MemberStrategy', 'StrategyError']

MEMBER_STRATEGIES = ('loop', 'vmap', 'grouped', 'auto')


class StrategyError(ValueError):
    """A member strategy that does not apply to this model (or gave results other than the loop's)."""


class _LoopFailed(StrategyError):
    """The reference itself failed on the probe batch (an input the model does not take)."""


def conv_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every convolution of a model, in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            yield name, module


def tapped_convs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The convolutions whose outputs FDL's ``feature_taps='convs'`` compares, by the reference code's rule.

    The reference taps every node of the traced graph whose name contains "conv": the convolutions of the stem and of
    the residual branches, not the 1x1 shortcut (projection) convolutions, which timm and torchvision name
    ``downsample``. Where no convolution's name contains "conv" (timm's VGG: ``features.0``, ...), every convolution.
    """
    convs = list(conv_modules(model))
    named = [(n, m) for n, m in convs if 'conv' in n.lower()]
    return named or convs


@contextlib.contextmanager
def capture_conv_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the output of every tapped convolution (``tapped_convs``) run inside the context, in call order."""
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for _, m in tapped_convs(model)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


class MemberStrategy:
    """Runs the members of an ensemble; holds no parameters or buffers of its own (the members do).

    Args:
        members: The ensemble's members (``EnsembleModel.members``), structurally identical timm models.
        base_model: The base model's name, for messages.
    """
    name = ''

    def __init__(self, members: nn.ModuleList, base_model: str = ''):
        self.members = members
        self.base_model = base_model

    @property
    def num_members(self) -> int:
        return len(self.members)

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's logits, ``[B, M, C]``."""
        raise NotImplementedError

    def forward_members_with_features(
            self, x: torch.Tensor, taps: str = 'stages', indices: int | Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """Member logits ``[B, M, C]`` and ``features[m]``, the list of member m's feature tensors."""
        raise NotImplementedError

    def _check_stage_taps(self) -> None:
        if not hasattr(self.members[0], 'forward_intermediates'):
            raise ValueError(
                f"Base model '{self.base_model}' has no forward_intermediates(); use feature taps 'convs'.")

    def _no_convs(self) -> ValueError:
        return ValueError(f"Base model '{self.base_model}' has no convolutions; use feature taps 'stages'.")


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
