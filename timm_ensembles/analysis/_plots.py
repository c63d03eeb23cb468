"""The report's figures (matplotlib, the [analysis] extra)."""
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.extras import require
from ..utils.progress import progress as progress_bar

# every plot the report can write, in the order of summary.md
PLOTS = ('disagreement', 'weight_cosine', 'feature_distance', 'ensemble_size', 'reliability', 'trajectory_disagreement',
         'trajectory_cosine', 'tsne', 'risk_coverage', 'shift', 'landscape', 'landscape_plane', 'samplers')
_DPI = 120
# about 7 inches at 120 dpi: the plots stay readable when shown ~700 px wide
_WIDTH = 7.0
_FONT = {'font.size': 10, 'axes.titlesize': 10, 'axes.labelsize': 10, 'xtick.labelsize': 9, 'ytick.labelsize': 9,
         'legend.fontsize': 9}


def _figure(width: float, height: float):
    Figure = require('matplotlib.figure', "the report's plots (--no-plots skips them)").Figure
    # a bare Figure renders with Agg and touches no pyplot state (no GUI backend, nothing global)
    # constrained layout: titles, tick labels and colour bars get their room (tight_layout leaves titles of
    # panels with colour bars clipped)
    fig = Figure(figsize=(width, height), dpi=_DPI, layout='constrained')
    fig.te_cell_labels = []  # the heatmaps' cell labels, written by _save once the layout gives the cells their size
    return fig


def _save(fig, path: Path) -> None:
    if fig.te_cell_labels:
        fig.draw_without_rendering()  # the layout, which gives the cells their size
    for cells in fig.te_cell_labels:
        _write_cell_labels(fig, *cells)
    fig.savefig(path, dpi=_DPI)


def _elide(text: str, max_chars: int) -> str:
    """``text``, its middle replaced by '…' when it is longer than ``max_chars`` (both ends tell runs apart)."""
    if len(text) <= max_chars:
        return text
    keep = max(max_chars - 1, 2)
    return text[:(keep + 1) // 2] + '…' + text[len(text) - keep // 2:]


def _panel_title(what: str, label: str, axes) -> str:
    """``label: what`` on one line where it fits the panel ``axes`` (one of ``_grid``'s), else ``what`` above the
    label, elided to the panel's width."""
    fig = axes.get_figure()
    cols = axes.get_subplotspec().get_gridspec().ncols
    # a title character is about 0.6 of the font size wide; a panel is the figure's width over the columns, less
    # the colour bar and the tick labels
    chars = int(0.75 * fig.get_figwidth() / cols * 72 / (0.6 * _FONT['axes.titlesize']))
    one_line = f'{label}: {what}'
    return one_line if len(one_line) <= chars else f'{what}\n{_elide(label, chars)}'


def _cell_text(value: float, digits: int) -> str:
    if not np.isfinite(value):
        return 'n/a'  # undefined, e.g. the members of a single-member source
    # no leading zero: '.028' fits a smaller cell than '0.028'
    return f'{value:.{digits}f}'.replace('0.', '.', 1) if 0 <= value < 1 else f'{value:.2f}'


def _write_cell_labels(fig, ax, m: np.ndarray, lo: float, hi: float, digits: int) -> None:
    """Every cell's value, at the largest font size up to 9 pt at which the longest label fits its cell; none below
    6 pt (cells too small to read a number in: the colour bar tells the values)."""
    n = m.shape[0]
    texts = [[_cell_text(v, digits) for v in row] for row in m]
    box = ax.get_window_extent()  # the axes after the layout, in pixels; the square image fits inside it
    cell = min(box.width, box.height) / n * 72 / fig.dpi  # points
    longest = max(len(t) for row in texts for t in row)
    # a digit is about 0.62 of the font size wide; keep a margin of a fifth of the cell
    size = min(9.0, 0.8 * cell / (0.62 * longest), 0.6 * cell)
    if size < 6:
        return
    for i in range(n):
        for j in range(n):
            if np.isfinite(m[i, j]):
                # dark text on the light end of the colour map, light text on the dark end
                light = (m[i, j] - lo) / ((hi - lo) or 1) > 0.6
                colour = 'black' if light else 'white'
            else:
                colour = 'gray'
            ax.text(j, i, texts[i][j], ha='center', va='center', fontsize=size, color=colour, in_layout=False)


def _heatmap(fig, ax, matrix, title: str, cbar_label: str, labels: list[str] | None = None,
             major: list[int] | None = None, minor: list[int] | None = None, groups: list[tuple[str, float]] | None
             = None, vmin=None, vmax=None, cmap: str = 'viridis', annotate: bool | None = None) -> None:
    """A labelled heatmap: ``labels`` per row, or ``groups`` (label, centre) for long matrices; ``major`` /
    ``minor`` are the first indices of blocks, drawn as boundary lines. Its cells are labelled with their values
    (``annotate``; default up to 8 x 8) where the cells are large enough once the figure is laid out (``_save``)."""
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
        fig.te_cell_labels.append((ax, m, lo, hi, digits))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label(cbar_label)
    ax.set_title(title)


def _grid(n: int, panel_h: float, max_cols: int = 2, square: bool = False):
    """Panels side by side, ``max_cols`` to a row; ``square`` ones (heatmaps with their colour bar) in a figure only
    as wide as they need."""
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    width = min(_WIDTH, cols * (panel_h + 1.5)) if square else _WIDTH
    fig = _figure(width, panel_h * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _member_labels(s: dict) -> list[str]:
    # a panel of one source: its name is in the title
    return [f'm{m}' for m in range(s['num_members'])]


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
    fig, axes = _grid(len(items), 3.6, square=True)
    vmax = max(float(np.nanmax(np.asarray(s['disagreement'], dtype=float))) for _, s in items)
    for ax, (label, s) in zip(axes, items):
        _heatmap(fig, ax, s['disagreement'], _panel_title('member disagreement', label, ax),
                 'fraction of inputs', labels=_member_labels(s), vmin=0, vmax=vmax or None)
        ax.set_xlabel('member')
        ax.set_ylabel('member')
    _save(fig, path)
    return True


def _plot_per_source_matrix(path: Path, per_source: dict[str, dict], key: str, title: str, cbar: str,
                            cmap: str) -> bool:
    items = [(label, s) for label, s in per_source.items() if s.get(key) is not None]
    if not items:
        return False
    fig, axes = _grid(len(items), 3.6, square=True)
    # one colour scale for every panel, so that sources compare by colour too
    values = np.concatenate([np.asarray(s[key], dtype=float).ravel() for _, s in items])
    vmin, vmax = float(np.nanmin(values)), float(np.nanmax(values))
    for ax, (label, s) in zip(axes, items):
        _heatmap(fig, ax, s[key], _panel_title(title, label, ax), cbar, labels=_member_labels(s),
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
        ax.set_title(_panel_title(f"{what} (ECE {s['calibration']['ece']:.3f})", label, ax))
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


def _plot_risk_coverage(path: Path, unc: dict) -> bool:
    items = list(unc['sources'].items())
    if not items:
        return False
    fig = _figure(_WIDTH, 3.8)
    ax = fig.subplots()
    for i, (label, u) in enumerate(items):
        colour = f'C{i % 10}'
        rc = u['risk_coverage']
        what = 'ensemble' if u['num_members'] > 1 else 'model'
        ax.plot(rc['coverage'], 100 * np.asarray(rc['risk'], dtype=float), color=colour,
                label=f"{label} {what} (AURC {u['aurc']:.4f})")
        if u['num_members'] > 1:
            rc0 = u['risk_coverage_member0']
            ax.plot(rc0['coverage'], 100 * np.asarray(rc0['risk'], dtype=float), '--', color=colour,
                    label=f"{label}:m0 (AURC {u['aurc_member0']:.4f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel('coverage (fraction of images kept, most confident first)')
    ax.set_ylabel('risk: error on the kept images (%)')
    ax.set_title('Risk-coverage curves (selective classification; lower is better)')
    ax.grid(alpha=0.3)
    ax.legend(loc='best')
    _save(fig, path)
    return True


def _plot_shift(path: Path, sh: dict) -> bool:
    Patch = require('matplotlib.patches', "the report's plots (--no-plots skips them)").Patch
    series = []  # (name, numbers, colour, filled)
    for i, (label, e) in enumerate(sh['sources'].items()):
        colour = f'C{i % 10}'
        series.append((f'{label} ensemble' if e['member0'] is not None else label, e['ensemble'], colour, True))
        if e['member0'] is not None:
            series.append((f'{label}:m0', e['member0'], colour, False))
    if not series:
        return False
    levels, corruptions = sh['severities'], sh['corruptions']
    fig = _figure(_WIDTH, 3.8)
    axes = fig.subplots(1, 2)
    width = 0.8 / len(series)
    for ax, key, ylabel in ((axes[0], 'accuracy', 'accuracy (%)'), (axes[1], 'ece', 'ECE')):
        for k, (_, numbers, colour, filled) in enumerate(series):
            # one box per severity over the corruptions (the clean set, severity 0, is one value)
            data = [[numbers[key][c][i] for c in corruptions] for i in range(len(levels))]
            pos = np.arange(len(levels)) + (k - (len(series) - 1) / 2) * width
            boxes = ax.boxplot(data, positions=pos, widths=width * 0.85, patch_artist=True, manage_ticks=False,
                               showfliers=False)
            for box in boxes['boxes']:
                box.set(facecolor=colour if filled else 'white', edgecolor=colour, alpha=0.8 if filled else 1.0)
            for part in ('whiskers', 'caps', 'medians'):
                for line in boxes[part]:
                    line.set(color='black' if filled and part == 'medians' else colour)
        ax.set_xticks(range(len(levels)), [str(v) for v in levels])
        ax.set_xlabel('shift intensity (0: clean)')
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis='y')
    axes[0].set_title('Accuracy under dataset shift')
    axes[1].set_title('ECE under dataset shift')
    handles = [Patch(facecolor=colour if filled else 'white', edgecolor=colour, label=name)
               for name, _, colour, filled in series]
    axes[0].legend(handles=handles, loc='lower left')
    _save(fig, path)
    return True


def _plot_landscape(path: Path, ls: dict) -> bool:
    if not ls['pairs']:
        return False
    fig = _figure(_WIDTH, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    for i, pair in enumerate(ls['pairs']):
        label = f"{pair['a']} -> {pair['b']}"
        ax1.plot(pair['t'], pair['loss'], 'o-', ms=3, color=f'C{i % 10}', label=label)
        ax2.plot(pair['t'], pair['accuracy'], 'o-', ms=3, color=f'C{i % 10}', label=label)
    for ax, ylabel, title in ((ax1, 'validation loss', 'Loss along the line'),
                              (ax2, 'validation accuracy (%)', 'Accuracy along the line')):
        ax.set_xlabel('t (weights (1 - t) a + t b)')
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.legend(loc='best')
    _save(fig, path)
    return True


def _plot_landscape_plane(path: Path, ls: dict) -> bool:
    pl = ls.get('plane')
    if pl is None:
        return False
    x, y = np.asarray(pl['x'], dtype=float), np.asarray(pl['y'], dtype=float)
    fig = _figure(_WIDTH, 3.6)
    axes = fig.subplots(1, 2)
    for ax, key, title, cmap in ((axes[0], 'loss', 'validation loss', 'viridis'),
                                 (axes[1], 'accuracy', 'validation accuracy (%)', 'magma')):
        grid = np.asarray(pl[key], dtype=float)
        filled = ax.contourf(x, y, grid, levels=20, cmap=cmap)
        fig.colorbar(filled, ax=ax, fraction=0.046, pad=0.04)
        for name, marker in (('a', 'o'), ('b', 's'), ('c', '^')):
            px, py = pl['points'][name]
            ax.plot(px, py, marker, color='white', mec='black', ms=8)
            # labels towards the middle of the plot, where they stay inside it
            right = px > (x[0] + x[-1]) / 2
            ax.annotate(pl[name], (px, py), textcoords='offset points', xytext=(-6 if right else 6, 6), fontsize=8,
                        color='white', ha='right' if right else 'left')
        ax.set_title(f'Plane: {title}')
        ax.set_xlabel('weight distance along a -> b')
        ax.set_ylabel('weight distance, orthogonal')
    _save(fig, path)
    return True


def _plot_samplers(path: Path, sm: dict) -> bool:
    items = [(label, e) for label, e in sm['sources'].items() if e['samplers'] or e['independent']]
    if not items:
        return False
    fig, axes = _grid(len(items), 3.6)
    markers = {'random': 'o', 'dropout': 's', 'diag': '^', 'lowrank': 'D'}
    for ax, (label, e) in zip(axes, items):
        for i, (name, numbers) in enumerate(e['samplers'].items()):
            xs, ys = _finite_points(numbers['plane'])
            ax.plot(xs, ys, markers.get(name, 'o'), color=f'C{i % 10}', ms=5, alpha=0.8,
                    label=f"{name} (ens. {numbers['ensemble_acc']:.1f}%)")
        if e['independent'] is not None:
            xs, ys = _finite_points(e['independent']['plane'])
            ax.plot(xs, ys, '*', color='black', ms=11,
                    label=f"independent (ens. {e['independent']['ensemble_acc']:.1f}%)")
        ax.set_xlabel('normalised disagreement with m0')
        ax.set_ylabel('accuracy (%)')
        ax.set_title(_panel_title(f"networks around {e['reference']}", label, ax))
        ax.grid(alpha=0.3)
        ax.legend(loc='best')
    _save(fig, path)
    return True


def _finite_points(plane: dict) -> tuple[list[float], list[float]]:
    pts = [(x, y) for x, y in zip(plane['normalized_disagreement'], plane['accuracy'])
           if x is not None and y is not None and math.isfinite(x)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _write_plots(out_dir: Path, report: dict[str, Any], progress: bool = False) -> dict[str, str]:
    """Every plot that applies (with ``progress``, a progress bar over them); returns {name: file name} of those
    written."""
    rc_context = require('matplotlib', "the report's plots (--no-plots skips them)").rc_context

    per_source, between, traj = report['sources'], report.get('between'), report.get('trajectories')
    written = {}
    jobs = []
    if 'members' in report['sections']:
        jobs += [
            ('disagreement', lambda p: _plot_disagreement(p, per_source, between)),
            ('weight_cosine', lambda p: _plot_weight_cosine(p, per_source, report.get('between_weights'))),
            ('feature_distance', lambda p: _plot_per_source_matrix(
                p, per_source, 'feature_distance', 'feature distance', 'mean feature distance', 'viridis')),
            ('ensemble_size', lambda p: _plot_ensemble_size(p, per_source)),
            ('reliability', lambda p: _plot_reliability(p, per_source)),
        ]
    elif between is not None:  # the between-source matrices alone (no per-source matrix to fall back on)
        jobs += [
            ('disagreement', lambda p: _plot_disagreement(p, per_source, between)),
            ('weight_cosine', lambda p: _plot_weight_cosine(p, per_source, report.get('between_weights'))),
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
    for name, key, plot in (('risk_coverage', 'uncertainty', _plot_risk_coverage), ('shift', 'shift', _plot_shift),
                            ('landscape', 'landscape', _plot_landscape),
                            ('landscape_plane', 'landscape', _plot_landscape_plane),
                            ('samplers', 'samplers', _plot_samplers)):
        if report.get(key) is not None:
            jobs.append((name, lambda p, plot=plot, key=key: plot(p, report[key])))
    with rc_context(_FONT):
        for name, job in progress_bar(jobs, desc='plots', enabled=progress, unit='plot'):
            path = out_dir / f'{name}.png'
            if job(path):
                written[name] = path.name
    return written
