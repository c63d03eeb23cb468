"""What every member strategy shares: the base class, its errors, and the features FDL taps."""
import contextlib
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ['MEMBER_STRATEGIES', 'FEATURE_TAPS', 'DEFAULT_FEATURE_TAPS', 'MemberStrategy', 'StrategyError']

MEMBER_STRATEGIES = ('loop', 'vmap', 'grouped', 'auto')
FEATURE_TAPS = ('preact', 'stages', 'convs')
# where the members' features are compared by default (FDL's term, the evaluation's feature distance, the analysis):
# the stage outputs before their final activation, where post-ReLU features could be at most orthogonal
DEFAULT_FEATURE_TAPS = 'preact'


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


# the modules of these packages are activations: elementwise maps a stage may end with
_ACTIVATION_PACKAGES = ('torch.nn.modules.activation', 'timm.layers.activations', 'timm.layers.activations_me')
# per model and ``indices``: the activation modules whose outputs forward_intermediates returned
_PREACT_SOURCES: 'weakref.WeakKeyDictionary[nn.Module, dict]' = weakref.WeakKeyDictionary()


def _activation_modules(model: nn.Module) -> dict[str, nn.Module]:
    # torch's activation module also defines MultiheadAttention, which is not one
    return {n: m for n, m in model.named_modules()
            if type(m).__module__ in _ACTIVATION_PACKAGES and not isinstance(m, nn.MultiheadAttention)}


def stage_features(model: nn.Module, x: torch.Tensor, taps: str, indices=None) -> tuple[torch.Tensor, list]:
    """Logits and the features of ``taps='stages'`` or ``'preact'`` from one ``forward_intermediates`` pass.

    ``'preact'`` takes each intermediate before the activation module that produced it, where one did: a ResNet
    stage ends in ReLU, and post-ReLU features are non-negative, so two networks' can be at most orthogonal (the
    scale-free distance cannot pass 1); before the activation they can point opposite ways (up to 2, the bound of
    ``losses.feature_difference_loss``). Activation modules are those of ``torch.nn`` and ``timm.layers``
    (``nn.ReLU``, timm's ``GELU``, ...). An intermediate that none returned (a ViT's or ConvNeXt's residual stream, an
    activation called as a function or of a class of the user's own) is taken as it is. Which activations those are is
    found on the first call for a model and ``indices`` (every activation's input kept for that one call), after which
    only their inputs are kept, cloned where the activation works in place.
    """
    if taps == 'stages':
        final, inter = model.forward_intermediates(x, indices=indices)
        return model.forward_head(final), list(inter)
    key = indices if not isinstance(indices, list) else tuple(indices)
    known = _PREACT_SOURCES.setdefault(model, {}).get(key)
    # the modules themselves are kept (they do not reference the model): no walk over the model after the first call
    watched = _activation_modules(model) if known is None else dict(known)
    inputs: dict[str, torch.Tensor] = {}
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, output, input before the activation)

    def pre_hook(name):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0].clone() if getattr(module, 'inplace', False) else args[0]
        return hook

    def post_hook(name):
        def hook(module, args, out):
            if name in inputs:
                calls.append((name, out, inputs.pop(name)))
        return hook

    handles = [h for n, m in watched.items()
               for h in (m.register_forward_pre_hook(pre_hook(n)), m.register_forward_hook(post_hook(n)))]
    try:
        final, inter = model.forward_intermediates(x, indices=indices)
    finally:
        for h in handles:
            h.remove()
    features, sources = [], []
    for t in inter:
        # the last call that returned this very tensor (an activation module can run more than once)
        hit = next(((n, pre) for n, out, pre in reversed(calls) if out is t), None)
        features.append(t if hit is None else hit[1])
        if hit is not None:
            sources.append((hit[0], watched[hit[0]]))
    if known is None:
        _PREACT_SOURCES[model][key] = tuple(sources)
    return model.forward_head(final), features


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
            self, x: torch.Tensor, taps: str = DEFAULT_FEATURE_TAPS, indices: int | Sequence[int] | None = None,
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
