"""The training command line as a timm user meets it: one-line errors, a suggestion for a misspelt flag, a pointer for
each flag of timm's train.py that is spelt differently here, and the trainer's parser (``get_args_parser``,
``parse_args``: flags from the command line and a YAML ``--config``, a resumed run's recorded flags).
"""
import argparse
import ast
import importlib
import os
import traceback
from pathlib import Path

import yaml
from accelerate import utils as accelerate_utils

from ..files.run_folder import RunFolder
from ..models.strategies import MEMBER_STRATEGIES
from ..utils.checks import close_matches
from .device import FUSED_OPTS as _FUSED_OPTS
from .optim import SCHEDULERS

__all__ = ['ArgumentParser', 'TIMM_SPELLINGS', 'TRACKERS', 'EVAL_METRICS', 'get_args_parser', 'parse_args',
           'import_user_module']

# the first line of --help (the trainer module's docstring says the rest)
DESCRIPTION = 'Train a timm model or a timm_ensembles ensemble with its own objective, on CPU, one GPU or many.'

# flags of timm's train.py that this trainer spells differently on purpose, and what to type here
TIMM_SPELLINGS = {
    '--torchcompile': '--compile',
    '--log-wandb': '--log-with wandb',
    '--train-num-samples': '--train-subset N (a fixed, stratified subset of the training split)',
    '--val-num-samples': '--val-subset N (a fixed, stratified subset of the validation split)',
    '--device': "--cpu to train on the CPU; otherwise the device is Accelerate's (accelerate launch / accelerate"
                ' config)',
    '--gp': '--model-kwargs global_pool=<pool>',
    '--pretrained-path': '--initial-checkpoint <file or folder>',
    '--kd-model-name': '--teacher <model>, with a model whose task learns from teachers',
    '--lr-base': '--lr (the learning rate itself: it is not scaled by the batch size here)',
    '--sched-on-updates': 'nothing: every schedule here steps per update already (plateau per epoch, as in timm)',
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), with a suggestion for an unknown flag: the flag this
    parser has under that name (difflib), or, for a timm train.py flag spelt differently here, the one to type."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message}\n')

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self.unknown_message(extras))
        return parsed

    def unknown_message(self, extras: list[str]) -> str:
        """The one line for the arguments this parser does not know, the first flag among them explained."""
        flags = [e for e in extras if e.startswith('-') and len(e) > 1]
        if not flags:
            value = extras[0]
            if os.path.isdir(value):  # timm's deprecated positional data folder
                return f'unrecognized argument {value!r}: timm\'s positional data folder is --data-dir {value} here'
            return f"unrecognized argument{'s' if len(extras) > 1 else ''}: {' '.join(extras)}"
        flag = flags[0].split('=', 1)[0]
        others = f" (also unrecognized: {' '.join(flags[1:])})" if len(flags) > 1 else ''
        if flag in TIMM_SPELLINGS:
            return f'{flag} is how timm\'s train.py spells it; here: {TIMM_SPELLINGS[flag]}{others}'
        options = [s for a in self._actions for s in a.option_strings if s.startswith('--')]
        near = close_matches(flag, options, n=1)
        hint = f'; did you mean {near[0]}?' if near else f'; {self.prog} --help lists the flags'
        return f'unrecognized argument {flag}{hint}{others}'
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
    """The trainer's parser: ``--config``, then one function per argument group, in the order ``--help`` shows."""
    parser = ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of flag defaults (keys as the'
                        ' flags with underscores, e.g. batch_size: 64); flags given on the command line win')
    _add_model_args(parser)
    _add_data_args(parser)
    _add_optimisation_args(parser)
    _add_model_ema_args(parser)
    _add_run_args(parser)
    _add_analysis_args(parser)
    return parser


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    """The ``Model`` flags: the model, its weights and options, its task's options, teachers and generations, and
    how it runs."""
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


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    """The ``Data`` flags: the dataset, its splits and subsets, the input and its preprocessing, augmentation and
    mixing, the loaders."""
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


def _add_optimisation_args(parser: argparse.ArgumentParser) -> None:
    """The ``Optimisation`` flags: epochs, batch, optimizer, schedule, clipping, label smoothing and precision."""
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


def _add_model_ema_args(parser: argparse.ArgumentParser) -> None:
    """The ``Model EMA`` flags: timm's exponential moving average of the model."""
    group = parser.add_argument_group('Model EMA')
    group.add_argument('--model-ema', action='store_true',
                       help="keep timm's ModelEmaV3 of the model (of every member of an ensemble), evaluate it every"
                            ' epoch and export it to <output>/ema')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='its decay per update (timm: 0.9998)')
    group.add_argument('--model-ema-warmup', action='store_true',
                       help="timm's decay warm-up (short runs: the average follows the model at first)")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    """The ``Run`` flags: device, seed, output folder, resuming, logging and trackers, the validation metric and the
    checkpoints kept."""
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


def _add_analysis_args(parser: argparse.ArgumentParser) -> None:
    """The ``Analysis`` flags: the per-epoch snapshots of the members' logits and weights."""
    group = parser.add_argument_group('Analysis')
    group.add_argument('--snapshot-subset', type=int, default=0, metavar='N',
                       help='after every epoch, and at the initialisation (epoch -1), save every member\'s logits on N'
                            ' validation samples to <output>/snapshots/ (the same N samples whatever --seed, so that'
                            ' runs can be compared; default 0: no snapshots)')
    group.add_argument('--snapshot-weights', action='store_true',
                       help='with --snapshot-subset, also save every member\'s parameters each epoch (models whose'
                            ' members share layers have none of their own and are refused)')


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
# what a run's args.yaml leaves out: where it was written, where it resumed from, the config it came from, and
# --overwrite (a recipe run again must not move a run aside)
_NOT_RECORDED = ('config', 'resume', 'output', 'experiment', 'overwrite')


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
