"""Diversity and calibration metrics of ensembles and of checkpoint sets.

Everything here works on what a model produced, not on how it was trained, so it applies equally to the
members of an ensemble, to the epochs of one run and to independent runs (Fort et al., "Deep Ensembles: A Loss
Landscape Perspective", 2019):

* function space: each member's and the ensemble's accuracy, the pairwise disagreement of the argmax
  predictions, accuracy and Brier score against ensemble size, a t-SNE of the predictions;
* weight space: flattened weight vectors and their pairwise cosine similarity;
* feature space: the FDL paper's pairwise feature distance (Das & Dutta Roy, 2022);
* calibration: negative log-likelihood, Brier score, expected calibration error and its reliability diagram.

Conventions: the logits of several models are ``[N, M, C]`` (N samples, M members or models, C classes, batch
first, as ``forward_members`` returns them); probabilities of one model are ``[N, C]``; targets are ``[N]``
class indices. Accuracies are in percent (0-100, as ``timm.utils.accuracy``), disagreement is a fraction in
[0, 1]. Inputs of any float dtype are computed in float64 (the ECE binning in float32, as torchmetrics does).
The package by concern: ``checks`` (the input checks above), ``accuracy``, ``diversity`` (function, weight and
feature space) and ``calibration``; here, what combines them: accuracy and Brier score against ensemble size, and
``summarize``. Every name is importable from ``timm_ensembles.metrics`` itself.
"""
import itertools
import math
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..utils.checks import check_whole
from .accuracy import _accuracy, ensemble_accuracy, ensemble_correct, ensemble_probs, member_accuracy, member_correct
from .calibration import brier_score, calibration, expected_calibration_error, nll, reliability_diagram, top_label
from .checks import as_float64, check_logits, check_probs, check_targets
from .diversity import (
    cosine_similarity_matrix,
    feature_distance_matrix,
    flatten_weights,
    mean_offdiag,
    member_weights,
    pairwise_differ_counts,
    pairwise_disagreement,
    tsne_embedding,
)

__all__ = [
    'member_correct', 'member_accuracy', 'ensemble_probs', 'ensemble_correct', 'ensemble_accuracy',
    'pairwise_differ_counts', 'pairwise_disagreement', 'mean_offdiag',
    'flatten_weights', 'member_weights', 'cosine_similarity_matrix', 'feature_distance_matrix', 'brier_score',
    'nll', 'expected_calibration_error', 'reliability_diagram', 'calibration', 'ensemble_size_curve',
    'tsne_embedding', 'summarize',
]

# above this many k-subsets, sampling draws subsets at random instead of listing them all first
_MAX_LISTED_SUBSETS = 100_000


def _subsets(num_members: int, k: int, max_subsets: int | None, rng: random.Random) -> list[tuple[int, ...]]:
    total = math.comb(num_members, k)
    if max_subsets is None or total <= max_subsets:
        return list(itertools.combinations(range(num_members), k))
    if total <= _MAX_LISTED_SUBSETS:
        chosen = rng.sample(list(itertools.combinations(range(num_members), k)), max_subsets)
    else:
        # too many to list: draw until enough distinct ones (total > max_subsets, so this ends)
        seen: set[tuple[int, ...]] = set()
        while len(seen) < max_subsets:
            seen.add(tuple(sorted(rng.sample(range(num_members), k))))
        chosen = list(seen)
    return sorted(chosen)


def ensemble_size_curve(
        logits: torch.Tensor,
        targets: torch.Tensor,
        max_subsets: int | None = None,
        seed: int = 0,
) -> list[dict[str, Any]]:
    """Accuracy and Brier score of the averaged-probability ensemble against its size k = 1..M.

    For every k, every k-subset of the members is an ensemble (``ensemble_probs`` of its members); the curve
    reports the mean and the population standard deviation (divided by the number of subsets, not by one less; 0
    for a single subset, as for k = M) over the subsets. With ``max_subsets``, a k with more subsets than that
    uses a random sample of ``max_subsets`` distinct subsets instead, drawn from ``random.Random(seed)`` (the same
    sample for the same seed).

    Args:
        logits: ``[N, M, C]`` logits of M members.
        targets: ``[N]`` class indices.
        max_subsets: At most this many subsets per k (None: all).
        seed: Seed of the subset sample.

    Returns:
        One dict per k: ``k``, ``num_subsets``, ``acc_mean``, ``acc_std`` (percent), ``brier_mean``, ``brier_std``.
    """
    logits = check_logits(logits)
    num_samples, num_members, num_classes = logits.shape
    targets = check_targets(targets, num_samples, num_classes, logits.device)
    check_whole('max_subsets', max_subsets, 'None or a positive integer', ge=1, optional=True)
    probs = F.softmax(logits, dim=-1)
    onehot = F.one_hot(targets, num_classes).to(probs.dtype)
    rng = random.Random(seed)
    curve = []
    for k in range(1, num_members + 1):
        accs, briers = [], []
        for subset in _subsets(num_members, k, max_subsets, rng):
            p = probs[:, list(subset)].mean(1)
            accs.append(_accuracy(p, targets))
            briers.append((p - onehot).pow(2).sum(1).mean().item())
        curve.append({
            'k': k,
            'num_subsets': len(accs),
            'acc_mean': float(np.mean(accs)),
            'acc_std': float(np.std(accs)),
            'brier_mean': float(np.mean(briers)),
            'brier_std': float(np.std(briers)),
        })
    return curve


def summarize(
        logits: torch.Tensor,
        targets: torch.Tensor,
        n_bins: int = 15,
        max_subsets: int | None = 1000,
) -> dict[str, Any]:
    """Every function-space metric of M members on one set, as plain Python types (JSON-serialisable).

    Args:
        logits: ``[N, M, C]`` logits of M members (or checkpoints), in eval mode on a held-out set.
        targets: ``[N]`` class indices.
        n_bins: Number of ECE bins.
        max_subsets: Passed to ``ensemble_size_curve`` (the default lists every subset up to M = 12 members).

    Returns:
        Dict with ``num_samples``, ``num_members``, ``num_classes``; ``member_acc`` (list, percent);
        ``ensemble_acc`` (percent, of the averaged probabilities); ``disagreement`` (mean pairwise disagreement, a
        fraction; None for M = 1, which has no pair); ``disagreement_matrix`` (list of lists);
        ``ensemble_calibration`` (dict ``nll``, ``brier``, ``ece`` of the averaged probabilities);
        ``member_calibration`` (list of such dicts, one per member); ``size_curve`` (``ensemble_size_curve``).
    """
    logits = check_logits(logits)
    num_samples, num_members, num_classes = logits.shape
    targets = check_targets(targets, num_samples, num_classes, logits.device)
    disagreement = pairwise_disagreement(logits)
    probs = F.softmax(logits, dim=-1)
    return {
        'num_samples': num_samples,
        'num_members': num_members,
        'num_classes': num_classes,
        'member_acc': member_accuracy(logits, targets).tolist(),
        'ensemble_acc': ensemble_accuracy(logits, targets),
        'disagreement': mean_offdiag(disagreement) if num_members > 1 else None,
        'disagreement_matrix': disagreement.tolist(),
        'ensemble_calibration': calibration(probs.mean(1), targets, n_bins),
        'member_calibration': [calibration(probs[:, m], targets, n_bins) for m in range(num_members)],
        'size_curve': ensemble_size_curve(logits, targets, max_subsets=max_subsets),
    }
