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
"""
import itertools
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .losses import check_features, pairwise_feature_difference
from .utils.checks import check_range, check_whole
from .utils.extras import require

__all__ = [
    'member_correct', 'member_accuracy', 'ensemble_probs', 'ensemble_correct', 'ensemble_accuracy',
    'pairwise_differ_counts', 'pairwise_disagreement', 'mean_offdiag',
    'flatten_weights', 'member_weights', 'cosine_similarity_matrix', 'feature_distance_matrix', 'brier_score',
    'nll', 'expected_calibration_error', 'reliability_diagram', 'calibration', 'ensemble_size_curve',
    'tsne_embedding', 'summarize',
]

# the largest float32 below 1: torchmetrics bins float32 confidences, and one of exactly 1 would get a bin of its own
_BELOW_ONE_FP32 = 1.0 - 2.0 ** -24
# above this many k-subsets, sampling draws subsets at random instead of listing them all first
_MAX_LISTED_SUBSETS = 100_000


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


def _accuracy(probs_or_logits: torch.Tensor, targets: torch.Tensor) -> float:
    # argmax over the last dimension; torch breaks ties towards the lower class index
    return probs_or_logits.argmax(-1).eq(targets).double().mean().item() * 100.0


def member_correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many samples every member classifies correctly: ``[M]`` int64 counts, which add up exactly over batches.

    Args:
        logits: ``[N, M, C]`` logits (or probabilities) of M members.
        targets: ``[N]`` class indices.
    """
    logits = check_logits(logits)
    targets = check_targets(targets, logits.shape[0], logits.shape[2], logits.device)
    return logits.argmax(-1).eq(targets[:, None]).sum(0)


def member_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of every member.

    Args:
        logits: ``[N, M, C]`` logits (or probabilities) of M members.
        targets: ``[N]`` class indices.

    Returns:
        ``[M]`` float64 tensor, in percent.
    """
    return member_correct(logits, targets).double() * 100.0 / logits.shape[0]


def ensemble_probs(logits: torch.Tensor) -> torch.Tensor:
    """The deep-ensemble prediction: the mean of the members' softmax probabilities.

    Args:
        logits: ``[N, M, C]`` logits of M members.

    Returns:
        ``[N, C]`` float64 probabilities.
    """
    return F.softmax(check_logits(logits), dim=-1).mean(1)


def ensemble_correct(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """How many samples the averaged probabilities (``ensemble_probs``) classify correctly.

    Args:
        logits: ``[N, M, C]`` logits of M members.
        targets: ``[N]`` class indices.
    """
    probs = ensemble_probs(logits)
    targets = check_targets(targets, probs.shape[0], probs.shape[1], probs.device)
    # argmax over the last dimension; torch breaks ties towards the lower class index
    return int(probs.argmax(-1).eq(targets).sum())


def ensemble_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy, in percent, of the averaged probabilities (``ensemble_probs``).

    Args:
        logits: ``[N, M, C]`` logits of M members.
        targets: ``[N]`` class indices.
    """
    return ensemble_correct(logits, targets) * 100.0 / logits.shape[0]


def pairwise_differ_counts(logits: torch.Tensor) -> torch.Tensor:
    """On how many samples the argmax predictions of every two models differ: ``[M, M]`` int64 counts, symmetric,
    zero on the diagonal, which add up exactly over batches (``pairwise_disagreement`` divided by N).

    Args:
        logits: ``[N, M, C]`` logits (or probabilities) of M models on the same N samples.
    """
    preds = check_logits(logits).argmax(-1)  # [N, M]
    num_models = preds.shape[1]
    out = torch.zeros(num_models, num_models, dtype=torch.int64, device=preds.device)
    # one row at a time: an [N, M, M] comparison would not fit in memory for many checkpoints
    for i in range(num_models):
        out[i] = preds.ne(preds[:, i:i + 1]).sum(0)
    return out


def pairwise_disagreement(logits: torch.Tensor) -> torch.Tensor:
    """Fraction of samples on which the argmax predictions of two models differ (Fort et al.'s disagreement).

    Measure it on a fixed held-out set with the models in eval mode. Targets play no part: two models that are
    wrong in different ways disagree.

    Args:
        logits: ``[N, M, C]`` logits (or probabilities) of M models on the same N samples.

    Returns:
        ``[M, M]`` float64 tensor in [0, 1], symmetric, zero on the diagonal (``[[0.]]`` for one model).
    """
    return pairwise_differ_counts(logits).double() / logits.shape[0]


def mean_offdiag(matrix: torch.Tensor) -> float:
    """Mean over the pairs i < j of a symmetric ``[M, M]`` matrix (its upper triangle, diagonal left out).

    Args:
        matrix: Square pairwise matrix, e.g. of ``pairwise_disagreement`` or ``cosine_similarity_matrix``.

    Raises:
        ValueError: Not a square matrix, or fewer than 2 rows.
    """
    matrix = as_float64(matrix, 'matrix')
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f'mean_offdiag expects a square [M, M] matrix, got shape {tuple(matrix.shape)}.')
    num = matrix.shape[0]
    if num < 2:
        raise ValueError(f'mean_offdiag needs at least 2 members/models: a single model has no pair to compare'
                         f' (got a {num} x {num} matrix).')
    i, j = torch.triu_indices(num, num, offset=1)
    return matrix[i, j].mean().item()


def flatten_weights(model: nn.Module, include_buffers: bool = False) -> torch.Tensor:
    """All learned weights of a model as one vector, for weight-space comparisons.

    Fort et al. compare all weights and biases, so every parameter counts, BatchNorm's affine weight and bias
    included, in ``named_parameters()`` order (a parameter shared by two modules counts once). BatchNorm's
    running statistics are estimates of the data's moments, not learned weights, so they are left out by default;
    ``include_buffers=True`` appends the floating-point buffers (``running_mean``, ``running_var``) after all the
    parameters, in ``named_buffers()`` order, so that the first entries are the same either way. Integer buffers
    (``num_batches_tracked``) are never included.

    Args:
        model: Any module.
        include_buffers: Also append the floating-point buffers.

    Returns:
        ``[P]`` float64 tensor, on the model's device.
    """
    tensors = [p.detach().reshape(-1).to(torch.float64) for _, p in model.named_parameters()]
    if include_buffers:
        tensors += [b.detach().reshape(-1).to(torch.float64) for _, b in model.named_buffers() if b.is_floating_point()]
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(tensors)


def member_weights(model: nn.Module, include_buffers: bool = False) -> torch.Tensor:
    """The flattened weights (``flatten_weights``) of every member of an ensemble, one row each.

    A model with ``.members`` (an ``nn.ModuleList``, as timm_ensembles' ``EnsembleModel``) gives one row per
    member; its combining head is left out. Any other module is one model: ``[1, P]``.

    Args:
        model: An ensemble with ``.members``, or a plain module.
        include_buffers: Also include the floating-point buffers (see ``flatten_weights``).

    Returns:
        ``[M, P]`` float64 tensor.

    Raises:
        ValueError: The model has ``forward_members`` but no ``.members`` (a collaborative multi-head network: its
            heads share layers, so a head has no weight vector of its own), or its members differ in size.
    """
    members = getattr(model, 'members', None)
    if isinstance(members, nn.ModuleList):
        vectors = [flatten_weights(m, include_buffers) for m in members]
        sizes = sorted({v.numel() for v in vectors})
        if len(sizes) > 1:
            raise ValueError(f'The members of {type(model).__name__} have different numbers of weights {sizes}, so'
                             f' their weight vectors cannot be compared.')
        return torch.stack(vectors)
    if hasattr(model, 'forward_members'):
        raise ValueError(f'{type(model).__name__} has forward_members but no .members: its members share weights'
                         f' (e.g. heads on shared layers), so per-member weight vectors are not defined. Compare'
                         f' whole models with flatten_weights instead.')
    return flatten_weights(model, include_buffers)[None]


def cosine_similarity_matrix(vectors: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Pairwise cosine similarity of K vectors (e.g. the flattened weights of K models).

    Args:
        vectors: ``[K, P]`` tensor, or a sequence of K ``[P]`` tensors.

    Returns:
        ``[K, K]`` float64 tensor in [-1, 1], with 1 on the diagonal and exactly +-1 for identical or exactly opposite
        vectors.

    Raises:
        ValueError: Not K vectors of one length, or a zero vector (its direction is undefined).
    """
    if not isinstance(vectors, torch.Tensor):
        vectors = [torch.as_tensor(v) for v in vectors]
        if not vectors or any(v.ndim != 1 for v in vectors) or len({v.numel() for v in vectors}) > 1:
            raise ValueError(f'cosine_similarity_matrix expects K >= 1 vectors [P] of one length, got shapes'
                             f' {[tuple(v.shape) for v in vectors]}.')
        vectors = torch.stack(vectors)
    vectors = vectors.detach().to(torch.float64)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f'cosine_similarity_matrix expects a [K, P] tensor, got shape {tuple(vectors.shape)}.')
    norms = vectors.norm(dim=1)
    zero = (norms == 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(f'cosine_similarity_matrix: vector(s) {zero} are zero, their cosine similarity is undefined.')
    unit = vectors / norms[:, None]
    sim = (unit @ unit.T).clamp(-1, 1)
    # rounding leaves 1 - 1e-16 for identical vectors; compare only the near-parallel pairs element by element
    for i, j in (sim.abs() > 1 - 1e-9).triu(1).nonzero().tolist():
        if torch.equal(vectors[i], vectors[j]):
            sim[i, j] = sim[j, i] = 1.0
        elif torch.equal(vectors[i], -vectors[j]):
            sim[i, j] = sim[j, i] = -1.0
    sim.fill_diagonal_(1.0)
    return sim


def feature_distance_matrix(features: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Pairwise feature distance of M members: the FDL paper's L_FDL(i, j) for every pair.

    Entry (i, j) is the mean over layers d of ``losses.feature_difference(features[i][d], features[j][d])``, the
    mean squared difference over every element, in fp32: the batch mean of ``losses.pairwise_feature_difference``.
    ``mean_offdiag`` of the matrix equals ``losses.feature_difference_loss(features)`` to fp32 rounding.

    Args:
        features: ``features[m][d]`` is member m's feature tensor at layer d (e.g. ``[B, C, H, W]``); every member has
            the same layers with the same shapes.

    Returns:
        ``[M, M]`` float64 tensor, symmetric, zero on the diagonal.
    """
    if len(features) == 0:
        raise ValueError('feature_distance_matrix needs the features of at least one member.')
    if len(features) == 1:
        check_features(features * 2)  # one member: its layers are checked as a pair would be
        return torch.zeros(1, 1, dtype=torch.float64)
    with torch.no_grad():
        return pairwise_feature_difference(features).mean(0).double().cpu()


def brier_score(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Brier score: the mean over samples of ``sum_c (p_c - onehot_c)^2``.

    This is the original, multi-class definition (Brier 1950, used by Lakshminarayanan et al. and Fort et al.), in
    [0, 2]: 0 for a confident correct prediction, 2 for a confident wrong one. Some papers divide it by the number
    of classes C; multiply by ``1 / C`` to compare with those.

    Args:
        probs: ``[N, C]`` probabilities.
        targets: ``[N]`` class indices.
    """
    probs, targets = check_probs(probs, targets)
    onehot = F.one_hot(targets, probs.shape[1]).to(probs.dtype)
    return (probs - onehot).pow(2).sum(1).mean().item()


def nll(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class.

    The probability of the true class is clamped at ``eps`` first, so that one confident wrong prediction costs
    ``-log(eps)`` (27.6 for the default 1e-12) rather than infinity; pass log-softmax outputs to
    ``torch.nn.functional.nll_loss`` for the unclamped value.

    Args:
        probs: ``[N, C]`` probabilities.
        targets: ``[N]`` class indices.
        eps: Smallest probability taken.
    """
    probs, targets = check_probs(probs, targets)
    return -probs.gather(1, targets[:, None]).clamp_min(eps).log().mean().item()


def top_label(probs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-label confidence (float64) and whether the top label is correct, for already checked inputs."""
    confidence, pred = probs.max(1)
    return confidence, pred.eq(targets)


def _ece_preds(probs: torch.Tensor) -> torch.Tensor:
    # torchmetrics puts a float32 confidence of exactly 1 (any float64 one above 1 - 2^-25) in a bin [1, 1] of its
    # own; clamping just below 1 folds it into the last bin, as every other binning convention does. Only a top
    # probability can exceed the clamp, so the argmax does not change.
    return probs.clamp(0, _BELOW_ONE_FP32)


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> float:
    """Top-label expected calibration error (Guo et al. 2017) with equal-width bins, computed by torchmetrics.

    ``ECE = sum_b (n_b / N) |accuracy_b - confidence_b|`` over ``n_bins`` bins of the top probability.
    Binning follows torchmetrics' ``multiclass_calibration_error``: the bins are ``[k / n, (k + 1) / n)``, closed
    on the left, so a confidence exactly on an edge belongs to the upper bin (0.5 with 2 bins is in [0.5, 1]), and
    the confidences are binned in float32. A confidence of 1 falls in the last bin, ``[1 - 1 / n, 1]``
    (torchmetrics alone would give it a bin of its own). ``reliability_diagram`` shows the same bins.

    Args:
        probs: ``[N, C]`` probabilities, C >= 2.
        targets: ``[N]`` class indices.
        n_bins: Number of equal-width bins over [0, 1].

    Returns:
        ECE as a fraction in [0, 1].
    """
    multiclass_calibration_error = require('torchmetrics.functional.classification',
                                           'expected_calibration_error').multiclass_calibration_error

    probs, targets = check_probs(probs, targets)
    check_whole('n_bins', n_bins, 'a positive integer', ge=1)
    if probs.shape[1] < 2:
        raise ValueError(f'expected_calibration_error needs at least 2 classes, got {probs.shape[1]}.')
    ece = multiclass_calibration_error(_ece_preds(probs), targets, num_classes=probs.shape[1], n_bins=n_bins,
                                       norm='l1')
    return ece.item()


def reliability_diagram(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> dict[str, torch.Tensor]:
    """Per-bin accuracy and confidence of the top label, in the bins of ``expected_calibration_error``.

    ``sum_b count_b |accuracy_b - confidence_b| / N`` over the non-empty bins is the ECE (to float32 rounding: the
    bins are assigned in float32 as torchmetrics does, the means taken in float64).

    Args:
        probs: ``[N, C]`` probabilities, C >= 2.
        targets: ``[N]`` class indices.
        n_bins: Number of equal-width bins over [0, 1].

    Returns:
        Dict of float64 tensors ``bin_edges`` ``[n_bins + 1]``, ``confidence`` ``[n_bins]`` (mean top probability
        of the bin's samples), ``accuracy`` ``[n_bins]`` (fraction of them whose top label is correct; both NaN
        where a bin is empty) and the int64 ``count`` ``[n_bins]``.
    """
    probs, targets = check_probs(probs, targets)
    probs, targets = probs.cpu(), targets.cpu()  # a few bins: no gain from an accelerator
    check_whole('n_bins', n_bins, 'a positive integer', ge=1)
    if probs.shape[1] < 2:
        raise ValueError(f'reliability_diagram needs at least 2 classes, got {probs.shape[1]}.')
    confidence, correct = top_label(probs, targets)
    # exactly torchmetrics' assignment: float32 confidences, float32 edges, bucketize(right=True) - 1
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32)
    bins = torch.bucketize(_ece_preds(confidence).float(), edges, right=True) - 1
    count = torch.bincount(bins, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, confidence)
    correct_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct.double())
    denom = count.double().where(count > 0, torch.tensor(float('nan'), dtype=torch.float64))
    return {
        'bin_edges': edges.double(),
        'confidence': conf_sum / denom,
        'accuracy': correct_sum / denom,
        'count': count,
    }


def calibration(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """NLL, Brier score and ECE of one model's probabilities.

    See ``nll``, ``brier_score`` and ``expected_calibration_error``.

    Args:
        probs: ``[N, C]`` probabilities.
        targets: ``[N]`` class indices.
        n_bins: Number of ECE bins.

    Returns:
        ``{'nll': ..., 'brier': ..., 'ece': ...}``.
    """
    return {
        'nll': nll(probs, targets),
        'brier': brier_score(probs, targets),
        'ece': expected_calibration_error(probs, targets, n_bins),
    }


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


def tsne_embedding(points: Any, seed: int = 0, perplexity: float | None = None) -> np.ndarray:
    """2-D t-SNE of K points, e.g. every checkpoint's softmax predictions on a fixed set, flattened.

    scikit-learn's ``TSNE`` with 2 components, PCA initialisation (random for one-dimensional points, which PCA
    cannot project to two) and ``random_state=seed``, so the same points and seed give the same embedding. The
    optimisation itself is deterministic and the PCA initialisation is exact for small K, so the seed rarely
    changes the result; it matters for the random initialisation and for scikit-learn's randomised PCA of large
    inputs.

    Args:
        points: ``[K, D]`` array-like (numpy array or tensor).
        seed: Random state of t-SNE.
        perplexity: t-SNE perplexity, below K; default ``min(30, (K - 1) / 3)``, at least 1.

    Returns:
        ``[K, 2]`` numpy array.
    """
    from sklearn.manifold import TSNE

    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().to(torch.float64).numpy()
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2:
        raise ValueError(f'tsne_embedding expects [K, D] points, got shape {points.shape}.')
    num_points = points.shape[0]
    if num_points < 3:
        raise ValueError(f't-SNE needs at least 3 points, got {num_points}.')
    if perplexity is None:
        perplexity = max(1.0, min(30.0, (num_points - 1) / 3))
    else:
        check_range('perplexity', perplexity, f'in (0, K = {num_points})', gt=0, lt=num_points)
    init = 'pca' if points.shape[1] >= 2 else 'random'
    tsne = TSNE(n_components=2, perplexity=perplexity, init=init, random_state=seed)
    return tsne.fit_transform(points)


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
