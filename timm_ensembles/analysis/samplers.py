"""Subspace samplers around one trained solution, as in section 4 of Fort, Hu & Lakshminarayanan, "Deep Ensembles:
A Loss Landscape Perspective" (2019).

Each sampler turns one trained network into an ensemble of K networks sampled around it, to be set against an
independent ensemble (K networks trained from different initialisations) of the same size:

* random subspace: ``random_samples``, the solution plus a random direction of a given relative radius;
* dropout subspace: ``dropout_predictions``, K Monte-Carlo dropout passes (Gal & Ghahramani, 2016);
* diagonal Gaussian subspace: ``diagonal_gaussian_samples``, SWAG-diagonal (Maddox et al., 2019) fitted to the
  snapshots of one training trajectory;
* low-rank Gaussian subspace: ``low_rank_gaussian_samples``, a Gaussian on the top principal components of the
  trajectory.

The unit is one network: a plain timm model or one member of an ensemble (``ensemble.members[i]``). Weight samples
are ``[K, P]`` parameter vectors in the layout of :func:`.landscape.parameter_vector` (every ``named_parameters()``
entry flattened in sorted-name order, the layout of ``read_snapshots(..., weights=True).weights[:, m]``);
``predict_samples`` turns them into logits ``[N, K, C]`` (the ``metrics`` convention, with the K samples in the
members' place), and ``normalized_disagreement`` places each sample on Fort et al.'s diversity-accuracy plane.

Fort et al.'s own code (the ``ensemble_loss_landscape`` notebook of google-deepmind/deepmind-research) differs in
two details worth knowing when comparing numbers: its random samples step a whole-vector-normalised direction by an
absolute radius (10 x U(0, 1), kept only above 70% validation accuracy), where ``random_samples`` takes a radius
relative to every filter's norm (below); and its PCA samples call sklearn's ``inverse_transform`` on standard normals
without whitening, i.e. unit variance along every component, where ``low_rank_gaussian_samples`` samples the fitted
Gaussian (variance ``lambda_k`` along component k). Its diagonal Gaussian uses ``np.std`` (divisor E), as here.
"""
import contextlib
import copy
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence

import torch
from timm.layers import DropBlock2d, DropPath
from torch import nn

from ..metrics import as_float64, check_logits, member_correct, pairwise_differ_counts
from ..train.engine import MemberPredictor
from ..utils.checks import check_number, check_whole, is_number
from .landscape import _named_parameters, load_parameter_vector, parameter_vector, recompute_batchnorm

__all__ = [
    'random_samples', 'diagonal_gaussian_samples', 'low_rank_gaussian_samples', 'dropout_predictions',
    'predict_samples', 'normalized_disagreement',
]

_DROPOUT_HINT = "create it with dropout, e.g. timm.create_model(..., drop_rate=0.1), and train it so"


def _count(value, name: str) -> int:
    return int(check_whole(name, value, 'a positive integer', ge=1, numpy=True))


def _seed(seed) -> int:
    return int(check_whole('seed', seed, 'an integer', numpy=True))


def _sampling(num_samples, scale, seed) -> tuple[int, float, int]:
    """The arguments the Gaussian samplers share, checked: K >= 1 samples, a finite scale > 0, an integer seed."""
    num_samples = _count(num_samples, 'num_samples')
    scale = float(check_number('scale', scale, 'a positive finite number', gt=0, numpy=True))
    return num_samples, scale, _seed(seed)


def _generator(seed: int) -> torch.Generator:
    # on the CPU, so that a seed draws the same samples whatever device the model is on
    return torch.Generator().manual_seed(seed)


def _check_trajectory(trajectory, min_epochs: int) -> torch.Tensor:
    trajectory = torch.as_tensor(trajectory)
    if not trajectory.is_floating_point():
        raise ValueError(f'trajectory must be a floating-point tensor, got dtype {trajectory.dtype}.')
    if trajectory.ndim != 2:
        hint = (" (snapshots' weights are [E, M, P]: pass one member's, snapshots.weights[:, m])"
                if trajectory.ndim == 3 else '')
        raise ValueError(f'trajectory must be [E, P] (E snapshots of one network, P parameters), got shape'
                         f' {tuple(trajectory.shape)}{hint}.')
    if trajectory.shape[0] < min_epochs or trajectory.shape[1] == 0:
        raise ValueError(f'trajectory [E, P] needs at least {min_epochs} snapshots (E >= {min_epochs}) of at least'
                         f' one parameter to fit a Gaussian, got shape {tuple(trajectory.shape)}.')
    if not torch.isfinite(trajectory).all():
        raise ValueError('trajectory holds NaN or infinite values.')
    return trajectory


def random_samples(model: nn.Module, num_samples: int, scale: float, seed: int) -> torch.Tensor:
    """The random subspace: ``num_samples`` parameter vectors ``theta0 + noise`` around the model's weights.

    The noise is Gaussian, normalised filter by filter as Li et al. (2018, "Visualizing the Loss Landscape of Neural
    Nets") normalise their directions: in every parameter tensor of two or more dimensions, each filter (each slice
    along dimension 0: a convolution's output channel, a linear layer's output unit) gets a random direction
    rescaled to ``scale`` times that filter's norm; every other tensor (biases, normalisation weights, scalars) is
    one filter. ``scale`` is thus a relative radius: every filter, and so the whole vector, moves by exactly
    ``scale`` times its own norm (0.1: 10% of it). A step of fixed size would mean different things for filters of
    different scales (before a BatchNorm a filter's scale does not change the function, only how much a step of
    given size changes it); a relative one means the same for all. Li et al. leave biases and BatchNorm parameters
    unmoved (or move them along themselves); here they are perturbed too, as the random subspace of Fort et al.
    covers every weight. A filter that is all zeros has no norm to be relative to and stays zero.

    Args:
        model: The trained network.
        num_samples: K, the number of samples.
        scale: Relative radius, > 0.
        seed: Seeds a generator of the samples' own (the global RNG is untouched); one seed gives the same samples.

    Returns:
        ``[K, P]`` tensor in the dtype and on the device of :func:`.landscape.parameter_vector`.
    """
    num_samples, scale, seed = _sampling(num_samples, scale, seed)
    theta0 = parameter_vector(model).detach()
    shapes = [(name, p.shape) for name, p in _named_parameters(model)]  # parameter_vector's layout
    total = sum(shape.numel() for _, shape in shapes)
    if theta0.ndim != 1 or theta0.numel() != total:
        raise ValueError(f'parameter_vector(model) has shape {tuple(theta0.shape)}, but the parameters of'
                         f' {type(model).__name__} number {total}: the layouts disagree.')
    theta = theta0.to(device='cpu', dtype=torch.float64)
    noise = torch.randn(num_samples, total, generator=_generator(seed), dtype=torch.float64)
    offset = 0
    for _, shape in shapes:
        size = shape.numel()
        if size:
            rows = shape[0] if len(shape) >= 2 else 1
            weight_norm = theta[offset:offset + size].reshape(rows, -1).norm(dim=1, keepdim=True)
            direction = noise[:, offset:offset + size].reshape(num_samples, rows, -1)
            # a Gaussian draw of one or more elements has a nonzero norm with probability 1
            direction = direction * (scale * weight_norm / direction.norm(dim=2, keepdim=True))
            noise[:, offset:offset + size] = direction.reshape(num_samples, size)
        offset += size
    return (theta + noise).to(device=theta0.device, dtype=theta0.dtype)


def diagonal_gaussian_samples(
        trajectory: torch.Tensor, num_samples: int, seed: int, scale: float = 1.0,
) -> torch.Tensor:
    """The diagonal Gaussian subspace: SWAG-diagonal (Maddox et al., 2019) fitted to one trajectory's snapshots.

    Every coordinate gets the mean and variance of its values over the snapshots, the variance with divisor E (the
    second moment less the squared mean, as SWAG computes it, and ``np.std`` in Fort et al.'s code); the samples are
    ``mean + scale * sqrt(var) * z``, z standard normal. A coordinate that did not move stays at its value.

    Args:
        trajectory: ``[E, P]`` snapshots of one network, e.g. ``read_snapshots(run, weights=True).weights[:, m]``
            (the last epochs of a run, where it has settled in its mode, are the usual choice), E >= 2.
        num_samples: K, the number of samples.
        seed: Seeds a generator of the samples' own (the global RNG is untouched).
        scale: Multiplies the standard deviation (SWAG often samples with 0.5).

    Returns:
        ``[K, P]`` tensor in the trajectory's dtype and on its device.
    """
    trajectory = _check_trajectory(trajectory, 2)
    num_samples, scale, seed = _sampling(num_samples, scale, seed)
    weights = trajectory.detach().to(device='cpu', dtype=torch.float64)
    mean, std = weights.mean(0), weights.var(0, correction=0).sqrt()
    z = torch.randn(num_samples, weights.shape[1], generator=_generator(seed), dtype=torch.float64)
    return (mean + scale * std * z).to(device=trajectory.device, dtype=trajectory.dtype)


def low_rank_gaussian_samples(
        trajectory: torch.Tensor, rank: int, num_samples: int, seed: int, scale: float = 1.0,
) -> torch.Tensor:
    """The low-rank Gaussian subspace: a Gaussian on the top ``rank`` principal components of one trajectory.

    The deviations of the snapshots from their mean are decomposed by ``torch.linalg.svd`` (``[E, P]``, so the
    cost is that of E vectors); the variance along component k is ``lambda_k = s_k^2 / (E - 1)`` (the sample
    covariance, as sklearn's PCA and SWAG's low-rank part), and the samples are
    ``mean + scale * sum_k sqrt(lambda_k) z_k v_k``, which lie exactly in the affine span of the mean and the top
    ``rank`` components. E snapshots have at most E - 1 independent deviations, hence ``rank <= E - 1``.

    Args:
        trajectory: ``[E, P]`` snapshots of one network (see :func:`diagonal_gaussian_samples`), E >= 2.
        rank: Number of principal components, 1 <= rank <= E - 1.
        num_samples: K, the number of samples.
        seed: Seeds a generator of the samples' own (the global RNG is untouched).
        scale: Multiplies the standard deviation along every component.

    Returns:
        ``[K, P]`` tensor in the trajectory's dtype and on its device.
    """
    trajectory = _check_trajectory(trajectory, 2)
    num_epochs = trajectory.shape[0]
    rank = _count(rank, 'rank')
    if rank > min(num_epochs - 1, trajectory.shape[1]):
        raise ValueError(f'rank {rank} is more than the {num_epochs} snapshots of the trajectory can span: their'
                         f' deviations from the mean have at most E - 1 = {num_epochs - 1} components'
                         f' (and at most P = {trajectory.shape[1]}); use a rank of at most'
                         f' {min(num_epochs - 1, trajectory.shape[1])} or more snapshots.')
    num_samples, scale, seed = _sampling(num_samples, scale, seed)
    weights = trajectory.detach().to(device='cpu', dtype=torch.float64)
    mean = weights.mean(0)
    _, singular, components = torch.linalg.svd(weights - mean, full_matrices=False)
    std = singular[:rank] / math.sqrt(num_epochs - 1)
    z = torch.randn(num_samples, rank, generator=_generator(seed), dtype=torch.float64)
    return (mean + scale * (z * std) @ components[:rank]).to(device=trajectory.device, dtype=trajectory.dtype)


def _device(model: nn.Module) -> torch.device | None:
    return next((p.device for p in model.parameters()), None)


def _has_running_stats(module: nn.Module) -> bool:
    # BatchNorm (timm's BatchNormAct2d included) and InstanceNorm with track_running_stats: the layers that
    # normalise with the batch's statistics in train mode and with their stored ones in eval mode
    return bool(getattr(module, 'track_running_stats', False)) and getattr(module, 'running_mean', None) is not None


def _dropout_sources(model: nn.Module) -> list[str]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            found.append(f'{name or type(module).__name__} (p={module.p})')
        rate = getattr(module, 'drop_rate', None)
        if is_number(rate, gt=0, finite=False, numpy=True):
            found.append(f'{name or type(module).__name__}.drop_rate={rate}')
    return found


@contextlib.contextmanager
def _mc_dropout_mode(model: nn.Module) -> Iterator[None]:
    """Dropout active, the rest in eval mode; every module's own mode back afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        # train mode for the whole model, not only the nn.Dropout modules: timm drops out in forward_head with
        # F.dropout(x, p=self.drop_rate, training=self.training), which reads the mode of the model itself
        model.train()
        for module in model.modules():
            # normalisation from the stored statistics, not the batch's (which would make a sample depend on the
            # rest of its batch and move the running statistics); stochastic depth and DropBlock are not the
            # dropout being sampled
            if _has_running_stats(module) or isinstance(module, (DropPath, DropBlock2d)):
                module.eval()
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
        what = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f'{type(model).__name__} must return [B, C] logits for a batch of {x.shape[0]}, got {what}.')
    return out.float()


def _batches(loader: Iterable, device: torch.device | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    empty = True
    for x, target in loader:
        empty = False
        yield (x if device is None else x.to(device)), torch.as_tensor(target).long().cpu()
    if empty:
        raise ValueError('The loader yielded no batches.')


def _predict(model: nn.Module, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's own prediction in eval mode, by the package's one evaluation pass."""
    outputs = [(out.logits.float().cpu(), out.target.long().cpu()) for out in MemberPredictor(model, loader)]
    if not outputs:
        raise ValueError('The loader yielded no batches.')
    return torch.cat([o for o, _ in outputs]), torch.cat([t for _, t in outputs])


def dropout_predictions(
        model: nn.Module, loader: Iterable, num_samples: int, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dropout subspace: ``num_samples`` Monte-Carlo dropout passes (Gal & Ghahramani, 2016) over every batch.

    Dropout is active and everything else is in eval mode: the model goes to train mode, because timm drops out in
    ``forward_head`` with ``F.dropout(..., training=self.training)`` (the model's own mode) besides its
    ``nn.Dropout`` modules, and then every normalisation layer with running statistics (BatchNorm) goes back to
    eval mode, so that it normalises with the statistics of training, as at test time, rather than with the batch's
    (which would make each prediction depend on the rest of its batch and would overwrite the running statistics).
    timm's stochastic depth (``DropPath``) and ``DropBlock2d`` stay in eval mode too: they are not dropout. Every
    module's mode is restored afterwards. A model whose forward differs otherwise in train mode is not supported.

    Args:
        model: The trained network, with dropout: an ``nn.Dropout*`` module with p > 0 or a ``drop_rate`` > 0.
        loader: Yields ``(x, target)`` batches, each used for all K passes.
        num_samples: K, the number of dropout masks per input.
        seed: ``torch.manual_seed`` for the dropout masks, inside ``torch.random.fork_rng``: the caller's RNG state
            (CPU and CUDA) is the same afterwards.

    Returns:
        float32 ``[N, K, C]`` logits and int64 ``[N]`` targets, on the CPU.

    Raises:
        ValueError: The model has no dropout (every pass would be the same network).
    """
    num_samples, seed = _count(num_samples, 'num_samples'), _seed(seed)
    if not _dropout_sources(model):
        raise ValueError(f'{type(model).__name__} has no dropout (no nn.Dropout module with p > 0 and no drop_rate >'
                         f' 0), so every Monte-Carlo dropout pass would be the same network: {_DROPOUT_HINT}.')
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    logits, targets = [], []
    with torch.random.fork_rng(devices=cuda_devices), _mc_dropout_mode(model), torch.no_grad():
        torch.manual_seed(seed)
        for x, target in _batches(loader, _device(model)):
            logits.append(torch.stack([_logits(model, x) for _ in range(num_samples)], 1).cpu())
            targets.append(target)
    return torch.cat(logits), torch.cat(targets)


def _check_vectors(vectors, num_params: int) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor):
        vectors = list(vectors)
        if not vectors or any(torch.as_tensor(v).ndim != 1 for v in vectors):
            raise ValueError(f'vectors must be a [K, P] tensor or K >= 1 parameter vectors [P], got'
                             f' {[tuple(torch.as_tensor(v).shape) for v in vectors]}.')
        if len({torch.as_tensor(v).numel() for v in vectors}) > 1:
            sizes = [torch.as_tensor(v).numel() for v in vectors]
            raise ValueError(f'The parameter vectors differ in length: {sizes}.')
        vectors = torch.stack([torch.as_tensor(v) for v in vectors])
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f'vectors must be a [K, P] tensor of K >= 1 parameter vectors, got shape'
                         f' {tuple(vectors.shape)}.')
    if not vectors.is_floating_point():
        raise ValueError(f'vectors must be floating point, got dtype {vectors.dtype}.')
    if vectors.shape[1] != num_params:
        raise ValueError(f'The vectors hold {vectors.shape[1]} parameters, the model {num_params}: they are not'
                         f' samples of this network (of parameter_vector(model)).')
    return vectors


def predict_samples(
        model: nn.Module,
        vectors: torch.Tensor | Sequence[torch.Tensor],
        loader: Iterable,
        bn_loader: Iterable | None = None,
        bn_batches: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictions of sampled networks: each parameter vector loaded into a copy of the model, in eval mode.

    A sample moves the weights, so the BatchNorm running statistics stored with the model, estimated for its own
    weights, no longer fit the sampled ones (and the snapshots do not store them): pass ``bn_loader`` (training
    batches) to recompute them for every sample (:func:`.landscape.recompute_batchnorm`), as SWA and SWAG do. A
    model with BatchNorm evaluated without it keeps the original statistics, with a warning.

    Args:
        model: The network the vectors are samples of; it is not changed.
        vectors: ``[K, P]`` parameter vectors (of the samplers here), or a sequence of K ``[P]`` vectors.
        loader: Yields ``(x, target)`` batches, in the same order on every pass (no shuffling).
        bn_loader: Yields batches to recompute the BatchNorm statistics with; None: keep the model's.
        bn_batches: Recompute from at most this many batches of ``bn_loader``; None: all of them.

    Returns:
        float32 ``[N, K, C]`` logits (sample k in member position k) and int64 ``[N]`` targets, on the CPU.

    Raises:
        ValueError: Vectors of another length than the model's parameters, or a loader whose targets change from
            pass to pass (shuffled).
    """
    num_params = sum(p.numel() for _, p in model.named_parameters())
    vectors = _check_vectors(vectors, num_params)
    network = copy.deepcopy(model)
    if bn_loader is None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) and _has_running_stats(m)
                                 for m in network.modules()):
        warnings.warn(f'{type(model).__name__} has BatchNorm running statistics, which were estimated for its own'
                      f' weights, not the sampled ones: pass bn_loader (training batches) to recompute them for every'
                      f' sample.', stacklevel=2)
    logits, targets = [], None
    for k, vector in enumerate(vectors):
        load_parameter_vector(network, vector)
        if bn_loader is not None:
            recompute_batchnorm(network, bn_loader, num_batches=bn_batches)
        sample_logits, sample_targets = _predict(network, loader)
        if targets is None:
            targets = sample_targets
        elif not torch.equal(sample_targets, targets):
            raise ValueError(f'The loader gave other targets for sample {k} than for sample 0: it must give the same'
                             f' batches in the same order on every pass (shuffle=False).')
        logits.append(sample_logits)
    return torch.stack(logits, 1), targets


def normalized_disagreement(
        sample_logits: torch.Tensor, reference_logits: torch.Tensor, targets: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Every sample network's place on Fort et al.'s diversity-accuracy plane.

    Fort et al. (section 4) plot, for functions sampled around a reference solution, the accuracy ``a`` of each
    sampled function against its diversity: ``d_diff``, the fraction of test points on which its predicted class
    differs from the reference's, divided by ``1 - a``, the sampled function's own error rate, because a less
    accurate function can differ more just by being wrong on more points. As counts: ``normalized_disagreement =
    differing points / points the sample gets wrong``. It is undefined for a sample that is never wrong: NaN if it
    also agrees with the reference everywhere, inf otherwise.

    Args:
        sample_logits: ``[N, K, C]`` logits (or probabilities) of the K sample networks.
        reference_logits: ``[N, C]`` (or ``[N, 1, C]``) logits of the reference solution on the same N points.
        targets: ``[N]`` class indices.

    Returns:
        float64 ``[K]`` tensors: ``'accuracy'`` (percent), ``'disagreement'`` (``d_diff``, a fraction) and
        ``'normalized_disagreement'``.
    """
    samples = check_logits(sample_logits)
    num_points, _, num_classes = samples.shape
    reference = as_float64(reference_logits, 'reference_logits')
    if reference.ndim == 3 and reference.shape[1] == 1:
        reference = reference[:, 0]
    if reference.shape != (num_points, num_classes):
        raise ValueError(f'reference_logits must be [N, C] = [{num_points}, {num_classes}] (one network, the N points'
                         f' and C classes of sample_logits), got shape {tuple(reference_logits.shape)}.')
    wrong = num_points - member_correct(samples, targets)  # checks the targets
    differ = pairwise_differ_counts(torch.cat([reference[:, None], samples], 1))[0, 1:]
    return {
        'accuracy': (num_points - wrong).double() * 100.0 / num_points,
        'disagreement': differ.double() / num_points,
        'normalized_disagreement': differ.double() / wrong.double(),
    }
