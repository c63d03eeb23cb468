"""Loss terms shared by the ensemble methods."""
import itertools
from collections.abc import Sequence

import torch

__all__ = ['feature_difference', 'feature_difference_loss', 'per_sample_feature_difference', 'loss_similarity',
           'member_cross_entropy']


def feature_difference(f_i: torch.Tensor, f_j: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of two feature tensors over every element (B, C, H, W), in fp32."""
    return (f_i.float() - f_j.float()).pow(2).mean()


def feature_difference_loss(features: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """The FDL paper's L_FDL: feature differences averaged over layers, then over member pairs.

    ``L_d(i, j) = mean_{b,c,h,w} (F_d^i - F_d^j)^2``, ``L_FDL(i, j) = mean_d L_d(i, j)``, and for N > 2 members
    the mean over all N (N - 1) / 2 pairs, as the reference code does for three members. The method
    *maximises* this quantity (it enters the objective as ``-L_FDL``).

    Up to 3 members the pairs are summed directly; from 4 on, in O(N) passes over the features through the
    identity ``sum_{i<j} (f_i - f_j)^2 = N sum_i (f_i - mean_k f_k)^2`` (centred, so without cancellation).
    Measured on a CPU (``benchmarks/fdl_term.py``), the pairwise form is the faster up to N = 3.

    Args:
        features: ``features[m][d]`` is member m's feature tensor at layer d; every member has the same layers.

    Returns:
        Scalar fp32 tensor.
    """
    num_members = len(features)
    if num_members < 2:
        raise ValueError(f'The feature difference needs at least 2 members, got {num_members}.')
    num_layers = len(features[0])
    if num_layers == 0 or any(len(f) != num_layers for f in features):
        counts = [len(f) for f in features]
        raise ValueError(f'Every member needs the same, non-zero number of feature layers, got {counts}.')
    if num_members <= 3:
        pair_losses = [torch.stack([feature_difference(a, b) for a, b in zip(features[i], features[j])]).mean()
                       for i, j in itertools.combinations(range(num_members), 2)]
        return torch.stack(pair_losses).mean()
    layer_losses: list[torch.Tensor] = []
    for layer in zip(*features):
        stacked = torch.stack([f.float() for f in layer])  # [M, ...]
        centred = stacked - stacked.mean(0, keepdim=True)
        # mean over pairs of the per-element mean: N * sum_i mean_e(centred_i^2) / (N (N - 1) / 2)
        layer_losses.append(centred.pow(2).mean(tuple(range(1, centred.ndim))).sum() * (2.0 / (num_members - 1)))
    return torch.stack(layer_losses).mean()


def per_sample_feature_difference(features: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """The FDL paper's L_FDL of every sample: ``[B]`` fp32, whose mean is ``feature_difference_loss(features)``.

    Every sample has the same number of elements per layer, so the batch mean over ``(b, c, h, w)`` of each layer is
    the mean over samples of their own means; per-sample values can then be gathered across processes with the
    duplicated tail of the last batch dropped, which a batch mean cannot (evaluation logs this). Pairs are summed
    directly up to 4 members, from 5 on (where that was measured slower on a CPU, without gradients) through
    ``sum_{i<j} (f_i - f_j)^2 = N sum_i (f_i - mean_k f_k)^2`` (centred, so without cancellation) with no stacked
    copy of the features.

    Args:
        features: ``features[m][d]`` is member m's ``[B, ...]`` feature tensor at layer d.
    """
    num_members = len(features)
    if num_members < 2:
        raise ValueError(f'The feature difference needs at least 2 members, got {num_members}.')
    layers = []
    for layer in zip(*features):
        layer = [f.float() for f in layer]
        if num_members <= 4:
            pairs = itertools.combinations(range(num_members), 2)
            diff = sum((layer[i] - layer[j]).pow(2).flatten(1).mean(1) for i, j in pairs)
            layers.append(diff / (num_members * (num_members - 1) // 2))
        else:
            mean = sum(layer) / num_members  # no stacked [M, B, ...] copy
            diff = sum((f - mean).pow(2).flatten(1).mean(1) for f in layer)
            layers.append(diff * (2.0 / (num_members - 1)))
    return torch.stack(layers).mean(0)


def loss_similarity(loss_i: torch.Tensor, loss_j: torch.Tensor) -> torch.Tensor:
    """The FDL paper's similarity term S = (L_i - L_j)^2 between two members' batch losses."""
    return (loss_i - loss_j).pow(2)


def member_cross_entropy(
        member_logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-member batch cross-entropy of ``[B, M, C]`` logits: a ``[M]`` fp32 tensor."""
    b, m, c = member_logits.shape
    per_sample = torch.nn.functional.cross_entropy(
        member_logits.float().reshape(b * m, c), target.repeat_interleave(m), reduction='none',
        label_smoothing=label_smoothing,
    )
    return per_sample.view(b, m).mean(0)
