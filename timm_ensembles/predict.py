"""Predict with a model of this package or of timm: a folder of images, or a dataset, to a CSV of one row per image.

    timm-ensembles-predict images/ --model output/train/fdl-run            # a train.py output folder
    timm-ensembles-predict --dataset fashion-mnist --model hf-hub:<org>/<name> --output fmnist.csv
    timm-ensembles-predict images/ --model resnet18 --pretrained            # a plain timm model
    timm-ensembles-predict images/ --model fdl_mynetx2 --checkpoint w.safetensors --import my_models

(also ``python -m timm_ensembles.predict``). A folder is searched recursively, as timm's inference.py reads it; images
are preprocessed with the model's own data config. Columns: filename (relative to the folder; index for a dataset),
target (the image's subfolder, or the dataset's label: where known), pred1..predK and prob1..probK (the top-k classes,
by the model's label names where it has them, and their probabilities), entropy
(timm_ensembles.analysis.uncertainty, in nats, of the members' averaged probabilities), and for a model with members
each member's top-1 class and probability (member0_pred, member0_prob, ...) with the entropy's parts:
expected_entropy (aleatoric) and mutual_information (epistemic: the members' disagreement).
"""
import csv
import io
import sys
from pathlib import Path

from .analysis.uncertainty import uncertainty_scores
from .inference import batches, class_names, device_of, fail, get_args_parser, image_folder, load_model, open_dataset
from .inference import parse_args as _parse_args
from .train.engine import MemberPredictor
from .utils.atomic import atomic_write_text
from .utils.checks import flag_message, is_whole


def _number(value: float) -> str:
    return f'{value:.6g}'


def main(argv=None) -> int:
    parser = get_args_parser(__doc__)
    parser.add_argument('--output', default='predictions.csv', metavar='FILE', help='the CSV (default: %(default)s)')
    parser.add_argument('--topk', type=int, default=5, help='classes per image (default: %(default)s)')
    args = _parse_args(parser, argv)
    output = Path(args.output)
    if not output.parent.is_dir():
        fail(f'--output {args.output}: the folder {output.parent} does not exist.')
    if not is_whole(args.topk, ge=1):
        fail(flag_message('topk', args.topk, 'a whole number >= 1'))
    model = load_model(args)
    names = class_names(model)
    if args.dataset:
        dataset, info = open_dataset(args, model)
        names = names or info.class_names
        keys = ('index', list(range(len(dataset))))
        targets = names or ([str(i) for i in range(info.num_classes)] if info.num_classes > 0 else None)
    else:
        dataset = image_folder(args.data_dir)
        keys = ('filename', [dataset.filename(i) for i in range(len(dataset))])
        folders = {i: c for c, i in dataset.reader.class_to_idx.items()}
        targets = [folders[i] for i in range(len(folders))] if any(folders.values()) else None
    model.to(device_of(args))

    rows, header = [], None
    predictor = MemberPredictor(model, batches(model, dataset, args, 'predict'))
    for out in predictor:
        probs = out.logits.softmax(-1)
        top = probs.topk(min(args.topk, probs.shape[-1]), dim=-1)
        member_top = out.members.softmax(-1).max(-1)
        scores = uncertainty_scores(out.members)
        parts = ('entropy', 'expected_entropy', 'mutual_information') if predictor.is_ensemble else ('entropy',)
        if header is None:
            header = [keys[0], *(['target'] if targets else []),
                      *(f'{c}{k + 1}' for k in range(top.indices.shape[1]) for c in ('pred', 'prob')),
                      *((f'member{m}_{c}' for m in range(out.members.shape[1]) for c in ('pred', 'prob'))
                        if predictor.is_ensemble else ()), *parts]
        for b in range(probs.shape[0]):
            row = [keys[1][len(rows)], *([targets[int(out.target[b])]] if targets else [])]
            for index, prob in zip(top.indices[b].tolist(), top.values[b].tolist()):
                row += [names[index] if names else index, _number(prob)]
            if predictor.is_ensemble:
                for index, prob in zip(member_top.indices[b].tolist(), member_top.values[b].tolist()):
                    row += [names[index] if names else index, _number(prob)]
            rows.append(row + [_number(float(scores[p][b])) for p in parts])
    text = io.StringIO()
    csv.writer(text, lineterminator='\n').writerows([header, *rows])
    atomic_write_text(output, text.getvalue())
    print(f'{len(rows)} predictions of {args.model} written to {output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
