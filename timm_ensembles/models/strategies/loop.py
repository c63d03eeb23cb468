"""``loop``: each member runs on its own, one after another (the reference; works for every timm model)."""

import torch

from .base import DEFAULT_FEATURE_TAPS, MemberStrategy, capture_conv_outputs, stage_features

__all__ = ['LoopStrategy']


class LoopStrategy(MemberStrategy):
    """The members one after another: the reference every other strategy is checked against."""
    name = 'loop'

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members], dim=1)

    def forward_members_with_features(self, x, taps=DEFAULT_FEATURE_TAPS, indices=None):
        logits, features = [], []
        for member in self.members:
            if taps in ('stages', 'preact'):
                self._check_stage_taps()
                out, inter = stage_features(member, x, taps, indices)
                logits.append(out)
                features.append(inter)
            else:
                with capture_conv_outputs(member) as convs:
                    logits.append(member(x))
                if not convs:
                    raise self._no_convs()
                features.append(convs)
        return torch.stack(logits, dim=1), features
