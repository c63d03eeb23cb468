"""One epoch of a training run and the run's end: what ``trainer`` repeats over the epochs once a run is set up.

``TrainingRun`` holds what a run built before its first epoch; ``TrainingState`` (``state.py``) what changes from
epoch to epoch and goes into the checkpoint.
"""
import argparse
import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.utils import ModelEmaV3

from ..files.model_folder import export_folder
from ..files.run_folder import RunFolder
from .checkpoint import export_new_folder, rank_history, save_checkpoint, sweep_history
from .engine import (
    LabelError,
    NonFiniteLossError,
    evaluate,
    format_mechanism,
    format_metrics,
    sync_buffers,
    train_one_epoch,
)
from .optim import SchedulerState
from .outputs import _calibrate, _flat, _kept, _on_main, _results, _write_snapshot, write_summary
from .sharded import SavedModels, Sharding, gather
from .snapshots import INIT_EPOCH, predict_members
from .state import TrainingState

__all__ = ['TrainingRun', 'run_epoch', 'finish_run', 'epoch_seed', 'saved_models', 'write_epoch_snapshot']


@dataclasses.dataclass
class TrainingRun:
    """What one run builds before its first epoch (set up by ``_build`` and ``_prepare``), and what it keeps across
    epochs without checkpointing it."""
    args: argparse.Namespace
    accelerator: Accelerator
    run: RunFolder
    log: Callable
    task: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loaders: dict  # train, val, test, snapshot (None where the run has none)
    info: Any
    num_classes: int
    data_config: dict
    mixup_fn: Callable | None
    snapshot_idx: Any
    run_identity: dict
    flags: argparse.Namespace  # args with the device settings resolved: as args.yaml records them
    teachers: list = dataclasses.field(default_factory=list)
    unwrapped: Any = None  # the task without Accelerate's and torch.compile's wrappers
    export_model: Any = None
    ema: ModelEmaV3 | None = None
    lr_scheduler: Any = None
    scheduler_state: SchedulerState | None = None
    num_epochs: int = 0
    start_epoch: int = 0
    shuffle_generator: torch.Generator | None = None  # the training loader's (as built, before Accelerate's)
    model_config: dict | None = None
    last_saved: tuple | None = None  # the last checkpoint on disk, (file, epochs it holds): what a failed save keeps
    unexplained: set = dataclasses.field(default_factory=set)  # diagnostics said once to be not computable
    sharding: Sharding | None = None  # FSDP's parts besides the task (sharded.py)

    def bar(self, desc: str) -> str | None:  # the evaluations' progress bars, as training's
        return None if self.args.no_progress else desc


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order and augmentation: far apart for neighbouring seeds, so that seed s + 1 does
    not replay seed s's shuffles shifted by one epoch (``seed + epoch`` did); seed 0 keeps ``epoch``. Below 2^32, as
    numpy's seed must be."""
    return (seed * 100_003 + epoch) % 2 ** 32


def saved_models(r: TrainingRun, with_optimizer: bool = True) -> SavedModels:
    """What the main process writes the run's files from: the live task, model, optimizer and EMA, or under FSDP
    their unsharded copies, gathered (a collective: every process calls it; the others get the live objects, which
    they pass to the main process's writers and never write from)."""
    saved = gather(r.unwrapped, r.optimizer, r.sharding, with_optimizer) if r.sharding is not None else None
    return saved or SavedModels(task=r.unwrapped, export_model=r.export_model, optimizer=r.optimizer, ema=r.ema)


def write_epoch_snapshot(r: TrainingRun, epoch: int) -> None:
    """The snapshot of ``epoch`` (or of the initialisation), written by the main process. Under FSDP the forward
    gathers the shards, so every process computes the logits; the weights come from the gathered copy."""
    if r.loaders['snapshot'] is None:
        return
    predicted, model, accelerator = None, r.export_model, r.accelerator
    if r.sharding is not None and epoch == INIT_EPOCH:
        # the first sharded module to run becomes FSDP's root, which must be the task: before its first step the
        # main process computes the initialisation's point on its unsharded copy (built from the same weights), on
        # its CPU; nothing to gather
        plain = r.sharding.plain_task
        model, accelerator = (r.export_model if plain is None else plain.export_model()), None
    elif r.sharding is not None:
        predicted = predict_members(r.export_model, r.loaders['snapshot'], r.accelerator)
        if r.args.snapshot_weights:
            model = saved_models(r, with_optimizer=False).export_model
    _on_main(r.accelerator, functools.partial(_write_snapshot, r.run.path, epoch, model, r.loaders['snapshot'],
                                              r.snapshot_idx, r.args, r.info, accelerator, predicted=predicted),
             f'writing the snapshot of epoch {epoch}', kept=functools.partial(_kept, r.last_saved))


def run_epoch(r: TrainingRun, state: TrainingState, epoch: int) -> None:
    """One epoch: train, validate (the EMA too), write its snapshot, log it, step an epoch's schedule, and save it
    (metrics, exports, checkpoint)."""
    args, accelerator = r.args, r.accelerator
    set_seed(epoch_seed(args.seed, epoch), device_specific=True)
    # reseeded every epoch, so that a resumed run sees the same data order as an uninterrupted one
    r.shuffle_generator.manual_seed(epoch_seed(args.seed, epoch))
    r.unwrapped.on_epoch_start(epoch)
    if r.mixup_fn is not None:
        r.mixup_fn.mixup_enabled = not (args.mixup_off_epoch and epoch >= args.mixup_off_epoch)
    start = time.perf_counter()
    train_metrics = _train_epoch(r, state, epoch)
    _validate(r, state, epoch)
    seconds = time.perf_counter() - start
    lr = r.optimizer.param_groups[0]['lr']
    # the method's own diagnostics, each beside its value when the mechanism does nothing
    state.mechanism = mechanism = r.unwrapped.mechanism(train_metrics, state.val_metrics)
    for name, d in mechanism.items():
        if d['value'] is None and name not in r.unexplained:
            r.unexplained.add(name)
            r.log(f"mechanism {name}: not computed ({d['note']})")
    r.log(format_metrics(epoch, train_metrics, state.val_metrics, lr, seconds)
          + ('' if r.ema is None else f" | ema acc {state.ema_metrics['acc']:.2f}")
          + (f' | mechanism: {format_mechanism(mechanism)}' if mechanism else ''))
    record = dict(epoch=epoch, lr=lr, seconds=seconds, train=train_metrics, val=state.val_metrics)
    if mechanism:
        record['mechanism'] = {k: d['value'] for k, d in mechanism.items()}
    if r.ema is not None:
        record['val_ema'] = state.ema_metrics
    accelerator.log(_flat({k: v for k, v in record.items() if k != 'seconds'}), step=state.num_updates)
    value = state.val_metrics[args.eval_metric]
    if r.lr_scheduler is not None:
        # as timm's train.py after every epoch: the schedules stepped per epoch (plateau, on the metric) step
        # here, before the checkpoint, so that a resumed run starts from the stepped state
        r.lr_scheduler.step(epoch + 1, value)
    _save(r, state, epoch, record, value)


def _train_epoch(r: TrainingRun, state: TrainingState, epoch: int) -> dict:
    """``train_one_epoch`` with the run's settings; its errors stop the run in one line. Returns its metrics."""
    args = r.args
    ema = r.ema
    try:
        train_metrics, state.num_updates = train_one_epoch(
            r.task, r.loaders['train'], r.optimizer, r.accelerator, epoch, lr_scheduler=r.lr_scheduler,
            clip_grad=args.clip_grad, clip_mode=args.clip_mode, num_updates=state.num_updates,
            show_progress=not args.no_progress, num_classes=r.num_classes if epoch == r.start_epoch else None,
            log_interval=args.log_interval, log=functools.partial(_log_progress, r, epoch),
            on_update=None if ema is None else (lambda n: ema.update(r.export_model, step=n)), mixup_fn=r.mixup_fn,
            # FSDP's forward uses gathered copies of the sharded parameters, which the measured gradients would be of
            mechanism_interval=0 if r.sharding is not None else args.log_interval)
    except LabelError as e:  # a dataset that does not expose its labels, checked on its first batch
        raise SystemExit(f'error: {e}') from None
    except NonFiniteLossError as e:
        kept = r.run.checkpoint_path
        where = f"the last good checkpoint is '{kept}'" if kept.exists() else 'no epoch had finished, no checkpoint'
        raise SystemExit(f'error: {e} Training stopped; {where}.') from None
    return train_metrics


def _log_progress(r: TrainingRun, epoch: int, values: dict) -> None:
    r.log(f"train {epoch} [{values['batch']}/{values['batches']}] | update {values['update']} | loss"
          f" {values['loss']:.4g} | lr {values['lr']:.3g} | {values['samples_per_sec']:.0f} img/s")
    r.accelerator.log({'train/loss_interval': values['loss'], 'train/lr': values['lr'],
                       'train/samples_per_sec': values['samples_per_sec']}, step=values['update'])


def _validate(r: TrainingRun, state: TrainingState, epoch: int) -> None:
    """The epoch's validation metrics (the EMA's too) into ``state``, and its snapshot written."""
    accelerator, export_model = r.accelerator, r.export_model
    # DDP keeps each process's BatchNorm statistics of its own last batches: evaluate and save one set
    sync_buffers(export_model, accelerator)
    try:
        state.val_metrics = evaluate(export_model, r.loaders['val'], accelerator, num_classes=r.num_classes,
                                     progress=r.bar(f'val {epoch}'))
    except LabelError as e:
        raise SystemExit(f'error: {e}') from None
    if r.ema is not None:
        sync_buffers(r.ema.module, accelerator)
        state.ema_metrics = evaluate(r.ema.module, r.loaders['val'], accelerator, progress=r.bar(f'val {epoch} ema'))
    # before the checkpoint: a run killed in between redoes this epoch and rewrites its snapshot
    write_epoch_snapshot(r, epoch)


def _save(r: TrainingRun, state: TrainingState, epoch: int, record: dict, value: float) -> None:
    """Rank the epoch, then save it: its metrics line, the best model's and the ranked epoch's exports, and the
    checkpoint; the epochs that fell out of the ranking are removed after it."""
    args, run = r.args, r.run
    improved = state.improves(value, args.eval_metric)
    if improved:
        state.best = dict(metric=args.eval_metric, value=value, epoch=epoch)
    state.history = rank_history(state.history, epoch, args.eval_metric, value, args.checkpoint_hist,
                                 lower_is_better=args.eval_metric == 'loss')
    state.epoch = epoch + 1
    saved = saved_models(r)
    checkpoint = dict(task=saved.task, optimizer=saved.optimizer, scheduler=r.scheduler_state,
                      scaler=r.accelerator.scaler, **state.state_dict(), run=r.run_identity, teachers=r.teachers,
                      **({} if saved.ema is None else dict(ema=saved.ema)))
    # the best epoch's model (and this epoch's, when it ranks among the --checkpoint-hist best) before the
    # checkpoint: a run killed in between redoes the epoch and its exports
    history_root = run.sub(RunFolder.HISTORY)
    exports, configs = [], dict(model_config=r.model_config, data_config=r.data_config)
    if improved:
        exports.append(functools.partial(export_folder, saved.export_model, run.sub(RunFolder.BEST), **configs))
    if any(h['epoch'] == epoch for h in state.history):
        exports.append(functools.partial(export_new_folder, saved.export_model, run.history_path(epoch), **configs))
    # the epochs that fell out of the ranking go once the checkpoint no longer lists them
    dropped = functools.partial(sweep_history, history_root, [h['epoch'] for h in state.history])
    _on_main(r.accelerator, functools.partial(_save_epoch, run, record, checkpoint, exports, dropped),
             f'saving epoch {epoch} to {run.path}', kept=functools.partial(_kept, r.last_saved))
    r.last_saved = (run.checkpoint_path, epoch + 1)


def finish_run(r: TrainingRun, state: TrainingState) -> None:
    """The end of a run: the test split evaluated (after a choice on the validation metrics, and calibration), the
    final model and the task's exports written, and results.json."""
    args, accelerator, export_model, ema = r.args, r.accelerator, r.export_model, r.ema
    test_metrics, ema_test_metrics, selection, calibration = None, None, None, None
    if r.loaders['test'] is not None:
        # every process makes the same choice from the same (gathered) validation metrics
        selection = r.unwrapped.select_on_validation(state.val_metrics)
        if selection:
            r.log(selection)
        if args.calibrate:
            calibration = _calibrate(export_model, r.loaders['val'], accelerator, r.log)
        test_metrics = evaluate(export_model, r.loaders['test'], accelerator, num_classes=r.num_classes,
                                split='test', progress=r.bar('test'))
        ema_test_metrics = None if ema is None else evaluate(ema.module, r.loaders['test'], accelerator,
                                                             split='test', progress=r.bar('test ema'))
    results = functools.partial(
        _results, args, r.info.name, r.num_epochs, accelerator.num_processes, state.val_metrics, state.best,
        state.history, test=None if test_metrics is None else dict(selection=selection, metrics=test_metrics),
        calibration=calibration, ema=None if ema is None else dict(final_epoch=state.ema_metrics,
                                                                   test=ema_test_metrics),
        mechanism=state.mechanism)
    saved = saved_models(r, with_optimizer=False)
    if r.sharding is not None and accelerator.is_main_process:
        # the choices made on the sharded model, made again on the copy written (neither is in a state dict)
        if selection:
            saved.task.select_on_validation(state.val_metrics)
        if calibration is not None and 'error' not in calibration:  # (an error: none was set)
            saved.export_model.set_temperature(calibration['temperature'])
    _on_main(accelerator, functools.partial(_export_final, r, saved, state, results, test_metrics),
             f'exporting the final model to {r.run.path}', kept=functools.partial(_kept, r.last_saved, finished=True))


def _export_final(r: TrainingRun, saved: SavedModels, state: TrainingState, results: Callable[[], dict],
                  test_metrics: dict | None) -> None:
    """The final model (with the evaluation preprocessing in config.json, so that
    ``resolve_data_config(model=reloaded)`` gives it), the task's exports, the EMA and results.json (main process)."""
    run, configs = r.run, dict(model_config=r.model_config, data_config=r.data_config)
    export_folder(saved.export_model, run.path, **configs)
    for name, extra in saved.task.exports().items():
        export_folder(extra, run.sub(name), **configs)
        r.log(f"saved {type(extra).__name__} '{name}' to {run.sub(name)}")
    if saved.ema is not None:
        export_folder(saved.ema.module, run.sub(RunFolder.EMA), **configs)
        r.log(f"saved the model's EMA to {run.sub(RunFolder.EMA)}")
    run.write_results(results())
    test = '' if test_metrics is None else f', test acc {test_metrics["acc"]:.2f} (mean-probs' \
        f' {test_metrics.get("mean_probs_acc", test_metrics["acc"]):.2f})'
    r.log(f'final epoch: val acc {state.val_metrics.get("acc", float("nan")):.2f}{test}; saved to {run.path}')


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
