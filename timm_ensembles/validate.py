"""Validate a model of this package or of timm on a dataset: accuracy, calibration, and each member's numbers.

    timm-ensembles-validate --model output/train/fdl-run                  # on the dataset and split the run used
    timm-ensembles-validate --model hf-hub:<org>/<name> --dataset fashion-mnist --results-file results.json
    timm-ensembles-validate data/my-images --model local-dir:exported --split test      # an image folder
    timm-ensembles-validate --model resnet18 --checkpoint w.safetensors --num-classes 10 --dataset digits

(also ``python -m timm_ensembles.validate``). The trainer's own evaluation, with the model's own data config: top1 and
top5 (%) of the model's prediction (an ensemble's combine rule), nll (its cross-entropy) and ece (expected calibration
error in --bins bins, needs torchmetrics); for a model with members, member_acc (each member's top-1, %), their mean,
mean_probs_acc (the accuracy of the averaged member probabilities, the deep ensemble's rule) and disagreement (the
fraction of images on which two members' top-1 differ, averaged over the pairs).
"""
import importlib.util
import json
import sys
from pathlib import Path

from .files.run_folder import RunFolder
from .inference import batches, device_of, fail, get_args_parser, load_model, model_folder, open_dataset
from .inference import parse_args as _parse_args
from .train.engine import evaluate
from .utils.atomic import atomic_write_text
from .utils.checks import flag_message, is_whole


def _recorded_data(args) -> None:
    """Without data named: the dataset, data folder and validation split that a ``train.py`` run folder recorded."""
    folder = model_folder(args.model)
    recorded = RunFolder.of_model(folder).args() if folder is not None else {}
    if not recorded:
        fail(f'no data: give --dataset NAME (digits, fashion-mnist, idx:<folder>, torch/cifar10 with --data-dir, ...)'
             f' or an image folder (DIR); only a train.py output folder records its own ({args.model} does not).')
    # a run that named no data trained on the embedded digits (train.py's default)
    args.dataset, args.data_dir = recorded.get('dataset') or ('' if recorded.get('data_dir') else 'digits'), \
        recorded.get('data_dir')
    args.split = args.split or recorded.get('val_split')


def main(argv=None) -> int:
    parser = get_args_parser(__doc__)
    parser.add_argument('--results-file', default=None, metavar='FILE', help='write the results as JSON')
    parser.add_argument('--bins', type=int, default=15, help='ECE bins (default: %(default)s)')
    args = _parse_args(parser, argv)
    if args.results_file and not Path(args.results_file).parent.is_dir():
        fail(f'--results-file {args.results_file}: the folder {Path(args.results_file).parent} does not exist.')
    if not is_whole(args.bins, ge=1):
        fail(flag_message('bins', args.bins, 'a whole number >= 1'))
    if not (args.dataset or args.data_dir):
        _recorded_data(args)
    model = load_model(args)
    dataset, info = open_dataset(args, model)
    # the calibration error is torchmetrics' (the analysis extra); everything else needs nothing more
    n_bins = args.bins if importlib.util.find_spec('torchmetrics') else None
    model.to(device_of(args))
    try:
        out = evaluate(model, batches(model, dataset, args, 'validate'), None, num_classes=info.num_classes
                       if info.num_classes > 0 else None, split=args.split or 'validation', n_bins=n_bins)
    except ValueError as e:  # labels outside the model's classes, an empty set
        fail(e)
    results = dict(model=args.model, dataset=info.name, split=args.split or 'validation', top1=out.pop('acc'),
                   top5=out.pop('top5'), nll=out.pop('loss'), **out,
                   param_count=sum(p.numel() for p in model.parameters()))
    lines = [f"{args.model} on {info.name} ({results['split']}, {results['num_samples']} images)",
             f"top1 {results['top1']:.2f}  top5 {results['top5']:.2f}  nll {results['nll']:.4f}  ece "
             + (f"{results['ece']:.4f}" if 'ece' in results else "n/a (pip install 'timm-ensembles[analysis]')")]
    if 'member_acc' in results:
        lines.append('members ' + ' '.join(f'{a:.2f}' for a in results['member_acc'])
                     + f"  mean {results['member_acc_mean']:.2f}  mean-probs {results['mean_probs_acc']:.2f}"
                     + (f"  disagreement {results['disagreement']:.4f}" if 'disagreement' in results else ''))
    print('\n'.join(lines))
    if args.results_file:
        atomic_write_text(args.results_file, json.dumps(results, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
