"""Report on trained ensembles: accuracy, diversity, calibration and training trajectories.

    python -m timm_ensembles.analysis output/train/ens output/train/fdl --dataset digits --out output/analysis

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

These are the sections ``members``, ``between`` and ``trajectories``; with ``uncertainty`` (from the same logits:
entropy, expected entropy and mutual information, AURC and risk-coverage curves, temperature scaling) they are the
default. ``--sections`` also asks for ``ood`` (detection of ``--ood-dataset`` images by every uncertainty score),
``shift`` (accuracy and ECE against the severity of corruptions of the evaluation images), ``landscape`` (loss
along the line between two solutions, its barrier, and the plane through two solutions and a trajectory point)
and ``samplers`` (ensembles of networks sampled around one solution against the independent ensemble).

It writes PNG plots, ``summary.md`` (one page), ``summary.json`` (every number) and ``logits.safetensors`` (each
source's member logits ``<label>.logits``, and on the OOD images ``<label>.ood_logits``, for re-analysis) into
``--out`` and prints the key numbers.
"""
import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import data as te_data
from ..files.run_folder import os_error_reason, output_problem
from ..models.registry import create_model
from ..train.engine import check_input_size
from ..utils.checks import check_number, check_whole
from ..utils.extras import MissingExtraError, require
from . import shift as te_shift
from ._compute import (
    _between_sources,
    _between_weights,
    _check_snapshots,
    _evaluate,
    _num_classes,
    _snapshot_sources,
    _source_numbers,
    _trajectories,
    _weights,
)
from ._plots import PLOTS, _write_plots
from ._report import _jsonable, _key_lines, _markdown
from ._sections import (
    DEFAULT_SECTIONS,
    SAMPLERS,
    SECTIONS,
    _check_shift,
    _Context,
    _ood,
    _parse_choices,
    _parse_sections,
    _parse_severities,
    _prepare_ood,
    _shift,
    _uncertainty,
)
from ._sources import (
    AnalysisError,
    _canonical_dataset,
    _check_classes,
    _check_datasets,
    _data_config,
    _describe,
    _resolve_source,
    _short_labels,
    _unique_labels,
)
from ._space import _landscape, _plan_landscape, _plan_samplers, _samplers
from .options import (
    DataOptions,
    LandscapeOptions,
    MetricOptions,
    OODOptions,
    OutputOptions,
    SamplerOptions,
    ShiftOptions,
    SnapshotOptions,
)

__all__ = ['AnalysisError', 'analyze_runs', 'get_args_parser', 'main', 'PLOTS', 'SECTIONS', 'DEFAULT_SECTIONS',
           'SAMPLERS', 'DataOptions', 'MetricOptions', 'SnapshotOptions', 'OODOptions', 'ShiftOptions',
           'LandscapeOptions', 'SamplerOptions', 'OutputOptions']


@dataclass
class _Choices:
    """The report's parsed choices: its sections and what they run on."""
    sections: tuple[str, ...]
    corruptions: list[str]
    severities: list[int]
    sampler_names: list[str]
    explicit_samplers: bool


def analyze_runs(
        sources: list[str],
        *,
        sections: str | Sequence[str] | None = None,
        out_dir: str | Path = 'output/analysis',
        labels: list[str] | None = None,
        seed: int = 0,
        data: DataOptions | None = None,
        metrics: MetricOptions | None = None,
        snapshots: SnapshotOptions | None = None,
        ood: OODOptions | None = None,
        shift: ShiftOptions | None = None,
        landscape: LandscapeOptions | None = None,
        samplers: SamplerOptions | None = None,
        output: OutputOptions | None = None,
) -> dict[str, Any]:
    """Evaluate the sources, compare them and their trajectories, write the report.

    Args:
        sources: ``train.py`` output folders, ``local-dir:<folder>`` or ``hf-hub:<repo>`` names.
        sections: The parts of the report (a list, or one comma-separated string) of ``SECTIONS``; 'default'
            stands for ``DEFAULT_SECTIONS`` (the default), 'all' for every one. The sources are always evaluated
            once, and their accuracy and calibration always reported.
        out_dir: Output folder (created).
        labels: A name per source for plots and tables; default the folder (or repo) name, without the time stamp
            of train.py's default folder name where the names stay distinct.
        seed: Seed of the subset sampling, the t-SNE, the temperature-scaling split, the corruptions and the
            samplers.
        data: The evaluation data (``DataOptions``; None: its defaults), and likewise for the rest:
        metrics: How every source's numbers are computed (``MetricOptions``).
        snapshots: The snapshots of the trajectories and samplers sections (``SnapshotOptions``).
        ood: The images of the ood section (``OODOptions``).
        shift: The corruptions of the shift section (``ShiftOptions``).
        landscape: The lines and plane of the landscape section (``LandscapeOptions``).
        samplers: The samplers section (``SamplerOptions``).
        output: Plots, printing and progress bars (``OutputOptions``).

    Returns:
        The report (what ``summary.json`` holds): ``sections``, ``sources`` (numbers per label), ``between`` (2+
        sources), ``between_weights``, ``trajectories`` (sources with snapshots), one entry per new section asked
        for (``uncertainty``, ``ood``, ``shift``, ``landscape``, ``samplers``), ``files`` and ``notes``.

    Raises:
        AnalysisError: A source that cannot be read, sources of other datasets or class counts (the message names
            each source's dataset and class count), unreadable or missing snapshots, snapshots of different subsets,
            an unknown section, corruption or sampler, the ood section without ``ood.dataset`` or with a dataset the
            sources' transforms cannot read, a landscape between networks of different architectures, a sampler
            asked for by name that can run on no source (diag and lowrank need snapshot weights, dropout a model
            with dropout); an ``out_dir`` that is a file or cannot be written, or a write to it that fails (a
            full disk said as such).
        MissingExtraError: The analysis extra is not installed (``pip install 'timm-ensembles[analysis]'``).
    """
    data, metrics, snapshots = data or DataOptions(), metrics or MetricOptions(), snapshots or SnapshotOptions()
    ood, shift, landscape = ood or OODOptions(), shift or ShiftOptions(), landscape or LandscapeOptions()
    samplers, output = samplers or SamplerOptions(), output or OutputOptions()
    if not sources:
        raise AnalysisError('No source given: pass train.py output folders or hf-hub: names.')
    problem = output_problem(out_dir)
    if problem:  # before minutes of evaluation
        raise AnalysisError(f'--out {out_dir}: {problem}; give a folder that can be written.')
    choices = _check_options(sections, data, snapshots, ood, shift, landscape, samplers, output)
    if labels is not None and len(labels) != len(sources):
        raise AnalysisError(f'{len(labels)} labels for {len(sources)} sources: give one label per source.')
    srcs = [_resolve_source(spec, labels[i] if labels else None) for i, spec in enumerate(sources)]
    defaults = [s.label for s in srcs]
    for s, label in zip(srcs, _unique_labels(defaults if labels else _short_labels(defaults))):
        s.label = label
    data, train_ds, val_ds, info = _open_dataset(srcs, data)
    dev = torch.device(data.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    _load_models(srcs, data, info)

    plans = _plan_sections(srcs, choices, info.name, snapshots, ood, landscape)
    report: dict[str, Any] = dict(dataset=info.name, val_split=data.val_split, n_bins=metrics.n_bins,
                                  sections=list(choices.sections), include_buffers=metrics.include_buffers, sources={},
                                  notes=[])
    evals = _evaluate_sources(srcs, val_ds, data, metrics, dev, seed, choices.sections, report, output)
    ctx = _Context(train_ds, val_ds, data.batch_size, data.workers, dev, metrics.n_bins, seed, data.bn_batches,
                   output.verbose)
    _run_sections(report, srcs, evals, choices, plans, ctx, landscape, samplers)
    for s in srcs:
        s.model = None  # free them: only the numbers are needed from here on

    report = _write_report(Path(out_dir), report, [s.label for s in srcs], evals, output)
    if output.verbose:
        for line in _key_lines(report):
            print(line)
        print(f'report: {Path(out_dir) / "summary.md"}')
    return report


def _check_options(sections, data: DataOptions, snapshots: SnapshotOptions, ood: OODOptions, shift: ShiftOptions,
                   landscape: LandscapeOptions, samplers: SamplerOptions, output: OutputOptions) -> _Choices:
    """Every option, and the packages of the analysis extra, before minutes of evaluation."""
    sections = _parse_sections(sections)
    if 'ood' in sections and not ood.dataset:
        raise AnalysisError('The ood section needs --ood-dataset NAME: a dataset of images of none of the classes'
                            " (as train.py --dataset names it, e.g. 'idx:<folder>' of MNIST against a Fashion-MNIST"
                            ' model).')
    corruptions, _ = _parse_choices(shift.corruptions, te_shift.CORRUPTIONS, '--shift')
    severities = _parse_severities(shift.severities)
    sampler_names, explicit_samplers = _parse_choices(samplers.names, SAMPLERS, '--samplers')
    for value, flag, minimum in ((ood.subset, '--ood-subset', 1), (data.bn_batches, '--landscape-batches', 1),
                                 (landscape.points, '--landscape-points', 2),
                                 (samplers.num_samples, '--num-samples', 1), (landscape.plane_grid, '--plane-grid', 2)):
        check_whole(flag, value, f'an integer >= {minimum}', ge=minimum, optional=True, error=AnalysisError)
    check_number('--random-scale', samplers.random_scale, "a finite number > 0 (a fraction of every filter's norm)",
                 gt=0, error=AnalysisError)
    if snapshots.epochs is not None and not {'trajectories', 'samplers'} & set(sections):
        raise AnalysisError('--snapshot-epochs selects the snapshots of the trajectories and samplers sections:'
                            f" add one of them to --sections (asked for: {', '.join(sections)}).")
    if landscape.plane_epoch is not None and not landscape.plane:
        raise AnalysisError('--plane-epoch needs --landscape-plane.')
    if landscape.plane and 'landscape' not in sections:
        raise AnalysisError('--landscape-plane needs the landscape section (--sections ...,landscape).')
    require('torchmetrics', 'the calibration error of the report')
    if output.plots:
        require('matplotlib', "the report's plots (--no-plots skips them)")
    return _Choices(sections, corruptions, severities, sampler_names, explicit_samplers)


def _open_dataset(srcs: list, data: DataOptions):
    """The dataset given, or the one the runs recorded (all of them the same), checked against every source.

    Returns:
        ``data`` with the dataset, its folder and the split resolved, the train and validation datasets, their info.
    """
    if data.dataset is None:
        recorded = {s.dataset for s in srcs if s.dataset is not None}
        if len(recorded) != 1:
            raise AnalysisError(
                'Pass --dataset: the sources record ' + ('no dataset' if not recorded else 'different datasets')
                + f' ({_describe(srcs)}).')
        data_dir = data.data_dir or next((s.args.get('data_dir') for s in srcs if s.args.get('data_dir')), None)
        data = replace(data, dataset=recorded.pop(), data_dir=data_dir)
    if data.val_split is None:
        splits = {s.args.get('val_split') for s in srcs if s.args.get('val_split')}
        data = replace(data, val_split=splits.pop() if len(splits) == 1 else 'validation')
    canonical = _canonical_dataset(data.dataset, data.data_dir)
    _check_datasets(srcs, canonical)
    try:
        train_ds, val_ds, info = te_data.create_datasets(data.dataset, root=data.data_dir, val_split=data.val_split,
                                                         val_subset=data.val_subset)
    except (OSError, ValueError) as e:
        raise AnalysisError(f'Cannot create dataset {data.dataset!r}: {e}') from e
    if info.name != canonical:
        _check_datasets(srcs, info.name)
    return data, train_ds, val_ds, info


def _load_models(srcs: list, data: DataOptions, info) -> None:
    """Every source's model, class count and data config, their class counts checked against the dataset's."""
    for s in srcs:
        try:
            s.model = create_model(s.model_name, pretrained=True)
        except Exception as e:  # noqa: BLE001  (any failure to load is reported with the source's name)
            raise AnalysisError(f'Cannot load source {s.label} ({s.spec}): {type(e).__name__}: {e}') from e
        s.num_classes = _num_classes(s.model)
        s.data_config = _data_config(s, data.img_size, data.in_chans, data.crop_pct)
    _check_classes(srcs, info.name, info.num_classes)


@dataclass
class _Plans:
    """What the sections will run on, prepared before the evaluation."""
    snapshots: dict
    snapshot_notes: list[str]
    ood_data: tuple | None
    landscape: Any
    samplers: Any


def _plan_sections(srcs: list, choices: _Choices, dataset: str, snapshots: SnapshotOptions, ood: OODOptions,
                   landscape: LandscapeOptions) -> _Plans:
    """Snapshots, OOD data, networks and sampler inputs before the evaluation, which can take long: what cannot be
    used fails first."""
    chosen = choices.sections
    snaps, notes = {}, []
    if 'trajectories' in chosen:
        snaps, notes = _snapshot_sources(srcs, snapshots.epochs, snapshots.allow_missing, dataset,
                                         require=snapshots.epochs is not None)
        if snaps:
            _check_snapshots(snaps, {s.label: s for s in srcs}, srcs[0].num_classes)
    if 'shift' in chosen:
        _check_shift(srcs, choices.corruptions)
    return _Plans(
        snaps, notes,
        _prepare_ood(ood.dataset, ood.data_dir, ood.subset, dataset, srcs) if 'ood' in chosen else None,
        _plan_landscape(srcs, landscape.plane, landscape.plane_epoch) if 'landscape' in chosen else None,
        (_plan_samplers(srcs, choices.sampler_names, choices.explicit_samplers, snapshots.epochs)
         if 'samplers' in chosen else None))


def _run_sections(report: dict[str, Any], srcs: list, evals: list[dict], choices: _Choices, plans: _Plans,
                  ctx: _Context, landscape: LandscapeOptions, samplers: SamplerOptions) -> None:
    """The sections beyond the sources' own numbers, each into its entry of ``report``."""
    if plans.snapshots:
        report['trajectories'] = _trajectories(plans.snapshots, ctx.seed)
        report['trajectories']['notes'] = plans.snapshot_notes + report['trajectories']['notes']
    elif plans.snapshot_notes:
        report['notes'].append('no trajectories: ' + '; '.join(plans.snapshot_notes))
    if 'uncertainty' in choices.sections:
        report['uncertainty'] = _uncertainty(srcs, evals, ctx.n_bins, ctx.seed)
    if plans.ood_data is not None:
        report['ood'] = _ood(srcs, evals, *plans.ood_data, ctx)
    if 'shift' in choices.sections:
        report['shift'] = _shift(srcs, evals, choices.corruptions, choices.severities, ctx)
    if plans.landscape is not None:
        report['landscape'] = _landscape(srcs, plans.landscape, landscape.points, landscape.plane_grid, ctx)
    if plans.samplers is not None:
        report['samplers'] = _samplers(srcs, evals, plans.samplers, choices.sampler_names, samplers.num_samples,
                                       samplers.random_scale, ctx)


def _evaluate_sources(srcs: list, val_ds, data: DataOptions, metrics: MetricOptions, dev: torch.device, seed: int,
                      sections: tuple[str, ...], report: dict[str, Any], output: OutputOptions) -> list[dict]:
    """Evaluate every source once: its numbers (and those between sources) into ``report``; its logits returned."""
    members = 'members' in sections
    evals, weights = [], []
    for s in srcs:
        loader = te_data.create_eval_loader(val_ds, s.data_config, data.batch_size, data.workers)
        s.model.to(dev)
        try:
            check_input_size(s.model, s.data_config['input_size'], s.spec)
        except ValueError as e:
            raise AnalysisError(f'Cannot evaluate source {s.label}: {e} (--img-size / --in-chans apply to sources'
                                f' without a train.py args.yaml).') from e
        if output.verbose:
            print(f'[analyze] evaluating {s.label}', flush=True)
        ev = _evaluate(s.model, loader, dev, metrics.feature_taps if members else None,
                       progress=f'evaluating {s.label}' if output.progress else None)
        if ev['logits'].shape[-1] != srcs[0].num_classes:
            raise AnalysisError(f'{s.label} predicts {ev["logits"].shape[-1]} classes: {_describe(srcs)}.')
        s.model.cpu()
        needs_weights = members or ('between' in sections and len(srcs) > 1)
        w, why = _weights(s.model, metrics.include_buffers) if needs_weights else (None, None)
        numbers = _source_numbers(s, ev, w, metrics.n_bins, metrics.max_subsets, seed, members=members)
        for note in (ev['feature_note'], why):
            if note and members:
                numbers['notes'].append(note)
        if s.folder is None:
            numbers['notes'].append('a Hub source records no training dataset: only its class count was checked')
        report['sources'][s.label] = numbers
        evals.append(ev)
        weights.append(w)
    labels = [s.label for s in srcs]
    report['num_samples'] = int(evals[0]['targets'].shape[0])
    report['num_classes'] = int(evals[0]['logits'].shape[-1])
    if len(srcs) > 1 and 'between' in sections:
        report['between'] = _between_sources(labels, evals)
        report['between_weights'] = _between_weights(labels, weights)
        if report['between_weights'] is None:
            report['notes'].append('no weight cosine between sources: some have no member weights or their'
                                   ' weights differ in length (other architectures)')
    return evals


def _write_report(out: Path, report: dict[str, Any], labels: list[str], evals: list[dict],
                  output: OutputOptions) -> dict[str, Any]:
    """Write the plots, the logits and the summaries; the report as ``summary.json`` holds it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in PLOTS:  # a stale plot of an earlier report must not pass for one of this report
            (out / f'{name}.png').unlink(missing_ok=True)
        files = _write_plots(out, report, progress=output.progress) if output.plots else {}
        report['files'] = files
        tensors = {f'{label}.logits': ev['logits'].contiguous() for label, ev in zip(labels, evals)}
        tensors['targets'] = evals[0]['targets'].contiguous()
        for label, o in (report.get('ood') or {}).get('sources', {}).items():
            tensors[f'{label}.ood_logits'] = o.pop('logits').contiguous()
        save_file(tensors, str(out / 'logits.safetensors'))
        report = _jsonable(report)
        (out / 'summary.md').write_text(_markdown(report, files))
        (out / 'summary.json').write_text(json.dumps(report, indent=1))
    except OSError as e:
        raise AnalysisError(f'writing the report to {out} failed: {os_error_reason(e)}; the sources are unchanged.')\
            from e
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m timm_ensembles.analysis', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('sources', nargs='+', metavar='SOURCE',
                        help='train.py output folders, local-dir:<folder> or hf-hub:<repo> names')
    parser.add_argument('--labels', nargs='+', default=None, metavar='LABEL',
                        help="a name per source (default: the folder name, without train.py's time stamp)")
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
    group.add_argument('--feature-taps', default='preact', choices=('preact', 'stages', 'convs', 'none'),
                       help='features of the feature-distance matrix (default: preact, the stage outputs before their'
                            ' final activation; none to skip)')
    group.add_argument('--include-buffers', action='store_true', help='BatchNorm buffers in the weight vectors')
    group.add_argument('--snapshot-epochs', type=int, nargs='+', default=None, metavar='E',
                       help='snapshot epochs to compare, and to fit the diag/lowrank samplers to (default: every'
                            ' epoch of each run, the later half for the samplers); with the trajectories section every'
                            ' source must have snapshots then')
    group.add_argument('--allow-missing-snapshots', action='store_true',
                       help='skip requested snapshot epochs that a run did not write')
    group.add_argument('--seed', type=int, default=0, metavar='N',
                       help='seed of the subset sampling, the t-SNE, the temperature-scaling split, the corruptions'
                            ' and the samplers')
    group.add_argument('--no-plots', action='store_true', help='numbers only')
    group.add_argument('--no-progress', action='store_true',
                       help='no progress bars (shown only when stderr is a terminal)')
    group.add_argument('--sections', default=None, metavar='LIST',
                       help=f"comma-separated parts of the report: {', '.join(SECTIONS)}; 'default'"
                            f" ({','.join(DEFAULT_SECTIONS)}, the default) and 'all' stand for those, e.g."
                            ' default,ood,shift')
    group = parser.add_argument_group('Out-of-distribution detection (section ood)')
    group.add_argument('--ood-dataset', default=None, metavar='NAME',
                       help="OOD images (their validation split), as train.py --dataset names them, e.g. idx:<folder>"
                            ' of MNIST against a Fashion-MNIST model')
    group.add_argument('--ood-data-dir', default=None, metavar='DIR', help='root folder of the OOD dataset')
    group.add_argument('--ood-subset', type=int, default=None, metavar='N', help='at most N OOD images')
    group = parser.add_argument_group('Dataset shift (section shift)')
    group.add_argument('--shift', default=None, metavar='LIST',
                       help=f"comma-separated corruptions (default: all of {','.join(te_shift.CORRUPTIONS)})")
    group.add_argument('--severities', type=int, nargs='+', default=[1, 2, 3, 4, 5], metavar='S',
                       help='corruption severities in 1..5 (default: 1 2 3 4 5; 0, the clean set, always shown)')
    group = parser.add_argument_group('Loss landscape and samplers (sections landscape, samplers)')
    group.add_argument('--landscape-batches', type=int, default=10, metavar='N',
                       help='training batches (of --batch-size) the BatchNorm statistics of every interpolated or'
                            ' sampled network are recomputed on (default: 10)')
    group.add_argument('--landscape-points', type=int, default=11, metavar='N',
                       help='points per line, t from 0 to 1 (default: 11)')
    group.add_argument('--landscape-plane', action='store_true',
                       help="also the plane through two solutions and a snapshot of the first one's trajectory"
                            ' (Fort et al. Fig. 3; needs its snapshot weights)')
    group.add_argument('--plane-epoch', type=int, default=None, metavar='E',
                       help='snapshot epoch of that plane (-1: the initialisation; default: mid-trajectory)')
    group.add_argument('--plane-grid', type=int, default=11, metavar='N',
                       help="points per axis of the plane, besides the solutions' own (default: 11)")
    group.add_argument('--samplers', default=None, metavar='LIST',
                       help=f"comma-separated samplers: {','.join(SAMPLERS)} (default: those that can run)")
    group.add_argument('--num-samples', type=int, default=None, metavar='K',
                       help="networks per sampled ensemble (default: the source's member count, or 4)")
    group.add_argument('--random-scale', type=float, default=0.1, metavar='F',
                       help="radius of the random sampler, relative to every filter's norm (default: 0.1)")
    return parser


def _options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``analyze_runs``'s keywords from the command line's flags."""
    return dict(
        sections=args.sections, out_dir=args.out, labels=args.labels, seed=args.seed,
        data=DataOptions(dataset=args.dataset, data_dir=args.data_dir, val_split=args.val_split,
                         val_subset=args.val_subset, img_size=args.img_size, in_chans=args.in_chans,
                         crop_pct=args.crop_pct, batch_size=args.batch_size, workers=args.workers, device=args.device,
                         bn_batches=args.landscape_batches),
        metrics=MetricOptions(n_bins=args.bins, max_subsets=args.max_subsets,
                              feature_taps=None if args.feature_taps == 'none' else args.feature_taps,
                              include_buffers=args.include_buffers),
        snapshots=SnapshotOptions(epochs=args.snapshot_epochs, allow_missing=args.allow_missing_snapshots),
        ood=OODOptions(dataset=args.ood_dataset, data_dir=args.ood_data_dir, subset=args.ood_subset),
        shift=ShiftOptions(corruptions=args.shift, severities=args.severities),
        landscape=LandscapeOptions(points=args.landscape_points, plane=args.landscape_plane,
                                   plane_epoch=args.plane_epoch, plane_grid=args.plane_grid),
        samplers=SamplerOptions(names=args.samplers, num_samples=args.num_samples, random_scale=args.random_scale),
        output=OutputOptions(plots=not args.no_plots, progress=not args.no_progress),
    )


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        analyze_runs(args.sources, **_options_from_args(args))
    except (AnalysisError, MissingExtraError) as e:
        raise SystemExit(f'error: {e}') from None
    return 0
