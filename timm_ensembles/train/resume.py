"""The output folder a run claims, and a resumed run checked against the one it continues (its identifying flags,
teachers and weights).
"""
import argparse
import contextlib

from ..files.run_folder import RunBusyError, RunFolder, os_error_reason
from .checkpoint import CheckpointError, find_checkpoint, load_checkpoint, model_identity
from .flags import IDENTITY_FLAGS, _normalised


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
