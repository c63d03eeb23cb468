"""Accuracy of every member and of the ensemble, which predicts the mean of the member probabilities."""
import torch
import torch.nn.functional as F

from .checks import check_logits, check_targets

__all__ = ['member_correct', 'member_accuracy', 'ensemble_probs', 'ensemble_correct', 'ensemble_accuracy']


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
