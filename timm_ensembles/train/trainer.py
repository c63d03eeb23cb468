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
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate import utils as accelerate_utils
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from timm.models import get_model_args
from timm.utils import ModelEmaV3

from ..files.model_folder import export_folder
from ..files.run_folder import RunFolder, output_problem
from ..models.hub import trusting_member_repos
from .checkpoint import (
    CheckpointError,
    export_new_folder,
    find_checkpoint,
    history_folder,
    load_checkpoint,
    rank_history,
    save_checkpoint,
    sweep_history,
)
from .cli import _NOT_RECORDED, import_user_module, parse_args
from .device import FUSED_UNSAFE_FP16, device_defaults
from .engine import (
    LabelError,
    NonFiniteLossError,
    evaluate,
    format_mechanism,
    format_metrics,
    sync_buffers,
    train_one_epoch,
)
from .flags import IDENTITY_FLAGS, _mixing, _normalised, check_args
from .inputs import _check_batch_of_one, _create_datasets, _create_loaders, _create_task
from .optim import SchedulerState, create_scheduler
from .outputs import _calibrate, _flat, _kept, _on_every_process, _on_main, _results, _write_snapshot, write_summary
from .resume import _claim_folder, _extension_note
from .snapshots import INIT_EPOCH, remove_snapshots_from, snapshot_indices
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


def _has_accelerator() -> bool:
    accel = getattr(torch, 'accelerator', None)
    return accel.is_available() if accel is not None else torch.cuda.is_available()
