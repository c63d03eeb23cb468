"""Loss landscape views of trained networks: the linear path between two solutions, a training trajectory, and the
plane through three solutions (Fort, Hu & Lakshminarayanan, "Deep Ensembles: A Loss Landscape Perspective", 2019;
Garipov et al., "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs", 2018).

The unit is one network: a plain timm model, or one member ``ensemble.members[i]`` of an ensemble of this package.
A point of the landscape is a parameter vector (``parameter_vector``: every ``named_parameters()`` entry flattened in
sorted-name order, the order of the weights snapshots of ``train.snapshots``). BatchNorm running statistics are buffers,
not parameters: at a point between solutions neither endpoint's statistics fit, so they are re-estimated on training
data (``recompute_batchnorm``) when a ``bn_loader`` is given, as Fort et al. and Garipov et al. do.

Every point is evaluated on a deep copy of the first network; the networks passed in are never modified. A point
that is one of the solutions (t = 0 or 1 on a line, a solution's coordinates in a plane) holds exactly that
solution's weights and buffers, so its loss is bit for bit the solution's own loss, evaluated the same way.

Losses are mean cross-entropies (natural log), accuracies percent, as ``metrics``.
"""
import copy
import itertools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

from ..train.engine import MemberPredictor
from ..utils.checks import check_whole, is_whole

__all__ = [
    'check_same_architecture', 'parameter_vector', 'load_parameter_vector', 'recompute_batchnorm', 'evaluate',
    'linear_path', 'trajectory_path', 'barrier_height', 'plane',
]

# keys of the results next to the splits' names: a split may not take one of them
_RESERVED = frozenset({'t', 'point', 'x', 'y', 'points'})
# c is collinear with a and b when its distance to their line is below this fraction of |c - a| (float32 weights
# carry ~1e-7 relative rounding, so truly collinear points land well below it)
_COLLINEAR_TOL = 1e-6


def _named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # named_parameters() lists a shared (tied) parameter once, as the snapshots do (they store dict(named_parameters()))
    return sorted(model.named_parameters(), key=lambda item: item[0])


def check_same_architecture(a: nn.Module, b: nn.Module) -> None:
    """Check that two networks have the same parameters and buffers (names and shapes), so that they can be combined
    entry by entry.

    Raises:
        ValueError: Naming the first difference (in sorted-name order, parameters before buffers).
    """
    for kind, items_a, items_b in (('parameter', a.named_parameters(), b.named_parameters()),
                                   ('buffer', a.named_buffers(), b.named_buffers())):
        shapes_a = {name: tuple(t.shape) for name, t in items_a}
        shapes_b = {name: tuple(t.shape) for name, t in items_b}
        for name in sorted(shapes_a.keys() | shapes_b.keys()):
            if name not in shapes_b:
                diff = f"{kind} '{name}' is in the first network only"
            elif name not in shapes_a:
                diff = f"{kind} '{name}' is in the second network only"
            elif shapes_a[name] != shapes_b[name]:
                diff = f"{kind} '{name}' has shape {shapes_a[name]} in the first network and {shapes_b[name]} in the" \
                       f' second'
            else:
                continue
            raise ValueError(f'interpolation needs two networks of one architecture: {diff} ({type(a).__name__} vs'
                             f' {type(b).__name__}). Pass networks built alike (same model name and arguments, e.g.'
                             f' the same member index of two runs of one ensemble).')


def parameter_vector(model: nn.Module) -> torch.Tensor:
    """The network's parameters as one vector: every ``named_parameters()`` entry flattened, in sorted-name order.

    This is the order of the weights snapshots (``Snapshots.weights[e, m]``), so a snapshot row can be loaded with
    ``load_parameter_vector``. It is not ``metrics.flatten_weights``, which keeps the registration order of
    ``named_parameters()`` (a BatchNorm's ``weight`` before its ``bias``) and converts to float64. BatchNorm running
    statistics are buffers and are not included.

    Returns:
        ``[P]`` detached copy, in the parameters' dtype (float32 for a float32 network), on their device.
    """
    tensors = [p.detach().reshape(-1) for _, p in _named_parameters(model)]
    if not tensors:
        return torch.zeros(0)
    return torch.cat(tensors)


def load_parameter_vector(model: nn.Module, vector: torch.Tensor) -> nn.Module:
    """Copy a vector of ``parameter_vector``'s layout into the network's parameters, in place (cast to each
    parameter's dtype and device; the vector is not aliased). Buffers are left as they are.

    Returns:
        ``model``.

    Raises:
        ValueError: The vector is not 1-D or its size differs from the network's parameter count.
    """
    vector = torch.as_tensor(vector)
    params = _named_parameters(model)
    total = sum(p.numel() for _, p in params)
    if vector.ndim != 1 or vector.numel() != total:
        raise ValueError(f'the parameter vector must be 1-D with one entry per parameter of the network ({total}, in'
                         f' sorted-name order as parameter_vector gives), got shape {tuple(vector.shape)}.')
    offset = 0
    with torch.no_grad():
        for _, p in params:
            p.copy_(vector[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    return model


def _check_num_batches(num_batches: int | None) -> None:
    check_whole('num_batches', num_batches, 'a positive integer or None (the whole loader)', ge=1, optional=True)


def _batches(loader: Iterable, num_batches: int | None, what: str) -> Iterable:
    """The loader's batches (the first ``num_batches`` of them), checked to be at least one before any is used."""
    _check_num_batches(num_batches)
    it = iter(loader if num_batches is None else itertools.islice(loader, num_batches))
    try:
        first = next(it)
    except StopIteration:
        raise ValueError(f'the {what} loader gave no batch: pass a loader of at least one (x, target) batch.') from None
    return itertools.chain([first], it)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recompute_batchnorm(model: nn.Module, loader: Iterable, num_batches: int | None = None) -> nn.Module:
    """Re-estimate the BatchNorm running statistics of the network on training data, in place.

    The running statistics are the means and variances of each BatchNorm layer's inputs under the weights they were
    collected with. A network whose weights were interpolated (or loaded from a snapshot, which holds no statistics)
    with either endpoint's statistics normalises its activations wrongly, and its loss says more about that mismatch
    than about the landscape: so Fort et al. and Garipov et al. recompute them at every point. This is
    ``torch.optim.swa_utils.update_bn``: the statistics are reset and re-estimated as the cumulative average over
    the batches (momentum None), in training mode (the training mode is restored after). Use the same
    deterministic (unshuffled) loader at every point for comparable, reproducible points.

    A network without BatchNorm is left as it is (the loader is not read).

    Args:
        model: The network.
        loader: Training data, ``(x, target)`` batches (or tensors of inputs).
        num_batches: Use the first this many batches; None: all.

    Returns:
        ``model``.

    Raises:
        ValueError: ``num_batches`` is not a positive integer, or the loader gives no batch.
    """
    _check_num_batches(num_batches)
    if not _has_batchnorm(model):
        return model
    batches = _batches(loader, num_batches, 'BatchNorm')
    device = next((p.device for p in model.parameters()), None)
    update_bn(batches, model, device=device)
    return model


def evaluate(model: nn.Module, loader: Iterable, num_batches: int | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy of the network, in eval mode without gradients (the training mode is
    restored after), through the package's evaluation pass (``MemberPredictor``: the model's own prediction).

    Args:
        model: The network.
        loader: ``(x, target)`` batches, targets class indices (or ``[B, C]`` soft targets: the accuracy takes
            their argmax).
        num_batches: Use the first this many batches; None: all.

    Returns:
        ``loss`` (mean over samples, computed in float64) and ``accuracy`` (percent).

    Raises:
        ValueError: ``num_batches`` is not a positive integer, or the loader gives no batch.
    """
    batches = _batches(loader, num_batches, 'evaluation')
    loss_sum, correct, total = 0.0, 0, 0
    for out in MemberPredictor(model, batches):
        logits, target = out.logits.double(), out.target
        if target.is_floating_point():
            target = target.double()
        loss_sum += F.cross_entropy(logits, target, reduction='sum').item()
        hard = target.argmax(-1) if target.ndim == 2 else target
        correct += int(logits.argmax(-1).eq(hard).sum())
        total += logits.shape[0]
    return dict(loss=loss_sum / total, accuracy=correct * 100.0 / total)


class _Solutions:
    """Networks of one architecture, as float64 parameter vectors and their buffers, to combine into points."""

    def __init__(self, models: Sequence[nn.Module]):
        for other in models[1:]:
            check_same_architecture(models[0], other)
        self.vectors = [parameter_vector(m).double() for m in models]
        self.buffers = [dict(m.named_buffers()) for m in models]
        # every point is a state of this copy; the solutions themselves are never touched
        self.work = copy.deepcopy(models[0])

    def load(self, coeffs: Sequence[float]) -> nn.Module:
        """Load sum_i coeffs[i] * solution_i into the work copy and return it.

        Terms of coefficient 0 are skipped, so a point whose coefficients are one 1 and zeros is that solution
        exactly (1.0 * w == w in float64, and float32 -> float64 -> float32 is the identity). Floating-point buffers
        are combined alike; integer buffers (``num_batches_tracked``) are the largest-coefficient solution's.
        """
        terms = [(c, i) for i, c in enumerate(coeffs) if c != 0]
        load_parameter_vector(self.work, self._combine([(c, self.vectors[i]) for c, i in terms],
                                                       self.vectors[0]))
        nearest = max(range(len(coeffs)), key=lambda i: coeffs[i])
        with torch.no_grad():
            for name, buf in self.work.named_buffers():
                if buf.is_floating_point():
                    value = self._combine([(c, self.buffers[i][name].double()) for c, i in terms], buf)
                else:
                    value = self.buffers[nearest][name]
                buf.copy_(value)
        return self.work

    @staticmethod
    def _combine(terms: list[tuple[float, torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
        if not terms:
            return torch.zeros_like(like, dtype=torch.float64)
        out = terms[0][0] * terms[0][1]
        for c, v in terms[1:]:
            out += c * v
        return out


def _check_loaders(eval_loaders: Mapping[str, Iterable]) -> None:
    if not isinstance(eval_loaders, Mapping) or not eval_loaders:
        raise ValueError(f'eval_loaders must be a non-empty dict of split name -> loader (e.g. {{"val": loader}}),'
                         f' got {type(eval_loaders).__name__}.')
    reserved = sorted(_RESERVED & set(eval_loaders))
    if reserved:
        raise ValueError(f'split names {reserved} are keys of the result ({sorted(_RESERVED)}): name the splits'
                         f' otherwise, e.g. "train" and "val".')


def _evaluate_point(model: nn.Module, eval_loaders: Mapping[str, Iterable], bn_loader: Iterable | None,
                    bn_batches: int | None) -> dict[str, dict[str, float]]:
    if bn_loader is not None:
        recompute_batchnorm(model, bn_loader, bn_batches)
    return {split: evaluate(model, loader) for split, loader in eval_loaders.items()}


def _collect(results: list[dict[str, dict[str, float]]], splits: Iterable[str]) -> dict[str, dict[str, list]]:
    return {split: {k: [r[split][k] for r in results] for k in ('loss', 'accuracy')} for split in splits}


def _check_ts(ts: Sequence[float] | torch.Tensor) -> list[float]:
    values = [float(t) for t in (ts.reshape(-1).tolist() if isinstance(ts, torch.Tensor) else ts)]
    if not values:
        raise ValueError('ts is empty: pass the interpolation coefficients, e.g. torch.linspace(0, 1, 11).')
    bad = [t for t in values if not math.isfinite(t)]
    if bad:
        raise ValueError(f'ts must be finite numbers, got {bad}.')
    return values


def linear_path(
        a: nn.Module,
        b: nn.Module,
        ts: Sequence[float] | torch.Tensor,
        eval_loaders: Mapping[str, Iterable],
        bn_loader: Iterable | None = None,
        bn_batches: int | None = None,
) -> dict[str, Any]:
    """Loss and accuracy along the straight line between two networks (Fort et al. 2019, Fig. 1 and the
    interpolations of Sec. 4; Frankle et al. 2020's linear mode connectivity).

    The point at ``t`` has the parameters ``(1 - t) * a + t * b`` (computed in float64, cast to the parameters'
    dtype). With ``bn_loader``, its BatchNorm statistics are recomputed on that data (``recompute_batchnorm``);
    without, the floating-point buffers are interpolated alike (the integer ``num_batches_tracked`` is the nearer
    endpoint's), which is meaningful only for networks without BatchNorm. At t = 0 and t = 1 the point is exactly
    ``a``, resp. ``b`` (weights and buffers), so its loss is theirs bit for bit when evaluated the same way.

    ``t`` outside [0, 1] extrapolates along the line (e.g. -0.5 to 1.5 to see the walls of the valleys); there an
    interpolated BatchNorm variance can turn negative (NaN loss) unless the statistics are recomputed.

    Args:
        a: The network at t = 0.
        b: The network at t = 1, of ``a``'s architecture.
        ts: The coefficients, in any order (the result keeps it).
        eval_loaders: Split name -> loader of ``(x, target)`` batches to evaluate every point on.
        bn_loader: Training data to recompute the BatchNorm statistics with at every point (the same batches each
            time: do not shuffle); None: interpolate them.
        bn_batches: Recompute them on the first this many batches of ``bn_loader``; None: all.

    Returns:
        ``{'t': [...], '<split>': {'loss': [...], 'accuracy': [...]}, ...}``, lists in the order of ``ts``.

    Raises:
        ValueError: Networks of different architectures, empty or non-finite ``ts``, bad ``eval_loaders``, or a
            loader without batches.
    """
    check_same_architecture(a, b)
    values = _check_ts(ts)
    _check_loaders(eval_loaders)
    _check_num_batches(bn_batches)
    solutions = _Solutions([a, b])
    results = [_evaluate_point(solutions.load([1.0 - t, t]), eval_loaders, bn_loader, bn_batches) for t in values]
    return dict(t=values, **_collect(results, eval_loaders))


def trajectory_path(
        model: nn.Module,
        vectors: Sequence[torch.Tensor] | torch.Tensor,
        eval_loaders: Mapping[str, Iterable],
        bn_loader: Iterable | None = None,
        bn_batches: int | None = None,
) -> dict[str, Any]:
    """Loss and accuracy at every point of a sequence of parameter vectors, e.g. one member's weights snapshots over
    a run (``read_snapshots(run, weights=True).weights[:, m]``).

    Each vector is loaded (``load_parameter_vector``) into a deep copy of ``model``, which gives the architecture
    and the buffers. Snapshots hold no BatchNorm statistics: for a network with BatchNorm pass ``bn_loader`` to
    recompute them at every point, else every point is evaluated with ``model``'s current statistics, which fit
    only the weights they were collected with.

    Args:
        model: A network of the vectors' architecture.
        vectors: ``[E, P]`` tensor, or a sequence of ``[P]`` vectors in ``parameter_vector``'s layout.
        eval_loaders: Split name -> loader of ``(x, target)`` batches.
        bn_loader: Training data to recompute the BatchNorm statistics with at every point; None: keep ``model``'s.
        bn_batches: Recompute them on the first this many batches of ``bn_loader``; None: all.

    Returns:
        ``{'point': [0, 1, ...], '<split>': {'loss': [...], 'accuracy': [...]}, ...}``.

    Raises:
        ValueError: No vectors, a vector of the wrong size, bad ``eval_loaders``, or a loader without batches.
    """
    if isinstance(vectors, torch.Tensor) and vectors.ndim != 2:
        raise ValueError(f'vectors must be [E, P] (one parameter vector per row) or a sequence of [P] vectors, got a'
                         f' tensor of shape {tuple(vectors.shape)} (wrap one vector as [vector]).')
    if len(vectors) == 0:
        raise ValueError('vectors is empty: pass at least one parameter vector (e.g. Snapshots.weights[:, m]).')
    _check_loaders(eval_loaders)
    _check_num_batches(bn_batches)
    if bn_loader is None and _has_batchnorm(model):
        warnings.warn(f'{type(model).__name__} has BatchNorm and no bn_loader was given: every point is evaluated'
                      f" with the model's current running statistics, which fit only the weights they were collected"
                      f' with; pass bn_loader (training data) to recompute them at every point.', stacklevel=2)
    work = copy.deepcopy(model)
    results = []
    for vector in vectors:
        load_parameter_vector(work, vector)
        results.append(_evaluate_point(work, eval_loaders, bn_loader, bn_batches))
    return dict(point=list(range(len(results))), **_collect(results, eval_loaders))


def barrier_height(ts: Sequence[float] | torch.Tensor, losses: Sequence[float] | torch.Tensor,
                   reference: str = 'linear') -> tuple[float, float]:
    """The loss barrier on a linear path: how far the loss rises above the endpoints' between them.

    ``reference='linear'``: ``max_t loss(t) - ((1 - t) loss(0) + t loss(1))``, the rise above the straight line
    between the endpoints' losses (Entezari et al., "The Role of Permutation Invariance in Linear Mode
    Connectivity", 2022). ``reference='mean'``: ``max_t loss(t) - (loss(0) + loss(1)) / 2``, Frankle et al.'s
    ("Linear Mode Connectivity and the Lottery Ticket Hypothesis", 2020) error barrier height, where it is applied
    to the test error. The two agree when the endpoints' values are equal. Only ``0 <= t <= 1`` counts (extrapolated
    points are ignored); with the endpoints included, the linear barrier is >= 0, and about 0 means the two
    solutions are linearly connected. Any value works in place of the loss (e.g. the error, 100 - accuracy).

    Args:
        ts: The coefficients (e.g. ``linear_path(...)['t']``); they must include 0 and 1.
        losses: The loss at each of them (e.g. ``linear_path(...)['val']['loss']``).
        reference: ``'linear'`` or ``'mean'``, as above.

    Returns:
        The height and the ``t`` where it is reached (the first such ``t`` in the order given); a NaN loss in
        [0, 1] gives a NaN height at the first such ``t``.

    Raises:
        ValueError: Lengths differ, ``ts`` is empty or lacks 0 or 1, or ``reference`` is unknown.
    """
    values = _check_ts(ts)
    losses = [float(v) for v in (losses.reshape(-1).tolist() if isinstance(losses, torch.Tensor) else losses)]
    if len(losses) != len(values):
        raise ValueError(f'ts and losses differ in length ({len(values)} and {len(losses)}): one loss per t.')
    if reference not in ('linear', 'mean'):
        raise ValueError(f"reference must be 'linear' or 'mean', got {reference!r}.")
    if 0.0 not in values or 1.0 not in values:
        raise ValueError(f'the barrier needs the losses at both endpoints: ts must include 0 and 1, got {values}.')
    loss0, loss1 = losses[values.index(0.0)], losses[values.index(1.0)]
    best_height, best_t = -math.inf, math.nan
    for t, loss in zip(values, losses):
        if not 0.0 <= t <= 1.0:
            continue
        base = (1.0 - t) * loss0 + t * loss1 if reference == 'linear' else (loss0 + loss1) / 2
        height = loss - base
        if math.isnan(height):
            return math.nan, t
        if height > best_height:
            best_height, best_t = height, t
    return best_height, best_t


def _axis(lo: float, hi: float, num: int, exact: Sequence[float]) -> list[float]:
    """``num`` evenly spaced values from lo to hi, with the ``exact`` values put in (and spaced values that would
    fall on one of them, within rounding, left out)."""
    tol = 1e-9 * (hi - lo)
    spaced = [v for v in torch.linspace(lo, hi, num, dtype=torch.float64).tolist()
              if all(abs(v - e) > tol for e in exact)]
    return sorted(set(spaced) | set(exact))


def plane(
        a: nn.Module,
        b: nn.Module,
        c: nn.Module,
        eval_loaders: Mapping[str, Iterable],
        grid: int | tuple[int, int] = 11,
        margin: float = 0.2,
        bn_loader: Iterable | None = None,
        bn_batches: int | None = None,
) -> dict[str, Any]:
    """Loss and accuracy on the plane through three solutions (Fort et al. 2019, Fig. 3; Garipov et al. 2018).

    The origin is ``a``; the orthonormal basis is Gram-Schmidt's: ``u = (b - a) / |b - a|``, ``v`` the component of
    ``c - a`` orthogonal to ``u``, normalised. The point of coordinates ``(x, y)`` is ``a + x u + y v``; the
    solutions are at ``(0, 0)``, ``(|b - a|, 0)`` and ``((c - a).u, (c - a).v)``, coordinates in units of weight
    distance (Euclidean, over all parameters).

    The point is built as ``(1 - alpha - beta) a + alpha b + beta c`` with ``beta = y / y_c`` and ``alpha = (x -
    beta x_c) / |b - a|``, the same point written in the solutions: at a solution's coordinates the coefficients
    are exactly one 1 and zeros, so the point is that solution exactly, and buffers can be combined with the same
    coefficients. Each axis is ``grid`` evenly spaced values over the solutions' coordinates plus ``margin`` times
    their larger extent on every side, with the solutions' own coordinates added (so the grid is not quite even,
    but holds the three solutions exactly). Without ``bn_loader`` floating-point buffers are combined like the
    parameters (outside the triangle a BatchNorm variance can turn negative: pass ``bn_loader`` for BatchNorm
    networks).

    Args:
        a: The origin network.
        b: The network that sets the first axis, of ``a``'s architecture.
        c: The third network, of ``a``'s architecture.
        eval_loaders: Split name -> loader of ``(x, target)`` batches.
        grid: Evenly spaced values per axis (before the solutions' coordinates are added), or ``(nx, ny)``.
        margin: How far the grid reaches beyond the solutions, as a fraction of their larger extent (x or y).
        bn_loader: Training data to recompute the BatchNorm statistics with at every point; None: combine them.
        bn_batches: Recompute them on the first this many batches of ``bn_loader``; None: all.

    Returns:
        ``x`` float64 ``[nx]`` and ``y`` ``[ny]`` (ascending coordinates), ``points`` (``{'a': (0.0, 0.0), 'b':
        (x_b, 0.0), 'c': (x_c, y_c)}``) and for every split ``{'loss': [ny, nx], 'accuracy': [ny, nx]}`` float64
        grids (row i is ``y[i]``: as ``matplotlib``'s ``contourf(x, y, loss)`` takes them).

    Raises:
        ValueError: Networks of different architectures, ``b`` equal to ``a``, three collinear solutions, a bad
            ``grid`` or ``margin``, bad ``eval_loaders``, or a loader without batches.
    """
    check_same_architecture(a, b)
    check_same_architecture(a, c)
    sizes = tuple(grid) if isinstance(grid, (tuple, list)) else (grid, grid)
    if len(sizes) != 2 or not all(is_whole(n, ge=2) for n in sizes):
        raise ValueError(f'grid must be an integer >= 2 (values per axis) or a pair of them, got {grid!r}.')
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f'margin must be a finite number >= 0 (a fraction of the solutions\' extent), got'
                         f' {margin!r}.')
    _check_loaders(eval_loaders)
    _check_num_batches(bn_batches)
    solutions = _Solutions([a, b, c])
    va, vb, vc = solutions.vectors
    ab = torch.linalg.vector_norm(vb - va).item()
    if ab == 0:
        raise ValueError('a and b have the same parameters: the plane needs three distinct, non-collinear'
                         ' solutions.')
    u = (vb - va) / ab
    ac = vc - va
    xc = torch.dot(ac, u).item()
    yc = torch.linalg.vector_norm(ac - xc * u).item()
    if yc <= _COLLINEAR_TOL * torch.linalg.vector_norm(ac).item():
        raise ValueError(f'a, b and c are collinear in weight space (c lies on the line through a and b, within'
                         f' {_COLLINEAR_TOL:g} of |c - a|): they span no plane; pick a third solution off that'
                         f' line.')
    del u, ac
    lo_x, hi_x = min(0.0, xc), max(ab, xc)
    pad = margin * max(hi_x - lo_x, yc)
    xs = _axis(lo_x - pad, hi_x + pad, sizes[0], (0.0, ab, xc))
    ys = _axis(-pad, yc + pad, sizes[1], (0.0, yc))
    results = {split: {k: torch.empty(len(ys), len(xs), dtype=torch.float64) for k in ('loss', 'accuracy')}
               for split in eval_loaders}
    for i, y in enumerate(ys):
        beta = y / yc
        for j, x in enumerate(xs):
            alpha = (x - beta * xc) / ab
            point = _evaluate_point(solutions.load([1.0 - alpha - beta, alpha, beta]), eval_loaders, bn_loader,
                                    bn_batches)
            for split, values in point.items():
                for k, value in values.items():
                    results[split][k][i, j] = value
    return dict(x=torch.tensor(xs, dtype=torch.float64), y=torch.tensor(ys, dtype=torch.float64),
                points=dict(a=(0.0, 0.0), b=(ab, 0.0), c=(xc, yc)), **results)
