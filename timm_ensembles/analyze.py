"""Report on trained ensembles: accuracy, diversity, calibration and training trajectories.

    python -m timm_ensembles.analyze output/train/ens output/train/fdl --dataset digits --out output/analysis

Each source (a ``train.py`` output folder, ``local-dir:<folder>`` or ``hf-hub:<repo>``) is evaluated on the
validation split of ``--dataset``, with the preprocessing it was trained with, giving every member's logits
``[N, M, C]``. From them (and, where defined, from the members' weights and intermediate features):

* per source: each member's and the ensemble's accuracy (the ensemble predicts the mean of the member
  probabilities), the members' pairwise disagreement, feature distance and weight cosine similarity, accuracy and
  Brier score against ensemble size, NLL / Brier / ECE of the ensemble and of every member, a reliability diagram;
* between sources: the disagreement between every member of every source, in one matrix;
* for sources whose run wrote snapshots (``train.py --snapshot-subset N``), the comparison of Fort et al.
  ("Deep Ensembles: A Loss Landscape Perspective", 2019): disagreement and weight cosine between the snapshots of
  one member's trajectory (epochs of one run) and between different members or runs at the same epoch, and a
  t-SNE of the prediction trajectories.

It writes PNG plots, ``summary.md`` (one page), ``summary.json`` (every number) and ``logits.safetensors`` (each
source's member logits, for re-analysis) into ``--out`` and prints the key numbers.
"""
import argparse
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import save_file
from timm.data import resolve_data_config
from torch import nn

from . import data as te_data
from . import metrics
from ._engine import check_input_size
from ._extras import MissingExtraError, require
from ._registry import create_model
from ._snapshots import read_snapshots

__all__ = ['AnalysisError', 'analyze_runs', 'get_args_parser', 'main', 'PLOTS']

_HUB_PREFIXES = ('hf-hub:', 'hf_hub:')
# every plot the report can write, in the order of summary.md
PLOTS = ('disagreement', 'weight_cosine', 'feature_distance', 'ensemble_size', 'reliability', 'trajectory_disagreement',
         'trajectory_cosine', 'tsne')
_DPI = 120
# about 7 inches at 120 dpi: the plots stay readable when shown ~700 px wide
_WIDTH = 7.0
_FONT = {'font.size': 10, 'axes.titlesize': 10, 'axes.labelsize': 10, 'xtick.labelsize': 9, 'ytick.labelsize': 9,
         'legend.fontsize': 9}
_SINGLE_MEMBER_NOTE = ('a single-member model has no pair of members: its mean disagreement, feature distance and'
                       ' weight cosine are undefined (null); it still enters the between-source comparison')


class AnalysisError(ValueError):
    """Sources that cannot be analysed (together): other datasets, class counts or snapshot subsets."""


@dataclass
class _Source:
    spec: str
    label: str
    model_name: str
    folder: Path | None
    args: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None  # the dataset its run recorded (canonical name), None when unknown
    model: nn.Module | None = None
    num_classes: int | None = None
    data_config: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------------------------
# sources


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _canonical_dataset(name: str | None, root: str | None) -> str | None:
    """The name ``create_datasets`` would report for ``name`` (``DatasetInfo.name``), without reading the data."""
    if name is None:
        return None
    try:
        kind, path, _ = te_data._resolve_source(name, root)
    except (OSError, ValueError):
        return str(name)  # a path that no longer exists: compare the name as given
    # as data.py names them: absolute, symbolic links kept
    if kind == 'digits':
        return 'digits'
    if kind == 'idx':
        return f'idx:{os.path.abspath(os.path.expanduser(path))}'
    if kind == 'folder':
        return os.path.abspath(path)
    return str(path)


def _hub_file(spec: str, filename: str) -> Path:
    """``filename`` of the Hub repo ``spec`` (``hf-hub:org/name[@rev]``) downloaded, or a missing path if it has
    none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo_id, _, revision = spec.split(':', 1)[1].partition('@')
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or None))
    except EntryNotFoundError:  # also: offline and not cached; a missing repo fails later, loading the model
        return Path(os.devnull) / filename


def _resolve_source(spec: str, label: str | None) -> _Source:
    if spec.startswith(_HUB_PREFIXES):
        src = _Source(spec, label or spec.split(':', 1)[1].rstrip('/').split('/')[-1], spec, None)
        # a repo pushed from a train.py folder carries its args.yaml and results.json (not its snapshots)
        src.args = _read_yaml(_hub_file(spec, 'args.yaml'))
        src.results = _read_json(_hub_file(spec, 'results.json'))
        # the dataset as the run named it, resolved here: the recorded one is a path on the machine that trained it
        src.dataset = (_canonical_dataset(src.args['dataset'], None) if 'dataset' in src.args
                       else src.results.get('dataset'))
        return src
    path = Path(spec[len('local-dir:'):] if spec.startswith('local-dir:') else spec).expanduser()
    if not path.is_dir():
        raise AnalysisError(f"Source '{spec}' is neither an existing folder (a train.py output) nor an hf-hub: name.")
    if not (path / 'config.json').is_file():
        raise AnalysisError(f"Source '{spec}' has no config.json: give a folder written by train.py (or by"
                            f' timm.models.save_for_hf).')
    src = _Source(spec, label or path.resolve().name, f'local-dir:{path.resolve()}', path)
    src.args = _read_yaml(path / 'args.yaml')
    src.results = _read_json(path / 'results.json')
    recorded = src.results.get('dataset')
    if recorded is None and 'dataset' in src.args:
        recorded = _canonical_dataset(src.args.get('dataset'), src.args.get('data_dir'))
    src.dataset = recorded
    return src


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f'{label}#{seen[label]}')
    return out


def _describe(sources: list[_Source]) -> str:
    parts = []
    for s in sources:
        classes = f', {s.num_classes} classes' if s.num_classes is not None else ''
        parts.append(f"{s.label} ({s.spec}): dataset {s.dataset or 'not recorded'}{classes}")
    return '; '.join(parts)


def _check_datasets(sources: list[_Source], dataset: str) -> None:
    wrong = [s for s in sources if s.dataset is not None and s.dataset != dataset]
    if wrong:
        others = [s for s in sources if s not in wrong]
        raise AnalysisError(
            f'Sources trained on another dataset than --dataset ({dataset}): {_describe(wrong)}. All sources are'
            f' evaluated on one dataset; analyse each group of runs with its own --dataset.'
            + (f' The other sources: {_describe(others)}.' if others else ''))


def _check_classes(sources: list[_Source], dataset: str, num_classes: int) -> None:
    counts = {s.num_classes for s in sources}
    if len(counts) > 1 or (num_classes > 0 and counts != {num_classes}):
        raise AnalysisError(
            f'Sources predict different numbers of classes, or not the {num_classes} classes of dataset {dataset}:'
            f' {_describe(sources)}. Only models of the same classes can be compared.')


def _data_config(src: _Source, img_size: int | None, in_chans: int | None, crop_pct: float | None) -> dict:
    """The evaluation preprocessing of a source: the data config saved with the model (train.py saves the one it
    evaluated with), with the run's own flags (args.yaml) where it has them, else the flags given here."""
    if src.args:
        # a train.py run: its flags, never the ones given here, which would evaluate it at another size
        img_size, in_chans, crop_pct = (src.args.get(k) for k in ('img_size', 'in_chans', 'crop_pct'))
    own = resolve_data_config(model=src.model)
    data_args: dict[str, Any] = {}
    if crop_pct is not None:
        data_args['crop_pct'] = crop_pct
    if img_size or in_chans:
        own_size = tuple(own['input_size'])
        data_args['input_size'] = (in_chans or own_size[0], *((img_size, img_size) if img_size else own_size[1:]))
    return resolve_data_config(data_args, model=src.model)


# ---------------------------------------------------------------------------------------------------------------
# evaluation


def _num_classes(model: nn.Module) -> int | None:
    n = getattr(model, 'num_classes', None)
    return int(n) if n is not None else None


@torch.no_grad()
def _evaluate(model: nn.Module, loader, device: torch.device, feature_taps: str | None) -> dict[str, Any]:
    """Member logits ``[N, M, C]``, targets ``[N]``, the model's own prediction and the mean feature distance."""
    model.eval()
    use_features = feature_taps is not None and hasattr(model, 'forward_members_with_features')
    logits, own, targets = [], [], []
    dist_sum, dist_n, feature_note = None, 0, None
    if feature_taps is not None and not use_features and hasattr(model, 'forward_members'):
        feature_note = f'no feature distance: {type(model).__name__} has no forward_members_with_features'
    for x, target in loader:
        x = x.to(device)
        if use_features:
            try:
                out, feats = model.forward_members_with_features(x, taps=feature_taps)
            except ValueError as e:  # a base without intermediates for these taps: logits only
                use_features, feature_note = False, f'no feature distance: {e}'
                out = model.forward_members(x)
            else:
                d = metrics.feature_distance_matrix(feats).double().cpu()
                # a weighted mean over batches: the distance averaged over samples
                dist_sum = d * x.shape[0] if dist_sum is None else dist_sum + d * x.shape[0]
                dist_n += x.shape[0]
        elif hasattr(model, 'forward_members'):
            out = model.forward_members(x)
        else:
            out = model(x)[:, None]
        logits.append(out.float().cpu())
        if hasattr(model, 'combine') and hasattr(model, 'forward_members'):
            own.append(model.combine(out).float().cpu())
        targets.append(target.cpu())
    if not logits:
        raise AnalysisError('The evaluation set is empty.')
    return dict(logits=torch.cat(logits), targets=torch.cat(targets).long(),
                own=torch.cat(own) if own else None,
                feature_distance=dist_sum / dist_n if dist_sum is not None else None, feature_note=feature_note)


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
                    max_subsets: int | None, seed: int) -> dict[str, Any]:
    logits, targets = ev['logits'], ev['targets']
    num_members = logits.shape[1]
    probs = metrics.ensemble_probs(logits)
    disagreement = metrics.pairwise_disagreement(logits)
    cosine = _cosine(weights) if weights is not None and num_members >= 2 else None
    fdist = ev['feature_distance']
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
        member_acc=member_acc,
        member_acc_mean=sum(member_acc) / num_members,
        disagreement=disagreement,
        disagreement_mean=_mean_offdiag(disagreement),
        feature_distance=fdist,
        feature_distance_mean=_mean_offdiag(fdist),
        weight_cosine=cosine,
        weight_cosine_mean=_mean_offdiag(cosine),
        calibration=metrics.calibration(probs, targets, n_bins=n_bins),
        member_calibration=[metrics.calibration(logits[:, m].softmax(-1), targets, n_bins=n_bins)
                            for m in range(num_members)],
        reliability=metrics.reliability_diagram(probs, targets, n_bins=n_bins),
        ensemble_size=metrics.ensemble_size_curve(logits, targets, max_subsets=max_subsets, seed=seed),
        notes=[],
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


def _read_snapshots(src: _Source, epochs: list[int] | None, allow_missing: bool, notes: list[str]):
    folder = src.folder / 'snapshots'
    hint = '' if allow_missing else ' (--allow-missing-snapshots skips missing epochs)'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            snap = None
            if any(folder.glob('epoch_*.weights.safetensors')):
                try:
                    snap = read_snapshots(src.folder, epochs=epochs, weights=True, allow_missing=allow_missing)
                except (OSError, ValueError):
                    # weights of some epochs only: compare the predictions of every epoch, without weights
                    notes.append(f'{src.label}: some snapshot epochs have no weights, snapshot weights left out')
            if snap is None:
                snap = read_snapshots(src.folder, epochs=epochs, weights=False, allow_missing=allow_missing)
        except (OSError, ValueError, KeyError) as e:
            raise AnalysisError(f'Snapshots of source {src.label} ({src.spec}) cannot be read: {e}{hint}') from e
    notes += [f'{src.label}: {w.message}' for w in caught]
    return snap


def _snapshot_sources(sources: list[_Source], epochs: list[int] | None, allow_missing: bool, dataset: str,
                      require: bool) -> tuple[dict[str, Any], list[str]]:
    snaps, notes = {}, []
    for s in sources:
        if s.folder is None or not (s.folder / 'snapshots').is_dir():
            if require:
                raise AnalysisError(f"--snapshot-epochs was given but source {s.label} ({s.spec}) has no snapshots"
                                    f' folder: train it with --snapshot-subset N, or leave it out.')
            notes.append(f'{s.label}: no snapshots (train.py --snapshot-subset N writes them)')
            continue
        snap = _read_snapshots(s, epochs, allow_missing, notes)
        recorded = snap.meta.get('dataset')
        if recorded is not None and recorded != dataset:
            raise AnalysisError(f'Snapshots of source {s.label} ({s.spec}) are of dataset {recorded}, not {dataset}.')
        snaps[s.label] = snap
    return snaps, notes


def _check_snapshots(snaps: dict[str, Any], sources: dict[str, _Source], num_classes: int) -> None:
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


def _trajectories(snaps: dict[str, Any], seed: int) -> dict[str, Any]:
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

    # weights: the runs that saved them, of the weight length most of them share (one architecture)
    lengths = [snap.weights.shape[-1] for snap in snaps.values() if snap.weights is not None]
    if lengths:
        length = max(set(lengths), key=lengths.count)
        kept = [label for label, snap in snaps.items() if snap.weights is not None and snap.weights.shape[-1] == length]
        wpoints = [p for p in points if p[0] in kept]
        vectors = torch.stack([snaps[s].weights[snaps[s].epochs.index(e), m] for s, m, e in wpoints])
        cosine = _cosine(vectors)
        out.update(weight_points=[dict(source=s, member=m, epoch=e) for s, m, e in wpoints], weight_cosine=cosine,
                   weight_cosine_stats=_pair_stats(cosine, wpoints))
        left = [label for label in snaps if label not in kept]
        if left:
            out['notes'].append(f"weight cosine of snapshots without {', '.join(left)}: no snapshot weights"
                                ' (train.py --snapshot-weights) or weights of another length')
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


# ---------------------------------------------------------------------------------------------------------------
# plots


def _figure(width: float, height: float):
    Figure = require('matplotlib.figure', "the report's plots (--no-plots skips them)").Figure
    # a bare Figure renders with Agg and touches no pyplot state (no GUI backend, nothing global)
    return Figure(figsize=(width, height), dpi=_DPI)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)


def _heatmap(fig, ax, matrix, title: str, cbar_label: str, labels: list[str] | None = None,
             major: list[int] | None = None, minor: list[int] | None = None, groups: list[tuple[str, float]] | None
             = None, vmin=None, vmax=None, cmap: str = 'viridis', annotate: bool | None = None) -> None:
    """A labelled heatmap: ``labels`` per row, or ``groups`` (label, centre) for long matrices; ``major`` /
    ``minor`` are the first indices of blocks, drawn as boundary lines."""
    m = np.asarray(matrix, dtype=float)
    n = m.shape[0]
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, interpolation='nearest')
    if labels is not None and n <= 30:
        ax.set_xticks(range(n), labels, rotation=90)
        ax.set_yticks(range(n), labels)
    elif groups is not None:
        ax.set_xticks([c for _, c in groups], [g for g, _ in groups], rotation=90)
        ax.set_yticks([c for _, c in groups], [g for g, _ in groups])
    for starts, width in ((minor, 0.6), (major, 2.0)):
        for s in starts or []:
            if 0 < s < n:
                ax.axhline(s - 0.5, color='white', lw=width)
                ax.axvline(s - 0.5, color='white', lw=width)
    if annotate is None:
        annotate = n <= 8
    if annotate:
        finite = m[np.isfinite(m)]
        lo = vmin if vmin is not None else (finite.min() if finite.size else 0)
        hi = vmax if vmax is not None else (finite.max() if finite.size else 1)
        # small values (a few % disagreement) need a third digit to differ at all
        digits = 3 if finite.size and np.abs(finite).max() < 0.1 else 2
        for i in range(n):
            for j in range(n):
                if np.isfinite(m[i, j]):
                    # dark text on the light end of viridis, light text on the dark end
                    light = (m[i, j] - lo) / ((hi - lo) or 1) > 0.6
                    # no leading zero: '.028' fits a cell of an 8 x 8 matrix at 9 pt, '0.028' does not
                    text = f'{m[i, j]:.{digits}f}'.replace('0.', '.', 1) if 0 <= m[i, j] < 1 else f'{m[i, j]:.2f}'
                    ax.text(j, i, text, ha='center', va='center', fontsize=9 if n <= 3 else 8,
                            color='black' if light else 'white')
                else:  # undefined, e.g. the members of a single-member source
                    ax.text(j, i, 'n/a', ha='center', va='center', fontsize=9, color='gray')
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label(cbar_label)
    ax.set_title(title)


def _grid(n: int, panel_h: float, max_cols: int = 2):
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig = _figure(_WIDTH, panel_h * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _plot_disagreement(path: Path, per_source: dict[str, dict], between: dict | None) -> bool:
    if between is not None:
        n = len(between['member_labels'])
        # wider than the other plots: two square panels side by side, the small one with readable cell labels
        fig = _figure(_WIDTH + 1.5, 5.0 if n > 6 else 4.0)
        ax1, ax2 = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1.6, 1]))
        _heatmap(fig, ax1, between['disagreement'], 'Member disagreement (all sources)', 'fraction of inputs',
                 labels=between['member_labels'], major=between['offsets'][1:-1], vmin=0)
        blocks = np.array([[np.nan if v is None else v for v in row] for row in between['block_mean']])
        _heatmap(fig, ax2, blocks, 'Mean disagreement\nbetween sources\n(diagonal: within)', 'fraction of inputs',
                 labels=between['labels'], vmin=0, annotate=True)
        ax1.set_xlabel('member')
        ax1.set_ylabel('member')
        _save(fig, path)
        return True
    items = [(label, s) for label, s in per_source.items() if s['num_members'] >= 2]
    if not items:
        return False
    fig, axes = _grid(len(items), 3.6)
    vmax = max(float(np.nanmax(np.asarray(s['disagreement'], dtype=float))) for _, s in items)
    for ax, (label, s) in zip(axes, items):
        _heatmap(fig, ax, s['disagreement'], f'{label}: member disagreement', 'fraction of inputs',
                 labels=[f'{label}:m{m}' for m in range(s['num_members'])], vmin=0, vmax=vmax or None)
        ax.set_xlabel('member')
        ax.set_ylabel('member')
    _save(fig, path)
    return True


def _plot_per_source_matrix(path: Path, per_source: dict[str, dict], key: str, title: str, cbar: str,
                            cmap: str) -> bool:
    items = [(label, s) for label, s in per_source.items() if s.get(key) is not None]
    if not items:
        return False
    fig, axes = _grid(len(items), 3.6)
    # one colour scale for every panel, so that sources compare by colour too
    values = np.concatenate([np.asarray(s[key], dtype=float).ravel() for _, s in items])
    vmin, vmax = float(np.nanmin(values)), float(np.nanmax(values))
    for ax, (label, s) in zip(axes, items):
        _heatmap(fig, ax, s[key], f'{label}: {title}', cbar, labels=[f'{label}:m{m}' for m in range(s['num_members'])],
                 cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_xlabel('member')
        ax.set_ylabel('member')
    _save(fig, path)
    return True


def _plot_weight_cosine(path: Path, per_source: dict[str, dict], between: dict | None) -> bool:
    if between is not None and len(between['labels']) > 1:
        fig = _figure(_WIDTH, 6.0 if len(between['member_labels']) > 6 else 4.8)
        ax = fig.subplots()
        _heatmap(fig, ax, between['cosine'], 'Weight cosine similarity (all sources)', 'cosine similarity',
                 labels=between['member_labels'], major=between['offsets'][1:-1], cmap='magma')
        ax.set_xlabel('member')
        ax.set_ylabel('member')
        _save(fig, path)
        return True
    return _plot_per_source_matrix(path, per_source, 'weight_cosine', 'weight cosine', 'cosine similarity', 'magma')


def _plot_ensemble_size(path: Path, per_source: dict[str, dict]) -> bool:
    fig = _figure(_WIDTH, 3.4)
    ax1, ax2 = fig.subplots(1, 2)
    max_k = 1
    for label, s in per_source.items():
        curve = s['ensemble_size']
        k = [c['k'] for c in curve]
        max_k = max(max_k, max(k))
        ax1.errorbar(k, [c['acc_mean'] for c in curve], yerr=[c['acc_std'] for c in curve], marker='o', capsize=3,
                     label=label)
        ax2.errorbar(k, [c['brier_mean'] for c in curve], yerr=[c['brier_std'] for c in curve], marker='o',
                     capsize=3, label=label)
    for ax, ylabel, title in ((ax1, 'accuracy (%)', 'Accuracy vs ensemble size'),
                              (ax2, 'Brier score', 'Brier score vs ensemble size')):
        ax.set_xlabel('ensemble size k (members)')
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_xticks(range(1, max_k + 1))
        ax.grid(alpha=0.3)
    ax1.legend()
    _save(fig, path)
    return True


def _plot_reliability(path: Path, per_source: dict[str, dict]) -> bool:
    items = list(per_source.items())
    fig, axes = _grid(len(items), 3.3)
    for i, (ax, (label, s)) in enumerate(zip(axes, items)):
        rel = s['reliability']
        edges = np.asarray(rel['bin_edges'], dtype=float)
        acc = np.asarray(rel['accuracy'], dtype=float)
        if np.nanmax(acc, initial=0) > 1.0 + 1e-6:  # accuracy per bin in percent: plot as a fraction
            acc = acc / 100
        centres, widths = (edges[1:] + edges[:-1]) / 2, np.diff(edges)
        ax.bar(centres, np.nan_to_num(acc), width=widths, edgecolor='black', lw=0.5, alpha=0.85,
               label='accuracy in bin')
        ax.plot([0, 1], [0, 1], '--', color='black', label='perfect calibration')
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel('confidence (top mean probability)')
        ax.set_ylabel('accuracy in bin')
        what = 'ensemble' if s['num_members'] > 1 else 'model'
        ax.set_title(f"{label}: {what} (ECE {s['calibration']['ece']:.3f})")
        if i == 0:  # one legend: on every panel it would hide the bars
            ax.legend(loc='upper left', framealpha=0.9)
    _save(fig, path)
    return True


def _trajectory_axes(pts: list[dict]) -> tuple[list[int], list[int], list[tuple[str, float]]]:
    major, minor, groups = [], [], []
    start = 0
    for i in range(1, len(pts) + 1):
        if i == len(pts) or (pts[i]['source'], pts[i]['member']) != (pts[i - 1]['source'], pts[i - 1]['member']):
            groups.append((f"{pts[start]['source']}:m{pts[start]['member']}", (start + i - 1) / 2))
            if i < len(pts):
                (major if pts[i]['source'] != pts[i - 1]['source'] else minor).append(i)
            start = i
    return major, minor, groups


def _plot_trajectory_matrix(path: Path, traj: dict, key: str, points: str, title: str, cbar: str, cmap: str,
                            **kw) -> bool:
    if traj.get(key) is None:
        return False
    major, minor, groups = _trajectory_axes(traj[points])
    fig = _figure(_WIDTH, 6.0)
    ax = fig.subplots()
    _heatmap(fig, ax, traj[key], title, cbar, groups=groups, major=major, minor=minor, cmap=cmap, annotate=False,
             **kw)
    ax.set_xlabel('snapshot (member trajectory, epochs in order)')
    ax.set_ylabel('snapshot (member trajectory, epochs in order)')
    _save(fig, path)
    return True


def _plot_tsne(path: Path, traj: dict) -> bool:
    if traj.get('tsne') is None:
        return False
    Line2D = require('matplotlib.lines', "the report's plots (--no-plots skips them)").Line2D
    xy = np.asarray(traj['tsne'])
    pts = traj['points']
    sources = list(dict.fromkeys(p['source'] for p in pts))
    colours = {s: f'C{i % 10}' for i, s in enumerate(sources)}
    fig = _figure(_WIDTH, 5.6)
    ax = fig.subplots()
    trajectories: dict[tuple[str, int], list[int]] = {}
    for i, p in enumerate(pts):
        trajectories.setdefault((p['source'], p['member']), []).append(i)
    for (source, member), idx in trajectories.items():
        c = colours[source]
        ax.plot(xy[idx, 0], xy[idx, 1], '-', color=c, lw=1.2, alpha=0.8)
        ax.plot(xy[idx, 0], xy[idx, 1], 'o', color=c, ms=3)
        ax.plot(xy[idx[0], 0], xy[idx[0], 1], 'o', mfc='white', mec=c, ms=7)
        ax.plot(xy[idx[-1], 0], xy[idx[-1], 1], '*', color=c, mec='black', mew=0.5, ms=13)
        ax.annotate(f'm{member}', xy[idx[-1]], textcoords='offset points', xytext=(5, 5), fontsize=9, color=c)
    handles = [Line2D([], [], color=colours[s], lw=2, label=s) for s in sources]
    handles += [Line2D([], [], ls='', marker='o', mfc='white', mec='gray', ms=7, label='first epoch'),
                Line2D([], [], ls='', marker='*', color='gray', mec='black', ms=12, label='last epoch')]
    ax.legend(handles=handles, loc='best')
    ax.set_xlabel('t-SNE 1')
    ax.set_ylabel('t-SNE 2')
    ax.set_title(f"t-SNE of prediction trajectories (softmax on {traj['num_samples']} held-out images)")
    _save(fig, path)
    return True


def _write_plots(out_dir: Path, report: dict[str, Any]) -> dict[str, str]:
    """Every plot that applies; returns {name: file name} of those written."""
    rc_context = require('matplotlib', "the report's plots (--no-plots skips them)").rc_context

    per_source, between, traj = report['sources'], report.get('between'), report.get('trajectories')
    written = {}
    jobs = [
        ('disagreement', lambda p: _plot_disagreement(p, per_source, between)),
        ('weight_cosine', lambda p: _plot_weight_cosine(p, per_source, report.get('between_weights'))),
        ('feature_distance', lambda p: _plot_per_source_matrix(
            p, per_source, 'feature_distance', 'feature distance', 'mean feature distance', 'viridis')),
        ('ensemble_size', lambda p: _plot_ensemble_size(p, per_source)),
        ('reliability', lambda p: _plot_reliability(p, per_source)),
    ]
    if traj is not None:
        jobs += [
            ('trajectory_disagreement', lambda p: _plot_trajectory_matrix(
                p, traj, 'disagreement', 'points', 'Disagreement between snapshots (Fort et al.)', 'fraction of inputs',
                'viridis', vmin=0)),
            ('trajectory_cosine', lambda p: _plot_trajectory_matrix(
                p, traj, 'weight_cosine', 'weight_points', 'Weight cosine between snapshots (Fort et al.)',
                'cosine similarity', 'magma')),
            ('tsne', lambda p: _plot_tsne(p, traj)),
        ]
    with rc_context(_FONT):
        for name, job in jobs:
            path = out_dir / f'{name}.png'
            if job(path):
                written[name] = path.name
    return written


# ---------------------------------------------------------------------------------------------------------------
# summary


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _fmt(value: Any, digits: int = 2) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def _key_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"dataset {report['dataset']} ({report['val_split']}), {report['num_samples']} images"]
    for label, s in report['sources'].items():
        lines.append(
            f"{label}: ensemble acc {s['ensemble_acc']:.2f} | member acc mean {s['member_acc_mean']:.2f} ("
            + ' '.join(f'{a:.2f}' for a in s['member_acc']) + ')'
            + f" | disagreement {_fmt(s['disagreement_mean'], 4)} | feature distance"
            f" {_fmt(s['feature_distance_mean'], 4)} | weight cosine {_fmt(s['weight_cosine_mean'], 4)}"
            f" | ECE {s['calibration']['ece']:.4f} | NLL {s['calibration']['nll']:.4f}"
            f" | Brier {s['calibration']['brier']:.4f}")
    between = report.get('between')
    if between is not None:
        labels = between['labels']
        pairs = [f'{labels[i]} vs {labels[j]} {_fmt(between["block_mean"][i][j], 4)}'
                 for i in range(len(labels)) for j in range(i + 1, len(labels))]
        lines.append('between sources (mean member disagreement): ' + ', '.join(pairs))
    traj = report.get('trajectories')
    if traj is not None:
        for key, what in (('disagreement_stats', 'disagreement'), ('weight_cosine_stats', 'weight cosine')):
            st = traj.get(key)
            if st is None:
                continue
            lines.append(
                f"trajectories, {what}: within a member's trajectory {_fmt(st['within_consecutive'], 4)}"
                f" (consecutive epochs), {_fmt(st['within_last_consecutive'], 4)} (last two epochs),"
                f" {_fmt(st['within_all'], 4)} (all epoch pairs) | between members at the same epoch"
                f" {_fmt(st['between_same_epoch'], 4)} (all epochs), {_fmt(st['between_last_epoch'], 4)}"
                f" (epoch {st['last_epoch']})")
    return lines


def _markdown(report: dict[str, Any], files: dict[str, str]) -> str:
    md = ['# Ensemble analysis', '',
          f"Dataset `{report['dataset']}`, split `{report['val_split']}`: {report['num_samples']} images,"
          f" {report['num_classes']} classes. Ensemble = mean of the member probabilities; accuracies in %,"
          f' disagreement = fraction of images on which two members\' predicted classes differ;'
          f" ECE with {report['n_bins']} bins; weights {'with' if report['include_buffers'] else 'without'}"
          f' BatchNorm buffers.', '',
          '| source | model | M | ensemble acc | own rule acc | member acc (mean) | disagreement | feature dist |'
          ' weight cos | NLL | Brier | ECE |',
          '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for label, s in report['sources'].items():
        c = s['calibration']
        md.append(f"| {label} | {s['model']} | {s['num_members']} | {s['ensemble_acc']:.2f} |"
                  f" {_fmt(s['model_acc'])} | {s['member_acc_mean']:.2f} | {_fmt(s['disagreement_mean'], 4)} |"
                  f" {_fmt(s['feature_distance_mean'], 4)} | {_fmt(s['weight_cosine_mean'], 4)} |"
                  f" {c['nll']:.4f} | {c['brier']:.4f} | {c['ece']:.4f} |")
    md += ['', 'Members (acc / NLL / Brier / ECE): ' + '; '.join(
        f'{label}:m{m} {a:.2f} / {c["nll"]:.3f} / {c["brier"]:.3f} / {c["ece"]:.3f}'
        for label, s in report['sources'].items()
        for m, (a, c) in enumerate(zip(s['member_acc'], s['member_calibration']))) + '.']
    sizes = '; '.join(f"{label}: " + ', '.join(f"k={c['k']} {c['acc_mean']:.2f}" for c in s['ensemble_size'])
                      for label, s in report['sources'].items())
    md += ['', f'Accuracy vs ensemble size (mean over k-subsets): {sizes}.']
    between = report.get('between')
    if between is not None:
        labels = between['labels']
        md += ['', '## Between sources', '',
               'Mean disagreement between the members of two sources (diagonal: between members of one source);'
               ' last column: how often the ensemble prediction (mean probabilities) of each source differs from'
               ' the first source\'s.', '',
               '| | ' + ' | '.join(labels) + ' | ensembles vs ' + labels[0] + ' |',
               '|---' * (len(labels) + 2) + '|']
        for i, label in enumerate(labels):
            md.append(f'| {label} | ' + ' | '.join(_fmt(v, 4) for v in between['block_mean'][i])
                      + f" | {float(between['ensemble_disagreement'][i][0]):.4f} |")
    traj = report.get('trajectories')
    if traj is not None:
        md += ['', '## Trajectories (Fort et al.)', '',
               f"Snapshots of {len(traj['epochs'])} run(s) on the same {traj['num_samples']} held-out images"
               f" (epochs: {'; '.join(f'{k} {v}' for k, v in traj['epochs'].items())}). Within: snapshots of one"
               ' member at different epochs; between: different members (or runs) at the same epoch.', '',
               '| | within, consecutive epochs | within, last two epochs | within, all epoch pairs |'
               ' between, same epoch | between, last epoch | between members of a run | between runs |',
               '|---|---|---|---|---|---|---|---|']
        for key, what in (('disagreement_stats', 'disagreement'), ('weight_cosine_stats', 'weight cosine')):
            st = traj.get(key)
            if st is not None:
                md.append(f"| {what} | {_fmt(st['within_consecutive'], 4)} |"
                          f" {_fmt(st['within_last_consecutive'], 4)} | {_fmt(st['within_all'], 4)} |"
                          f" {_fmt(st['between_same_epoch'], 4)} | {_fmt(st['between_last_epoch'], 4)} |"
                          f" {_fmt(st['between_members_same_source'], 4)} | {_fmt(st['between_sources'], 4)} |")
    notes = report['notes'] + [f'{label}: {n}' for label, s in report['sources'].items() for n in s['notes']]
    if traj is not None:
        notes += traj['notes']
    if notes:
        md += ['', 'Notes: ' + '; '.join(notes) + '.']
    if files:
        md += ['', '## Plots', ''] + [f'![{name}]({f})' for name, f in files.items()]
    return '\n'.join(md) + '\n'


# ---------------------------------------------------------------------------------------------------------------
# entry points


def analyze_runs(
        sources: list[str],
        dataset: str | None = None,
        out_dir: str | Path = 'output/analysis',
        labels: list[str] | None = None,
        data_dir: str | None = None,
        val_split: str | None = None,
        val_subset: int | None = None,
        img_size: int | None = None,
        in_chans: int | None = None,
        crop_pct: float | None = None,
        batch_size: int = 128,
        workers: int = 0,
        device: str | None = None,
        n_bins: int = 15,
        max_subsets: int | None = None,
        feature_taps: str | None = 'stages',
        include_buffers: bool = False,
        snapshot_epochs: list[int] | None = None,
        allow_missing_snapshots: bool = False,
        seed: int = 0,
        plots: bool = True,
        verbose: bool = True,
) -> dict[str, Any]:
    """Evaluate the sources, compare them and their trajectories, write the report.

    Args:
        sources: ``train.py`` output folders, ``local-dir:<folder>`` or ``hf-hub:<repo>`` names.
        dataset: Dataset name as for ``train.py --dataset``; None: the one every source's run recorded.
        out_dir: Output folder (created).
        labels: A name per source for plots and tables; default the folder (or repo) name.
        data_dir: Root folder for timm dataset names.
        val_split: Split to evaluate on; None: the runs' own ``--val-split`` when they agree, else 'validation'.
        val_subset: Evaluate on a fixed stratified subset of this many images (as ``train.py --val-subset``).
        img_size: Input size of sources without a ``train.py`` args.yaml (Hub models); default their saved data
            config. A run is always evaluated with its own flags and saved config.
        in_chans: Input channels, likewise.
        crop_pct: Evaluation centre-crop fraction, likewise.
        batch_size: Evaluation batch size.
        workers: Data loader processes.
        device: Torch device; default CUDA when available.
        n_bins: Confidence bins of the ECE and reliability diagram.
        max_subsets: At most this many random k-subsets per ensemble size (None: all of them).
        feature_taps: Features of the feature-distance matrix, as ``forward_members_with_features`` takes them
            ('stages' or 'convs'); None to skip it.
        include_buffers: Include BatchNorm buffers in the weight vectors.
        snapshot_epochs: Epochs of the snapshots to compare; None: every snapshot each run wrote. When given, every
            source must have snapshots.
        allow_missing_snapshots: Skip requested snapshot epochs a run did not write instead of failing.
        seed: Seed of the subset sampling and the t-SNE.
        plots: Write the PNG plots.
        verbose: Print the key numbers.

    Returns:
        The report (what ``summary.json`` holds): ``sources`` (numbers per label), ``between`` (2+ sources),
        ``between_weights``, ``trajectories`` (sources with snapshots), ``files`` and ``notes``.

    Raises:
        AnalysisError: A source that cannot be read, sources of other datasets or class counts (the message names
            each source's dataset and class count), unreadable or missing snapshots, snapshots of different subsets.
        MissingExtraError: The analysis extra is not installed (``pip install 'timm-ensembles[analysis]'``).
    """
    if not sources:
        raise AnalysisError('No source given: pass train.py output folders or hf-hub: names.')
    # before minutes of evaluation: the packages of the analysis extra
    require('torchmetrics', 'the calibration error of the report')
    if plots:
        require('matplotlib', "the report's plots (--no-plots skips them)")
    if labels is not None and len(labels) != len(sources):
        raise AnalysisError(f'{len(labels)} labels for {len(sources)} sources: give one label per source.')
    srcs = [_resolve_source(spec, labels[i] if labels else None) for i, spec in enumerate(sources)]
    for s, label in zip(srcs, _unique_labels([s.label for s in srcs])):
        s.label = label

    # the dataset: given, or the one the runs recorded (all of them the same)
    if dataset is None:
        recorded = {s.dataset for s in srcs if s.dataset is not None}
        if len(recorded) != 1:
            raise AnalysisError(
                'Pass --dataset: the sources record ' + ('no dataset' if not recorded else 'different datasets')
                + f' ({_describe(srcs)}).')
        dataset = recorded.pop()
        data_dir = data_dir or next((s.args.get('data_dir') for s in srcs if s.args.get('data_dir')), None)
    if val_split is None:
        splits = {s.args.get('val_split') for s in srcs if s.args.get('val_split')}
        val_split = splits.pop() if len(splits) == 1 else 'validation'
    canonical = _canonical_dataset(dataset, data_dir)
    _check_datasets(srcs, canonical)
    try:
        train_ds, val_ds, info = te_data.create_datasets(dataset, root=data_dir, val_split=val_split,
                                                         val_subset=val_subset)
    except (OSError, ValueError) as e:
        raise AnalysisError(f'Cannot create dataset {dataset!r}: {e}') from e
    if info.name != canonical:
        _check_datasets(srcs, info.name)

    dev = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    for s in srcs:
        try:
            s.model = create_model(s.model_name, pretrained=True)
        except Exception as e:  # noqa: BLE001  (any failure to load is reported with the source's name)
            raise AnalysisError(f'Cannot load source {s.label} ({s.spec}): {type(e).__name__}: {e}') from e
        s.num_classes = _num_classes(s.model)
    _check_classes(srcs, info.name, info.num_classes)
    # snapshots before the evaluation, which can take long: a run whose snapshots cannot be used fails first
    snaps, notes = _snapshot_sources(srcs, snapshot_epochs, allow_missing_snapshots, info.name,
                                     require=snapshot_epochs is not None)
    if snaps:
        _check_snapshots(snaps, {s.label: s for s in srcs}, srcs[0].num_classes)

    report: dict[str, Any] = dict(dataset=info.name, val_split=val_split, n_bins=n_bins,
                                  include_buffers=include_buffers, sources={}, notes=[])
    evals, weights = [], []
    for s in srcs:
        s.data_config = _data_config(s, img_size, in_chans, crop_pct)
        # create_loaders sets the val transform on val_ds: one source at a time, in order, nothing shuffled
        _, loader = te_data.create_loaders(train_ds, val_ds, s.data_config, batch_size=batch_size, workers=workers,
                                           train_transform=False)
        s.model.to(dev)
        try:
            check_input_size(s.model, s.data_config['input_size'], s.spec)
        except ValueError as e:
            raise AnalysisError(f'Cannot evaluate source {s.label}: {e} (--img-size / --in-chans apply to sources'
                                f' without a train.py args.yaml).') from e
        ev = _evaluate(s.model, loader, dev, feature_taps)
        if ev['logits'].shape[-1] != srcs[0].num_classes:
            raise AnalysisError(f'{s.label} predicts {ev["logits"].shape[-1]} classes: {_describe(srcs)}.')
        w, why = _weights(s.model.cpu(), include_buffers)
        numbers = _source_numbers(s, ev, w, n_bins, max_subsets, seed)
        for note in (ev['feature_note'], why):
            if note:
                numbers['notes'].append(note)
        if s.folder is None:
            numbers['notes'].append('a Hub source records no training dataset: only its class count was checked')
        report['sources'][s.label] = numbers
        evals.append(ev)
        weights.append(w)
        s.model = None  # free it: only the numbers are needed from here on
    labels_ = [s.label for s in srcs]
    report['num_samples'] = int(evals[0]['targets'].shape[0])
    report['num_classes'] = int(evals[0]['logits'].shape[-1])
    if len(srcs) > 1:
        report['between'] = _between_sources(labels_, evals)
        report['between_weights'] = _between_weights(labels_, weights)
        if report['between_weights'] is None:
            report['notes'].append('no weight cosine between sources: some have no member weights or their'
                                   ' weights differ in length (other architectures)')

    if snaps:
        report['trajectories'] = _trajectories(snaps, seed)
        report['trajectories']['notes'] = notes + report['trajectories']['notes']
    elif notes:
        report['notes'].append('no trajectories: ' + '; '.join(notes))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in PLOTS:  # a stale plot of an earlier report must not pass for one of this report
        (out / f'{name}.png').unlink(missing_ok=True)
    files = _write_plots(out, report) if plots else {}
    report['files'] = files
    tensors = {f'{label}.logits': ev['logits'].contiguous() for label, ev in zip(labels_, evals)}
    tensors['targets'] = evals[0]['targets'].contiguous()
    save_file(tensors, str(out / 'logits.safetensors'))
    report = _jsonable(report)
    (out / 'summary.md').write_text(_markdown(report, files))
    (out / 'summary.json').write_text(json.dumps(report, indent=1))
    if verbose:
        for line in _key_lines(report):
            print(line)
        print(f'report: {out / "summary.md"}')
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m timm_ensembles.analyze', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('sources', nargs='+', metavar='SOURCE',
                        help='train.py output folders, local-dir:<folder> or hf-hub:<repo> names')
    parser.add_argument('--labels', nargs='+', default=None, metavar='LABEL',
                        help='a name per source (default: the folder name)')
    parser.add_argument('--out', default='output/analysis', metavar='DIR',
                        help='output folder (default: output/analysis)')
    group = parser.add_argument_group('Data')
    group.add_argument('--dataset', default=None, metavar='NAME',
                       help="as train.py --dataset (digits, fashion-mnist, idx:<folder>, ...); default: the dataset"
                            ' the runs recorded')
    group.add_argument('--data-dir', default=None, metavar='DIR', help='root folder for timm dataset names')
    group.add_argument('--val-split', default=None, metavar='SPLIT',
                       help="split to evaluate on (default: the runs' own --val-split, else validation)")
    group.add_argument('--val-subset', type=int, default=None, metavar='N',
                       help='evaluate on a fixed subset of N images')
    group.add_argument('--img-size', type=int, default=None, metavar='PX',
                       help="input size of sources without a train.py args.yaml, e.g. Hub models (default: the"
                            " model's saved config); a run is evaluated with its own")
    group.add_argument('--in-chans', type=int, default=None, metavar='N', help='input channels, likewise')
    group.add_argument('--crop-pct', type=float, default=None, metavar='F',
                       help='evaluation centre-crop fraction, likewise')
    group.add_argument('--batch-size', type=int, default=128, metavar='N')
    group.add_argument('--workers', type=int, default=0, metavar='N', help='data loader processes')
    group.add_argument('--device', default=None, metavar='DEV',
                       help='torch device (default: cuda when available, else cpu)')
    group = parser.add_argument_group('Analysis')
    group.add_argument('--bins', type=int, default=15, metavar='N',
                       help='confidence bins of the ECE / reliability diagram')
    group.add_argument('--max-subsets', type=int, default=None, metavar='N',
                       help='at most N random k-subsets per ensemble size (default: all)')
    group.add_argument('--feature-taps', default='stages', choices=('stages', 'convs', 'none'),
                       help='features of the feature-distance matrix (default: stages; none to skip)')
    group.add_argument('--include-buffers', action='store_true', help='BatchNorm buffers in the weight vectors')
    group.add_argument('--snapshot-epochs', type=int, nargs='+', default=None, metavar='E',
                       help='snapshot epochs to compare (default: every epoch of each run); every source must'
                            ' have snapshots then')
    group.add_argument('--allow-missing-snapshots', action='store_true',
                       help='skip requested snapshot epochs that a run did not write')
    group.add_argument('--seed', type=int, default=0, metavar='N', help='seed of the subset sampling and the t-SNE')
    group.add_argument('--no-plots', action='store_true', help='numbers only')
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        analyze_runs(
            args.sources, dataset=args.dataset, out_dir=args.out, labels=args.labels, data_dir=args.data_dir,
            val_split=args.val_split, val_subset=args.val_subset, img_size=args.img_size, in_chans=args.in_chans,
            crop_pct=args.crop_pct, batch_size=args.batch_size, workers=args.workers, device=args.device,
            n_bins=args.bins, max_subsets=args.max_subsets,
            feature_taps=None if args.feature_taps == 'none' else args.feature_taps,
            include_buffers=args.include_buffers, snapshot_epochs=args.snapshot_epochs,
            allow_missing_snapshots=args.allow_missing_snapshots, seed=args.seed, plots=not args.no_plots)
    except (AnalysisError, MissingExtraError) as e:
        raise SystemExit(f'error: {e}') from None
    return 0


if __name__ == '__main__':
    sys.exit(main())
