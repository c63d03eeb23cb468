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
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import data as te_data
from .._engine import check_input_size
from .._extras import MissingExtraError, require
from .._registry import create_model
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
from ._sources import (
    AnalysisError,
    _canonical_dataset,
    _check_classes,
    _check_datasets,
    _data_config,
    _describe,
    _resolve_source,
    _unique_labels,
)

__all__ = ['AnalysisError', 'analyze_runs', 'get_args_parser', 'main', 'PLOTS']


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

