"""The report's numbers: evaluation of every source, its members' diversity and calibration, the between-source
matrices and the snapshot trajectories (Fort et al.)."""
import contextlib
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from .. import metrics
from ..files.run_folder import RunFolder
from ..train.engine import MemberPredictor
from ..train.snapshots import Snapshots, read_snapshots, snapshot_epoch
from ._sources import AnalysisError, _Source

_SINGLE_MEMBER_NOTE = ('a single-member model has no pair of members: its mean disagreement, feature distance and'
                       ' weight cosine are undefined (null); it still enters the between-source comparison')


def _num_classes(model: nn.Module) -> int | None:
    n = getattr(model, 'num_classes', None)
    return int(n) if n is not None else None


def _evaluate(model: nn.Module, loader, device: torch.device, feature_taps: str | None,
              progress: str | None = None) -> dict[str, Any]:
    """Member logits ``[N, M, C]``, targets ``[N]``, the model's own prediction and the mean feature distance;
    ``progress``: a progress bar with this description."""
    model.to(device)
    predictor = MemberPredictor(model, loader, features=feature_taps is not None, taps=feature_taps, progress=progress)
    logits, own, targets, pair_sum = [], [], [], None
    for out in predictor:
        logits.append(out.members.cpu())
        own.append(out.logits.cpu())
        targets.append(out.target.cpu())
        if out.feature_pairs is not None:
            # summed over samples here, divided by their count below: the distance averaged over samples
            batch_sum = out.feature_pairs.double().sum(0).cpu()
            pair_sum = batch_sum if pair_sum is None else pair_sum + batch_sum
    if not logits:
        raise AnalysisError('The evaluation set is empty.')
    num = sum(len(t) for t in targets)
    return dict(logits=torch.cat(logits), targets=torch.cat(targets).long(),
                own=torch.cat(own) if predictor.is_ensemble else None,
                feature_distance=pair_sum / num if pair_sum is not None else None, feature_note=predictor.feature_note)


def _own_rule(model: nn.Module) -> str:
    """How the model's own prediction (``forward``) is made from its members: its combine mode ('linear': a trained
    head, as FDL's; 'mean_probs', 'mean_logits', 'vote', or 'head N': one designated head), else 'forward' (one
    network, or an ensemble without a combine rule)."""
    rule = getattr(model, 'combine_mode', None)
    if rule == 'head' and getattr(model, 'head_index', None) is not None:
        return f'head {model.head_index}'
    return rule or 'forward'


def _weights(model: nn.Module, include_buffers: bool) -> tuple[torch.Tensor | None, str | None]:
    """Flattened weights of every member ``[M, P]`` (a plain model is one member), or None and why."""
    try:
        return metrics.member_weights(model, include_buffers=include_buffers), None
    except ValueError as e:  # heads on shared layers have no weight vector of their own
        return None, f'no weight cosine: {e}'


def _cosine(vectors: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix; above 1 GiB of float64 a chunked Gram matrix keeps the memory bounded."""
    if vectors.numel() * 8 <= 1 << 30:
        return metrics.cosine_similarity_matrix(vectors)
    gram = torch.zeros(vectors.shape[0], vectors.shape[0], dtype=torch.float64)
    for start in range(0, vectors.shape[1], 1 << 22):
        chunk = vectors[:, start:start + (1 << 22)].double()
        gram += chunk @ chunk.T
    norm = gram.diagonal().sqrt()
    return gram / (norm[:, None] * norm[None, :])


def _mean_offdiag(matrix: torch.Tensor | None) -> float | None:
    if matrix is None or matrix.shape[0] < 2:
        return None
    return float(metrics.mean_offdiag(matrix))


def _source_numbers(src: _Source, ev: dict[str, Any], weights: torch.Tensor | None, n_bins: int,
                    max_subsets: int | None, seed: int, members: bool = True) -> dict[str, Any]:
    """A source's numbers: accuracy and calibration always (cheap, from the logits); with ``members`` (the
    section of that name) also the members' diversity, calibration, ensemble-size curve and reliability diagram."""
    logits, targets = ev['logits'], ev['targets']
    num_members = logits.shape[1]
    probs = metrics.ensemble_probs(logits)
    member_acc = [float(a) for a in metrics.member_accuracy(logits, targets)]
    if ev['own'] is not None:  # the model's own rule (its combine: a learned head, one designated head, ...)
        own_acc = 100.0 * float((ev['own'].argmax(-1) == targets).double().mean())
    else:  # a plain model: its own prediction is its one member's
        own_acc = member_acc[0] if num_members == 1 else None
    numbers = dict(
        spec=src.spec,
        model=src.results.get('model') or (src.model.pretrained_cfg or {}).get('architecture'),
        dataset=src.dataset,
        num_members=num_members,
        num_classes=logits.shape[-1],
        num_samples=logits.shape[0],
        input_size=list(src.data_config['input_size']),
        ensemble_acc=float(metrics.ensemble_accuracy(logits, targets)),
        model_acc=own_acc,
        model_rule=_own_rule(src.model),
        member_acc=member_acc,
        member_acc_mean=sum(member_acc) / num_members,
        calibration=metrics.calibration(probs, targets, n_bins=n_bins),
        # the members section's numbers, None when it is not asked for
        disagreement=None, disagreement_mean=None, feature_distance=None, feature_distance_mean=None,
        weight_cosine=None, weight_cosine_mean=None, member_calibration=None, reliability=None, ensemble_size=None,
        notes=[],
    )
    if not members:
        return numbers
    disagreement = metrics.pairwise_disagreement(logits)
    cosine = _cosine(weights) if weights is not None and num_members >= 2 else None
    fdist = ev['feature_distance']
    numbers.update(
        disagreement=disagreement,
        disagreement_mean=_mean_offdiag(disagreement),
        feature_distance=fdist,
        feature_distance_mean=_mean_offdiag(fdist),
        weight_cosine=cosine,
        weight_cosine_mean=_mean_offdiag(cosine),
        member_calibration=[metrics.calibration(logits[:, m].softmax(-1), targets, n_bins=n_bins)
                            for m in range(num_members)],
        reliability=metrics.reliability_diagram(probs, targets, n_bins=n_bins),
        ensemble_size=metrics.ensemble_size_curve(logits, targets, max_subsets=max_subsets, seed=seed),
    )
    if num_members < 2:
        numbers['notes'].append(_SINGLE_MEMBER_NOTE)
    return numbers


def _between_sources(labels: list[str], evals: list[dict[str, Any]]) -> dict[str, Any]:
    """Disagreement between every member of every source, and its block means (source x source)."""
    logits = torch.cat([ev['logits'] for ev in evals], dim=1)
    matrix = metrics.pairwise_disagreement(logits)
    sizes = [ev['logits'].shape[1] for ev in evals]
    offsets = np.cumsum([0] + sizes).tolist()
    blocks = [[None] * len(labels) for _ in labels]
    for i in range(len(labels)):
        for j in range(len(labels)):
            block = matrix[offsets[i]:offsets[i + 1], offsets[j]:offsets[j + 1]]
            blocks[i][j] = _mean_offdiag(block) if i == j else float(block.mean())
    # the ensembles' own predictions (mean member probabilities) against each other
    ens = torch.stack([metrics.ensemble_probs(ev['logits']) for ev in evals], dim=1)
    return dict(labels=labels, member_labels=_member_labels(labels, sizes), offsets=offsets, disagreement=matrix,
                block_mean=blocks, ensemble_disagreement=metrics.pairwise_disagreement(ens))


def _member_labels(labels: list[str], sizes: list[int]) -> list[str]:
    return [f'{label}:m{m}' for label, n in zip(labels, sizes) for m in range(n)]


def _between_weights(labels: list[str], weights: list[torch.Tensor | None]) -> dict[str, Any] | None:
    """Weight cosine between every member of every source, where all have weights of one length."""
    if any(w is None for w in weights) or len({w.shape[1] for w in weights}) != 1:
        return None
    sizes = [w.shape[0] for w in weights]
    return dict(labels=labels, member_labels=_member_labels(labels, sizes), offsets=np.cumsum([0] + sizes).tolist(),
                cosine=_cosine(torch.cat(weights)))


# ---------------------------------------------------------------------------------------------------------------
# trajectories


# float64 elements of one block of the streamed Gram matrix (128 MiB): a parameter is read in blocks of its rows
_GRAM_BLOCK = 1 << 24
# a member's parameters in a weights snapshot: (name without the 'member{m}.' prefix, shape), sorted by name
Layout = list[tuple[str, tuple[int, ...]]]


@dataclass
class _Trajectory:
    """The snapshots of one source: their logits, and where their weights are (read one tensor at a time)."""
    snap: Snapshots
    weight_paths: list[Path] | None = None  # one weights file per epoch of snap.epochs
    layout: Layout | None = None


def _weight_files(folder: Path | None) -> dict[int, Path]:
    """A run's snapshot weights files by epoch (``INIT_EPOCH`` for the initialisation), ascending."""
    snap_dir = None if folder is None else folder / RunFolder.SNAPSHOTS
    if snap_dir is None or not snap_dir.is_dir():
        return {}
    found = {}
    for path in snap_dir.iterdir():
        epoch = snapshot_epoch(path.name, weights=True)
        if epoch is not None:
            found[epoch] = path
    return dict(sorted(found.items()))


def _weight_layout(paths: list[Path], num_members: int) -> Layout:
    """The parameters every member has in every weights file, from the files' headers (no tensor is read).

    Raises:
        ValueError: A file lacks a member, or a member's parameters (names, shapes) differ from member 0's in the
            first file.
    """
    layout = None
    for path in paths:
        try:
            with safe_open(str(path), framework='pt') as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001  (any unreadable file, with its name)
            raise ValueError(f"'{path}' cannot be read ({type(e).__name__}: {e})") from e
        for m in range(num_members):
            prefix = f'member{m}.'
            mine = sorted((k[len(prefix):], shape) for k, shape in shapes.items() if k.startswith(prefix))
            if not mine:
                raise ValueError(f"'{path}' holds no parameters of member {m}")
            if layout is None:
                layout = mine
            elif mine != layout:
                raise ValueError(f"member {m} in '{path}' has other parameters (names or shapes) than member 0 in"
                                 f" '{paths[0]}'")
    return layout


def _read_rows(handle, key: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
    if not shape:
        return handle.get_tensor(key).reshape(1)
    if start == 0 and stop >= shape[0]:
        return handle.get_tensor(key)
    return handle.get_slice(key)[start:stop]


def _streaming_gram(entries: list[tuple[Path, int]], layout: Layout) -> torch.Tensor:
    """The float64 Gram matrix ``G[i, j] = <w_i, w_j>`` of K snapshot weight vectors, read parameter by parameter.

    Entry i is (weights file, member): the vector of ``member{m}.*`` in ``layout``'s order. For every parameter,
    that tensor is read from each of the K files (``safe_open`` reads one tensor, or a block of its rows, at a
    time), stacked ``[K, size]`` and ``G += X X^T`` accumulated: the memory is one block, never the K vectors (15 GB
    for 4 ResNet-18 members over 20 epochs).
    """
    num = len(entries)
    gram = torch.zeros(num, num, dtype=torch.float64)
    with contextlib.ExitStack() as stack:
        handles = {}
        for path, _ in entries:
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework='pt'))
        for name, shape in layout:
            rows = shape[0] if shape else 1
            row_size = math.prod(shape[1:]) if shape else 1
            step = max(1, _GRAM_BLOCK // max(1, num * row_size))
            for start in range(0, rows, step):
                block = torch.stack([_read_rows(handles[path], f'member{m}.{name}', shape, start, start + step)
                                     .reshape(-1) for path, m in entries])
                # float32 values are exact in float64: the products and sums are float64's
                block = block.double()
                gram += block @ block.T
    return gram


def _gram_cosine(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``G_ij / sqrt(G_ii G_jj)`` from a Gram matrix, as ``metrics.cosine_similarity_matrix``:
    in [-1, 1], 1 on the diagonal."""
    norm = gram.diagonal().sqrt()
    if bool((norm == 0).any()):
        raise AnalysisError(f'Snapshot weight vector(s) {(norm == 0).nonzero().flatten().tolist()} are all zeros:'
                            f' their cosine similarity is undefined.')
    cosine = (gram / (norm[:, None] * norm[None, :])).clamp(-1, 1)
    cosine.fill_diagonal_(1.0)
    return cosine


def _member_vector(path: Path, member: int, layout: Layout) -> torch.Tensor:
    """One member's float32 weight vector from a weights snapshot, in ``layout``'s (sorted-name) order: the layout
    of ``landscape.parameter_vector``."""
    with safe_open(str(path), framework='pt') as f:
        return torch.cat([f.get_tensor(f'member{member}.{name}').float().reshape(-1) for name, _ in layout])


def _read_snapshots(src: _Source, epochs: list[int] | None, allow_missing: bool, notes: list[str]) -> _Trajectory:
    """The predictions of a run's snapshots and, where every epoch read has them, its weights files (not read)."""
    folder = src.folder / RunFolder.SNAPSHOTS
    hint = '' if allow_missing else ' (--allow-missing-snapshots skips missing epochs)'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            snap = read_snapshots(src.folder, epochs=epochs, weights=False, allow_missing=allow_missing)
            files = _weight_files(src.folder)
            paths = None
            if files:
                have = [e for e in snap.epochs if e in files]
                if len(have) == len(snap.epochs):
                    paths = [files[e] for e in snap.epochs]
                elif have and allow_missing:
                    # as read_snapshots(weights=True, allow_missing=True) did: the epochs without weights are left
                    # out, so that the predictions and the weights are of the same epochs
                    missing = [e for e in snap.epochs if e not in files]
                    warnings.warn(f"'{folder}' has no weights files for epoch(s) {missing}; reading the other"
                                  f' epochs.', stacklevel=2)
                    snap = read_snapshots(src.folder, epochs=have, weights=False)
                    paths = [files[e] for e in have]
                else:
                    # weights of some epochs only: compare the predictions of every epoch, without weights
                    notes.append(f'{src.label}: some snapshot epochs have no weights, snapshot weights left out')
        except (OSError, ValueError, KeyError) as e:
            raise AnalysisError(f'Snapshots of source {src.label} ({src.spec}) cannot be read: {e}{hint}') from e
    notes += [f'{src.label}: {w.message}' for w in caught]
    traj = _Trajectory(snap)
    if paths is not None:
        try:
            traj.layout = _weight_layout(paths, snap.logits.shape[2])
            traj.weight_paths = paths
        except ValueError as e:
            notes.append(f'{src.label}: snapshot weights left out: {e}')
    return traj


def _snapshot_sources(sources: list[_Source], epochs: list[int] | None, allow_missing: bool, dataset: str,
                      require: bool) -> tuple[dict[str, _Trajectory], list[str]]:
    snaps, notes = {}, []
    for s in sources:
        if s.folder is None or not (s.folder / RunFolder.SNAPSHOTS).is_dir():
            if require:
                raise AnalysisError(f"--snapshot-epochs was given but source {s.label} ({s.spec}) has no snapshots"
                                    f' folder: train it with --snapshot-subset N, or leave it out.')
            notes.append(f'{s.label}: no snapshots (train.py --snapshot-subset N writes them)')
            continue
        traj = _read_snapshots(s, epochs, allow_missing, notes)
        recorded = traj.snap.meta.get('dataset')
        if recorded is not None and recorded != dataset:
            raise AnalysisError(f'Snapshots of source {s.label} ({s.spec}) are of dataset {recorded}, not {dataset}.')
        snaps[s.label] = traj
    return snaps, notes


def _check_snapshots(trajs: dict[str, _Trajectory], sources: dict[str, _Source], num_classes: int) -> None:
    snaps = {label: t.snap for label, t in trajs.items()}
    labels = list(snaps)
    for label in labels:
        if snaps[label].logits.shape[-1] != num_classes:
            raise AnalysisError(f'Snapshots of {label} hold {snaps[label].logits.shape[-1]} classes, the models'
                                f' {num_classes}.')

    def _say(name):
        idx = snaps[name].indices.tolist()
        split = {k: sources[name].args.get(k) for k in ('val_split', 'val_subset')}
        return f'{name}: {len(idx)} samples, indices {idx[:5]}{"..." if len(idx) > 5 else ""}, {split}'

    ref = snaps[labels[0]]
    ref_split = [sources[labels[0]].args.get(k) for k in ('val_split', 'val_subset')]
    for label in labels[1:]:
        snap = snaps[label]
        # the indices point into the validation set as each run used it: the same split and --val-subset too
        same = snap.indices.shape == ref.indices.shape and torch.equal(snap.indices, ref.indices) \
            and torch.equal(snap.targets, ref.targets) \
            and [sources[label].args.get(k) for k in ('val_split', 'val_subset')] == ref_split
        if not same:
            raise AnalysisError(
                f'Snapshot subsets differ between sources ({_say(labels[0])}; {_say(label)}): their predictions are'
                f' on other images and cannot be compared. Train the runs with the same --snapshot-subset (and'
                f' dataset, --val-split, --val-subset), or analyse them separately.')


def _pair_stats(matrix: torch.Tensor, points: list[tuple[str, int, int]]) -> dict[str, Any]:
    """Means of a [K, K] snapshot matrix within trajectories (one member, other epochs) and between trajectories
    (other members or runs, same epoch)."""
    within_cons, within_last, within_all, between_src, between_runs = [], [], [], [], []
    by_epoch: dict[int, list[float]] = {}
    m = matrix.double()
    for i in range(len(points)):
        for j in range(i + 1, len(points)):
            a, b, v = points[i], points[j], float(m[i, j])
            if a[:2] == b[:2]:
                within_all.append(v)
                if j == i + 1:  # points are ordered by epoch within a trajectory
                    within_cons.append(v)
                    if j + 1 == len(points) or points[j + 1][:2] != b[:2]:
                        within_last.append(v)
            elif a[2] == b[2]:
                by_epoch.setdefault(a[2], []).append(v)
                (between_src if a[0] == b[0] else between_runs).append(v)

    def _mean(values):
        return float(np.mean(values)) if values else None

    epochs = sorted(by_epoch)
    return dict(
        within_consecutive=_mean(within_cons),
        within_last_consecutive=_mean(within_last),
        within_all=_mean(within_all),
        between_same_epoch=_mean(between_src + between_runs),
        between_same_epoch_by_epoch={e: _mean(by_epoch[e]) for e in epochs},
        between_last_epoch=_mean(by_epoch[epochs[-1]]) if epochs else None,
        last_epoch=epochs[-1] if epochs else None,
        between_members_same_source=_mean(between_src),
        between_sources=_mean(between_runs),
    )


def _trajectories(trajs: dict[str, _Trajectory], seed: int) -> dict[str, Any]:
    snaps = {label: t.snap for label, t in trajs.items()}
    points, logits = [], []
    for label, snap in snaps.items():
        for m in range(snap.logits.shape[2]):
            for e_idx, epoch in enumerate(snap.epochs):
                points.append((label, m, int(epoch)))
                logits.append(snap.logits[e_idx, :, m])
    stacked = torch.stack(logits, dim=1).float()  # [S, K, C]: every snapshot as a "member"
    disagreement = metrics.pairwise_disagreement(stacked)
    out = dict(points=[dict(source=s, member=m, epoch=e) for s, m, e in points], num_samples=stacked.shape[0],
               epochs={label: list(snap.epochs) for label, snap in snaps.items()},
               disagreement=disagreement, disagreement_stats=_pair_stats(disagreement, points),
               weight_points=None, weight_cosine=None, weight_cosine_stats=None, tsne=None, notes=[])

    # weights: the runs that saved them, of the parameters most of them share (one architecture)
    layouts = {label: tuple(t.layout) for label, t in trajs.items() if t.layout is not None}
    if layouts:
        common = Counter(layouts.values()).most_common(1)[0][0]
        kept = [label for label, layout in layouts.items() if layout == common]
        wpoints = [p for p in points if p[0] in kept]
        entries = [(trajs[s].weight_paths[snaps[s].epochs.index(e)], m) for s, m, e in wpoints]
        cosine = _gram_cosine(_streaming_gram(entries, list(common)))
        out.update(weight_points=[dict(source=s, member=m, epoch=e) for s, m, e in wpoints], weight_cosine=cosine,
                   weight_cosine_stats=_pair_stats(cosine, wpoints))
        left = [label for label in snaps if label not in kept]
        if left:
            out['notes'].append(f"weight cosine of snapshots without {', '.join(left)}: no snapshot weights"
                                ' (train.py --snapshot-weights) or weights of another architecture')
    else:
        out['notes'].append('no weight cosine of snapshots: no run saved snapshot weights (train.py'
                            ' --snapshot-weights)')
    if len(points) >= 3:
        # each snapshot's predictive distribution over the subset, flattened, as in Fort et al.'s t-SNE
        flat = stacked.softmax(-1).permute(1, 0, 2).reshape(len(points), -1).double()
        out['tsne'] = np.asarray(metrics.tsne_embedding(flat, seed=seed)).tolist()
    else:
        out['notes'].append('no t-SNE: it needs at least 3 snapshots')
    return out
