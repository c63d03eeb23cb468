"""Training-step time of ensembles relative to one network: what an ensemble, and FDL on top of it, cost per step.

One *step* is what a training loop does per batch: the task's forward (``task(x, target)``), ``loss.backward()``,
``optimizer.step()`` and ``optimizer.zero_grad()``, everything in train mode on one fixed random batch. Timed
configurations, for each number of members N given:

* ``single``: the base model alone with its ``CrossEntropyTask`` (timed once, shared by every N);
* ``ens xN``: the independent deep ensemble (``timm.create_model('ens', ...)``) with its task;
* ``fdl xN``: the FDL ensemble with its task in the joint phase (features, similarity term, -L_FDL, head), its
  features at the default taps (the stage outputs before their final activation, kept by hooks on the activations);
* ``fdl xN stages``: the same on the stage outputs as ``forward_intermediates`` returns them (no hooks);
* ``FDL term xN``: ``feature_difference_loss`` alone, forward and backward, on the features of one forward pass
  of the ``fdl xN`` members, held as leaf tensors so that only the term itself is timed (the network backward it
  feeds is shared with the cross-entropy's in a real step and is counted in ``fdl xN``).

Every configuration uses the same optimizer (``task.create_optimizer(opt='sgd', lr=0.05, momentum=0.9)``). After
``--warmup`` untimed steps of each, every round times each configuration once, in a fixed order, so that slow
drift in the machine's load (other jobs, clock changes) hits all configurations alike; the report gives the median
and the minimum over rounds.

How to read it: absolute times depend on the machine and its load, so the script reports ratios.

* ``ens xN / (N x single)``: about 1 when the members run one after another and nothing else is shared; above 1
  shows per-member overhead, below 1 usually means the single model underuses the device (small batches on a
  GPU) or that the measurement is noisy.
* ``fdl xN / (N x single)`` and ``fdl xN / ens xN``: the price of FDL over N separate trainings and over an
  independent ensemble trained side by side (stage features via ``forward_intermediates``, the FDL and
  similarity terms, the ensemble head).
* ``FDL term / fdl xN``: the share of the FDL step spent in the feature difference term itself.
* ``fdl xN / fdl xN stages``: what taking the features before the activation costs (a clone of each tapped
  activation's input where it works in place).

Ratios are given two ways: the median over rounds of the ratio within a round (configurations of one round ran
under about the same load), and the ratio of the minima (each configuration's least disturbed round). When the
two disagree much, or a configuration's spread (slowest round / fastest) is far above 1, the machine was too
noisy for the numbers to mean much: use more rounds or a quiet machine.

On a CPU shared with other jobs, pass ``--threads`` no larger than the cores left free: an oversubscribed OpenMP
thread pool can make every step many times slower, and erratically so, which swamps the ratios.

Usage::

    python benchmarks/step_time.py --base resnet18 --img-size 32 --batch-size 64 --members 2 3 4 --rounds 7
"""
import argparse
from collections.abc import Callable

import timm
import torch
from _common import (
    NUM_CLASSES,
    OPTIMIZER_ARGS,
    add_model_args,
    add_timing_args,
    check_args,
    clear_grads,
    fixed_batch,
    make_term_step,
    make_train_step,
    model_setup,
    print_header,
    ratio_row,
    ratio_table,
    rounds_setup,
    run_rounds,
    setup_device,
    time_table,
)

import timm_ensembles
from timm_ensembles.losses import feature_difference_loss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    add_model_args(parser, members=[2, 3, 4], base_help='timm model name of the base network / members')
    add_timing_args(parser)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def build_configs(args: argparse.Namespace, x: torch.Tensor,
                  target: torch.Tensor) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, Callable[[], None]]]:
    """Build every configuration, in the fixed order of the rounds.

    Returns:
        ``(steps, before)``: the timed closure of each configuration, and for some an untimed closure to run
        before each of its steps.
    """
    device = torch.device(args.device)
    steps: dict[str, Callable[[], torch.Tensor]] = {}
    before: dict[str, Callable[[], None]] = {}

    def train_task(model: torch.nn.Module, epoch: int | None = None) -> torch.nn.Module:
        task = timm_ensembles.create_task(model).to(device).train()
        if epoch is not None:
            task.on_epoch_start(epoch)
        return task

    single = train_task(timm.create_model(args.base, num_classes=NUM_CLASSES))
    steps['single'] = make_train_step(single, single.create_optimizer(**OPTIMIZER_ARGS), x, target)
    for n in args.members:
        ens = train_task(timm.create_model('ens', base_model=args.base, num_members=n, num_classes=NUM_CLASSES))
        steps[f'ens x{n}'] = make_train_step(ens, ens.create_optimizer(**OPTIMIZER_ARGS), x, target)

        # epoch 1 is past FDLTask's default single warm-up epoch: the joint phase, with every FDL term
        fdl = train_task(timm.create_model('fdl', base_model=args.base, num_members=n, num_classes=NUM_CLASSES),
                         epoch=1)
        if fdl.phase != 'joint':
            raise RuntimeError(f'fdl x{n} is in phase {fdl.phase!r}, expected the joint phase.')
        # FDLTask reads the optimizer's lr for its term weights, so the optimizer must come from the task
        steps[f'fdl x{n}'] = make_train_step(fdl, fdl.create_optimizer(**OPTIMIZER_ARGS), x, target)
        stages = timm.create_model('fdl', base_model=args.base, num_members=n, num_classes=NUM_CLASSES)
        stages = timm_ensembles.create_task(stages, feature_taps='stages').to(device).train()
        stages.on_epoch_start(1)
        steps[f'fdl x{n} stages'] = make_train_step(stages, stages.create_optimizer(**OPTIMIZER_ARGS), x, target)

        # the features the fdl task would tap, computed once; as leaves, the term's backward stops at them
        with torch.no_grad():
            _, features = fdl.model.forward_members_with_features(x, fdl.feature_taps, fdl.feature_indices)
        leaves = [[f.detach().requires_grad_() for f in member] for member in features]
        steps[f'FDL term x{n}'] = make_term_step(feature_difference_loss, leaves)
        before[f'FDL term x{n}'] = lambda leaves=leaves: clear_grads(leaves)
    return steps, before


def report(args: argparse.Namespace, times: dict[str, list[float]]) -> None:
    """Print one section per N: the step times, then the ratios."""
    single = times['single']
    for n in args.members:
        ens, fdl, term = times[f'ens x{n}'], times[f'fdl x{n}'], times[f'FDL term x{n}']
        print(f'\n### N = {n}')
        time_table(times, ['single', f'ens x{n}', f'fdl x{n}', f'fdl x{n} stages', f'FDL term x{n}'])
        ratio_table([
            ratio_row(f'ens x{n} / ({n} x single)', ens, single, scale=n),
            ratio_row(f'fdl x{n} / ({n} x single)', fdl, single, scale=n),
            ratio_row(f'fdl x{n} / ens x{n}', fdl, ens),
            ratio_row(f'FDL term x{n} / fdl x{n} (share of the step)', term, fdl),
            ratio_row(f'fdl x{n} / fdl x{n} stages (features before the activation)', fdl, times[f'fdl x{n} stages']),
        ])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = setup_device(args)
    print_header('Training step time: ensembles vs one network', argv, args.device,
                 f'{model_setup(args)}, members {args.members}, {rounds_setup(args)}; optimizer {OPTIMIZER_ARGS}')
    x, target = fixed_batch(args.batch_size, args.img_size, device)
    steps, before = build_configs(args, x, target)
    times = run_rounds(steps, args.rounds, args.warmup, device, before)
    report(args, times)


if __name__ == '__main__':
    main()
