"""The input checks the metrics share (and the trainer's calibration and the analysis reuse): logits ``[N, M, C]``,
probabilities ``[N, C]`` and targets ``[N]``, each computed on in float64."""
from typing import Any

import torch

__all__ = ['as_float64', 'check_logits', 'check_targets', 'check_probs']


def as_float64(x: Any, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise ValueError(f'{name} must be a floating-point tensor, got dtype {x.dtype}.')
    return x.detach().to(torch.float64)


def check_logits(logits: Any) -> torch.Tensor:
    logits = as_float64(logits, 'logits')
    if logits.ndim != 3:
        raise ValueError(f'logits must be [N, M, C] (samples, members, classes), got shape {tuple(logits.shape)}.')
    if logits.shape[0] == 0 or logits.shape[1] == 0 or logits.shape[2] == 0:
        raise ValueError(f'logits [N, M, C] must have at least one sample, member and class, got shape'
                         f' {tuple(logits.shape)}.')
    return logits


def check_targets(
        targets: Any, num_samples: int, num_classes: int, device: torch.device | None = None,
) -> torch.Tensor:
    targets = torch.as_tensor(targets)
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f'targets must be integer class indices, got dtype {targets.dtype}.')
    if targets.ndim != 1 or targets.shape[0] != num_samples:
        raise ValueError(f'targets must be [N] = [{num_samples}] class indices (one per sample), got shape'
                         f' {tuple(targets.shape)}.')
    targets = targets.detach().to(device=device, dtype=torch.long)
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f'targets must lie in [0, {num_classes - 1}] ({num_classes} classes), got values from'
                         f' {targets.min().item()} to {targets.max().item()}.')
    return targets


def check_probs(probs: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
    probs = as_float64(probs, 'probs')
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f'probs must be [N, C] probabilities of one model (for [N, M, C] logits use'
                         f' ensemble_probs), got shape {tuple(probs.shape)}.')
    # tolerant enough for probabilities computed in half precision, strict enough to catch logits
    if probs.min() < -1e-3 or probs.max() > 1 + 1e-3 or not torch.allclose(
            probs.sum(1), torch.ones((), dtype=probs.dtype), atol=1e-3, rtol=0):
        raise ValueError('probs must be probabilities in [0, 1] whose rows sum to 1 (softmax outputs, not logits).')
    return probs.clamp(0, 1), check_targets(targets, probs.shape[0], probs.shape[1], probs.device)
