"""The report's figures (matplotlib, the [analysis] extra)."""
import math
from pathlib import Path
from typing import Any

import numpy as np

from .._extras import require

# every plot the report can write, in the order of summary.md
PLOTS = ('disagreement', 'weight_cosine', 'feature_distance', 'ensemble_size', 'reliability', 'trajectory_disagreement',
         'trajectory_cosine', 'tsne')
_DPI = 120
# about 7 inches at 120 dpi: the plots stay readable when shown ~700 px wide
_WIDTH = 7.0
_FONT = {'font.size': 10, 'axes.titlesize': 10, 'axes.labelsize': 10, 'xtick.labelsize': 9, 'ytick.labelsize': 9,
         'legend.fontsize': 9}


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


