"""What a run trains: the model and its task, its datasets and loaders, and the batch sizes a model with BatchNorm
cannot take."""
import argparse

import torch
from accelerate.utils import set_seed
from timm.data import Mixup, resolve_data_config

from .. import data as te_data
from ..models.registry import create_model, create_task
from ..utils.extras import MissingExtraError
from .checkpoint import load_initial_checkpoint
from .device import DeviceSettings
from .engine import check_input_size
from .flags import _MODEL_RATES, _mixing
from .snapshots import member_parameters


def _create_loaders(args: argparse.Namespace, accelerator, train_ds, val_ds, test_ds, data_config: dict, info,
                    snapshot_idx, device: DeviceSettings):
    """The training and validation loaders (timm's transforms, or the in-memory batched path), the test loader with
    --holdout, and the loader of the snapshot subset with --snapshot-subset (else None); host memory pinned as the
    device settings say."""
    hflip = args.hflip if args.hflip is not None else info.default_hflip
    train_loader, val_loader = te_data.create_loaders(
        train_ds, val_ds, data_config, batch_size=args.batch_size, workers=args.workers, hflip=hflip,
        scale=tuple(args.scale), train_transform=not args.no_aug, seed=args.seed, rank=accelerator.process_index,
        auto_augment=args.aa, color_jitter=args.color_jitter, re_prob=args.reprob, re_mode=args.remode,
        re_count=args.recount, pin_memory=device.pin_memory)
    test_loader = None if test_ds is None else te_data.create_eval_loader(
        test_ds, data_config, args.batch_size, args.workers, pin_memory=device.pin_memory)
    snapshot_loader = None
    if snapshot_idx is not None:
        # the evaluation transform (set by the loaders above); its own generator keeps the global RNG untouched
        snapshot_loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(val_ds if test_ds is None else test_ds, snapshot_idx.tolist()),
            batch_size=args.batch_size, shuffle=False,
            num_workers=args.workers, persistent_workers=args.workers > 0, generator=torch.Generator())
    return train_loader, val_loader, test_loader, snapshot_loader


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
