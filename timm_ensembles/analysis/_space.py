"""The report's sections in weight space: the loss landscape (paths and planes between solutions) and the subspace
samplers, computed from the sources' models and weight snapshots.
"""
import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import metrics
from . import landscape, samplers
from ._compute import Layout, _member_vector, _weight_files, _weight_layout
from ._sections import _Context
from ._sources import AnalysisError, _Source

# principal components of the low-rank Gaussian (fewer when the trajectory has fewer snapshots)
LOWRANK_RANK = 5


# ---------------------------------------------------------------------------------------------------------------
# loss landscape


def _networks(src: _Source) -> tuple[list[nn.Module], str | None]:
    """A source's networks: an ensemble's members, else the model as one network (with a note when its members
    share layers: then the whole model is the network)."""
    members = getattr(src.model, 'members', None)
    if isinstance(members, nn.ModuleList):
        return list(members), None
    if hasattr(src.model, 'forward_members'):
        return [src.model], (f'{src.label}: its members share layers, so the whole model is the network of the'
                             f' landscape and the samplers')
    return [src.model], None


@dataclass
class _LandscapePlan:
    pairs: list[tuple[tuple[int, int], tuple[int, int]]]  # ((source index, member), (source index, member))
    plane: tuple[int, Any, Layout] | None  # (epoch, weights file, layout) of the first pair's first network
    notes: list[str]


def _plan_landscape(srcs: list[_Source], plane: bool, plane_epoch: int | None) -> _LandscapePlan:
    """The networks to interpolate, checked before any evaluation: member 0 of every pair of sources, or member 0
    and every other member of a single source."""
    nets = [_networks(s) for s in srcs]
    notes = [note for _, note in nets if note]
    if len(srcs) > 1:
        pairs = [((i, 0), (j, 0)) for i in range(len(srcs)) for j in range(i + 1, len(srcs))]
    else:
        pairs = [((0, 0), (0, m)) for m in range(1, len(nets[0][0]))]
        if not pairs:
            raise AnalysisError(f'The landscape section needs two networks: source {srcs[0].label} has one. Give two'
                                f' sources (runs of one architecture), or an ensemble of separate members.')
    for (i, mi), (j, mj) in pairs:
        try:
            landscape.check_same_architecture(nets[i][0][mi], nets[j][0][mj])
        except ValueError as e:
            raise AnalysisError(f'The landscape between {_net_label(srcs, i, mi)} and {_net_label(srcs, j, mj)}'
                                f' needs networks of one architecture: {e}') from e
    if srcs[pairs[0][0][0]].data_config != srcs[pairs[0][1][0]].data_config:
        notes.append('the sources have different data configs: every point is evaluated with the first'
                     " network's preprocessing")
    plane_plan = None
    if plane:
        (i, mi), _ = pairs[0]
        src = srcs[i]
        files = _weight_files(src.folder)
        if not files:
            raise AnalysisError(f'--landscape-plane needs the snapshot weights of {_net_label(srcs, i, mi)}\'s'
                                f' trajectory: source {src.label} has none (train it with --snapshot-subset N'
                                f' --snapshot-weights).')
        epochs = list(files)
        if plane_epoch is None:
            plane_epoch = epochs[len(epochs) // 2]  # the middle of the trajectory
        elif plane_epoch not in files:
            raise AnalysisError(f'--plane-epoch {plane_epoch}: source {src.label} has snapshot weights of epochs'
                                f' {epochs} only (-1 is the initialisation).')
        try:
            layout = _weight_layout([files[plane_epoch]], mi + 1)
        except ValueError as e:
            raise AnalysisError(f'The snapshot weights of source {src.label} cannot be used for the plane: {e}') from e
        _check_layout(layout, nets[i][0][mi], f'{src.label} epoch {plane_epoch}')
        plane_plan = (plane_epoch, files[plane_epoch], layout)
    return _LandscapePlan(pairs, plane_plan, notes)


def _check_layout(layout: Layout, network: nn.Module, what: str) -> None:
    own = sorted((n, tuple(p.shape)) for n, p in network.named_parameters())
    if own != list(layout):
        raise AnalysisError(f'The snapshot weights of {what} are not of the network ({type(network).__name__}):'
                            f' their parameters (names or shapes) differ.')


def _net_label(srcs: list[_Source], i: int, m: int) -> str:
    return f'{srcs[i].label}:m{m}'


def _landscape(srcs: list[_Source], plan: _LandscapePlan, num_points: int, grid: int,
               ctx: _Context) -> dict[str, Any]:
    ts = torch.linspace(0, 1, num_points, dtype=torch.float64).tolist()
    out = dict(num_points=num_points, bn_batches=ctx.bn_batches, bn_images=ctx.bn_images(), pairs=[], plane=None,
               notes=list(plan.notes))
    for (i, mi), (j, mj) in plan.pairs:
        a, b = _networks(srcs[i])[0][mi], _networks(srcs[j])[0][mj]
        la, lb = _net_label(srcs, i, mi), _net_label(srcs, j, mj)
        ctx.log(f'landscape: {la} -> {lb}, {num_points} points')
        srcs[i].model.to(ctx.device)
        srcs[j].model.to(ctx.device)
        path = landscape.linear_path(a, b, ts, {'val': ctx.val_loader(srcs[i])}, bn_loader=ctx.bn_loader(srcs[i]),
                                     bn_batches=ctx.bn_batches)
        loss, acc = path['val']['loss'], path['val']['accuracy']
        barrier, barrier_t = landscape.barrier_height(path['t'], loss)
        err_barrier, err_t = landscape.barrier_height(path['t'], [100.0 - v for v in acc])
        distance = torch.linalg.vector_norm(landscape.parameter_vector(b).double()
                                            - landscape.parameter_vector(a).double()).item()
        out['pairs'].append(dict(a=la, b=lb, t=path['t'], loss=loss, accuracy=acc, distance=distance,
                                 barrier_loss=barrier, barrier_loss_t=barrier_t, barrier_error=err_barrier,
                                 barrier_error_t=err_t))
        srcs[i].model.cpu()
        srcs[j].model.cpu()
    if plan.plane is not None:
        epoch, path, layout = plan.plane
        (i, mi), (j, mj) = plan.pairs[0]
        a, b = _networks(srcs[i])[0][mi], _networks(srcs[j])[0][mj]
        la, lb = _net_label(srcs, i, mi), _net_label(srcs, j, mj)
        lc = f'{la}@epoch{epoch}'
        ctx.log(f"landscape: plane through {la}, {lb} and {lc}, {grid} x {grid} points and the solutions'")
        c = landscape.load_parameter_vector(copy.deepcopy(a), _member_vector(path, mi, layout))
        srcs[i].model.to(ctx.device)
        srcs[j].model.to(ctx.device)
        c.to(ctx.device)
        try:
            result = landscape.plane(a, b, c, {'val': ctx.val_loader(srcs[i])}, grid=grid,
                                     bn_loader=ctx.bn_loader(srcs[i]), bn_batches=ctx.bn_batches)
        except ValueError as e:
            raise AnalysisError(f'The plane through {la}, {lb} and {lc} cannot be drawn: {e} (--plane-epoch picks'
                                f' another snapshot)') from e
        out['plane'] = dict(a=la, b=lb, c=lc, epoch=epoch, x=result['x'], y=result['y'], points=result['points'],
                            loss=result['val']['loss'], accuracy=result['val']['accuracy'])
        srcs[i].model.cpu()
        srcs[j].model.cpu()
    return out


# ---------------------------------------------------------------------------------------------------------------
# subspace samplers


@dataclass
class _SamplerPlan:
    runnable: dict[str, dict[str, str | None]]  # label -> sampler -> None (runs) or why it cannot
    trajectories: dict[str, tuple[list[int], list[Any], Layout]]  # label -> epochs, weights files, layout
    notes: list[str]


def _trajectory_epochs(files: dict[int, Any], snapshot_epochs: list[int] | None) -> list[int]:
    """The epochs whose weights the Gaussians are fitted to: ``--snapshot-epochs`` when given, else the later half
    of the trajectory (at least two epochs), where the run has settled in its mode; never the initialisation."""
    epochs = [e for e in files if e >= 0]
    if snapshot_epochs is not None:
        return [e for e in epochs if e in set(snapshot_epochs)]
    return epochs[min(len(epochs) // 2, max(len(epochs) - 2, 0)):]


def _plan_samplers(srcs: list[_Source], names: list[str], explicit: bool,
                   snapshot_epochs: list[int] | None) -> _SamplerPlan:
    """Which sampler can run on which source, before any evaluation. A sampler asked for by name that runs on no
    source is an error; otherwise a sampler that cannot run on a source gets a note."""
    runnable, trajectories, notes = {}, {}, []
    for s in srcs:
        nets, note = _networks(s)
        if note:
            notes.append(note)
        net = nets[0]
        why: dict[str, str | None] = {}
        for name in names:
            why[name] = None
            if name == 'dropout' and not samplers._dropout_sources(net):
                why[name] = (f'{type(net).__name__} has no dropout (no nn.Dropout with p > 0, no drop_rate > 0): train'
                             f' it with --model-kwargs drop_rate=0.1 to sample dropout masks')
            elif name in ('diag', 'lowrank'):
                why[name] = _trajectory_reason(s, net, snapshot_epochs, trajectories)
        runnable[s.label] = why
    for name in names:
        reasons = [f'{label}: {why[name]}' for label, why in runnable.items() if why[name]]
        if explicit and len(reasons) == len(srcs):
            raise AnalysisError(f'--samplers {name} cannot run on any source: ' + '; '.join(reasons) + '.')
        notes += [f'sampler {name} left out for {r}' for r in reasons]
    return _SamplerPlan(runnable, trajectories, notes)


def _trajectory_reason(src: _Source, net: nn.Module, snapshot_epochs: list[int] | None,
                       trajectories: dict[str, Any]) -> str | None:
    if src.label in trajectories:
        return None
    files = _weight_files(src.folder)
    if not files:
        return ('no snapshot weights of its trajectory (train it with --snapshot-subset N --snapshot-weights)'
                if src.folder is not None else 'a Hub source has no snapshots')
    epochs = _trajectory_epochs(files, snapshot_epochs)
    if len(epochs) < 2:
        return f'the Gaussians need the weights of at least 2 epochs, it has {epochs} (of epochs {list(files)})'
    paths = [files[e] for e in epochs]
    try:
        layout = _weight_layout(paths, 1)
        _check_layout(layout, net, src.label)
    except (ValueError, AnalysisError) as e:
        return f'its snapshot weights cannot be used: {e}'
    trajectories[src.label] = (epochs, paths, layout)
    return None


def _sample_stats(logits: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor,
                  n_bins: int) -> dict[str, Any]:
    """An ensemble of sampled (or independent) networks: its accuracy, diversity and calibration, and every
    network's place on the diversity-accuracy plane against the reference network."""
    acc = metrics.member_accuracy(logits, targets)
    out = dict(num_networks=logits.shape[1], ensemble_acc=float(metrics.ensemble_accuracy(logits, targets)),
               network_acc=[float(a) for a in acc], network_acc_mean=float(acc.mean()),
               disagreement_mean=(float(metrics.mean_offdiag(metrics.pairwise_disagreement(logits)))
                                  if logits.shape[1] > 1 else None),
               calibration=metrics.calibration(metrics.ensemble_probs(logits), targets, n_bins=n_bins))
    plane = samplers.normalized_disagreement(logits, reference, targets)
    out['plane'] = {k: v.tolist() for k, v in plane.items()}
    return out


def _independent(srcs: list[_Source], evals: list[dict[str, Any]], index: int) -> tuple[torch.Tensor | None, str]:
    """The independent ensemble to compare a source's samplers with: its own members, or for a single network the
    single-network sources together (itself first)."""
    logits = evals[index]['logits']
    if logits.shape[1] > 1:
        return logits, f'{srcs[index].label} ({logits.shape[1]} members)'
    singles = [i for i, ev in enumerate(evals) if ev['logits'].shape[1] == 1]
    if len(singles) < 2:
        return None, 'no independent ensemble: one network, and no other single-network source'
    order = [index] + [i for i in singles if i != index]
    return (torch.cat([evals[i]['logits'] for i in order], dim=1),
            'the single-network sources ' + ', '.join(srcs[i].label for i in order))


def _samplers(srcs: list[_Source], evals: list[dict[str, Any]], plan: _SamplerPlan, names: list[str],
              num_samples: int | None, scale: float, ctx: _Context) -> dict[str, Any]:
    out = dict(samplers=names, random_scale=scale, bn_batches=ctx.bn_batches, bn_images=ctx.bn_images(),
               lowrank_rank=LOWRANK_RANK, sources={}, notes=list(plan.notes))
    for index, (s, ev) in enumerate(zip(srcs, evals)):
        targets, num_members = ev['targets'], ev['logits'].shape[1]
        reference = ev['logits'][:, 0]
        k = num_samples or (num_members if num_members > 1 else 4)
        net = _networks(s)[0][0]
        ind_logits, ind_what = _independent(srcs, evals, index)
        entry = dict(reference=f'{s.label}:m0', num_samples=k, independent=None, independent_of=ind_what,
                     samplers={}, notes=[])
        if ind_logits is not None:
            entry['independent'] = _sample_stats(ind_logits, targets, reference, ctx.n_bins)
        s.model.to(ctx.device)
        loader, bn_loader = None, None
        for name in names:
            why = plan.runnable[s.label][name]
            if why:
                continue
            ctx.log(f'samplers: {s.label}:m0, {name}, {k} samples')
            if loader is None:
                loader = ctx.val_loader(s)
            extra: dict[str, Any] = {}
            if name == 'dropout':
                logits, got = samplers.dropout_predictions(net, loader, k, seed=ctx.seed)
            else:
                if name == 'random':
                    vectors = samplers.random_samples(net, k, scale, seed=ctx.seed)
                    extra['scale'] = scale
                else:
                    epochs, paths, layout = plan.trajectories[s.label]
                    trajectory = torch.stack([_member_vector(p, 0, layout) for p in paths])
                    extra['epochs'] = epochs
                    if name == 'diag':
                        vectors = samplers.diagonal_gaussian_samples(trajectory, k, seed=ctx.seed)
                    else:
                        extra['rank'] = min(LOWRANK_RANK, len(epochs) - 1)
                        vectors = samplers.low_rank_gaussian_samples(trajectory, extra['rank'], k, seed=ctx.seed)
                    del trajectory
                if bn_loader is None:
                    bn_loader = ctx.bn_loader(s)
                logits, got = samplers.predict_samples(net, vectors, loader, bn_loader=bn_loader,
                                                       bn_batches=ctx.bn_batches)
                del vectors
            if not torch.equal(got, targets):
                raise AnalysisError(f'The {name} samples of {s.label} were evaluated on other images than the source:'
                                    f' the evaluation loader is not deterministic.')
            entry['samplers'][name] = dict(_sample_stats(logits, targets, reference, ctx.n_bins), **extra)
        s.model.cpu()
        out['sources'][s.label] = entry
    return out
