"""The checks of the flags' values, each refused in one line before anything is built, and the flags that identify a
run (what ``--resume`` must not change).
"""
import argparse
from pathlib import Path

import yaml
from timm.data import create_transform

from ..utils.checks import flag_message, is_number, is_whole
from .cli import _TRACKER_PACKAGES
from .optim import check_optimizer, check_scheduler

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
