"""Uncertainty of ensembles: its decomposition, temperature scaling, OOD detection and selective classification.

What an ensemble's disagreement is good for, measured on what the models produced (Fort et al., "Deep Ensembles: A
Loss Landscape Perspective", 2019; Lakshminarayanan et al., 2017):

* decomposition: the entropy of the averaged probabilities (total uncertainty) is the members' mean entropy (the
  aleatoric part, ``expected_entropy``) plus the mutual information between the prediction and the member (the
  epistemic part: how much the members disagree);
* calibration: temperature scaling of a model's logits, fitted on held-out data;
* out-of-distribution detection: AUROC, AUPR and FPR at 95 % TPR of a score, with the OOD samples the positives;
* selective classification: the risk-coverage curve and the area under it (AURC).

Conventions: as in ``metrics``, logits of several members are ``[N, M, C]`` (N samples, M members, C classes, batch
first, as ``forward_members`` returns them), probabilities of one model are ``[N, C]``, targets ``[N]`` class indices;
inputs of any float dtype are computed in float64. Entropies are in nats (natural logarithm), with 0 log 0 = 0. An
OOD score is higher for "more out-of-distribution" (``ood_scores`` turns the uncertainty scores into such scores); a
confidence is higher for "more likely correct".

References:
    Depeweg et al., "Decomposition of Uncertainty in Bayesian Deep Learning", ICML 2018 (entropy = expected entropy
    + mutual information). Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (temperature scaling).
    Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples", ICLR 2017 (AUROC,
    AUPR). Geifman & El-Yaniv, "Selective Classification for Deep Neural Networks", NeurIPS 2017, and Geifman et al.,
    "Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers", ICLR 2019 (risk-coverage curve, AURC).
"""
from typing import Any

import torch
import torch.nn.functional as F

from ..metrics import as_float64, check_logits, check_probs, top_label
from ..train.calibrate import calibrate, fit_temperature
from ..utils.extras import require

__all__ = [
    'predictive_entropy', 'expected_entropy', 'mutual_information', 'uncertainty_scores', 'ood_scores',
    'fit_temperature', 'calibrate', 'ood_detection', 'risk_coverage', 'aurc',
]


def _check_probs_only(probs: Any) -> torch.Tensor:
    probs = as_float64(probs, 'probs')
    # check_probs checks the shape and the values with its own messages; targets of class 0 pass any valid probs
    num_samples = probs.shape[0] if probs.ndim == 2 else 0
    return check_probs(probs, torch.zeros(num_samples, dtype=torch.long))[0]


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    # entr(p) = -p ln p, exactly 0 at p = 0 (where p * log(p) would be 0 * -inf = nan)
    return torch.special.entr(probs).sum(-1)


def _decomposition(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four scores of checked ``[N, M, C]`` float64 logits, from one softmax of the members."""
    member_probs = F.softmax(logits, dim=-1)
    probs = member_probs.mean(1)  # metrics.ensemble_probs, without a second softmax of every member
    entropy = _entropy(probs)
    expected = _entropy(member_probs).mean(1)
    # H(mean p) >= mean H(p) because the entropy is concave (Jensen), so the mutual information is >= 0; when the
    # members (nearly) agree the two terms are equal up to float64 rounding, which can leave -1e-17 instead of 0
    mutual_info = (entropy - expected).clamp_min(0)
    return {
        'max_prob': probs.max(1).values,
        'entropy': entropy,
        'expected_entropy': expected,
        'mutual_information': mutual_info,
    }


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum_c p_c ln p_c`` of every sample's predicted distribution, in nats (0 ln 0 = 0).

    For an ensemble, pass ``metrics.ensemble_probs(logits)``: the total uncertainty of the averaged prediction.

    Args:
        probs: ``[N, C]`` probabilities.

    Returns:
        ``[N]`` float64 tensor in [0, ln C].
    """
    return _entropy(_check_probs_only(probs))


def expected_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the members of each member's softmax entropy, in nats: the aleatoric part of the uncertainty.

    Args:
        logits: ``[N, M, C]`` logits of M members.

    Returns:
        ``[N]`` float64 tensor in [0, ln C].
    """
    return _entropy(F.softmax(check_logits(logits), dim=-1)).mean(1)


def mutual_information(logits: torch.Tensor) -> torch.Tensor:
    """Mutual information between the prediction and the member: the epistemic part of the uncertainty, in nats.

    ``H(ensemble_probs) - expected_entropy``: how much the members disagree, 0 when all of them predict the same
    distribution (in particular for M = 1). It is >= 0 by Jensen's inequality; values that float64 rounding leaves
    slightly below 0 are clamped to 0.

    Args:
        logits: ``[N, M, C]`` logits of M members.

    Returns:
        ``[N]`` float64 tensor in [0, ln min(M, C)].
    """
    return _decomposition(check_logits(logits))['mutual_information']


def uncertainty_scores(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The uncertainty of an ensemble's prediction, per sample, in its usual forms.

    Args:
        logits: ``[N, M, C]`` logits of M members.

    Returns:
        Dict of ``[N]`` float64 tensors: ``max_prob`` (top probability of the averaged probabilities, a confidence),
        ``entropy`` (``predictive_entropy`` of the averaged probabilities: total), ``expected_entropy`` (aleatoric)
        and ``mutual_information`` (epistemic; ``entropy = expected_entropy + mutual_information``).
    """
    return _decomposition(check_logits(logits))


def ood_scores(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``uncertainty_scores`` as OOD scores for ``ood_detection``: higher means "more out-of-distribution".

    Args:
        logits: ``[N, M, C]`` logits of M members.

    Returns:
        Dict of ``[N]`` float64 tensors: ``neg_max_prob`` (minus the top averaged probability, Hendrycks & Gimpel's
        baseline), ``entropy``, ``expected_entropy`` and ``mutual_information``.
    """
    scores = _decomposition(check_logits(logits))
    return {
        'neg_max_prob': -scores['max_prob'],
        'entropy': scores['entropy'],
        'expected_entropy': scores['expected_entropy'],
        'mutual_information': scores['mutual_information'],
    }

def _check_scores(scores: Any, name: str) -> torch.Tensor:
    scores = as_float64(scores, name)
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(f'{name} must be a non-empty [N] tensor of one score per sample, got shape'
                         f' {tuple(scores.shape)}.')
    if scores.isnan().any():
        raise ValueError(f'{name} has NaN scores, which have no order.')
    return scores


def ood_detection(scores_in: torch.Tensor, scores_out: torch.Tensor) -> dict[str, float]:
    """How well a score separates out-of-distribution from in-distribution samples.

    A higher score means "more out-of-distribution" (see ``ood_scores``), and the OOD samples are the positive class:

    * ``auroc``: area under the ROC curve, the probability that an OOD sample scores higher than an in-distribution
      one (ties count one half);
    * ``aupr``: average precision with the OOD samples positive, ``sum_k (R_k - R_{k-1}) P_k`` over the distinct
      thresholds, without interpolation (Hendrycks & Gimpel's AUPR-Out; their AUPR-In is this with the scores
      negated and the two sets swapped);
    * ``fpr95``: the fraction of in-distribution samples scoring at or above the highest threshold at which at least
      95 % of the OOD samples score at or above it (the false positive rate at 95 % true positive rate).

    AUROC and AUPR are torchmetrics' ``binary_auroc`` and ``binary_average_precision`` (exact, no binning; torchmetrics
    counts and divides in float32, so they are good to about 1e-7). Only the order of the scores matters, so they are
    passed as their ranks: torchmetrics would squash scores outside [0, 1] with a sigmoid, which in float64 makes all
    scores above ~37 equal. FPR95 is counted here in float64.

    Args:
        scores_in: ``[N_in]`` scores of in-distribution samples.
        scores_out: ``[N_out]`` scores of out-of-distribution samples.

    Returns:
        ``{'auroc': ..., 'aupr': ..., 'fpr95': ...}``, each in [0, 1].
    """
    classification = require('torchmetrics.functional.classification', 'ood_detection')
    scores_in = _check_scores(scores_in, 'scores_in')
    scores_out = _check_scores(scores_out, 'scores_out').to(scores_in.device)
    scores = torch.cat([scores_in, scores_out])
    is_out = torch.cat([torch.zeros_like(scores_in, dtype=torch.long), torch.ones_like(scores_out, dtype=torch.long)])
    # dense ranks scaled into [0, 1]: same order, same ties
    unique, rank = torch.unique(scores, sorted=True, return_inverse=True)
    ranks = rank.to(torch.float64) / max(unique.numel() - 1, 1)
    # the k-th highest OOD score is the highest threshold that k = ceil(0.95 N_out) OOD samples reach; an exact integer
    # count, where binary_roc's float TPR would be compared with 0.95
    num_detected = -(-95 * scores_out.numel() // 100)
    threshold = scores_out.sort(descending=True).values[num_detected - 1]
    return {
        'auroc': classification.binary_auroc(ranks, is_out).item(),
        'aupr': classification.binary_average_precision(ranks, is_out).item(),
        'fpr95': scores_in.ge(threshold).double().mean().item(),
    }


def risk_coverage(
        probs: torch.Tensor,
        targets: torch.Tensor,
        confidence: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The risk-coverage curve of selective classification: the error rate on the k most confident samples.

    The samples are sorted by confidence, highest first; for k = 1..N, ``coverage = k / N`` and ``risk`` is the
    fraction of the first k whose top label (argmax of ``probs``, ties to the lower class) is wrong. Samples of equal
    confidence keep their order in the data (a stable sort), so a tie is broken towards the lower sample index: the
    risks inside a group of tied confidences depend on that order, the risk where the group ends does not.

    Args:
        probs: ``[N, C]`` probabilities (for an ensemble, ``metrics.ensemble_probs(logits)``).
        targets: ``[N]`` class indices.
        confidence: ``[N]`` confidence of each prediction, higher = more likely correct (e.g. minus
            ``mutual_information``); default the top probability.

    Returns:
        Dict of ``[N]`` float64 tensors ``coverage`` and ``risk``.
    """
    probs, targets = check_probs(probs, targets)
    top_prob, correct = top_label(probs, targets)
    if confidence is None:
        confidence = top_prob
    else:
        confidence = _check_scores(confidence, 'confidence').to(probs.device)
        if confidence.shape[0] != probs.shape[0]:
            raise ValueError(f'confidence must be [N] = [{probs.shape[0]}] (one per sample of probs), got shape'
                             f' {tuple(confidence.shape)}.')
    order = confidence.sort(descending=True, stable=True).indices
    num = torch.arange(1, probs.shape[0] + 1, dtype=torch.float64, device=probs.device)
    return {
        'coverage': num / probs.shape[0],
        'risk': (~correct[order]).double().cumsum(0) / num,
    }


def aurc(probs: torch.Tensor, targets: torch.Tensor, confidence: torch.Tensor | None = None) -> float:
    """Area under the risk-coverage curve: the mean of ``risk_coverage``'s risks over k = 1..N (lower is better).

    This is Geifman et al.'s AURC (2019), a sum over the N points of the curve at coverage k / N, each weighted
    1 / N. torch-uncertainty's ``AURC`` metric integrates the same points by the trapezoidal rule instead and divides
    by ``1 - 1 / N``, which differs from this by O(1 / N) on small sets. AURC depends on the error rate too: a
    confidence that ranks every correct sample above every wrong one gives the least AURC for that error rate, not 0.

    Args:
        probs: ``[N, C]`` probabilities.
        targets: ``[N]`` class indices.
        confidence: ``[N]`` confidences, higher = more likely correct; default the top probability.

    Returns:
        AURC as a fraction in [0, 1].
    """
    return risk_coverage(probs, targets, confidence)['risk'].mean().item()

