"""What ``timm-ensembles-predict`` and ``timm-ensembles-validate`` share: their flags, the model from any source, the
data it is run on and its batches, preprocessed the model's own way.

A model is a ``train.py`` output folder, ``local-dir:<folder>``, ``hf-hub:<org>/<name>`` (read by ``hub.load_from_hub``:
safetensors only, never a pickle) or a timm name, this package's included (``import timm_ensembles`` registers them,
``--import`` a user's own). Every bad input stops the command with one ``error:`` line before anything is written.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch
from timm.data import ImageDataset, resolve_data_config
from timm.data.readers.img_extensions import get_img_extensions
from timm.models import load_checkpoint
from torch import nn
from tqdm import tqdm

from . import data as te_data
from .models.hub import load_from_hub
from .models.registry import create_model
from .utils.checks import flag_message, is_whole
from .utils.extras import MissingExtraError

_MODELS = ('a train.py output folder (config.json + model.safetensors), local-dir:<folder>, hf-hub:<org>/<name>, or a'
           ' timm model name with --pretrained or --checkpoint')


def fail(message: object) -> NoReturn:
    """Stop the command with one line (a message of several lines, e.g. torch's missing keys, joined into one)."""
    message = ' '.join(str(message).split())
    raise SystemExit('error: ' + (message if len(message) < 1000 else message[:1000] + ' ...'))


def get_args_parser(doc: str) -> argparse.ArgumentParser:
    """The flags both commands take, under timm's names (its inference.py and validate.py)."""
    parser = argparse.ArgumentParser(description=doc.split('\n\n')[0], epilog=doc.split('\n\n', 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('data', nargs='?', default=None, metavar='DIR', help='a folder of images (or --data-dir)')
    parser.add_argument('--data-dir', default=None, metavar='DIR', help='the same as DIR')
    parser.add_argument('--dataset', default=None, help="a dataset by name, read from --data-dir where it needs one:"
                        " 'digits', 'fashion-mnist', 'idx:<folder>', 'torch/cifar10', ... (see train.py)")
    parser.add_argument('--split', default=None, help="the dataset's split (default: validation)")
    add_model_args(parser)
    parser.add_argument('-b', '--batch-size', type=int, default=128)
    parser.add_argument('-j', '--workers', type=int, default=2, help='data loader processes')
    parser.add_argument('--device', default=None, help='default: cuda when there is one, else cpu')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags that name the model and its weights (``load_model``), and ``--import`` (``import_modules``)."""
    parser.add_argument('-m', '--model', required=True, help=_MODELS)
    parser.add_argument('--pretrained', action='store_true', help="a model name: load its published weights")
    parser.add_argument('--checkpoint', default=None, metavar='FILE',
                        help='load these weights (.safetensors, or a .pth read with torch.load(weights_only=True))')
    parser.add_argument('--num-classes', type=int, default=None, help='a model name: build it for N classes')
    parser.add_argument('--trust-member-repos', action='store_true',
                        help='load the members that a hf-hub:/local-dir: model names in other repos or folders (each'
                             ' as safetensors, checked against its recorded sha256)')
    parser.add_argument('--import', dest='imports', action='append', default=[], metavar='MODULE',
                        help='import this module first (repeatable): one that registers your own timm models')


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, check the numbers, and import the ``--import`` modules (as ``train.py`` does)."""
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or args.data
    for flag, low in (('batch_size', 1), ('num_classes', 1), ('workers', 0)):
        value = getattr(args, flag)
        if value is not None and not is_whole(value, ge=low):
            fail(flag_message(flag, value, f'a whole number >= {low}'))
    import_modules(args)
    return args


def import_modules(args: argparse.Namespace) -> None:
    """Import the ``--import`` modules, from the working directory too (as ``python -m`` would find them)."""
    from .train import import_user_module

    if args.imports and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in args.imports:
        import_user_module(module)


def model_folder(spec: str) -> Path | None:
    """The folder that ``--model`` names, None for a Hub repo or a model name; one that is missing is an error."""
    if spec.startswith(('hf-hub:', 'hf_hub:')):
        return None
    named = spec.startswith('local-dir:')
    path = Path(spec.removeprefix('local-dir:')).expanduser()
    # a timm name holds no path separator: any other name that does, or that exists, is meant as a folder
    if not named and not path.exists() and '/' not in spec and os.sep not in spec:
        return None
    if not path.is_dir():
        fail(f"--model {spec}: the model folder {'is a file' if path.exists() else 'does not exist'}; give {_MODELS}.")
    return path


def load_model(args: argparse.Namespace) -> nn.Module:
    """The model of ``--model`` (and ``--pretrained``, ``--checkpoint``, ``--num-classes``), in eval mode."""
    folder = model_folder(args.model)
    if args.checkpoint and not Path(args.checkpoint).is_file():
        fail(f'--checkpoint {args.checkpoint}: no such file.')
    try:
        if folder is not None or args.model.startswith(('hf-hub:', 'hf_hub:')):
            model = load_from_hub(f'local-dir:{folder}' if folder is not None else args.model,
                                  trust_member_repos=args.trust_member_repos)
        else:
            kwargs = {} if args.num_classes is None else dict(num_classes=args.num_classes)
            model = create_model(args.model, pretrained=args.pretrained, **kwargs)
            if not (args.pretrained or args.checkpoint):
                print(f'warning: {args.model} has random weights: pass --pretrained or --checkpoint', file=sys.stderr)
        if args.checkpoint:
            keys = load_checkpoint(model, args.checkpoint, strict=False, weights_only=True)
            wrong = [f'{len(names)} {what} ({", ".join(names[:3])}, ...)' for names, what in (
                (keys.missing_keys, "of the model's weights missing"), (keys.unexpected_keys, 'weights of another'))
                if names]
            if wrong:
                fail(f"--checkpoint {args.checkpoint} is not a checkpoint of {args.model}: {'; '.join(wrong)}.")
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as e:
        fail(f'--model {args.model}: {e}')
    return model.eval()


def class_names(model: nn.Module) -> list[str] | None:
    """The model's own class names (``pretrained_cfg['label_names']``, which ``train.py`` saves), where it has them."""
    names = (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')
    return [str(n) for n in names] if names else None


def open_dataset(args: argparse.Namespace, model: nn.Module):
    """``--dataset`` (read from ``--data-dir``), or the image folder ``--data-dir`` as ``train.py`` reads it, at
    ``--split``: the dataset and its ``DatasetInfo``, refused when its class count is not the model's."""
    name, root = (args.dataset, args.data_dir) if args.dataset else (args.data_dir, None)
    split = args.split or 'validation'
    try:
        _, dataset, info = te_data.create_datasets(name, root=root, val_split=split)
    except (OSError, ValueError, MissingExtraError) as e:
        fail(e)
    num_classes = getattr(model, 'num_classes', None)
    if num_classes and info.num_classes > 0 and num_classes != info.num_classes:
        fail(f"--model {args.model} predicts {num_classes} classes, but the dataset {info.name} has"
             f' {info.num_classes}: give the dataset the model was trained on (a model name: --num-classes'
             f' {info.num_classes} with --checkpoint).')
    return dataset, info


def image_folder(folder: str | None) -> ImageDataset:
    """Every image under ``folder``, found recursively as timm's inference.py finds them (targets: subfolders)."""
    if not folder:
        fail('no input: give a folder of images (DIR or --data-dir), or a dataset with --dataset.')
    path = Path(folder).expanduser()
    if not path.is_dir():
        fail(f"image folder {folder} {'is a file' if path.exists() else 'does not exist'}: give a folder of images.")
    try:
        return ImageDataset(str(path))
    except RuntimeError:  # timm's folder reader found none
        fail(f"{folder} holds no images (searched recursively for {' '.join(get_img_extensions())}); a dataset by"
             f' name (digits, idx:<folder>, ...) is given with --dataset.')


def device_of(args: argparse.Namespace) -> torch.device:
    try:
        return torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError as e:
        fail(f'--device {args.device}: {e}')


def batches(model: nn.Module, dataset, args: argparse.Namespace, desc: str):
    """The dataset's ``(x, target)`` batches, in order, preprocessed with timm's eval transform of the model's own data
    config (``resolve_data_config(model=model)``), behind a progress bar on stderr."""
    loader = te_data.create_eval_loader(dataset, resolve_data_config(model=model), args.batch_size, args.workers)
    return tqdm(loader, desc=desc, disable=args.no_progress, leave=False, dynamic_ncols=True)
