"""How different the members are: in function space (pairwise disagreement of the predictions, a t-SNE of them),
in weight space (flattened weights and their cosine similarity) and in feature space (the FDL paper's pairwise
feature distance, Das & Dutta Roy, 2022)."""
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..losses import check_features, pairwise_feature_difference
from ..utils.checks import check_range
from .checks import as_float64, check_logits

__all__ = ['pairwise_differ_counts', 'pairwise_disagreement', 'mean_offdiag', 'flatten_weights', 'member_weights',
           'cosine_similarity_matrix', 'feature_distance_matrix', 'tsne_embedding']


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
