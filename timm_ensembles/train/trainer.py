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
import contextlib
import functools
import logging
import math
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate import utils as accelerate_utils
from accelerate.utils import DistributedDataParallelKwargs
from timm.models import get_model_args
from timm.utils import ModelEmaV3

from ..files.run_folder import RunFolder, output_problem
from ..models.hub import trusting_member_repos
from .checkpoint import CheckpointError, find_checkpoint, load_checkpoint, sweep_history
from .cli import _NOT_RECORDED, import_user_module, parse_args
from .device import FUSED_UNSAFE_FP16, FUSED_UNSHARDABLE, DeviceSettings, device_defaults
from .flags import IDENTITY_FLAGS, _mixing, _normalised, check_args
from .inputs import _check_batch_of_one, _create_datasets, _create_loaders, _create_task
from .loop import TrainingRun, finish_run, run_epoch, write_epoch_snapshot
from .optim import SchedulerState, create_scheduler
from .outputs import _on_every_process, _on_main
from .resume import _claim_folder, _extension_note
from .sharded import check_fsdp_launch, fsdp_requested, load_sharded_state, shard_run
from .snapshots import INIT_EPOCH, remove_snapshots_from, snapshot_indices
from .state import TrainingState
from .summary import run_summary

_logger = logging.getLogger(__name__)


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


def _refuse_unsupported_launch() -> None:
    """Refuse a DeepSpeed launch, or FSDP1, in one line, before anything is built or written. DeepSpeed is read from
    the variable `accelerate launch` sets (--use_deepspeed, or a config's distributed_type): on a CPU Accelerate
    fails on DeepSpeed's import, so the variable says it the same everywhere. FSDP2 is taken (``sharded.py``)."""
    try:
        check_fsdp_launch()
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    if accelerate_utils.parse_flag_from_env('ACCELERATE_USE_DEEPSPEED'):
        raise SystemExit('error: DeepSpeed is not supported by this trainer (ACCELERATE_USE_DEEPSPEED is set by'
                         ' accelerate launch or its config); shard with FSDP2 (accelerate launch --use_fsdp'
                         ' --fsdp_version 2 ...), or run DDP (accelerate launch --multi_gpu --num_processes N ...).')


def _train(args: argparse.Namespace, end_training: bool, generation: int | None, held: contextlib.ExitStack) -> int:
    r, resume_state, datasets = _build(args)
    accelerator, output = r.accelerator, r.run.path
    # the folder is claimed on the main process (its lock taken, what a kill left swept, the run it holds checked);
    # every process starts as it decides, or stops with its line
    verdict = _on_main(accelerator, functools.partial(_claim_folder, args, r.run, resume_state, r.run_identity,
                                                      generation, held, r.log), f'claiming {output}')
    if verdict['start'] == 'done':
        r.log(f'generation {generation}: done in {output}')
    else:
        if verdict['start'] == 'new':
            resume_state = None  # a generation of another command, moved aside by --overwrite: trained anew
        state = _prepare(r, resume_state, verdict, datasets)
        _on_main(accelerator, functools.partial(_prepare_folder, r, state), f'preparing {output}')
        if state.epoch == 0:
            # the trajectory's first point (Fort et al.'s start at the initialisation); rewritten by a run resumed
            # before its first epoch finished, from the same seeded initialisation
            write_epoch_snapshot(r, INIT_EPOCH)
        for epoch in range(r.start_epoch, r.num_epochs):
            run_epoch(r, state, epoch)
        finish_run(r, state)
        if r.sharding is not None:
            _release_sharded(r)
    # the next generation of a --generations run reads this run's folder on every process
    accelerator.wait_for_everyone()
    if end_training:
        accelerator.end_training()  # also finishes the trackers
    elif verdict['start'] != 'done':
        for tracker in accelerator.trackers:  # the next generation starts its own
            tracker.finish()
    return 0


def _release_sharded(r: TrainingRun) -> None:
    """Free a finished sharded run's modules and optimizer before the process group goes. FSDP's modules hold gloo's
    last asynchronous works in reference cycles, which the interpreter would otherwise free at its exit, when doing
    so can abort the process (pytorch/pytorch#179291: seen once here, a finished run's second process exiting with
    SIGABRT under load)."""
    r.task = r.unwrapped = r.export_model = r.ema = r.optimizer = r.sharding = None
    r.lr_scheduler = r.scheduler_state = None
    r.accelerator.free_memory()  # Accelerate's own references, then the garbage collector


def _build(args: argparse.Namespace) -> tuple[TrainingRun, dict | None, dict]:
    """The process group, the run's inputs, the Accelerator, the loaders and the optimizer; returns the run, the
    checkpoint to resume (or None) and the datasets (for the run's summary)."""
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
    # the device-dependent settings, each flag as given or its default, before Accelerate needs the precision;
    # PartialState is the device the Accelerator will use (`accelerate launch --cpu` included). args keeps what was
    # given; `flags` is args as args.yaml and the checkpoint's identity record it, these settings resolved: a --resume
    # reads its flags back from args.yaml and compares that identity, so that a resumed run, on whatever device, runs
    # with the settings it started with (and the runs of earlier versions recorded them so)
    # sharded where Accelerate would shard: FSDP asked for, in a process group (`accelerate launch` forms one for a
    # single GPU process too; one CPU process has none)
    sharded = fsdp_requested() and torch.distributed.is_available() and torch.distributed.is_initialized()
    defaults = device_defaults(state.device.type, args.opt, args.mixed_precision, sharded=sharded)
    device, flags = defaults.settings(args), defaults.resolve(args)
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=task.find_unused_parameters)
    run = RunFolder(args.output) if args.output else RunFolder.default(args.model)
    accelerator = Accelerator(cpu=cpu, mixed_precision=device.mixed_precision,
                              gradient_accumulation_steps=args.grad_accum_steps, kwargs_handlers=[ddp_kwargs],
                              log_with=args.log_with,
                              project_dir=run.sub(RunFolder.TRACKING) if args.log_with else None)
    log = _logger.info if accelerator.is_main_process else (lambda *a, **k: None)
    if device.channels_last and sharded:
        raise SystemExit('error: --channels-last under FSDP: FSDP2 cannot shard non-contiguous (channels_last)'
                         ' parameters; pass --no-channels-last (the default when sharded).')
    if device.fused_opt and sharded and args.opt.lower() in FUSED_UNSHARDABLE:
        raise SystemExit(f"error: --fused-opt with --opt {args.opt} under FSDP: torch's fused SGD kernel has no rule"
                         f' for sharded parameters (DTensor); pass --no-fused-opt, or use --opt adamw.')
    if device.fused_opt and accelerator.scaler is not None and args.opt.lower() in FUSED_UNSAFE_FP16:
        raise SystemExit(f"error: --fused-opt with --opt {args.opt} under fp16: torch's fused SGD starts from"
                         f' uninitialised momentum when the grad scaler skips its first step (an overflow, routine in'
                         f' fp16); pass --no-fused-opt, or use bf16 or --opt adamw.')
    if accelerator.mixed_precision == 'fp16' and accelerator.scaler is None and accelerator.device.type == 'cpu':
        log('warning: --mixed-precision fp16 on the CPU: Accelerate neither autocasts nor scales the loss there, so'
            ' this run computes in fp32 (bf16 autocasts on a CPU).')

    loaders = dict(zip(('train', 'val', 'test', 'snapshot'), _create_loaders(
        args, accelerator, train_ds, val_ds, test_ds, data_config, info, snapshot_idx, device)))
    if fsdp_requested() and not sharded:
        log('FSDP on one CPU process: no process group to shard over, the task trains unsharded')
    try:
        _apply_speed_flags(device, task, data_config['input_size'], log)
        # the optimizer is built on the sharded parameters, its groups as the task makes them
        sharding = shard_run(accelerator, task, _ema_kwargs(args), log) if sharded else None
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None
    try:
        optimizer = task.create_optimizer(opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                          layer_decay=args.layer_decay, momentum=args.momentum,
                                          **(dict(fused=True) if device.fused_opt else {}))
    except ValueError as e:  # e.g. a task whose terms need an optimizer of another kind
        raise SystemExit(f'error: {e}') from None

    run_identity = _normalised(dict(
        **{flag: getattr(flags, flag) for flag in IDENTITY_FLAGS},
        model_args=get_model_args(model), dataset=info.name, input_size=list(data_config['input_size'])))
    # reseeded every epoch, so that a resumed run sees the same data order as an uninterrupted one
    r = TrainingRun(args=args, accelerator=accelerator, run=run, log=log, task=task, optimizer=optimizer,
                    loaders=loaders, info=info, num_classes=num_classes, data_config=data_config, mixup_fn=mixup_fn,
                    snapshot_idx=snapshot_idx, run_identity=run_identity, flags=flags,
                    shuffle_generator=loaders['train'].generator, sharding=sharding)
    return r, resume_state, dict(training=train_ds, validation=val_ds, test=test_ds)


def _prepare(r: TrainingRun, resume_state: dict | None, verdict: dict, datasets: dict) -> TrainingState:
    """What a claimed run does before its first epoch: the summary, args.yaml and the trackers, Accelerate's
    preparation, the EMA and the schedule, and a resumed run's state taken up. Returns the training state."""
    args, accelerator, output = r.args, r.accelerator, r.run.path
    r.teachers = verdict['teachers']
    r.last_saved = (find_checkpoint(args.resume), resume_state['epoch']) if resume_state is not None else None
    r.log('\n'.join(run_summary(r.flags, r.info, r.task, datasets, r.data_config, accelerator, r.optimizer,
                                output=output)))
    sharding = r.sharding
    if resume_state is not None and sharding is None:
        r.task.load_state_dict(resume_state['task'])
        r.optimizer.load_state_dict(resume_state['optimizer'])
    # what reproduces the run: never where it was written, where it resumed from, or the config it came from
    recorded = _normalised({k: v for k, v in vars(r.flags).items() if k not in _NOT_RECORDED})
    _on_main(accelerator, functools.partial(r.run.write_args, recorded), f'writing {r.run.file(RunFolder.ARGS)}')
    if args.log_with:
        # the run's flags as the trackers' config (scalars only: what every tracker takes)
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in recorded.items()}
        accelerator.init_trackers('timm-ensembles', config=config, init_kwargs={'wandb': {'name': output.name}})

    task = torch.compile(r.task) if args.compile else r.task
    if sharding is None or sharding.by_accelerate:
        r.task, r.optimizer, r.loaders['train'], r.loaders['val'] = accelerator.prepare(
            task, r.optimizer, r.loaders['train'], r.loaders['val'])
    else:  # sharded by the trainer over CPU processes: Accelerate would wrap the sharded task in DDP
        r.task = task
        r.optimizer, r.loaders['train'], r.loaders['val'] = accelerator.prepare(
            r.optimizer, r.loaders['train'], r.loaders['val'])
    if r.loaders['test'] is not None:
        r.loaders['test'] = accelerator.prepare(r.loaders['test'])
    unwrapped = accelerator.unwrap_model(r.task)
    r.unwrapped = getattr(unwrapped, '_orig_mod', unwrapped)
    r.export_model = r.unwrapped.export_model()
    if resume_state is not None and sharding is not None:  # a collective, on the sharded task as prepared
        load_sharded_state(r.unwrapped, r.optimizer, sharding, resume_state)
    # before a new scheduler sets its own
    saved_lrs = [group['lr'] for group in r.optimizer.param_groups] if resume_state is not None else None
    # the average of the exported model's weights (an ensemble's: every member's), on its device; each process keeps
    # the same one (the weights are the same after every all-reduced update); a sharded one was built unsharded
    if sharding is not None:
        r.ema = sharding.ema
    elif args.model_ema:
        r.ema = ModelEmaV3(r.export_model, **_ema_kwargs(args))
    # the schedule counts the updates of this process's share of the batches (as prepared)
    updates_per_epoch = max(math.ceil(len(r.loaders['train']) / args.grad_accum_steps), 1)
    try:
        r.lr_scheduler, r.num_epochs = create_scheduler(r.optimizer, args, updates_per_epoch)
    except (ValueError, AssertionError) as e:  # settings that depend on the epoch's length (wsd's decay phase)
        raise SystemExit(f'error: --sched {args.sched}: {e}') from None
    r.scheduler_state = SchedulerState(r.lr_scheduler)
    r.model_config = dict(label_names=r.info.class_names) if r.info.class_names else None
    state = TrainingState()
    if resume_state is not None:
        _resume(r, state, resume_state, verdict['extended_from'], saved_lrs)
    r.start_epoch = state.epoch
    return state


def _resume(r: TrainingRun, state: TrainingState, resume_state: dict, extended_from: int | None,
            saved_lrs: list) -> None:
    """Take up a checkpoint's schedule, grad scaler, training state and EMA (the task and optimizer are loaded before
    Accelerate prepares them)."""
    args, optimizer, lr_scheduler = r.args, r.optimizer, r.lr_scheduler
    # an extended run takes its schedule up as timm's --resume does: rebuilt over the new epoch count (the state
    # saved describes the old one); a plateau's state has no length and carries on
    if extended_from is None or args.sched == 'plateau':
        r.scheduler_state.load_state_dict(resume_state['scheduler'])
    if r.accelerator.scaler is not None and resume_state.get('scaler'):
        r.accelerator.scaler.load_state_dict(resume_state['scaler'])
    state.load_state_dict(resume_state)
    # building the scheduler reset the learning rate: set it where the interrupted run had it, from the update
    # count, or, for a schedule stepped per epoch on a metric (plateau), as the optimizer's state has it
    if lr_scheduler is not None and lr_scheduler.t_in_epochs:
        for group, lr in zip(optimizer.param_groups, saved_lrs):
            group['lr'] = lr
    elif lr_scheduler is not None:
        lr_scheduler.step_update(num_updates=state.num_updates)
    if extended_from is not None:
        r.log(_extension_note(args, extended_from, state.epoch, state.num_updates, saved_lrs[0],
                              optimizer.param_groups[0]['lr']))
    # as the checkpoint has it (a --checkpoint-hist given now that is smaller keeps the first N; epochs dropped
    # before cannot come back under a larger one)
    state.history = state.history[:args.checkpoint_hist]
    if r.ema is not None and r.sharding is None:  # a sharded one was loaded with the task
        r.ema.load_state_dict(resume_state['ema'])
    r.log(f'resumed from {args.resume} at epoch {state.epoch}')


def _prepare_folder(r: TrainingRun, state: TrainingState) -> None:
    """The run folder as the first epoch this run trains finds it (on the main process)."""
    output = r.run.path
    r.run.truncate_metrics(state.epoch)
    remove_snapshots_from(output, state.epoch)
    # the epochs this run redoes (exported before a kill could stop their checkpoint)
    sweep_history(r.run.sub(RunFolder.HISTORY), [h['epoch'] for h in state.history])


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


def _apply_speed_flags(device: DeviceSettings, task: torch.nn.Module, input_size: tuple[int, ...], log) -> None:
    """Apply the member strategy and memory format of the run's device settings to the model."""
    model = getattr(task, 'model', task)
    if hasattr(model, 'set_member_strategy'):
        # vmap and grouped are checked against the loop when set, here on a probe batch of the run's input size
        # (from a generator of its own: the global random stream stays the same whatever the strategy); auto
        # decides on the first batches, on the run's device
        probe = None
        if device.member_strategy in ('vmap', 'grouped'):
            ref = next(model.parameters())
            probe = torch.randn((2, *input_size), generator=torch.Generator().manual_seed(0), dtype=ref.dtype)
        model.set_member_strategy(device.member_strategy, example_input=probe)
    elif device.member_strategy in ('vmap', 'grouped'):  # auto (a GPU's default) has nothing to choose from either
        log(f'--member-strategy {device.member_strategy}: {type(model).__name__} has no members to run another way;'
            f' ignored')
    if device.channels_last:
        model.to(memory_format=torch.channels_last)


def _ema_kwargs(args: argparse.Namespace) -> dict | None:
    """timm's ``ModelEmaV3`` arguments from the run's flags, None without --model-ema."""
    return dict(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) if args.model_ema else None


def _has_accelerator() -> bool:
    accel = getattr(torch, 'accelerator', None)
    return accel.is_available() if accel is not None else torch.cuda.is_available()
