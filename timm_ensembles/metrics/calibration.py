"""Calibration of one model's probabilities: negative log-likelihood, Brier score, expected calibration error and
its reliability diagram."""
import torch
import torch.nn.functional as F

from ..utils.checks import check_whole
from ..utils.extras import require
from .checks import check_probs

__all__ = ['brier_score', 'nll', 'top_label', 'expected_calibration_error', 'reliability_diagram', 'calibration']

# the largest float32 below 1: torchmetrics bins float32 confidences, and one of exactly 1 would get a bin of its own
_BELOW_ONE_FP32 = 1.0 - 2.0 ** -24


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
