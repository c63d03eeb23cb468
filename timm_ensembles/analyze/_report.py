"""The report's text: summary.md and the key lines printed, and summary.json's values."""
import math
from typing import Any

import numpy as np
import torch


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


