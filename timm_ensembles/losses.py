"""Loss terms shared by the ensemble methods."""
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ['FEATURE_DISTANCES', 'feature_difference', 'feature_difference_loss', 'pairwise_feature_difference',
           'loss_similarity', 'member_cross_entropy', 'soft_cross_entropy']

FEATURE_DISTANCES = ('mse', 'relative')
# from this many members on, the pair sums go through the centred O(N) identity (measured faster with gradients on a
# CPU, benchmarks/fdl_term.py); below it, pair by pair
_CENTRED_FROM = 4


def _layer_pair_difference(layer: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per sample, the mean squared difference of two members' features at one layer, averaged over member pairs:
    ``[B]`` fp32. The one primitive of every form of the feature difference below (the pair, the batch loss, the
    per-sample pair matrix).

    Up to 3 members the pairs are summed directly; from 4 on, through ``sum_{i<j} (f_i - f_j)^2 =
    N sum_i (f_i - mean_k f_k)^2`` (centred, so without cancellation), in O(N) passes and no stacked copy.
    """
    num_members = len(layer)
    layer = [f.float() for f in layer]
    if num_members < _CENTRED_FROM:
        pairs = list(itertools.combinations(range(num_members), 2))
        return sum((layer[i] - layer[j]).pow(2).flatten(1).mean(1) for i, j in pairs) / len(pairs)
    mean = sum(layer) / num_members
    # mean over pairs: N sum_i mean_e(centred_i^2) / (N (N - 1) / 2)
    return sum((f - mean).pow(2).flatten(1).mean(1) for f in layer) * (2.0 / (num_members - 1))


def feature_difference(f_i: torch.Tensor, f_j: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of two same-shape feature tensors over every element (B, C, H, W), in fp32."""
    check_features([[f_i], [f_j]])
    # every sample has the same number of elements: the mean of the samples' means is the mean over every element
    return _layer_pair_difference((f_i, f_j)).mean()


def check_features(features: Sequence[Sequence[torch.Tensor]]) -> None:
    num_members = len(features)
    if num_members < 2:
        raise ValueError(f'The feature difference needs at least 2 members, got {num_members}.')
    num_layers = len(features[0])
    if num_layers == 0 or any(len(f) != num_layers for f in features):
        counts = [len(f) for f in features]
        raise ValueError(f'Every member needs the same, non-zero number of feature layers, got {counts}.')
    for d, layer in enumerate(zip(*features)):
        shapes = [tuple(f.shape) for f in layer]
        if len(set(shapes)) > 1:  # a difference would broadcast them silently
            raise ValueError(f'Layer {d} has different shapes across members: {shapes}.')


def feature_difference_loss(features: Sequence[Sequence[torch.Tensor]], distance: str = 'mse') -> torch.Tensor:
    """The FDL paper's L_FDL: feature differences averaged over layers, then over member pairs.

    ``distance='mse'`` is the paper's: ``L_d(i, j) = mean_{b,c,h,w} (F_d^i - F_d^j)^2``, ``L_FDL(i, j) =
    mean_d L_d(i, j)``, and for N > 2 members the mean over all N (N - 1) / 2 pairs, as the reference code does for
    three members. It grows without bound with the scale of the features, which a base without normalisation can
    raise freely.

    ``distance='relative'`` divides each layer's term by twice the members' mean feature energy over the batch,
    ``mean_b,pairs (F^i - F^j)^2 / (2 mean_b,m (F^m)^2)``: for two members ``|F^1 - F^2|^2 / (|F^1|^2 + |F^2|^2)``,
    0 for equal features, 1 for orthogonal ones, at most ``N / (N - 1)``; scaling the features changes nothing. The
    members are pushed apart in direction, not in magnitude, so -L_FDL cannot run away.

    The method *maximises* this quantity (it enters the objective as ``-L_FDL``).

    Args:
        features: ``features[m][d]`` is member m's feature tensor at layer d; every member has the same layers.
        distance: 'mse' or 'relative', see above.

    Returns:
        Scalar fp32 tensor.
    """
    check_features(features)
    if distance not in FEATURE_DISTANCES:
        raise ValueError(f"Unknown feature distance '{distance}', expected one of {FEATURE_DISTANCES}.")
    layer_losses = []
    for layer in zip(*features):
        # every sample has the same number of elements, so the batch mean is the mean of the samples' means
        difference = _layer_pair_difference(layer).mean()
        if distance == 'relative':
            energy = sum(f.float().pow(2).mean() for f in layer) / len(layer)
            difference = difference / (2 * energy).clamp(min=torch.finfo(torch.float32).tiny)
        layer_losses.append(difference)
    return torch.stack(layer_losses).mean()


def pairwise_feature_difference(features: Sequence[Sequence[torch.Tensor]], distance: str = 'mse') -> torch.Tensor:
    """The FDL paper's L_FDL(i, j) of every sample and member pair: ``[B, M, M]`` fp32, symmetric, zero on the
    diagonal. With ``distance='mse'`` its mean over samples is the pair matrix of ``metrics.feature_distance_matrix``;
    its mean over samples and pairs ``i < j`` is ``feature_difference_loss(features)`` (to fp32 rounding).

    ``distance='relative'``: each sample's scale-free distance, per layer ``|F^i - F^j|^2 / (|F^i|^2 + |F^j|^2)``
    averaged over layers (0 for equal features, 1 for orthogonal ones, 2 for opposite ones; at most 1 for
    non-negative features such as post-ReLU stage outputs). The loss' relative form normalises a batch at once, by
    every member's energy; this per-sample form is the one that can be gathered (for two members the two agree on a
    one-sample batch).

    Per-sample values can be gathered across processes with the duplicated tail of the last batch dropped, which a
    batch mean cannot (evaluation relies on this).

    Args:
        features: ``features[m][d]`` is member m's ``[B, ...]`` feature tensor at layer d.
        distance: 'mse' or 'relative'.
    """
    check_features(features)
    if distance not in FEATURE_DISTANCES:
        raise ValueError(f"Unknown feature distance '{distance}', expected one of {FEATURE_DISTANCES}.")
    num_members = len(features)
    batch = features[0][0].shape[0]
    out = torch.zeros(batch, num_members, num_members, dtype=torch.float32, device=features[0][0].device)
    tiny = torch.finfo(torch.float32).tiny
    for i, j in itertools.combinations(range(num_members), 2):
        layers = []
        for a, b in zip(features[i], features[j]):
            difference = _layer_pair_difference((a, b))
            if distance == 'relative':
                energy = a.float().pow(2).flatten(1).mean(1) + b.float().pow(2).flatten(1).mean(1)
                difference = difference / energy.clamp(min=tiny)
            layers.append(difference)
        out[:, i, j] = out[:, j, i] = torch.stack(layers).mean(0)
    return out


def loss_similarity(loss_i: torch.Tensor, loss_j: torch.Tensor, delta: float | None = None) -> torch.Tensor:
    """The FDL paper's similarity term S = (L_i - L_j)^2 between two members' batch losses.

    With ``delta``, S is quadratic only while ``|L_i - L_j| <= delta`` and linear beyond (twice the Huber loss, the
    same value and gradient inside): the gradient of S on a member's loss is bounded by ``2 delta``. The paper's S,
    unbounded, reverses the better member's own gradient once ``2 w |L_i - L_j| > 1`` (``w`` its weight), and that
    member then ascends its loss, which widens the gap further: on a network without normalisation at a common
    learning rate both losses run to infinity within tens of steps (measured: a one-filter pair on the digits at
    lr 0.1). ``delta = 1 / (2 w)`` keeps every member descending its own loss; ``0.1 / w`` (FDL's) changes any
    member's step by at most 20 %.
    """
    if delta is None:
        return (loss_i - loss_j).pow(2)
    return 2.0 * F.huber_loss(loss_i, loss_j, delta=delta)


def member_cross_entropy(
        member_logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-member batch cross-entropy of ``[B, M, C]`` logits: a ``[M]`` fp32 tensor. ``target``: ``[B]`` class
    indices or ``[B, C]`` probabilities."""
    b, m, c = member_logits.shape
    per_sample = torch.nn.functional.cross_entropy(
        member_logits.float().reshape(b * m, c), target.repeat_interleave(m, dim=0), reduction='none',
        label_smoothing=label_smoothing,
    )
    return per_sample.view(b, m).mean(0)


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * mean_b H(target, softmax(logits / T))``, the cross-entropy against a distribution, in fp32."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(target_probs.float() * log_p).sum(-1).mean() * temperature ** 2
