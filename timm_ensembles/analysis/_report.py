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
            f"{label}: averaged probabilities acc {s['ensemble_acc']:.2f}, the model's own rule ({s['model_rule']})"
            f" {_fmt(s['model_acc'])} | member acc mean {s['member_acc_mean']:.2f} ("
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
    return lines + _section_key_lines(report)


def _section_key_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    unc = report.get('uncertainty')
    if unc is not None:
        for label, u in unc['sources'].items():
            temp = u['temperature']
            lines.append(
                f"uncertainty, {label}: entropy {u['entropy']:.4f} = expected entropy {u['expected_entropy']:.4f} +"
                f" mutual information {u['mutual_information']:.4f} (nats) | AURC {u['aurc']:.4f}"
                + (f" (m0 {u['aurc_member0']:.4f})" if u['num_members'] > 1 else '')
                + (f" | temperature {temp['temperature']:.3f}: NLL {temp['before']['nll']:.4f} ->"
                   f" {temp['after']['nll']:.4f}, ECE {temp['before']['ece']:.4f} -> {temp['after']['ece']:.4f}"
                   ' (held-out half)' if temp else ''))
    ood = report.get('ood')
    if ood is not None:
        for label, o in ood['sources'].items():
            scores = o['scores']
            best = max(scores, key=lambda k: scores[k]['auroc'])
            lines.append(f"OOD ({ood['dataset']}), {label}: AUROC " + ', '.join(
                f"{k} {v['auroc']:.4f}" for k, v in scores.items()) + f" (best {best}; FPR95"
                f" {scores[best]['fpr95']:.4f})"
                + (f" | m0 AUROC max prob {o['member0']['neg_max_prob']['auroc']:.4f}" if o['member0'] else ''))
    sh = report.get('shift')
    if sh is not None:
        top = sh['severities'][-1]
        for label, e in sh['sources'].items():
            ens = e['ensemble']
            line = (f"shift, {label}: accuracy clean {ens['accuracy_mean'][0]:.2f} -> {ens['accuracy_mean'][-1]:.2f}"
                    f" at severity {top} (mean of {len(sh['corruptions'])} corruptions), ECE"
                    f" {ens['ece_mean'][0]:.4f} -> {ens['ece_mean'][-1]:.4f}")
            if e['member0'] is not None:
                m0 = e['member0']
                line += (f" | m0 accuracy {m0['accuracy_mean'][0]:.2f} -> {m0['accuracy_mean'][-1]:.2f}, ECE"
                         f" {m0['ece_mean'][0]:.4f} -> {m0['ece_mean'][-1]:.4f}")
            lines.append(line)
    ls = report.get('landscape')
    if ls is not None:
        for pair in ls['pairs']:
            lines.append(f"landscape, {pair['a']} -> {pair['b']}: loss barrier {_fmt(pair['barrier_loss'], 4)} (t"
                         f" {_fmt(pair['barrier_loss_t'])}), error barrier {_fmt(pair['barrier_error'])} points,"
                         f" weight distance {pair['distance']:.4g}")
    sm = report.get('samplers')
    if sm is not None:
        for label, e in sm['sources'].items():
            parts = [f"{name} {v['ensemble_acc']:.2f}" for name, v in e['samplers'].items()]
            ind = e['independent']
            lines.append(f"samplers, {label} (around {e['reference']}, {e['num_samples']} samples): ensemble acc "
                         + (', '.join(parts) if parts else 'none ran')
                         + f" | independent ensemble {_fmt(ind['ensemble_acc'] if ind else None)}"
                         + (f" ({ind['num_networks']} networks)" if ind else ''))
    return lines


def _markdown(report: dict[str, Any], files: dict[str, str]) -> str:
    md = ['# Ensemble analysis', '',
          f"Dataset `{report['dataset']}`, split `{report['val_split']}`: {report['num_samples']} images,"
          f" {report['num_classes']} classes. Ensemble = mean of the member probabilities; own rule = the model's"
          f' own prediction (its forward: its combine rule, e.g. linear, a trained head); accuracies in %,'
          f' disagreement = fraction of images on which two members\' predicted classes differ;'
          f" ECE with {report['n_bins']} bins; weights {'with' if report['include_buffers'] else 'without'}"
          f' BatchNorm buffers.', '',
          '| source | model | M | ensemble acc | own rule acc | member acc (mean) | disagreement | feature dist |'
          ' weight cos | NLL | Brier | ECE |',
          '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for label, s in report['sources'].items():
        c = s['calibration']
        md.append(f"| {label} | {s['model']} | {s['num_members']} | {s['ensemble_acc']:.2f} |"
                  f" {_fmt(s['model_acc'])} ({s['model_rule']}) | {s['member_acc_mean']:.2f} |"
                  f" {_fmt(s['disagreement_mean'], 4)} |"
                  f" {_fmt(s['feature_distance_mean'], 4)} | {_fmt(s['weight_cosine_mean'], 4)} |"
                  f" {c['nll']:.4f} | {c['brier']:.4f} | {c['ece']:.4f} |")
    if 'members' in report['sections']:
        md += ['', 'Members (acc / NLL / Brier / ECE): ' + '; '.join(
            f'{label}:m{m} {a:.2f} / {c["nll"]:.3f} / {c["brier"]:.3f} / {c["ece"]:.3f}'
            for label, s in report['sources'].items()
            for m, (a, c) in enumerate(zip(s['member_acc'], s['member_calibration']))) + '.']
        sizes = '; '.join(f"{label}: " + ', '.join(f"k={c['k']} {c['acc_mean']:.2f}" for c in s['ensemble_size'])
                          for label, s in report['sources'].items())
        md += ['', f'Accuracy vs ensemble size (mean over k-subsets): {sizes}.']
    else:
        md += ['', 'Sections: ' + ', '.join(report['sections']) + ' (the members section, not asked for, gives the'
               ' columns shown as -).']
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
    md += _section_markdown(report)
    notes = report['notes'] + [f'{label}: {n}' for label, s in report['sources'].items() for n in s['notes']]
    if traj is not None:
        notes += traj['notes']
    for key in ('ood', 'landscape', 'samplers'):
        if report.get(key) is not None:
            notes += [f'{key}: {n}' for n in report[key]['notes']]
    for key in ('uncertainty', 'samplers'):
        if report.get(key) is not None:
            notes += [f'{key}, {label}: {n}' for label, v in report[key]['sources'].items() for n in v['notes']]
    if notes:
        md += ['', 'Notes: ' + '; '.join(notes) + '.']
    if files:
        md += ['', '## Plots', ''] + [f'![{name}]({f})' for name, f in files.items()]
    return '\n'.join(md) + '\n'




def _section_markdown(report: dict[str, Any]) -> list[str]:
    md = []
    unc = report.get('uncertainty')
    if unc is not None:
        temps = [u['temperature'] for u in unc['sources'].values() if u['temperature']]
        split = (' Temperature scaling: T fitted (NLL) on a fixed random half of the evaluation set'
                 f" ({temps[0]['fit_samples']} images, seed {unc['seed']}); NLL and ECE before and after are of the"
                 ' other half'
                 f" ({temps[0]['eval_samples']} images), not of the whole set." if temps else '')
        md += ['', '## Uncertainty', '',
               'What it shows: how uncertain each ensemble is, split into the members\' own uncertainty (expected'
               ' entropy, aleatoric) and their disagreement (mutual information, epistemic), in nats (mean over the'
               ' images); how well its confidence ranks its errors (AURC: area under the risk-coverage curve, lower'
               ' is better); and how much temperature scaling improves its calibration.' + split, '',
               '| source | entropy | expected entropy | mutual information | AURC | AURC m0 | T | NLL before -> after |'
               ' ECE before -> after |',
               '|---|---|---|---|---|---|---|---|---|']
        for label, u in unc['sources'].items():
            t = u['temperature']
            md.append(f"| {label} | {u['entropy']:.4f} | {u['expected_entropy']:.4f} | {u['mutual_information']:.4f} |"
                      f" {u['aurc']:.4f} | {_fmt(u['aurc_member0'] if u['num_members'] > 1 else None, 4)} |"
                      + (f" {t['temperature']:.3f} | {t['before']['nll']:.4f} -> {t['after']['nll']:.4f} |"
                         f" {t['before']['ece']:.4f} -> {t['after']['ece']:.4f} |" if t else ' - | - | - |'))
    ood = report.get('ood')
    if ood is not None:
        md += ['', '## Out-of-distribution detection', '',
               f"What it shows: how well each ensemble's uncertainty tells the {ood['num_samples']} images of"
               f" `{ood['dataset']}` ({ood['split']} split, the OOD positives) from the evaluation images: AUROC and"
               ' AUPR (higher is better) and the false positive rate at 95 % true positive rate (FPR95, lower is'
               ' better) of each score (neg_max_prob: minus the top probability). Rows `:m0`: the first member'
               ' alone.', '',
               '| source | score | AUROC | AUPR | FPR95 |', '|---|---|---|---|---|']
        for label, o in ood['sources'].items():
            for name, v in o['scores'].items():
                md.append(f"| {label} | {name} | {v['auroc']:.4f} | {v['aupr']:.4f} | {v['fpr95']:.4f} |")
            for name, v in (o['member0'] or {}).items():
                md.append(f"| {label}:m0 | {name} | {v['auroc']:.4f} | {v['aupr']:.4f} | {v['fpr95']:.4f} |")
    sh = report.get('shift')
    if sh is not None:
        levels = sh['severities']
        md += ['', '## Dataset shift', '',
               "What it shows: how accuracy and calibration degrade as the evaluation images are corrupted more"
               f" strongly ({', '.join(sh['corruptions'])}; severity 0 is the clean set), for each ensemble and its"
               ' first member alone, as Fort et al.\'s CIFAR-10-C figure. Values: mean over the corruptions (every'
               ' corruption in summary.json).', '',
               '| model | metric | ' + ' | '.join(f'severity {v}' for v in levels) + ' |',
               '|---|---|' + '---|' * len(levels)]
        for label, e in sh['sources'].items():
            for name, numbers in ((f'{label} ensemble' if e['member0'] else label, e['ensemble']),
                                  (f'{label}:m0', e['member0'])):
                if numbers is None:
                    continue
                md.append(f'| {name} | accuracy | ' + ' | '.join(f'{v:.2f}' for v in numbers['accuracy_mean']) + ' |')
                md.append(f'| {name} | ECE | ' + ' | '.join(f'{v:.4f}' for v in numbers['ece_mean']) + ' |')
    ls = report.get('landscape')
    if ls is not None:
        md += ['', '## Loss landscape', '',
               'What it shows: whether two solutions lie in one valley of the loss (a barrier of about 0 along the'
               ' straight line between their weights) or in different modes (a barrier above 0), Fort et al.\'s'
               f" linear interpolation, at {ls['num_points']} points. Barrier: the highest rise of the validation"
               ' loss (of the error, in points) above the straight line between the endpoints\' values. The'
               f" BatchNorm statistics are recomputed at every point on {ls['bn_batches']} batches"
               f" ({ls['bn_images']} images) of the training split, with the evaluation transform (no"
               ' augmentation); at the endpoints too, so that every point is evaluated alike (their losses can differ'
               ' slightly from the sources\' own evaluation above).', '',
               '| a | b | weight distance | loss a | loss b | loss barrier (t) | error barrier, points (t) |',
               '|---|---|---|---|---|---|---|']
        for pair in ls['pairs']:
            md.append(f"| {pair['a']} | {pair['b']} | {pair['distance']:.4g} | {pair['loss'][0]:.4f} |"
                      f" {pair['loss'][-1]:.4f} | {_fmt(pair['barrier_loss'], 4)} ({_fmt(pair['barrier_loss_t'])}) |"
                      f" {_fmt(pair['barrier_error'])} ({_fmt(pair['barrier_error_t'])}) |")
        pl = ls.get('plane')
        if pl is not None:
            md += ['', f"Plane through {pl['a']}, {pl['b']} and {pl['c']} (the snapshot of {pl['a']}'s trajectory at"
                   f" epoch {pl['epoch']}), as Fort et al.'s Fig. 3: validation loss and accuracy on a"
                   f" {len(pl['x'])} x {len(pl['y'])} grid (landscape_plane.png)."]
    sm = report.get('samplers')
    if sm is not None:
        md += ['', '## Subspace samplers', '',
               'What it shows: whether networks sampled around one solution (its first member, m0) make as good an'
               ' ensemble as independently trained networks (Fort et al., section 4): random (a relative radius of'
               f" {sm['random_scale']:g} of every filter's norm), dropout (Monte-Carlo masks), diag (SWAG-diagonal"
               ' Gaussian) and lowrank (Gaussian on the top principal components, rank'
               f" {sm['lowrank_rank']} or fewer) of the snapshot weights of m0's trajectory (its later half, or"
               ' --snapshot-epochs). The BatchNorm statistics of every sampled network are recomputed on'
               f" {sm['bn_batches']} batches ({sm['bn_images']} training images). Disagreement: between the"
               ' networks of one ensemble.', '',
               '| source | ensemble | networks | ensemble acc | network acc (mean) | disagreement | NLL | Brier |'
               ' ECE |',
               '|---|---|---|---|---|---|---|---|---|']
        for label, e in sm['sources'].items():
            rows = ([('independent', e['independent'])] if e['independent'] else []) + list(e['samplers'].items())
            for name, v in rows:
                c = v['calibration']
                md.append(f"| {label} | {name} | {v['num_networks']} | {v['ensemble_acc']:.2f} |"
                          f" {v['network_acc_mean']:.2f} | {_fmt(v['disagreement_mean'], 4)} | {c['nll']:.4f} |"
                          f" {c['brier']:.4f} | {c['ece']:.4f} |")
    return md
