"""``vmap``: one call of ``torch.func.vmap`` over the members' stacked parameters and buffers."""
import warnings
from typing import Any

import torch
from torch import nn

from .base import DEFAULT_FEATURE_TAPS, MemberStrategy, StrategyError, capture_conv_outputs, stage_features

__all__ = ['VmapStrategy']


class _Runner(nn.Module):
    """What ``functional_call`` calls under vmap: one member's forward, intermediates or conv outputs.

    Kept outside the ensemble's module tree (it only wraps member 0 as a template), so it adds no state_dict keys.
    """

    def __init__(self, template: nn.Module):
        super().__init__()
        self.m = template

    def forward(self, x: torch.Tensor, mode: str = 'logits', indices: Any = None) -> Any:
        if mode == 'logits':
            return self.m(x)
        if mode in ('stages', 'preact'):
            return stage_features(self.m, x, mode, indices)
        with capture_conv_outputs(self.m) as convs:
            out = self.m(x)
        return out, list(convs)


class VmapStrategy(MemberStrategy):
    """``torch.func.vmap`` over the members' stacked parameters and buffers (see the module docstring)."""
    name = 'vmap'

    def __init__(self, members: nn.ModuleList, base_model: str = ''):
        super().__init__(members, base_model)
        ref = members[0]
        self.param_names = [n for n, _ in ref.named_parameters()]
        self.buffer_names = [n for n, _ in ref.named_buffers()]
        for i, member in enumerate(members):
            shapes = [(n, tuple(t.shape)) for n, t in (*member.named_parameters(), *member.named_buffers())]
            ref_shapes = [(n, tuple(t.shape)) for n, t in (*ref.named_parameters(), *ref.named_buffers())]
            if shapes != ref_shapes:
                raise StrategyError(f"vmap needs structurally identical members; member {i} of '{base_model}'"
                                    ' has other parameters or buffers than member 0.')
        self.runner = _Runner(ref)

    def _stacked_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        # stacked at every call, from the members' own tensors: autograd carries the gradients back through
        # torch.stack to each member's parameters, which the optimiser and the checkpoints see
        params = [dict(m.named_parameters()) for m in self.members]
        buffers = [dict(m.named_buffers()) for m in self.members]
        stacked_p = {f'm.{n}': torch.stack([p[n] for p in params]) for n in self.param_names}
        with torch.no_grad():
            stacked_b = {f'm.{n}': torch.stack([b[n] for b in buffers]) for n in self.buffer_names}
        return stacked_p, stacked_b

    def _write_back(self, stacked_b: dict[str, torch.Tensor]) -> None:
        # BatchNorm updated the stacked running statistics in place (a batched in-place update under vmap):
        # each member's slice goes back into that member's buffer
        if not stacked_b:
            return
        dst, src = [], []
        for m in self.members:
            dst.extend(b for _, b in m.named_buffers())
        for i in range(self.num_members):
            src.extend(stacked_b[f'm.{n}'][i] for n in self.buffer_names)
        with torch.no_grad():
            torch._foreach_copy_(dst, src)

    def _run(self, x: torch.Tensor, mode: str, indices: Any = None) -> Any:
        stacked_p, stacked_b = self._stacked_state()

        def call(p, b, inp):
            return torch.func.functional_call(self.runner, {**p, **b}, (inp,), dict(mode=mode, indices=indices))

        with warnings.catch_warnings():
            # kernels without a batching rule (e.g. CPU flash attention) fall back to a per-member loop inside
            # vmap, correct and merely slower; auto's timing is what judges the speed
            warnings.filterwarnings('ignore', message='There is a performance drop because we have not yet')
            out = torch.func.vmap(call, in_dims=(0, 0, None), randomness='different')(stacked_p, stacked_b, x)
        if any(m.training for m in self.members[0].modules()):
            self._write_back(stacked_b)
        return out

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, 'logits').movedim(0, 1)

    def forward_members_with_features(self, x, taps=DEFAULT_FEATURE_TAPS, indices=None):
        if taps in ('stages', 'preact'):
            self._check_stage_taps()
        logits, feats = self._run(x, taps, indices)
        if not feats:
            raise self._no_convs()
        return logits.movedim(0, 1), [[f[m] for f in feats] for m in range(self.num_members)]
