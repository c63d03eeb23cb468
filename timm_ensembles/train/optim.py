"""The optimizer and scheduler names timm's factories accept, checked before anything is built, and the schedule a
run builds (and rebuilds when ``--resume`` extends it).
"""
import argparse
import warnings

import torch
from timm.optim import create_optimizer_v2, get_optimizer_class, get_optimizer_info, list_optimizers
from timm.scheduler import PlateauLRScheduler, create_scheduler_v2

from ..utils.checks import close_matches

__all__ = ['SCHEDULERS', 'check_optimizer', 'check_scheduler', 'create_scheduler', 'optimizer_state_ratio',
           'SchedulerState']

# the names timm.scheduler.create_scheduler_v2 accepts (checked against the installed timm when one is refused)
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'wsd', 'rsqrt', 'constant', 'none')


def check_optimizer(opt: str) -> str | None:
    """Why timm's optimizer factory would refuse ``opt`` (``--opt``), or None: a name of
    ``timm.optim.list_optimizers()``, optionally ``lookahead_<name>``, whose class can be imported here."""
    parts = str(opt).lower().split('_')
    name = parts[-1]
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != 'lookahead'):
        return (f"--opt {opt}: timm reads <name> or lookahead_<name>, with <name> one of"
                f' timm.optim.list_optimizers()')
    names = list_optimizers()
    if name not in names:
        near = close_matches(name, names)
        hint = f"did you mean {', '.join(near)}? " if near else ''
        return (f"--opt {opt}: not an optimizer timm knows; {hint}timm.optim.list_optimizers() lists {len(names)}"
                f' (sgd, momentum, adamw, lamb, lion, ...), each also as lookahead_<name>')
    try:
        get_optimizer_class(get_optimizer_info(name), bind_defaults=False)
    except (ImportError, AssertionError) as e:  # apex / bitsandbytes: a package or CUDA missing
        return f'--opt {opt}: {e}'
    return None


def create_scheduler(optimizer, args: argparse.Namespace, updates_per_epoch: int):
    """timm's scheduler for the run's flags (``create_scheduler_v2``), stepped per update; ``plateau`` per epoch,
    on the --eval-metric (its direction from the metric, as timm's ``scheduler_kwargs``). Returns (scheduler or
    None for ``none``, the number of epochs)."""
    plateau = args.sched == 'plateau'
    with warnings.catch_warnings():
        # timm deprecates plateau because its state is not saved: SchedulerState saves it here
        warnings.simplefilter('ignore', FutureWarning)
        return create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            decay_milestones=list(args.decay_milestones), decay_rate=args.decay_rate, min_lr=args.min_lr,
            warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, patience_epochs=args.patience_epochs,
            plateau_mode='min' if args.eval_metric == 'loss' else 'max', step_on_epochs=plateau,
            updates_per_epoch=updates_per_epoch)


def check_scheduler(args: argparse.Namespace) -> str | None:
    """Why timm's scheduler factory would refuse the run's ``--sched`` and its settings, or None; built on a
    one-parameter optimizer, before anything of the run is."""

    def refusal(sched: str) -> Exception | None:
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        try:
            create_scheduler(probe, argparse.Namespace(**{**vars(args), 'sched': sched}), updates_per_epoch=1)
        except (ValueError, AssertionError) as e:
            return e
        return None

    error = refusal(args.sched)
    if error is None:
        return None
    if f"'{args.sched}'" in str(error) and 'Unknown' in str(error):
        valid = [s for s in SCHEDULERS if not str(refusal(s) or '').startswith('Unknown')]
        near = close_matches(str(args.sched), valid, n=1)
        hint = f'did you mean {near[0]}? ' if near else ''
        return f"--sched {args.sched}: not a scheduler timm knows; {hint}timm's are {', '.join(valid)}"
    return f'--sched {args.sched}: {error}'


def optimizer_state_ratio(opt: str, **kwargs) -> float:
    """Bytes of state the optimizer ``opt`` keeps per byte of parameter (SGD with momentum 1, Adam 2), measured on a
    small parameter after one step: what a checkpoint holds beside the weights."""
    param = torch.nn.Parameter(torch.zeros(16, 16))
    optimizer = create_optimizer_v2([param], opt=opt, **kwargs)
    param.grad = torch.ones_like(param)
    optimizer.step()
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.numel() > 1)
    return state / (param.numel() * param.element_size())


class SchedulerState:
    """A checkpoint's entry for timm's scheduler: its ``state_dict``, and for ``plateau`` the counters timm leaves
    out of it (patience, cooldown), so that a resumed run steps the plateau exactly as an uninterrupted one."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict | None:
        if self.scheduler is None:
            return None
        state = self.scheduler.state_dict()
        if isinstance(self.scheduler, PlateauLRScheduler):
            state = dict(state, plateau=self.scheduler.lr_scheduler.state_dict())
        return state

    def load_state_dict(self, state: dict | None) -> None:
        if self.scheduler is None or state is None:
            return
        state = dict(state)
        plateau = state.pop('plateau', None)
        self.scheduler.load_state_dict(state)
        if plateau is not None and isinstance(self.scheduler, PlateauLRScheduler):
            self.scheduler.lr_scheduler.load_state_dict(plateau)
