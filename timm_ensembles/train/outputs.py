"""What a run writes besides its checkpoints: the results, the calibration, the snapshots, what each process writes
at the end of an epoch, and ``summary.csv``.
"""
import argparse
import csv
import io
import socket
from pathlib import Path

from accelerate import PartialState
from accelerate import utils as accelerate_utils
from accelerate.utils import broadcast_object_list

from ..files.run_folder import RunFolder, os_error_reason
from ..utils.atomic import atomic_write_text
from .calibrate import calibrate
from .snapshots import member_parameters, predict_members, write_snapshot


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


def _write_snapshot(output, epoch: int, model, loader, indices, args, info, accelerator, predicted=None) -> None:
    """The snapshot of one epoch (or of the initialisation): member logits on the subset (``predicted``: computed
    already, ``(logits, targets)``), weights when asked."""
    logits, targets = predict_members(model, loader, accelerator) if predicted is None else predicted
    params = member_parameters(model) if args.snapshot_weights else None
    write_snapshot(output, epoch, logits, targets, indices, dict(model=args.model, dataset=info.name),
                   member_params=params)


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
