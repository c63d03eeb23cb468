"""The check of a strategy against the loop, in float64 on a CPU copy of the members (``verify_against_loop``)."""
import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .base import MemberStrategy, StrategyError, _LoopFailed
from .grouped import GROUPED_SUPPORT, GroupedStrategy
from .loop import LoopStrategy
from .vmap import VmapStrategy

__all__ = ['verify_against_loop']

# relative L2 tolerance of the check against the loop (in float64, see verify_against_loop): float64 rounding of
# reordered sums is about 1e-15; channels fused wrongly (DenseNet) give errors of 0.04 to 1
_VERIFY_RTOL = 1e-8


# ---- checking against the loop ----

@contextlib.contextmanager
def _preserved_state(members: nn.ModuleList, device: torch.device) -> Iterator[None]:
    """Restore the members' buffers, train/eval modes and the random number generators on exit, so that checks
    and timings leave no trace in the training run."""
    modules = list(members.modules())
    modes = [m.training for m in modules]
    buffers = list(members.buffers())
    saved = [b.detach().clone() for b in buffers]
    devices = [device] if device.type == 'cuda' else []
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else 'cuda'):
            yield
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def _probe_run(strategy: MemberStrategy, x: torch.Tensor, params: list[torch.Tensor],
               with_features: bool) -> dict[str, list[torch.Tensor]]:
    """Eval outputs, then (norm layers in train mode, dropout off) outputs, features, gradients, statistics."""
    members = strategy.members
    members.eval()
    with torch.no_grad():
        eval_out = strategy.forward_members(x)
    for m in members.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.train()
    with torch.enable_grad():
        if with_features:
            logits, feats = strategy.forward_members_with_features(x, 'stages')
            outs = [logits] + [f for member in feats for f in member]
        else:
            outs = [strategy.forward_members(x)]
        gen = torch.Generator(device=x.device).manual_seed(0)
        loss = sum((o.float() * torch.randn(o.shape, generator=gen, device=o.device)).sum() for o in outs)
        grads = torch.autograd.grad(loss, params, allow_unused=True) if params else []
    buffers = [b.detach().clone() for b in members.buffers() if b.is_floating_point()]
    return dict(eval=[eval_out.detach()], train=[o.detach() for o in outs],
                grads=[torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)], buffers=buffers)


def _rel_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Relative L2 error of a group of tensors, ``||got - ref|| / ||ref||`` over all of them together.

    A norm over the group, not the largest elementwise error: where rounding moves a near tie of a max-pooling
    window, one element's gradient goes to its neighbour, which is a large elementwise but a tiny relative change;
    fusing channels of different members wrongly is of order 1 either way.
    """
    if len(got) != len(ref) or any(a.shape != b.shape for a, b in zip(got, ref)):
        return float('inf')
    diff = sum(((a.double() - b.double()) ** 2).sum().item() for a, b in zip(got, ref))
    norm = sum((b.double() ** 2).sum().item() for b in ref)
    return (diff / max(norm, 1e-30)) ** 0.5 if norm or diff else 0.0


def _float64_cpu_copy(members: nn.ModuleList) -> nn.ModuleList:
    """A float64 CPU copy of the members (through the deepcopy memo, so the originals are never copied where they
    are)."""
    memo: dict[int, Any] = {}
    for t in (*members.parameters(), *members.buffers()):
        new = t.detach().to('cpu', torch.float64 if t.is_floating_point() else t.dtype, copy=True)
        memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    return copy.deepcopy(members, memo)


def verify_against_loop(strategy: MemberStrategy, x: torch.Tensor) -> dict[str, float]:
    """Check a strategy against the loop on a probe batch, on a float64 CPU copy of the members.

    Compares eval-mode outputs, then with the norm layers in train mode (batch statistics, dropout off): outputs and
    stage features, the gradient of a random projection of them with respect to every member parameter, and the
    running statistics after that pass. In float64 because the question is whether the strategy computes the
    loop's function, and fp32 rounding cannot answer it on small probes: BatchNorm over the few values per channel
    of a small batch at 1x1 maps, and max-pooling near ties, turn rounding into gradient differences of 1 % (measured
    on resnet10t at 32 px, batch 4), where channels fused wrongly (DenseNet) differ by 4 % to 100 %. The members
    themselves are not touched.

    Returns:
        The relative (L2) error of each group.

    Raises:
        StrategyError: The strategy fails on this model, or differs from the loop beyond float64 rounding.
    """
    members = _float64_cpu_copy(strategy.members)
    x = x.detach().to('cpu', torch.float64)
    probe = _build(strategy.name, members, strategy.base_model)
    if isinstance(probe, GroupedStrategy):
        probe.set_conv_kernel('grouped')  # the fused kernels are what is in question (split runs the members' own)
    params = [p for p in members.parameters() if p.requires_grad]
    with_features = hasattr(members[0], 'forward_intermediates')
    # float64 throughout: auto checks inside the run's first forward pass, which on a CPU may be under autocast
    with _preserved_state(members, x.device), torch.autocast('cpu', enabled=False):
        try:
            ref = _probe_run(LoopStrategy(members, strategy.base_model), x, params, with_features)
        except Exception as e:
            raise _LoopFailed(f"the loop itself fails on the probe batch {tuple(x.shape)}: {type(e).__name__}: {e}"
                              ) from e
    with _preserved_state(members, x.device), torch.autocast('cpu', enabled=False):
        try:
            got = _probe_run(probe, x, params, with_features)
        except StrategyError:
            raise
        except Exception as e:  # any failure of the strategy on this architecture is a refusal, with its cause
            raise StrategyError(f"'{strategy.name}' fails on '{strategy.base_model}': {type(e).__name__}: {e}."
                                + (f' {GROUPED_SUPPORT}.' if strategy.name == 'grouped' else '')) from e
    errors = {k: _rel_error(got[k], ref[k]) for k in ref}
    bad = {k: v for k, v in errors.items() if not v <= _VERIFY_RTOL}
    if bad:
        detail = ', '.join(f'{k} {v:.2g}' for k, v in bad.items())
        raise StrategyError(
            f"'{strategy.name}' does not compute what the loop computes on '{strategy.base_model}' (relative"
            f' error {detail} in float64, tolerance {_VERIFY_RTOL:g}): its code mixes or splits channels across the'
            f" fused members (e.g. DenseNet's concatenation)."
            + (f' {GROUPED_SUPPORT}.' if strategy.name == 'grouped' else ''))
    return errors


_PROBE_SIZE = 64


def default_probe_input(members: nn.ModuleList, in_chans: int, batch_size: int = 2,
                        full_size: bool = False) -> torch.Tensor:
    """A random batch for the check against the loop, drawn from a generator of its own so that the global random
    stream is untouched: a ViT's patch-embedding size; for other models the base's input size (its pretrained
    config) capped at 64 px (``full_size=False``), as the check runs in float64 on the CPU and a CNN's structure does
    not depend on the input size."""
    from timm.data import resolve_model_data_config
    member = members[0]
    img_size = getattr(getattr(member, 'patch_embed', None), 'img_size', None)
    if img_size is not None:
        size = tuple(img_size)
    else:
        size = tuple(resolve_model_data_config(member)['input_size'][1:])
        if not full_size:
            size = tuple(min(s, _PROBE_SIZE) for s in size)
    return torch.randn((batch_size, in_chans, *size), generator=torch.Generator().manual_seed(0))


def _check(strategy: MemberStrategy, in_chans: int, example: torch.Tensor | None = None,
           fallback: torch.Tensor | None = None) -> dict[str, float]:
    """``verify_against_loop`` on ``example``, else on the default probe (reduced, then full size, then
    ``fallback``) until the loop itself takes one."""
    if example is not None:
        probes = [example]
    else:
        probes = [default_probe_input(strategy.members, in_chans),
                  default_probe_input(strategy.members, in_chans, full_size=True)]
        probes += [fallback] if fallback is not None else []
    for i, probe in enumerate(probes):
        try:
            return verify_against_loop(strategy, probe)
        except _LoopFailed:
            if i == len(probes) - 1:
                raise
    raise AssertionError('unreachable')


def _build(name: str, members: nn.ModuleList, base_model: str) -> MemberStrategy:
    cls = dict(loop=LoopStrategy, vmap=VmapStrategy, grouped=GroupedStrategy)[name]
    return cls(members, base_model)
