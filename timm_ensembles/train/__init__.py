"""Train a timm model or a timm_ensembles ensemble with its own objective, on CPU, one GPU or many.

    accelerate launch -m timm_ensembles.train      # fdl_resnet18x2 on the embedded digits dataset (offline)
    accelerate launch -m timm_ensembles.train --model ens_resnet18x2 --dataset fashion-mnist --epochs 10
    accelerate launch -m timm_ensembles.train --model ens_resnet18x2 --data-dir pets  # pets/{train,validation}/<cls>
    accelerate launch --multi_gpu --num_processes 2 -m timm_ensembles.train ...   # DDP (gloo processes on a CPU)
    timm-ensembles-train --import my_models --model fdl_my_netx2 ...      # a timm model registered in my_models.py

(in a checkout, ``accelerate launch train.py ...`` runs this module). The model name picks everything
method-specific: the model's task (its losses, phases and training-only parts) comes from
``timm_ensembles.create_task(model)``; this module never names a method. Task options are given with
``--task-kwargs key=value ...``, model options with ``--model-kwargs``; every flag can also come from a YAML file
(``--config``, ``-c``), flags winning. timm's train.py habits hold: ``--data-dir`` alone reads that folder (an image
folder as timm's ``ImageFolder``, but a missing split folder, overlapping splits or differing classes are errors),
timm's flags (``--drop``, ``--drop-path``, ``--input-size``, ``--mean``/``--std``, ``--clip-mode``,
``--initial-checkpoint``, ``--experiment``) work, and one spelt differently here (``--torchcompile``) gets one line
naming ours. ``--resume RUN --epochs N`` with N above the run's epochs extends it as timm's --resume does: the schedule
is rebuilt over N epochs and taken up at the run's update (a cosine's learning rate rises to its value there; the log
says from what to what). The first lines of a run summarise what it trains: model, members, parameters, dataset,
classes, split sizes, input, device, precision, and what a checkpoint will take on disk.

The output folder holds the model in timm's Hugging Face format (``config.json`` + ``model.safetensors``, loadable
with ``timm.create_model('local-dir:<folder>', pretrained=True)`` after ``import timm_ensembles``), ``metrics.jsonl``
(one line per epoch), ``results.json`` (final-epoch metrics), ``args.yaml``, and ``checkpoint.pt`` (written
atomically after every epoch) for ``--resume``. With ``--snapshot-subset N``, ``snapshots/`` holds every epoch's
member logits on N fixed validation samples, and those of the initialisation (epoch -1), with
``--snapshot-weights`` the member weights too, read back with ``timm_ensembles.read_snapshots``.

A run owns its folder: it holds the folder's lock (``.timm-ensembles.lock``, naming host, pid and start) until it ends,
so a second trainer or ``--resume`` there is refused; a folder that holds a run's files is never written by a new run
(``--overwrite`` moves them aside into ``overwritten-<time>/``), and only the trainer's own temporaries are swept.
"""
import argparse
import ast
import contextlib
import csv
import functools
import importlib
import io
import logging
import math
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate import utils as accelerate_utils
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed
from timm.data import Mixup, create_transform, resolve_data_config
from timm.models import get_model_args
from timm.utils import ModelEmaV3

from .. import data as te_data
from ..analysis.uncertainty import calibrate
from ..files.model_folder import export_folder
from ..files.run_folder import RunBusyError, RunFolder, os_error_reason, output_problem
from ..models.hub import trusting_member_repos
from ..models.registry import create_model, create_task
from ..models.strategies import MEMBER_STRATEGIES
from ..utils.atomic import atomic_write_text
from ..utils.checks import flag_message, is_number, is_whole
from ..utils.extras import MissingExtraError
from .checkpoint import (
    CheckpointError,
    export_new_folder,
    find_checkpoint,
    history_folder,
    load_checkpoint,
    load_initial_checkpoint,
    model_identity,
    rank_history,
    save_checkpoint,
    sweep_history,
)
from .cli import (
    SCHEDULERS,
    TIMM_SPELLINGS,
    ArgumentParser,
    SchedulerState,
    check_optimizer,
    check_scheduler,
    close_matches,
    create_scheduler,
)
from .device import FUSED_OPTS as _FUSED_OPTS
from .device import FUSED_UNSAFE_FP16, DeviceDefaults, device_defaults
from .engine import (
    LabelError,
    NonFiniteLossError,
    check_input_size,
    evaluate,
    format_mechanism,
    format_metrics,
    sync_buffers,
    train_one_epoch,
)
from .snapshots import (
    INIT_EPOCH,
    member_parameters,
    predict_members,
    remove_snapshots_from,
    snapshot_indices,
    write_snapshot,
)
from .summary import run_summary

_logger = logging.getLogger(__name__)
# Accelerate's trackers, the check that each is installed, and the package that installs it
_TRACKER_PACKAGES = {
    'tensorboard': (accelerate_utils.is_tensorboard_available, 'tensorboard'),
    'wandb': (accelerate_utils.is_wandb_available, 'wandb'),
    'trackio': (accelerate_utils.is_trackio_available, 'trackio'),
    'mlflow': (accelerate_utils.is_mlflow_available, 'mlflow'),
    'comet_ml': (accelerate_utils.is_comet_ml_available, 'comet-ml'),
    'aim': (accelerate_utils.is_aim_available, 'aim'),
    'clearml': (accelerate_utils.is_clearml_available, 'clearml'),
    'dvclive': (accelerate_utils.is_dvclive_available, 'dvclive'),
    'swanlab': (accelerate_utils.is_swanlab_available, 'swanlab'),
}
TRACKERS = ('all', *_TRACKER_PACKAGES)
# validation metrics that pick the best epoch (the ensemble ones only for models with members); loss: lower is better
EVAL_METRICS = ('acc', 'top5', 'loss', 'mean_probs_acc', 'member_acc_mean')


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of flag defaults (keys as the'
                        ' flags with underscores, e.g. batch_size: 64); flags given on the command line win')
    group = parser.add_argument_group('Model')
    group.add_argument('--import', dest='imports', action='append', default=[], metavar='MODULE',
                       help='import this Python module first (repeatable), e.g. one that registers your own timm'
                            ' models with @register_model, so that --model can name them')
    group.add_argument('--trust-member-repos', action='store_true',
                       help='load the members that a hf-hub:/local-dir: model or teacher names in other repos or'
                            ' folders (each as safetensors, checked against its recorded sha256)')
    group.add_argument('--model', default='fdl_resnet18x2',
                       help='timm or timm_ensembles model name: fdl_<base>x<N>, ens_<base>x<N> for any timm base,'
                            ' or a plain timm model (default: fdl_resnet18x2)')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=_Kwargs,
                       help='model arguments, e.g. img_size=32 drop_rate=0.1 combine=mean_probs')
    group.add_argument('--pretrained', action='store_true', help="load the model's own published weights")
    group.add_argument('--pretrained-base', action='store_true',
                       help="initialise every ensemble member from timm's pretrained weights of the base")
    group.add_argument('--initial-checkpoint', default='', metavar='PATH',
                       help="start from these weights (timm's flag): a folder written by train.py or timm's"
                            ' save_for_hf (its model.safetensors), a .safetensors file, or a timm .pth checkpoint'
                            ' (read with torch.load(weights_only=True), never unpickled); loaded strictly')
    group.add_argument('--drop', type=float, default=None, metavar='PCT',
                       help="dropout rate before the classifier (timm's drop_rate; every member's); default: the"
                            " model's")
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT',
                       help="stochastic depth rate (timm's drop_path_rate); default: the model's")
    group.add_argument('--drop-block', type=float, default=None, metavar='PCT',
                       help="DropBlock rate, for the models that have it (timm's drop_block_rate)")
    group.add_argument('--task-kwargs', nargs='*', default={}, action=_Kwargs,
                       help='options of the model\'s task, e.g. member_warmup_epochs=1 fdl_lr=1e-4 beta=0.5')
    group.add_argument('--teacher', action=_ReplaceDefaultAppend, default=None, metavar='MODEL',
                       help='a teacher, for models whose task learns from teachers; repeatable: a timm name (its'
                            ' pretrained weights), hf-hub:<repo>, local-dir:<folder>, or a folder written by train.py')
    group.add_argument('--generations', type=int, default=1,
                       help='train K generations in <output>/gen1..genK, each the teacher of the next (generation 1'
                            ' learns from --teacher), seed + 1000 k for generation k')
    group.add_argument('--compile', action='store_true', help='torch.compile the task')
    group.add_argument('--member-strategy', default=None, choices=MEMBER_STRATEGIES,
                       help="how an ensemble's members run (loop, vmap, grouped, auto: the fastest of those that"
                            ' accept the model, timed on the first batch); default: loop on a CPU, auto on a GPU.'
                            ' Checkpoints and exports are the same whichever runs; other models ignore it')
    group.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                       help='model in channels_last memory format (default: on a GPU only; on a CPU it is slower)')
    group = parser.add_argument_group('Data')
    group.add_argument('--dataset', default='',
                       help="'' (as timm: the image folder or MNIST-format IDX folder --data-dir names; without"
                            " --data-dir, the embedded digits, offline), 'digits', 'fashion-mnist', 'idx:<folder>',"
                            ' or a timm dataset name (torch/cifar10 or hfds/<repo> with --data-dir)')
    group.add_argument('--data-dir', default=None,
                       help='the dataset folder: an image folder (<split>/<class>/<image>, as timm reads it), an IDX'
                            ' folder, or the root of a timm dataset name')
    group.add_argument('--train-split', default='train', help='training split (an image folder\'s subfolder)')
    group.add_argument('--val-split', default='validation',
                       help="validation split (an image folder's subfolder, or a timm synonym of it: val, valid)")
    group.add_argument('--dataset-download', action='store_true', help='let torchvision datasets download')
    group.add_argument('--train-subset', type=int, default=None, help='train on a fixed subset of N samples')
    group.add_argument('--val-subset', type=int, default=None, help='evaluate on a fixed subset of N samples')
    group.add_argument('--holdout', type=int, default=None, metavar='N',
                       help='validate on N training samples held out (from those --train-subset leaves out, else'
                            ' removed from training), and evaluate --val-split once at the end as the test set;'
                            " choices a method leaves to validation (FDL's head or averaged probabilities) are made"
                            ' on the held-out samples')
    group.add_argument('--calibrate', action='store_true',
                       help='with --holdout, fit a temperature on the held-out samples after training (temperature'
                            ' scaling, Guo et al. 2017): the exported model divides its logits by it, its config'
                            ' records it, and the test set is evaluated calibrated')
    group.add_argument('--num-classes', type=int, default=None, help='default: from the dataset')
    group.add_argument('--img-size', type=int, default=None,
                       help='default: the dataset\'s natural size or the model\'s')
    group.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                       help="the model's input (timm's flag): channels, height, width; sets --in-chans")
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                       help="normalisation mean, one value or one per channel (default: the model's)")
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD',
                       help="normalisation standard deviation, one value or one per channel (default: the model's)")
    group.add_argument('--crop-pct', type=float, default=None,
                       help='evaluation centre-crop fraction (default: 1.0 for small images, else the model\'s)')
    group.add_argument('--in-chans', type=int, default=None, help='input channels (default 3; 1 for grayscale input)')
    group.add_argument('--hflip', type=float, default=None, help='horizontal flip probability (default: per dataset)')
    group.add_argument('--scale', type=float, nargs=2, default=(0.5, 1.0), metavar=('MIN', 'MAX'),
                       help='random-resized-crop scale range')
    group.add_argument('--no-aug', action='store_true', help='no training augmentation')
    group.add_argument('--aa', default=None, metavar='NAME',
                       help="timm's auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2,"
                            ' original, 3a (default: none). The in-memory datasets then take timm\'s per-image'
                            ' transforms instead of their batched path (slower)')
    group.add_argument('--color-jitter', type=float, default=None, metavar='PCT',
                       help="timm's colour jitter factor (brightness, contrast, saturation), e.g. 0.4. Default: none"
                            " (timm's train.py jitters by 0.4 unless --aa is given; here only when asked). As in"
                            ' timm, --aa turns it off (but for 3a). In-memory datasets then take the per-image path')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT',
                       help="timm's random erasing probability per image, after normalisation (default 0: off);"
                            ' the in-memory datasets erase a batch at a time')
    group.add_argument('--remode', default='pixel', choices=('pixel', 'rand', 'const'),
                       help='random erasing fill: per-pixel normal noise (pixel, default), one random colour (rand),'
                            ' zeros (const)')
    group.add_argument('--recount', type=int, default=1, help='random erasing: up to this many boxes an image')
    group.add_argument('--mixup', type=float, default=0.0,
                       help="timm's mixup alpha (on when > 0): the tasks learn from mixed images' soft targets")
    group.add_argument('--cutmix', type=float, default=0.0, help="timm's cutmix alpha (on when > 0)")
    group.add_argument('--cutmix-minmax', type=float, nargs=2, default=None, metavar=('MIN', 'MAX'),
                       help='cutmix box size ratio range (overrides --cutmix alpha)')
    group.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixing a batch')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='probability of cutmix instead of mixup when both are on')
    group.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'),
                       help='mix parameters per batch, per pair or per element')
    group.add_argument('--mixup-off-epoch', type=int, default=0, help='stop mixing from this epoch (0: never)')
    group.add_argument('-j', '--workers', type=int, default=2, help='data loader processes per training process')
    group = parser.add_argument_group('Optimisation')
    group.add_argument('--epochs', type=int, default=8)
    group.add_argument('-b', '--batch-size', type=int, default=64, help='per process')
    group.add_argument('--grad-accum-steps', type=int, default=1)
    group.add_argument('--opt', default='sgd', help='timm optimizer name')
    group.add_argument('--lr', type=float, default=0.05)
    group.add_argument('--momentum', type=float, default=0.9)
    group.add_argument('--weight-decay', type=float, default=5e-4)
    group.add_argument('--layer-decay', type=float, default=None,
                       help="layer-wise lr decay (timm's): layer k of L trains at lr * layer_decay^(L - k), by the"
                            " model's group_matcher (every member of an ensemble alike); default: none")
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                       help='clip gradients at this value (by --clip-mode); default: no clipping')
    group.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'),
                       help="timm's: clip the global gradient norm (norm), each gradient value (value), or adaptively"
                            ' per unit against the weights (agc, with --clip-grad the factor, e.g. 0.01; every'
                            ' classifier left unclipped, as timm leaves its head)')
    group.add_argument('--sched', default='cosine',
                       help=f"timm scheduler name ({', '.join(SCHEDULERS)}); stepped per update, plateau per epoch on"
                            ' --eval-metric')
    group.add_argument('--min-lr', type=float, default=1e-5)
    group.add_argument('--warmup-epochs', type=int, default=0, help='learning-rate warm-up epochs')
    group.add_argument('--warmup-lr', type=float, default=1e-5)
    group.add_argument('--decay-epochs', type=float, default=1, help='step scheduler: epochs between decays')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.97,
                       help='step, multistep and plateau schedulers: decay factor')
    group.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270], metavar='EPOCH',
                       help='multistep scheduler: the epochs to decay at (timm\'s default 90 180 270)')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N',
                       help='plateau scheduler: epochs without improvement of --eval-metric before it decays')
    group.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')
    group.add_argument('--amp', action='store_true', help="timm's flag: autocast in --amp-dtype (--mixed-precision"
                       ' says the same in Accelerate\'s words)')
    group.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'), help='with --amp')
    group.add_argument('--mixed-precision', default=None, choices=('no', 'fp16', 'bf16'),
                       help="autocast dtype (default: bf16 on a GPU that supports it, else accelerate's config;"
                            ' no is fp32)')
    group.add_argument('--fused-opt', action=argparse.BooleanOptionalAction, default=None,
                       help="torch's fused optimizer kernel (default: on a GPU, for the optimizers that have one:"
                            f" {', '.join(_FUSED_OPTS)})")
    group = parser.add_argument_group('Model EMA')
    group.add_argument('--model-ema', action='store_true',
                       help="keep timm's ModelEmaV3 of the model (of every member of an ensemble), evaluate it every"
                            ' epoch and export it to <output>/ema')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='its decay per update (timm: 0.9998)')
    group.add_argument('--model-ema-warmup', action='store_true',
                       help="timm's decay warm-up (short runs: the average follows the model at first)")
    group = parser.add_argument_group('Run')
    group.add_argument('--cpu', action='store_true', help='run on the CPU even where an accelerator is available')
    group.add_argument('--seed', type=int, default=0)
    group.add_argument('--output', default='',
                       help='output folder (default: output/train/<time>-<model>); with --experiment, the folder it'
                            ' is made in')
    group.add_argument('--experiment', default='', metavar='NAME',
                       help="the output folder's name (timm's flag): <--output or output/train>/NAME")
    group.add_argument('--resume', default='',
                       help='continue the run in this output folder (or checkpoint file); with a larger --epochs,'
                            ' extend it as timm does (the schedule rebuilt over the new epochs, taken up where the run'
                            ' is)')
    group.add_argument('--overwrite', action='store_true',
                       help="start anew in an --output folder that holds a run: its files are moved aside into"
                            ' <output>/overwritten-<time>/ (never deleted); with --generations, the generations made'
                            ' by another command are moved aside and retrained')
    group.add_argument('--no-progress', action='store_true',
                       help='no progress bars (shown only when stderr is a terminal; log lines go above them)')
    group.add_argument('--log-interval', type=int, default=50, metavar='N',
                       help='a log line (loss, learning rate, throughput) every N updates, as timm (default 50)')
    group.add_argument('--log-with', nargs='+', default=None, choices=TRACKERS, metavar='TRACKER',
                       help=f"experiment trackers, through Accelerate ({', '.join(TRACKERS)}; all: every one"
                            ' installed); each gets every log line and epoch, with the run\'s flags as its config.'
                            ' Local ones write into <output>/tracking (tensorboard --logdir <output>/tracking)')
    group.add_argument('--eval-metric', default='acc', choices=(*EVAL_METRICS, 'top1'),
                       help='the validation metric that picks <output>/best, the best epoch\'s model beside the final'
                            ' one (acc (timm: top1), top5, mean_probs_acc, member_acc_mean: higher is better; loss:'
                            ' lower), and that --sched plateau follows.'
                            ' Validation is the held-out data with --holdout, else the dataset\'s evaluation split')
    group.add_argument('--checkpoint-hist', type=int, default=0, metavar='N',
                       help='keep the N best epochs by --eval-metric as exported models in'
                            ' <output>/checkpoints/epoch-<E> (the format of best/; ranked in results.json), as timm'
                            ' keeps its N best checkpoints. Default 0 (none), where timm keeps 10: each is a whole'
                            ' model (an ensemble: all its members), so 10 would multiply the folder\'s size by up to'
                            ' 11, and best/ already holds the best one')
    group = parser.add_argument_group('Analysis')
    group.add_argument('--snapshot-subset', type=int, default=0, metavar='N',
                       help='after every epoch, and at the initialisation (epoch -1), save every member\'s logits on N'
                            ' validation samples to <output>/snapshots/ (the same N samples whatever --seed, so that'
                            ' runs can be compared; default 0: no snapshots)')
    group.add_argument('--snapshot-weights', action='store_true',
                       help='with --snapshot-subset, also save every member\'s parameters each epoch (models whose'
                            ' members share layers have none of their own and are refused)')
    return parser


class _Kwargs(argparse.Action):
    """``key=value`` pairs, values read as Python literals where they are ones (timm's ParseKwargs), else strings; a
    token without ``=`` is an error that says so."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for token in values:
            key, sep, value = token.partition('=')
            if not sep or not key:
                parser.error(f"{option_string} {token!r}: options are key=value pairs, e.g. {option_string}"
                             f" fdl_lr=1e-4 feature_taps=convs")
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


class _ReplaceDefaultAppend(argparse.Action):
    """``append`` whose first use on the command line replaces the default (from ``--config`` or a resumed run's
    args.yaml) instead of adding to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not getattr(namespace, f'_{self.dest}_from_cli', False):
            setattr(namespace, self.dest, [])
            setattr(namespace, f'_{self.dest}_from_cli', True)
        getattr(namespace, self.dest).append(values)


def parse_args(argv=None) -> argparse.Namespace:
    """Flags over ``--config`` over, with ``--resume``, the resumed run's own ``args.yaml``."""
    parser = get_args_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('-c', '--config', default='')
    pre.add_argument('--resume', default='')
    pre.add_argument('--import', dest='imports', action='append', default=[])
    pre.add_argument('--trust-member-repos', action='store_true')
    known, _ = pre.parse_known_args(argv)
    sources = []
    if known.resume:
        run_dir = _run_dir(known.resume)
        if RunFolder(run_dir).file(RunFolder.ARGS).is_file():
            sources.append((RunFolder(run_dir).file(RunFolder.ARGS), _NOT_RECORDED))
    if known.config:
        if not Path(known.config).is_file():
            parser.error(f"--config '{known.config}' does not exist")
        sources.append((Path(known.config), ()))
    valid = {a.dest for a in parser._actions}
    for path, skip in sources:
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            parser.error(f'{path} is not valid YAML: {" ".join(str(e).split())}')
        if not isinstance(cfg, dict):
            parser.error(f'{path} must hold a mapping of flag names to values (e.g. epochs: 10), got'
                         f' {type(cfg).__name__}')
        unknown = sorted(set(cfg) - valid)
        if unknown:
            hints = []
            for key in unknown:
                flag = f"--{key.replace('_', '-')}"
                near = close_matches(key, valid, n=1)
                hints.append(f"{key} (here: {TIMM_SPELLINGS[flag]})" if flag in TIMM_SPELLINGS else
                             f'{key} (did you mean {near[0]}?)' if near else key)
            parser.error(f"unknown keys in {path}: {', '.join(hints)}; the keys are the flags' names with"
                         f' underscores (epochs, batch_size, ...)')
        _refuse_what_only_the_command_line_says(cfg, path, known)
        parser.set_defaults(**{k: v for k, v in cfg.items() if k not in skip})
    args = parser.parse_args(argv)
    vars(args).pop('_teacher_from_cli', None)
    if isinstance(args.teacher, str):  # `teacher: folder` in a YAML file
        args.teacher = [args.teacher]
    return args


def _refuse_what_only_the_command_line_says(cfg: dict, path: Path, known: argparse.Namespace) -> None:
    """A YAML file never runs code or widens what loads: a module is imported, and models in other repos load, only
    when the command line itself says so (``--import``, ``--trust-member-repos``). A config that says either is refused
    with the command line that would, unless that command line gives it; ``cfg`` keeps none of it.

    This holds for ``--resume`` too, although train.py wrote the run's own args.yaml: a folder's args.yaml cannot be
    told from one downloaded beside a pushed model (push_to_hub publishes it), so a resume names the run's modules
    again, as the command that started the run did (``--resume RUN --import my_models``)."""
    imports = cfg.pop('imports', None) or []
    imports = list(dict.fromkeys(map(str, imports if isinstance(imports, list) else [imports])))
    trust = bool(cfg.pop('trust_member_repos', False)) or 'trust_member_repos' in (cfg.get('model_kwargs') or {})
    if set(imports) <= set(known.imports) and (known.trust_member_repos or not trust):
        return
    flags = [f'--import {m}' for m in imports] + ['--trust-member-repos'] * trust
    resumed = bool(known.resume) and path == RunFolder(_run_dir(known.resume)).file(RunFolder.ARGS)
    command = f'--resume {known.resume}' if resumed else f'--config {path}'
    what = f'the run in {path.parent} was started with' if resumed else f'{path} asks for'
    flags = ' '.join(flags)
    raise SystemExit(f'error: {what} {flags}, which only the command line can give (a config file never imports a'
                     f' module or trusts other repos): if you trust them, give them there: {command} {flags}')


def _run_dir(resume: str) -> Path:
    path = Path(resume)
    return path if path.is_dir() else path.parent


# the flags that change a run's result, compared on --resume (the dataset by its name, recorded beside them; the data
# folder and the initial weights are left out: data may move between sessions, and the checkpoint replaces the weights)
IDENTITY_FLAGS = (
    'model', 'model_kwargs', 'task_kwargs', 'teacher', 'train_split', 'val_split', 'train_subset', 'val_subset',
    'holdout', 'num_classes', 'img_size', 'crop_pct', 'in_chans', 'hflip', 'scale', 'no_aug', 'aa', 'color_jitter',
    'reprob', 'remode', 'recount', 'mixup', 'cutmix', 'drop', 'drop_path', 'drop_block', 'mean', 'std',
    'cutmix_minmax', 'mixup_prob', 'mixup_switch_prob', 'mixup_mode', 'mixup_off_epoch', 'epochs', 'batch_size',
    'grad_accum_steps', 'opt', 'lr', 'momentum', 'weight_decay', 'layer_decay', 'clip_grad', 'clip_mode', 'sched',
    'min_lr', 'warmup_epochs', 'warmup_lr', 'decay_epochs', 'decay_rate', 'decay_milestones', 'patience_epochs',
    'smoothing', 'mixed_precision', 'seed', 'model_ema', 'model_ema_decay', 'model_ema_warmup',
)
# what a run's args.yaml leaves out: where it was written, where it resumed from, the config it came from, and
# --overwrite (a recipe run again must not move a run aside)
_NOT_RECORDED = ('config', 'resume', 'output', 'experiment', 'overwrite')
# timm's flags for the model's regularisation, and the model argument each sets
_MODEL_RATES = (('drop', 'drop_rate'), ('drop_path', 'drop_path_rate'), ('drop_block', 'drop_block_rate'))


def _normalised(value):
    """A value as YAML reads it back (tuples become lists), so that what is saved and what is compared agree."""
    return yaml.safe_load(yaml.safe_dump(value))


# (flag, test, what is allowed): every flag's range, checked in one place before anything is built or written
_CHECKS = (
    ('epochs', lambda v: is_whole(v, ge=1), 'a whole number >= 1'),
    ('batch_size', lambda v: is_whole(v, ge=1), 'a whole number >= 1'),
    ('grad_accum_steps', lambda v: is_whole(v, ge=1), 'a whole number >= 1'),
    ('workers', lambda v: is_whole(v, ge=0), 'a whole number >= 0'),
    ('generations', lambda v: is_whole(v, ge=1), 'a whole number >= 1'),
    ('log_interval', lambda v: is_whole(v, ge=1), 'a whole number of updates >= 1'),
    ('model_ema_decay', lambda v: is_number(v, ge=0, lt=1), 'a number in [0, 1)'),
    ('snapshot_subset', lambda v: is_whole(v, ge=0), 'a whole number >= 0 (0: no snapshots)'),
    ('seed', lambda v: is_whole(v, ge=0), 'a whole number >= 0'),
    ('train_subset', lambda v: v is None or is_whole(v, ge=1), 'a whole number >= 1 (omit it for all)'),
    ('val_subset', lambda v: v is None or is_whole(v, ge=1), 'a whole number >= 1 (omit it for all)'),
    ('holdout', lambda v: v is None or is_whole(v, ge=1), 'a whole number >= 1'),
    ('num_classes', lambda v: v is None or is_whole(v, ge=1), "a whole number >= 1 (omit it for the dataset's)"),
    ('img_size', lambda v: v is None or is_whole(v, ge=1), 'a whole number of pixels >= 1 (omit it for the'
                                                         " dataset's or model's)"),
    ('in_chans', lambda v: v in (None, 1, 3), '1 (gray) or 3 (colour)'),
    ('crop_pct', lambda v: v is None or is_number(v, gt=0, le=1), 'a fraction in (0, 1]'),
    ('hflip', lambda v: v is None or is_number(v, ge=0, le=1), 'a probability in [0, 1]'),
    ('scale', lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(is_number(x) for x in v)
     and 0 < v[0] <= v[1] <= 1, 'two area fractions MIN MAX with 0 < MIN <= MAX <= 1'),
    ('lr', lambda v: is_number(v, gt=0), 'a number > 0'),
    ('min_lr', lambda v: is_number(v, ge=0), 'a number >= 0'),
    ('warmup_lr', lambda v: is_number(v, ge=0), 'a number >= 0'),
    ('warmup_epochs', lambda v: is_whole(v, ge=0), 'a whole number >= 0'),
    ('momentum', lambda v: is_number(v, ge=0, lt=1), 'a number in [0, 1)'),
    ('weight_decay', lambda v: is_number(v, ge=0), 'a number >= 0'),
    ('layer_decay', lambda v: v is None or is_number(v, gt=0, le=1), 'a factor in (0, 1] (omit it for none)'),
    ('clip_grad', lambda v: v is None or is_number(v, gt=0), 'a gradient norm > 0 (omit it for no clipping)'),
    ('smoothing', lambda v: is_number(v, ge=0, lt=1), 'a number in [0, 1)'),
    ('mixup', lambda v: is_number(v, ge=0), 'an alpha >= 0 (0: off)'),
    ('cutmix', lambda v: is_number(v, ge=0), 'an alpha >= 0 (0: off)'),
    ('cutmix_minmax', lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 2
                                              and all(is_number(x) for x in v) and 0 < v[0] <= v[1] <= 1),
     'two box size ratios MIN MAX with 0 < MIN <= MAX <= 1'),
    ('mixup_prob', lambda v: is_number(v, ge=0, le=1), 'a probability in [0, 1]'),
    ('mixup_switch_prob', lambda v: is_number(v, ge=0, le=1), 'a probability in [0, 1]'),
    ('mixup_off_epoch', lambda v: is_whole(v, ge=0), 'a whole number >= 0 (0: never)'),
    ('decay_epochs', lambda v: is_number(v, gt=0), 'a number > 0'),
    ('decay_rate', lambda v: is_number(v, gt=0), 'a number > 0'),
    ('reprob', lambda v: is_number(v, ge=0, le=1), 'a probability in [0, 1]'),
    ('remode', lambda v: v in ('pixel', 'rand', 'const'), 'pixel, rand or const'),
    ('recount', lambda v: is_whole(v, ge=1), 'a whole number of boxes >= 1'),
    ('color_jitter', lambda v: v is None or is_number(v, ge=0), 'a factor >= 0 (omit it for none)'),
    ('checkpoint_hist', lambda v: is_whole(v, ge=0), 'a whole number of epochs >= 0 (0: none)'),
    ('drop', lambda v: v is None or is_number(v, ge=0, lt=1), 'a rate in [0, 1)'),
    ('drop_path', lambda v: v is None or is_number(v, ge=0, lt=1), 'a rate in [0, 1)'),
    ('drop_block', lambda v: v is None or is_number(v, ge=0, lt=1), 'a rate in [0, 1)'),
    ('input_size', lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 3 and all(is_whole(x) for x in v)
                                           and v[0] in (1, 3) and min(v[1:]) >= 1),
     'C H W: 1 (gray) or 3 (colour) channels, then a height and a width >= 1'),
    ('mean', lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) in (1, 3)
                                     and all(is_number(x) for x in v)), 'one value, or one per channel'),
    ('std', lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) in (1, 3)
                                    and all(is_number(x, gt=0) for x in v)), 'one value > 0, or one per channel'),
    ('clip_mode', lambda v: v in ('norm', 'value', 'agc'), 'norm, value or agc'),
    ('patience_epochs', lambda v: is_whole(v, ge=0), 'a whole number of epochs >= 0'),
    ('decay_milestones', lambda v: isinstance(v, (list, tuple)) and len(v) >= 1
     and all(is_whole(x, ge=1) for x in v), 'one or more epochs >= 1'),
)


def _mixing(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def check_args(args: argparse.Namespace) -> None:
    """Refuse a flag outside its range (also from a YAML config) with one line naming the flag, the value and what
    is allowed, before anything is built or written; timm's ``--amp`` becomes ``--mixed-precision``."""
    if args.amp:
        amp = dict(float16='fp16', bfloat16='bf16')[args.amp_dtype]
        if args.mixed_precision not in (None, amp):
            raise SystemExit(f'error: --amp --amp-dtype {args.amp_dtype} and --mixed-precision {args.mixed_precision}'
                             f' disagree: give one of them.')
        args.mixed_precision, args.amp = amp, False  # recorded once, as --mixed-precision
    for name, ok, allowed in _CHECKS:
        value = getattr(args, name)
        if not ok(value):
            raise SystemExit(f'error: {flag_message(name, value, allowed)}')
    if args.warmup_epochs >= args.epochs:
        raise SystemExit(f'error: --warmup-epochs {args.warmup_epochs}: must be fewer than --epochs {args.epochs}.')
    for name in args.log_with or ():
        if name != 'all' and not _TRACKER_PACKAGES[name][0]():
            raise SystemExit(f"error: --log-with {name}: the package '{_TRACKER_PACKAGES[name][1]}' is not installed"
                             f' here; pip install {_TRACKER_PACKAGES[name][1]}, or leave {name} out.')
    if _mixing(args) and args.batch_size % 2:
        raise SystemExit(f'error: --batch-size {args.batch_size}: mixup and cutmix pair every image with another one;'
                         f' use an even batch size.')
    if args.calibrate and args.holdout is None:
        raise SystemExit('error: --calibrate fits the temperature on validation data the test set is not part of:'
                         ' add --holdout N (N training samples held out to validate on).')
    if args.snapshot_weights and not args.snapshot_subset:
        raise SystemExit('error: --snapshot-weights needs --snapshot-subset N: the weights are saved beside the'
                         ' snapshot of the predictions')
    augmentation = [flag for flag, on in (('--aa', args.aa), ('--color-jitter', args.color_jitter),
                                          ('--reprob', args.reprob)) if on]
    if args.no_aug and augmentation:
        raise SystemExit(f"error: --no-aug trains without augmentation, and {' and '.join(augmentation)}"
                         f" {'ask' if len(augmentation) > 1 else 'asks'} for some: give one or the other.")
    if args.aa:
        try:  # timm parses the policy when it builds the transform
            create_transform((3, 32, 32), is_training=True, auto_augment=args.aa)
        except (AssertionError, ValueError, KeyError, IndexError) as e:
            raise SystemExit(f"error: --aa {args.aa}: not a policy timm knows ({e or type(e).__name__}); e.g."
                             f' rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2 (AugMix), original or 3a'
                             f' (AutoAugment).') from None
    _check_timm_flags(args)


def _check_timm_flags(args: argparse.Namespace) -> None:
    """timm's train.py flags checked against each other and against ours, in one line each (the ranges are in
    ``_CHECKS``); timm's ``--input-size`` sets ``--in-chans``, its ``--eval-metric top1`` is ``acc``."""
    if args.eval_metric == 'top1':
        args.eval_metric = 'acc'
    if args.data_dir and (args.dataset or '').strip().lower() == 'digits':
        raise SystemExit(f"error: --dataset digits is the embedded dataset and reads no folder, but --data-dir"
                         f" {args.data_dir} names one: leave --dataset out to train on the folder (as timm's"
                         f" train.py reads it), or --data-dir out for the digits.")
    if args.input_size is not None:
        chans, height, width = args.input_size
        shown = f'--input-size {chans} {height} {width}'
        if args.in_chans not in (None, chans):
            raise SystemExit(f'error: {shown} and --in-chans {args.in_chans} disagree: give one of them.')
        if args.img_size is not None and (height, width) != (args.img_size, args.img_size):
            raise SystemExit(f'error: {shown} and --img-size {args.img_size} disagree: give one of them.')
        args.in_chans = chans
    chans = args.in_chans or 3
    for name in ('mean', 'std'):
        values = getattr(args, name)
        if values is not None and len(values) not in (1, chans):
            raise SystemExit(f"error: --{name} {' '.join(map(str, values))}: {len(values)} values for {chans}"
                             f' input channels; give one value, or one per channel.')
    for flag, key in _MODEL_RATES:
        value = getattr(args, flag)
        if value is not None and key in args.model_kwargs and args.model_kwargs[key] != value:
            raise SystemExit(f"error: --{flag.replace('_', '-')} {value} and --model-kwargs {key}="
                             f'{args.model_kwargs[key]} disagree: give one of them.')
    if args.initial_checkpoint:
        path = Path(args.initial_checkpoint.removeprefix('local-dir:')).expanduser()
        if not path.exists():
            raise SystemExit(f"error: --initial-checkpoint {args.initial_checkpoint}: no such file or folder.")
    if args.experiment and (Path(args.experiment).name != args.experiment or args.experiment in ('.', '..')):
        raise SystemExit(f'error: --experiment {args.experiment}: a folder name, not a path (the folder is made in'
                         f' --output, default output/train); give a path with --output.')
    for problem in (check_optimizer(args.opt), check_scheduler(args)):
        if problem:
            raise SystemExit(f"error: {problem.rstrip('.')}.")


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    if args.experiment:  # timm's layout: <output>/<experiment>, the experiment's name not recorded in args.yaml
        args.output = str(Path(args.output or RunFolder.DEFAULT_ROOT) / args.experiment)
    problem = output_problem(args.output) if args.output else None
    if problem:
        raise SystemExit(f'error: --output {args.output}: {problem}; give a folder that can be written.')
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    if args.imports and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a module beside the user, as `python -m` would find it
    for module in args.imports:
        import_user_module(module)
    with trusting_member_repos(args.trust_member_repos):
        if args.generations > 1:
            return train_generations(args)
        return train(args)


def import_user_module(module: str) -> None:
    """Import ``--import MODULE`` (a user's module that registers timm models); a module that cannot be found, or
    fails while it runs, stops the run with the module named, before anything is written."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module != e.name and not module.startswith(f'{e.name}.'):
            # the user's module was found, and it imports something missing
            raise SystemExit(f'error: --import {module}: the module imports {e.name!r}, which is not installed'
                             f' ({e}).') from None
        raise SystemExit(f"error: --import {module}: no module named {module!r} here. Give a module name importable"
                         f" from the working directory or PYTHONPATH (a file my_models.py there is 'my_models').")\
            from None
    except Exception as e:  # noqa: BLE001  (anything the user's code raises, reported with its place)
        if isinstance(e, SyntaxError):
            where = f'{e.filename}, line {e.lineno}'
        else:
            frame = traceback.extract_tb(e.__traceback__)[-1]
            where = f'{frame.filename}, line {frame.lineno}'
        raise SystemExit(f'error: --import {module} failed while it ran: {type(e).__name__}: {e} ({where}).')\
            from None


def train_generations(args: argparse.Namespace) -> int:
    """K runs in <output>/gen1..genK: generation k learns from generation k-1 (generation 1 from --teacher), with
    seed + 1000 k. Running the same command again keeps the generations it finished and resumes where it stopped;
    each generation is checked to be this command's (its flags and its teacher's weights), a generation of another
    command is refused (or, with --overwrite, moved aside and retrained)."""
    if not args.teacher:
        raise SystemExit('error: --generations needs --teacher: the model generation 1 learns from')
    if not args.output:
        # every process must find the same folders, and running the command again must find the finished ones
        raise SystemExit('error: --generations needs --output: the folder of gen1..genK')
    if args.resume:
        raise SystemExit('error: to continue a run of generations, run the same command again (without --resume):'
                         ' finished generations are skipped and an interrupted one resumes')
    root = Path(args.output)
    teacher = list(args.teacher)
    for k in range(1, args.generations + 1):
        run = RunFolder.generation(root, k)
        folder = run.path
        gen_args = argparse.Namespace(**vars(args))
        # seeds far apart, so that no generation's epoch reuses another's data order or augmentation
        seed = args.seed + 1000 * k
        gen_args.generations, gen_args.output, gen_args.seed, gen_args.teacher = 1, str(folder), seed, teacher
        if run.checkpoint_path.exists() and not run.file(RunFolder.RESULTS).exists():
            gen_args.resume = str(folder)
        _logger.info(f'generation {k} of {args.generations}: teacher {teacher}, seed {gen_args.seed}, output {folder}')
        # a finished generation is checked (built, not trained) and kept; the process group (two processes under
        # DDP) must outlive every generation but the last
        train(gen_args, end_training=k == args.generations, generation=k)
        teacher = [str(folder)]
    return 0


def train(args: argparse.Namespace, end_training: bool = True, generation: int | None = None) -> int:
    """One training run; ``end_training`` ends Accelerate's state (the process group) after it. ``generation``: the
    run's number in a --generations run, whose folder may hold that generation finished by the same command (kept,
    not trained again). The main process holds the output folder's lock from the moment it claims the folder (before
    writing anything there) to the end of the run."""
    _refuse_unsupported_launch()
    with contextlib.ExitStack() as held:
        return _train(args, end_training, generation, held)


# the ways of sharding the Accelerator takes from `accelerate launch` (--use_deepspeed, --use_fsdp, or a config's
# distributed_type), by the variable it reads: neither is tested with this trainer. On a CPU Accelerate ignores FSDP and
# fails on DeepSpeed's import, so the variable, not the Accelerator's distributed_type, says it the same everywhere
_UNSUPPORTED_LAUNCH = (
    ('ACCELERATE_USE_DEEPSPEED', 'DeepSpeed is not supported by this trainer'),
    ('ACCELERATE_USE_FSDP', 'FSDP is not supported yet (open item 1 of issue 29: the trainer builds its optimizer'
                            ' before sharding and saves on the main process only)'),
)


def _refuse_unsupported_launch() -> None:
    """Refuse a DeepSpeed or FSDP launch in one line, before anything is built or written."""
    for variable, reason in _UNSUPPORTED_LAUNCH:
        if accelerate_utils.parse_flag_from_env(variable):
            raise SystemExit(f'error: {reason} ({variable} is set by accelerate launch or its config); run one'
                             f' process, or DDP on one or several machines (accelerate launch --multi_gpu'
                             f' --num_processes N [--num_machines M ...]) without --use_deepspeed / --use_fsdp.')


def _train(args: argparse.Namespace, end_training: bool, generation: int | None, held: contextlib.ExitStack) -> int:
    task_kwargs = dict(args.task_kwargs)
    if args.smoothing and not _mixing(args):  # with mixup, timm's Mixup smooths the targets it mixes
        task_kwargs.setdefault('label_smoothing', args.smoothing)
    if args.teacher:
        task_kwargs['teachers'] = list(args.teacher)

    # Accelerate only forms a CPU process group (gloo) when told it runs on the CPU; without this, processes
    # started by `accelerate launch --multi_gpu` on a machine without an accelerator each train alone
    cpu = args.cpu or not _has_accelerator()
    # the process group, formed before the inputs are read: every process reads them from its own machine (a
    # checkpoint to resume, the data, the teachers), and one that lacks one must stop the others
    state = PartialState(cpu=cpu)
    (resume_state, train_ds, val_ds, test_ds, info, num_classes, snapshot_idx, model, task, mixup_fn,
     data_config) = _on_every_process(state, functools.partial(_read_inputs, args, task_kwargs),
                                      "reading the run's inputs", in_turns=args.dataset_download)
    # the device-dependent defaults, resolved into args (args.yaml records them) before Accelerate needs the
    # precision; PartialState is the device the Accelerator will use (`accelerate launch --cpu` included)
    defaults = device_defaults(state.device.type, args.opt, args.mixed_precision)
    defaults.resolve(args)
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=task.find_unused_parameters)
    run = RunFolder(args.output) if args.output else RunFolder.default(args.model)
    output = run.path
    accelerator = Accelerator(cpu=cpu, mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.grad_accum_steps, kwargs_handlers=[ddp_kwargs],
                              log_with=args.log_with,
                              project_dir=run.sub(RunFolder.TRACKING) if args.log_with else None)
    is_main = accelerator.is_main_process
    log = _logger.info if is_main else (lambda *a, **k: None)
    if args.fused_opt and accelerator.scaler is not None and args.opt.lower() in FUSED_UNSAFE_FP16:
        raise SystemExit(f"error: --fused-opt with --opt {args.opt} under fp16: torch's fused SGD starts from"
                         f' uninitialised momentum when the grad scaler skips its first step (an overflow, routine in'
                         f' fp16); pass --no-fused-opt, or use bf16 or --opt adamw.')
    if accelerator.mixed_precision == 'fp16' and accelerator.scaler is None and accelerator.device.type == 'cpu':
        log('warning: --mixed-precision fp16 on the CPU: Accelerate neither autocasts nor scales the loss there, so'
            ' this run computes in fp32 (bf16 autocasts on a CPU).')

    train_loader, val_loader, test_loader, snapshot_loader = _create_loaders(
        args, accelerator, train_ds, val_ds, test_ds, data_config, info, snapshot_idx, defaults)
    # reseeded every epoch, so that a resumed run sees the same data order as an uninterrupted one
    shuffle_generator = train_loader.generator
    try:
        _apply_speed_flags(args, task, data_config['input_size'], log)
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    try:
        optimizer = task.create_optimizer(opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                          layer_decay=args.layer_decay, momentum=args.momentum,
                                          **(dict(fused=True) if args.fused_opt else {}))
    except ValueError as e:  # e.g. a task whose terms need an optimizer of another kind
        raise SystemExit(f'error: {e}') from None

    run_identity = _normalised(dict(
        **{flag: getattr(args, flag) for flag in IDENTITY_FLAGS},
        model_args=get_model_args(model), dataset=info.name, input_size=list(data_config['input_size'])))
    # the folder is claimed on the main process (its lock taken, what a kill left swept, the run it holds checked);
    # every process starts as it decides, or stops with its line
    verdict = _on_main(accelerator, functools.partial(_claim_folder, args, run, resume_state, run_identity,
                                                      generation, held, log), f'claiming {output}')
    if verdict['start'] == 'done':
        log(f'generation {generation}: done in {output}')
        accelerator.wait_for_everyone()
        if end_training:
            accelerator.end_training()
        return 0
    if verdict['start'] == 'new':
        resume_state = None  # a generation of another command, moved aside by --overwrite: trained anew
    extended_from, teachers = verdict['extended_from'], verdict['teachers']
    # the last checkpoint on disk, (file, epochs it holds): what a failed save says is kept
    last_saved = (find_checkpoint(args.resume), resume_state['epoch']) if resume_state is not None else None
    log('\n'.join(run_summary(args, info, task, dict(training=train_ds, validation=val_ds, test=test_ds), data_config,
                              accelerator, optimizer, output=output)))
    if resume_state is not None:
        task.load_state_dict(resume_state['task'])
        optimizer.load_state_dict(resume_state['optimizer'])
        saved_lrs = [group['lr'] for group in optimizer.param_groups]  # before a new scheduler sets its own
    # what reproduces the run: never where it was written, where it resumed from, or the config it came from
    recorded = _normalised({k: v for k, v in vars(args).items() if k not in _NOT_RECORDED})
    _on_main(accelerator, functools.partial(run.write_args, recorded), f'writing {run.file(RunFolder.ARGS)}')
    if args.log_with:
        # the run's flags as the trackers' config (scalars only: what every tracker takes)
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in recorded.items()}
        accelerator.init_trackers('timm-ensembles', config=config, init_kwargs={'wandb': {'name': output.name}})

    if args.compile:
        task = torch.compile(task)
    task, optimizer, train_loader, val_loader = accelerator.prepare(task, optimizer, train_loader, val_loader)
    if test_loader is not None:
        test_loader = accelerator.prepare(test_loader)
    unwrapped = accelerator.unwrap_model(task)
    unwrapped = getattr(unwrapped, '_orig_mod', unwrapped)
    export_model = unwrapped.export_model()
    # the average of the exported model's weights (an ensemble's: every member's), on its device; each process keeps
    # the same one (the weights are the same after every all-reduced update)
    ema = ModelEmaV3(export_model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) \
        if args.model_ema else None
    # the schedule counts the updates of this process's share of the batches (as prepared)
    updates_per_epoch = max(math.ceil(len(train_loader) / args.grad_accum_steps), 1)
    try:
        lr_scheduler, num_epochs = create_scheduler(optimizer, args, updates_per_epoch)
    except (ValueError, AssertionError) as e:  # settings that depend on the epoch's length (wsd's decay phase)
        raise SystemExit(f'error: --sched {args.sched}: {e}') from None
    scheduler_state = SchedulerState(lr_scheduler)

    start_epoch, num_updates, val_metrics, best, ema_metrics = 0, 0, {}, None, None
    mechanism = {}  # the last epoch's diagnostics (Task.mechanism)
    # --checkpoint-hist: the epochs kept in <output>/checkpoints, best first ([{'epoch': E, <metric>: value}])
    history, history_root = [], run.sub(RunFolder.HISTORY)
    if resume_state is not None:
        # an extended run takes its schedule up as timm's --resume does: rebuilt over the new epoch count (the state
        # saved describes the old one); a plateau's state has no length and carries on
        if extended_from is None or args.sched == 'plateau':
            scheduler_state.load_state_dict(resume_state['scheduler'])
        if accelerator.scaler is not None and resume_state.get('scaler'):
            accelerator.scaler.load_state_dict(resume_state['scaler'])
        start_epoch, num_updates = resume_state['epoch'], resume_state['num_updates']
        # building the scheduler reset the learning rate: set it where the interrupted run had it, from the update
        # count, or, for a schedule stepped per epoch on a metric (plateau), as the optimizer's state has it
        if lr_scheduler is not None and lr_scheduler.t_in_epochs:
            for group, lr in zip(optimizer.param_groups, saved_lrs):
                group['lr'] = lr
        elif lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        if extended_from is not None:
            log(_extension_note(args, extended_from, start_epoch, num_updates, saved_lrs[0],
                                optimizer.param_groups[0]['lr']))
        val_metrics = resume_state.get('val_metrics', {})
        mechanism = resume_state.get('mechanism', {})  # a run resumed after its last epoch reports it
        best = resume_state.get('best')
        # as the checkpoint has it (a --checkpoint-hist given now that is smaller keeps the first N; epochs dropped
        # before cannot come back under a larger one)
        history = resume_state.get('checkpoint_hist', [])[:args.checkpoint_hist]
        if ema is not None:
            ema.load_state_dict(resume_state['ema'])
            ema_metrics = resume_state.get('ema_val_metrics')
        log(f'resumed from {args.resume} at epoch {start_epoch}')

    model_config = dict(label_names=info.class_names) if info.class_names else None
    unexplained = set()  # diagnostics said once to be not computable

    def bar(desc: str) -> str | None:  # the evaluations' progress bars, as training's
        return None if args.no_progress else desc

    def update_ema(num_updates: int) -> None:
        ema.update(export_model, step=num_updates)

    def log_progress(values: dict) -> None:
        log(f"train {epoch} [{values['batch']}/{values['batches']}] | update {values['update']} | loss"
            f" {values['loss']:.4g} | lr {values['lr']:.3g} | {values['samples_per_sec']:.0f} img/s")
        accelerator.log({'train/loss_interval': values['loss'], 'train/lr': values['lr'],
                         'train/samples_per_sec': values['samples_per_sec']}, step=values['update'])

    def prepare_folder() -> None:
        run.truncate_metrics(start_epoch)
        remove_snapshots_from(output, start_epoch)
        # the epochs this run redoes (exported before a kill could stop their checkpoint)
        sweep_history(history_root, [h['epoch'] for h in history])
        if snapshot_loader is not None and start_epoch == 0:
            # the trajectory's first point (Fort et al.'s start at the initialisation); rewritten by a run resumed
            # before its first epoch finished, from the same seeded initialisation
            _write_snapshot(output, INIT_EPOCH, export_model, snapshot_loader, snapshot_idx, args, info, accelerator)

    _on_main(accelerator, prepare_folder, f'preparing {output}')
    for epoch in range(start_epoch, num_epochs):
        set_seed(epoch_seed(args.seed, epoch), device_specific=True)
        shuffle_generator.manual_seed(epoch_seed(args.seed, epoch))
        unwrapped.on_epoch_start(epoch)
        if mixup_fn is not None:
            mixup_fn.mixup_enabled = not (args.mixup_off_epoch and epoch >= args.mixup_off_epoch)
        start = time.perf_counter()
        try:
            train_metrics, num_updates = train_one_epoch(
                task, train_loader, optimizer, accelerator, epoch, lr_scheduler=lr_scheduler,
                clip_grad=args.clip_grad, clip_mode=args.clip_mode, num_updates=num_updates,
                show_progress=not args.no_progress, num_classes=num_classes if epoch == start_epoch else None,
                log_interval=args.log_interval,
                log=log_progress, on_update=None if ema is None else update_ema, mixup_fn=mixup_fn,
                mechanism_interval=args.log_interval)
        except LabelError as e:  # a dataset that does not expose its labels, checked on its first batch
            raise SystemExit(f'error: {e}') from None
        except NonFiniteLossError as e:
            kept = run.checkpoint_path
            where = f"the last good checkpoint is '{kept}'" if kept.exists() else 'no epoch had finished, no checkpoint'
            raise SystemExit(f'error: {e} Training stopped; {where}.') from None
        # DDP keeps each process's BatchNorm statistics of its own last batches: evaluate and save one set
        sync_buffers(export_model, accelerator)
        try:
            val_metrics = evaluate(export_model, val_loader, accelerator, num_classes=num_classes,
                                   progress=bar(f'val {epoch}'))
        except LabelError as e:
            raise SystemExit(f'error: {e}') from None
        if ema is not None:
            sync_buffers(ema.module, accelerator)
            ema_metrics = evaluate(ema.module, val_loader, accelerator, progress=bar(f'val {epoch} ema'))
        if snapshot_loader is not None:
            # before the checkpoint: a run killed in between redoes this epoch and rewrites its snapshot
            _on_main(accelerator, functools.partial(_write_snapshot, output, epoch, export_model, snapshot_loader,
                                                    snapshot_idx, args, info, accelerator),
                     f'writing the snapshot of epoch {epoch}', kept=functools.partial(_kept, last_saved))
        seconds = time.perf_counter() - start
        lr = optimizer.param_groups[0]['lr']
        # the method's own diagnostics, each beside its value when the mechanism does nothing
        mechanism = unwrapped.mechanism(train_metrics, val_metrics)
        for name, d in mechanism.items():
            if d['value'] is None and name not in unexplained:
                unexplained.add(name)
                log(f"mechanism {name}: not computed ({d['note']})")
        log(format_metrics(epoch, train_metrics, val_metrics, lr, seconds)
            + ('' if ema is None else f" | ema acc {ema_metrics['acc']:.2f}")
            + (f' | mechanism: {format_mechanism(mechanism)}' if mechanism else ''))
        record = dict(epoch=epoch, lr=lr, seconds=seconds, train=train_metrics, val=val_metrics)
        if mechanism:
            record['mechanism'] = {k: d['value'] for k, d in mechanism.items()}
        if ema is not None:
            record['val_ema'] = ema_metrics
        accelerator.log(_flat({k: v for k, v in record.items() if k != 'seconds'}), step=num_updates)
        value = val_metrics[args.eval_metric]
        if lr_scheduler is not None:
            # as timm's train.py after every epoch: the schedules stepped per epoch (plateau, on the metric) step
            # here, before the checkpoint, so that a resumed run starts from the stepped state
            lr_scheduler.step(epoch + 1, value)
        improved = best is None or (value < best['value'] if args.eval_metric == 'loss' else value > best['value'])
        if improved:
            best = dict(metric=args.eval_metric, value=value, epoch=epoch)
        ranked = rank_history(history, epoch, args.eval_metric, value, args.checkpoint_hist,
                              lower_is_better=args.eval_metric == 'loss')
        state = dict(task=unwrapped, optimizer=optimizer, scheduler=scheduler_state, scaler=accelerator.scaler,
                     epoch=epoch + 1, num_updates=num_updates, val_metrics=val_metrics, mechanism=mechanism,
                     run=run_identity, best=best, checkpoint_hist=ranked, teachers=teachers,
                     **({} if ema is None else dict(ema=ema, ema_val_metrics=ema_metrics)))
        # the best epoch's model (and this epoch's, when it ranks among the --checkpoint-hist best) before the
        # checkpoint: a run killed in between redoes the epoch and its exports
        exports, configs = [], dict(model_config=model_config, data_config=data_config)
        if improved:
            exports.append(functools.partial(export_folder, export_model, run.sub(RunFolder.BEST), **configs))
        if any(h['epoch'] == epoch for h in ranked):
            exports.append(functools.partial(export_new_folder, export_model, history_folder(history_root, epoch),
                                             **configs))
        # the epochs that fell out of the ranking go once the checkpoint no longer lists them
        dropped = functools.partial(sweep_history, history_root, [h['epoch'] for h in ranked])
        _on_main(accelerator, functools.partial(_save_epoch, run, record, state, exports, dropped),
                 f'saving epoch {epoch} to {output}', kept=functools.partial(_kept, last_saved))
        last_saved = (run.checkpoint_path, epoch + 1)
        history = ranked

    test_metrics, ema_test_metrics, selection, calibration = None, None, None, None
    if test_loader is not None:
        # every process makes the same choice from the same (gathered) validation metrics
        selection = unwrapped.select_on_validation(val_metrics)
        if selection:
            log(selection)
        if args.calibrate:
            calibration = _calibrate(export_model, val_loader, accelerator, log)
        test_metrics = evaluate(export_model, test_loader, accelerator, num_classes=num_classes, split='test',
                                progress=bar('test'))
        ema_test_metrics = None if ema is None else evaluate(ema.module, test_loader, accelerator, split='test',
                                                             progress=bar('test ema'))
    def export_final() -> None:
        # the evaluation preprocessing goes into config.json, so that resolve_data_config(model=reloaded) gives it
        export_folder(export_model, output, model_config=model_config, data_config=data_config)
        for name, extra in unwrapped.exports().items():
            export_folder(extra, run.sub(name), model_config=model_config, data_config=data_config)
            log(f"saved {type(extra).__name__} '{name}' to {run.sub(name)}")
        if ema is not None:
            export_folder(ema.module, run.sub(RunFolder.EMA), model_config=model_config, data_config=data_config)
            log(f"saved the model's EMA to {run.sub(RunFolder.EMA)}")
        run.write_results(_results(
            args, info.name, num_epochs, accelerator.num_processes, val_metrics, best, history,
            test=None if test_metrics is None else dict(selection=selection, metrics=test_metrics),
            calibration=calibration, ema=None if ema is None else dict(final_epoch=ema_metrics, test=ema_test_metrics),
            mechanism=mechanism))
        test = '' if test_metrics is None else f', test acc {test_metrics["acc"]:.2f} (mean-probs' \
            f' {test_metrics.get("mean_probs_acc", test_metrics["acc"]):.2f})'
        log(f'final epoch: val acc {val_metrics.get("acc", float("nan")):.2f}{test}; saved to {output}')

    _on_main(accelerator, export_final, f'exporting the final model to {output}',
             kept=functools.partial(_kept, last_saved, finished=True))
    # the next generation of a --generations run reads this run's folder on every process
    accelerator.wait_for_everyone()
    if end_training:
        accelerator.end_training()  # also finishes the trackers
    else:
        for tracker in accelerator.trackers:  # the next generation starts its own
            tracker.finish()
    return 0


def _read_inputs(args: argparse.Namespace, task_kwargs: dict) -> tuple:
    """What a run reads before it trains, each refused in one line: the checkpoint to resume (``args.output``
    defaults to its folder), the datasets (the data first: the class count and natural image size come from it),
    the snapshot subset, the model and its task (teachers, initial checkpoint) and the data config."""
    resume_state = None
    if args.resume:
        try:
            resume_path = find_checkpoint(args.resume)
            resume_state = load_checkpoint(resume_path)
        except CheckpointError as e:
            raise SystemExit(f'error: {e}') from None
        args.output = args.output or str(resume_path.parent)
    train_ds, val_ds, test_ds, info, num_classes = _create_datasets(args)
    try:
        # from the dataset's evaluation split (the test set with --holdout), which the snapshot loader reads
        snapshot_idx = snapshot_indices(val_ds if test_ds is None else test_ds, args.snapshot_subset) \
            if args.snapshot_subset else None
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    model, task, mixup_fn, data_config = _create_task(args, task_kwargs, num_classes, info)
    _check_batch_of_one(args, task, data_config, train_ds)
    return (resume_state, train_ds, val_ds, test_ds, info, num_classes, snapshot_idx, model, task, mixup_fn,
            data_config)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order and augmentation: far apart for neighbouring seeds, so that seed s + 1 does
    not replay seed s's shuffles shifted by one epoch (``seed + epoch`` did); seed 0 keeps ``epoch``. Below 2^32, as
    numpy's seed must be."""
    return (seed * 100_003 + epoch) % 2 ** 32


def _results(args: argparse.Namespace, dataset: str, num_epochs: int, world_size: int, final: dict,
             best: dict | None, history: list, test: dict | None, ema: dict | None,
             calibration: dict | None = None, mechanism: dict | None = None) -> dict:
    """``results.json``: the final epoch's validation metrics, the best epoch, the --checkpoint-hist ranking, the
    test set's with --holdout (and the choice made on validation, the --calibrate temperature), the EMA model's, and
    the method's diagnostics of the final epoch (``Task.mechanism``: value, null value and what each says)."""
    results = dict(model=args.model, dataset=dataset, epochs=num_epochs, seed=args.seed, world_size=world_size,
                   final_epoch=final)
    if best is not None:
        results.update(best_epoch=best)
    if args.checkpoint_hist:
        results['checkpoint_hist'] = history
    if test is not None:
        results.update(holdout=args.holdout, selection=test['selection'], test=test['metrics'])
    if calibration is not None:
        results['calibration'] = calibration
    if mechanism:
        results['mechanism'] = mechanism
    if ema is not None:
        results['ema'] = dict(final_epoch=ema['final_epoch'])
        if test is not None:
            results['ema']['test'] = ema['test']
    return results


def _calibrate(model, loader, accelerator, log) -> dict:
    """--calibrate: the temperature fitted on the held-out samples (uncertainty.calibrate). Where none can be fitted
    (held-out samples all right, say) the run still exports its model, uncalibrated, and says why."""
    try:
        calibration = calibrate(model, loader, accelerator)
    except ValueError as e:
        log(f'warning: --calibrate: {e} The model is exported uncalibrated (temperature 1).')
        return dict(temperature=1.0, error=str(e))
    log(f"calibrated on the held-out samples: temperature {calibration['temperature']:.4g}, NLL"
        f" {calibration['nll_before']:.4f} -> {calibration['nll_after']:.4f}")
    return calibration


def _write_snapshot(output, epoch: int, model, loader, indices, args, info, accelerator) -> None:
    """The snapshot of one epoch (or of the initialisation): member logits on the subset, weights when asked."""
    logits, targets = predict_members(model, loader, accelerator)
    params = member_parameters(model) if args.snapshot_weights else None
    write_snapshot(output, epoch, logits, targets, indices, dict(model=args.model, dataset=info.name),
                   member_params=params)


def _create_loaders(args: argparse.Namespace, accelerator, train_ds, val_ds, test_ds, data_config: dict, info,
                    snapshot_idx, defaults: DeviceDefaults):
    """The training and validation loaders (timm's transforms, or the in-memory batched path), the test loader with
    --holdout, and the loader of the snapshot subset with --snapshot-subset (else None); host memory pinned as the
    device's defaults say."""
    hflip = args.hflip if args.hflip is not None else info.default_hflip
    train_loader, val_loader = te_data.create_loaders(
        train_ds, val_ds, data_config, batch_size=args.batch_size, workers=args.workers, hflip=hflip,
        scale=tuple(args.scale), train_transform=not args.no_aug, seed=args.seed, rank=accelerator.process_index,
        auto_augment=args.aa, color_jitter=args.color_jitter, re_prob=args.reprob, re_mode=args.remode,
        re_count=args.recount, pin_memory=defaults.pin_memory)
    test_loader = None if test_ds is None else te_data.create_eval_loader(
        test_ds, data_config, args.batch_size, args.workers, pin_memory=defaults.pin_memory)
    snapshot_loader = None
    if snapshot_idx is not None:
        # the evaluation transform (set by the loaders above); its own generator keeps the global RNG untouched
        snapshot_loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(val_ds if test_ds is None else test_ds, snapshot_idx.tolist()),
            batch_size=args.batch_size, shuffle=False,
            num_workers=args.workers, persistent_workers=args.workers > 0, generator=torch.Generator())
    return train_loader, val_loader, test_loader, snapshot_loader


def _check_resume(args: argparse.Namespace, resume_state: dict, run_identity: dict) -> int | None:
    """Refuse to resume another run (its identity flags, model or data differ, or a teacher changed in place). A
    larger --epochs extends the run, as timm's --resume does (a smaller one is refused): returns the run's epoch
    count then, else None."""
    extended_from = None
    # a run saved by an older version records fewer entries: those it has must match
    saved = _normalised(resume_state.get('run', {}))
    if 'epochs' in saved and saved['epochs'] != run_identity['epochs']:
        if run_identity['epochs'] < saved['epochs']:
            raise SystemExit(f"error: --resume {args.resume} --epochs {run_identity['epochs']}: the run has"
                             f" {saved['epochs']} epochs; a resumed run can be extended (a larger --epochs) but not"
                             f" shortened: give --epochs {saved['epochs']} or more.")
        extended_from = saved.pop('epochs')
    changed = _changed_flags(saved, run_identity)
    if changed:
        raise SystemExit(
            f'error: --resume {args.resume} is another run ({changed}). A resumed run takes its settings from'
            f" the run's args.yaml; resume without changing them, or start a new run in another --output folder."
        )
    return extended_from


def _changed_flags(saved: dict, run_identity: dict) -> str:
    """The entries of a recorded run identity that differ from this command's, in words ('' when none)."""
    changed = {k: (saved[k], v) for k, v in run_identity.items() if k in saved and saved[k] != v}
    return '; '.join(f'{k}: {old!r} there, {new!r} here' for k, (old, new) in changed.items())


def _changed_teachers(saved: list | None, teachers: list[dict]) -> str:
    """The teachers whose weights (or architecture) differ from those a run recorded, in words ('' when none): a
    teacher folder retrained in place keeps its name and changes its weights' sha256."""
    changed = []
    for old, new in zip(saved or (), teachers):
        if not isinstance(old, dict) or old.get('source') != new['source']:
            continue  # another teacher altogether: the teacher flag differs, and says so
        sha_changed = old.get('sha256') and new['sha256'] and old['sha256'] != new['sha256']
        if sha_changed or old.get('architecture') != new['architecture']:
            changed.append(f"teacher '{new['source']}' changed ({_weights_words(old)} then, {_weights_words(new)}"
                           f' now)')
    return '; '.join(changed)


def _weights_words(identity: dict) -> str:
    sha = identity.get('sha256')
    return f"{identity.get('architecture')}, sha256 {sha[:12] if sha else 'unknown'}"


def _recorded_identity(run: RunFolder) -> tuple[dict, list | None]:
    """The identity a run recorded: its checkpoint's (flags, model, data, teachers), or where the checkpoint is gone
    its args.yaml's identity flags (teachers unknown)."""
    if run.checkpoint_path.is_file():
        try:
            state = load_checkpoint(run.checkpoint_path)
            return _normalised(state.get('run', {})), state.get('teachers')
        except CheckpointError:
            pass
    recorded = run.args()
    return {k: recorded[k] for k in IDENTITY_FLAGS if k in recorded}, None


def _claim_folder(args: argparse.Namespace, run: RunFolder, resume_state: dict | None, run_identity: dict,
                  generation: int | None, held: contextlib.ExitStack, log) -> dict:
    """Claim the output folder on the main process, before anything is written there: take its lock for the life of
    the run (``held`` releases it), sweep what a killed save or export left, and decide how the run starts there.

    Refused in one line: a folder in use by another trainer; a folder holding a run that this one would write over
    (a new run, or a resume into another folder), unless --overwrite moves its files aside; a resume whose flags or
    teachers changed. A generation of --generations is checked against this command instead: the same (flags and
    teachers' weights) is kept when finished and resumed otherwise; another is refused, or with --overwrite moved
    aside and trained anew.

    Returns:
        ``start`` ('new', 'resume', or 'done' for a finished generation of this command), ``extended_from`` (the
        epochs of a run that --resume extends, else None) and ``teachers`` (each teacher's identity, recorded in
        the checkpoint).
    """
    try:
        held.enter_context(run.lock(log))
    except RunBusyError as e:
        raise SystemExit(f'error: {e}') from None
    except OSError as e:
        raise SystemExit(f"error: cannot make the run folder '{run.path}': {os_error_reason(e)}; give an --output"
                         f' that can be written.') from None
    swept = run.sweep()
    if swept:
        log(f"{run.path}: removed what a killed save or export left: {', '.join(p.name for p in swept)}")
    teachers = [model_identity(t) for t in args.teacher or ()]
    verdict = dict(start='new' if resume_state is None else 'resume', extended_from=None, teachers=teachers)
    held_files = run.run_files()

    def move_aside() -> None:
        aside = run.move_aside()
        log(f"--overwrite: the earlier run's files in {run.path} are moved aside into {aside}")

    if generation is not None and (resume_state is not None or held_files):
        # this command's generation k: its flags and teachers' weights must be those the folder's run recorded
        saved, saved_teachers = (_normalised(resume_state.get('run', {})), resume_state.get('teachers')) \
            if resume_state is not None else _recorded_identity(run)
        changed = '; '.join(c for c in (_changed_flags(saved, run_identity),
                                        _changed_teachers(saved_teachers, teachers)) if c)
        if not changed:
            if run.file(RunFolder.RESULTS).is_file():
                verdict['start'] = 'done'
            # else: resumed from its checkpoint, or (stopped before its first checkpoint) started again
            return verdict
        if not args.overwrite:
            raise SystemExit(f"error: generation {generation} in '{run.path}' was made by another command"
                             f' ({changed}): run the command it was made with to continue it, choose another'
                             f' --output, or pass --overwrite to move its files aside and train it anew.')
        move_aside()
        verdict['start'] = 'new'
        return verdict
    if resume_state is not None:
        source = find_checkpoint(args.resume).parent
        if held_files and source.resolve() != run.path.resolve():
            if not args.overwrite:
                raise SystemExit(
                    f"error: --resume {args.resume} --output {run.path}: '{run.path}' already holds another run"
                    f" ({', '.join(held_files)}), which this one would write over: give --output a new folder (or"
                    f' leave it out to continue in {source}), or pass --overwrite to move its files aside.')
            move_aside()
        verdict['extended_from'] = _check_resume(args, resume_state, run_identity)
        changed = _changed_teachers(resume_state.get('teachers'), teachers)
        if changed:
            raise SystemExit(f'error: --resume {args.resume}: {changed}: retrained or replaced in place since the run'
                             f' started. Resume with the teacher it started from, or start a new run in another'
                             f' --output.')
        return verdict
    if held_files:
        if not args.overwrite:
            if run.file(RunFolder.RESULTS).is_file():
                how = f'it is finished (--resume {run.path} with a larger --epochs extends it)'
            elif run.checkpoint_path.is_file():
                how = f'--resume {run.path} continues it'
            else:
                how = 'it has no checkpoint to resume (it stopped before saving an epoch, or its checkpoint is gone)'
            raise SystemExit(f"error: '{run.path}' already holds a run ({', '.join(held_files)}), which a new run"
                             f' would write over: {how}; choose another --output, or pass --overwrite to move its'
                             f' files aside into {run.path}/{RunFolder.MOVED_ASIDE_PREFIX}<time>.')
        move_aside()
    return verdict


def _extension_note(args: argparse.Namespace, old_epochs: int, start_epoch: int, num_updates: int, old_lr: float,
                    new_lr: float) -> str:
    """What a run extended by --resume with a larger --epochs does next: timm's train.py rebuilds its schedule over
    the new epoch count and takes it up where the run stands (``step_update(start_epoch * updates_per_epoch)``), so
    the learning rate is the new schedule's at that update, not the decayed end of the old one."""
    if args.sched == 'plateau':
        schedule = 'the plateau schedule carries on (it has no length)'
    elif args.sched == 'none':
        schedule = 'the learning rate stays constant (--sched none)'
    else:
        schedule = (f'the {args.sched} schedule is rebuilt over {args.epochs} epochs and taken up at update'
                    f' {num_updates}, as timm\'s --resume does')
    return (f'--epochs {old_epochs} -> {args.epochs}: the run continues from epoch {start_epoch} to {args.epochs};'
            f' {schedule}: learning rate {old_lr:.6g} -> {new_lr:.6g}')


def _create_datasets(args: argparse.Namespace):
    """The training, validation and (with --holdout) test sets, the dataset's info and the class count; every label
    checked against it."""
    try:
        train_ds, val_ds, info = te_data.create_datasets(
            args.dataset, root=args.data_dir, train_split=args.train_split, val_split=args.val_split,
            train_subset=args.train_subset, val_subset=args.val_subset, download=args.dataset_download,
            img_mode='L' if args.in_chans == 1 else 'RGB')
        # with --holdout the dataset's validation split becomes the test set, evaluated once at the end
        test_ds = None
        if args.holdout is not None:
            test_ds = val_ds
            train_ds, val_ds = te_data.split_holdout(train_ds, args.holdout)
    except (OSError, ValueError, MissingExtraError) as e:
        raise SystemExit(f'error: {e}') from None
    num_classes = args.num_classes if args.num_classes is not None else info.num_classes
    if not num_classes or num_classes < 1:
        raise SystemExit(f"error: cannot tell the class count of dataset '{info.name}'; pass --num-classes")
    if info.num_classes and num_classes > info.num_classes:
        # a larger head would train classes no image has, and export more classes than label names
        extra = num_classes - info.num_classes
        raise SystemExit(f'error: --num-classes {num_classes}: {info.name} has {info.num_classes} classes (labels'
                         f' 0..{info.num_classes - 1}); a head of {num_classes} would learn {extra} classes that no'
                         f' image has, and export {num_classes} classes with {info.num_classes} label'
                         f' names. Leave --num-classes out (the dataset\'s count) or give {info.num_classes}.')
    try:
        for split, ds in (('training', train_ds), ('validation', val_ds), ('test', test_ds)):
            if ds is not None:
                te_data.check_labels(ds, num_classes, split)
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    return train_ds, val_ds, test_ds, info, num_classes


def _create_task(args: argparse.Namespace, task_kwargs: dict, num_classes: int, info):
    """The model, its task, timm's Mixup (or None) and the data config (the evaluation preprocessing, exported with
    the model), each refused with the reason before anything is written."""
    # same seed on every process before the model is built, so that every process builds the same model
    set_seed(args.seed)
    model_kwargs = dict(args.model_kwargs)
    model_kwargs.setdefault('num_classes', num_classes)
    if args.in_chans:
        model_kwargs.setdefault('in_chans', args.in_chans)
    if args.pretrained_base:
        model_kwargs['pretrained_base'] = True
    for flag, key in _MODEL_RATES:  # timm's --drop, --drop-path, --drop-block (checked against --model-kwargs)
        if getattr(args, flag) is not None:
            model_kwargs[key] = getattr(args, flag)
    try:
        model = create_model(args.model, pretrained=args.pretrained, **model_kwargs)
        task = create_task(model, **task_kwargs)
        if args.initial_checkpoint:
            load_initial_checkpoint(model, args.initial_checkpoint, exported=task.export_model())
        if args.snapshot_weights:
            member_parameters(task.export_model())  # refuses models without weights per member, before training
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        raise SystemExit(f'error: {e}') from None
    head = getattr(task.export_model(), 'num_classes', None)
    if isinstance(head, int) and head != num_classes:
        # the labels are checked against num_classes; the model must have that many outputs too
        given = f"--model-kwargs num_classes={args.model_kwargs['num_classes']}" \
            if 'num_classes' in args.model_kwargs else args.model
        raise SystemExit(f'error: {given}: the model has {head} outputs, but the data has {num_classes} classes'
                         f' ({info.name}): leave num_classes out of --model-kwargs (the dataset sets it), or use data'
                         f' of {head} classes.')
    mixup_fn = None
    if _mixing(args):
        if not getattr(task, 'accepts_soft_targets', False):
            raise SystemExit(f'error: --mixup/--cutmix give mixed (soft) targets, which {type(task).__name__} of'
                             f' {args.model} cannot learn from; train it without them.')
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
    exported = task.export_model()
    if args.eval_metric in ('mean_probs_acc', 'member_acc_mean') and not (
            hasattr(exported, 'forward_members') and hasattr(exported, 'combine')):
        raise SystemExit(f'error: --eval-metric {args.eval_metric}: {args.model} has no members to average (it'
                         f' exports {type(exported).__name__}); use acc, top5 or loss.')

    img_size = args.img_size if args.img_size is not None else info.default_img_size
    data_args = dict(crop_pct=1.0) if info.default_img_size else {}
    if args.crop_pct is not None:
        data_args['crop_pct'] = args.crop_pct
    if args.input_size is not None:
        data_args['input_size'] = tuple(args.input_size)
    elif img_size:
        data_args['input_size'] = (args.in_chans or 3, img_size, img_size)
    for key in ('mean', 'std'):  # one value, or one per channel (checked in check_args)
        if getattr(args, key) is not None:
            data_args[key] = tuple(getattr(args, key))
    try:
        # one mean / std value per input channel, also in the exported config.json
        data_config = te_data.match_channels(resolve_data_config(data_args, model=model))
        check_input_size(model, data_config['input_size'], args.model)
        task.set_data_config(data_config)
        task.set_label_names(info.class_names)
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    return model, task, mixup_fn, data_config


def _check_batch_of_one(args: argparse.Namespace, task: torch.nn.Module, data_config: dict, train_ds) -> None:
    """Refuse, before anything is written, a run whose training batches hold one image where a BatchNorm layer would
    see a single value per channel (torch cannot normalise it: 'Expected more than 1 value per channel'). The loader
    already drops a last incomplete batch, as timm's does, so one image a batch means --batch-size 1 (or a training
    set of one image); BatchNorm over a larger feature map still works then, so the layers are found by a forward
    pass of one blank image (in eval mode, which changes no statistic)."""
    try:
        size = len(train_ds)
    except TypeError:  # a streamed dataset: its batches are full
        size = args.batch_size
    if min(args.batch_size, size) != 1:
        return
    model = task.export_model()
    single = []

    def hook(module, inputs):
        x = inputs[0]
        if not single and x.dim() >= 2 and x.numel() == x.shape[1]:
            single.append((module, tuple(x.shape)))

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_pre_hook(hook) for m in norms]
    was_training = model.training
    try:
        ref = next(model.parameters())
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *data_config['input_size']), dtype=ref.dtype, device=ref.device))
    except Exception:  # noqa: BLE001  (a model the probe cannot run: training says what is wrong)
        return
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if single:
        module, shape = single[0]
        name = next(n for n, m in model.named_modules() if m is module)
        why = f'--batch-size {args.batch_size}' if args.batch_size == 1 else f'a training set of {size} image'
        raise SystemExit(f"error: {why}: {args.model}'s BatchNorm layer {name} would see one value per channel"
                         f' (input {shape}) in training, which it cannot normalise; use --batch-size 2 or more.')


def _apply_speed_flags(args: argparse.Namespace, task: torch.nn.Module, input_size: tuple[int, ...], log) -> None:
    """Apply the member strategy and memory format (resolved for the device by ``DeviceDefaults.resolve``) to the
    model."""
    model = getattr(task, 'model', task)
    if hasattr(model, 'set_member_strategy'):
        # vmap and grouped are checked against the loop when set, here on a probe batch of the run's input size
        # (from a generator of its own: the global random stream stays the same whatever the strategy); auto
        # decides on the first batches, on the run's device
        probe = None
        if args.member_strategy in ('vmap', 'grouped'):
            ref = next(model.parameters())
            probe = torch.randn((2, *input_size), generator=torch.Generator().manual_seed(0), dtype=ref.dtype)
        model.set_member_strategy(args.member_strategy, example_input=probe)
    elif args.member_strategy in ('vmap', 'grouped'):  # auto (a GPU's default) has nothing to choose from either
        log(f'--member-strategy {args.member_strategy}: {type(model).__name__} has no members to run another way;'
            f' ignored')
    if args.channels_last:
        model.to(memory_format=torch.channels_last)


def _save_epoch(run: RunFolder, record: dict, state: dict, exports=(), after=None) -> None:
    """Append the epoch's metrics (``metrics.jsonl``, and ``summary.csv`` from it), run the epoch's model exports
    (``exports``: best/, checkpoints/), write the checkpoint (the objects' state dicts) atomically, then ``after``
    (what the checkpoint no longer needs to exist). When a step fails (a full disk), the epoch's metrics line is
    taken back (a truncation needs no space): metrics.jsonl ends with the epoch the kept checkpoint holds."""
    metrics = run.file(RunFolder.METRICS)
    size = metrics.stat().st_size if metrics.is_file() else None
    try:
        run.append_metrics(record)
        write_summary(run)
        for export in exports:
            export()
        states = {k: (v.state_dict() if hasattr(v, 'state_dict') else v) for k, v in state.items()}
        save_checkpoint(states, run.path)
    except BaseException:
        with contextlib.suppress(OSError):
            if size is None:
                metrics.unlink(missing_ok=True)
            else:
                os.truncate(metrics, size)
        raise
    if after is not None:
        after()


def _on_main(accelerator, fn, what: str, kept=None):
    """Run ``fn`` (file output, or a decision about the run folder) on the main process and return its result on
    every process. A refusal there (a SystemExit with its line) stops every process with the same line; a failure
    stops every process at once, instead of the others waiting in the next collective call until its timeout: the
    main process says what failed, why (a full disk said as such) and, from ``kept()``, what is kept on disk."""
    result, refusal, failure = None, None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except SystemExit as e:
            refusal = e.code if isinstance(e.code, str) else f'error: the main process stopped {what}.'
        except Exception as e:  # noqa: BLE001  (reported below, on every process)
            reason = os_error_reason(e) if isinstance(e, OSError) else f'{type(e).__name__}: {e}'
            failure = f'error: {what} failed: {reason}.' + (f' {kept()}' if kept is not None else '')
    if accelerator.num_processes > 1:
        box = [(result, refusal, failure is not None)]
        broadcast_object_list(box, from_process=0)
        result, refusal, failed = box[0]
        if failed and failure is None:
            raise SystemExit(f'error: the main process failed {what}; this process stops with it.')
    if refusal is not None:
        raise SystemExit(refusal)
    if failure is not None:
        raise SystemExit(failure)
    return result


def _on_every_process(state: PartialState, fn, what: str, in_turns: bool = False):
    """Run ``fn`` on every process and return its own result there. A refusal on any process (a SystemExit with its
    line: a folder or a dataset that one machine lacks) or a failure stops every process with that line, instead of
    leaving the others waiting in their next collective call. ``in_turns``: first the main process, then the first
    process of each other machine, then the rest, each turn ending when all are through it: files that ``fn``
    fetches (--dataset-download) are complete, in a folder the machines share or in one of each machine's own, before
    another process reads them."""
    if state.num_processes == 1:
        return fn()
    mine = (0 if state.is_main_process else 1 if state.is_local_main_process else 2) if in_turns else 0
    result, error, line = None, None, None
    for turn in range(3 if in_turns else 1):
        if turn == mine:
            try:
                result = fn()
            except SystemExit as e:
                error = e
                line = e.code if isinstance(e.code, str) else f'error: process {state.process_index} stopped {what}.'
            except Exception as e:  # noqa: BLE001  (raised again below; the others stop with its line)
                error, line = e, f'error: {what} failed: {type(e).__name__}: {e}'
        # also the barrier that ends the turn
        lines = accelerate_utils.gather_object([(line, socket.gethostname())])
        if error is not None:
            raise error
        failed = next(((k, *ln) for k, ln in enumerate(lines) if ln[0] is not None), None)
        if failed is not None:
            k, line, host = failed
            raise SystemExit(f'{line} [process {k} on {host}; this process stops with it]')
    return result


def _kept(last_saved: tuple[Path, int] | None, finished: bool = False) -> str:
    """What a failed write leaves to continue from, truthfully: the last checkpoint on disk, or nothing."""
    if last_saved is None or not Path(last_saved[0]).is_file():
        return 'No epoch had been saved: nothing of this run is kept to resume from.'
    path, epochs = Path(last_saved[0]), last_saved[1]
    then = 'exports the model without training again' if finished else 'continues from it'
    return (f"Kept: the checkpoint after epoch {epochs - 1} ('{path}'); --resume {path.parent} {then} (once the"
            f' cause is fixed).')


def _flat(metrics: dict, prefix: str = '') -> dict[str, float]:
    """Nested metrics as one level of scalars, ``train/ce``, ``val/member_acc_1`` (what trackers and CSV take)."""
    flat = {}
    for key, value in metrics.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            flat.update(_flat(value, f'{name}/'))
        elif isinstance(value, (list, tuple)):
            flat.update({f'{name}_{i}': v for i, v in enumerate(value)})
        elif value is not None:
            flat[name] = value
    return flat


def write_summary(run: RunFolder) -> None:
    """``summary.csv`` as timm's ``update_summary`` names its columns (``epoch``, ``train_<m>``, ``eval_<m>``,
    ``lr``), rewritten from ``metrics.jsonl``: columns that only some epochs have (FDL's joint-phase terms) are
    blank in the others, where timm's appending writer would fail, and a resumed run's redone epochs appear once."""
    rows = []
    for r in run.metrics():
        flat = _flat(dict(train=r['train'], eval=r['val'], eval_ema=r.get('val_ema')))
        # train/train_acc is train_acc, not train_train_acc
        names = {k: k.split('/', 1)[1] if k.startswith('train/train_') else k.replace('/', '_', 1) for k in flat}
        rows.append({'epoch': r['epoch'], **{names[k]: v for k, v in flat.items()}, 'lr': r['lr']})
    columns = [*dict.fromkeys(k for row in rows for k in row if k != 'lr'), 'lr']
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run.file(RunFolder.SUMMARY), buffer.getvalue())


def _has_accelerator() -> bool:
    accel = getattr(torch, 'accelerator', None)
    return accel.is_available() if accel is not None else torch.cuda.is_available()

