"""Training-step time of ensembles relative to one network: what an ensemble, and FDL on top of it, cost per step.

One *step* is what a training loop does per batch: the task's forward (``task(x, target)``), ``loss.backward()``,
``optimizer.step()`` and ``optimizer.zero_grad()``, everything in train mode on one fixed random batch. Timed
configurations, for each number of members N given:

* ``single``: the base model alone with its ``ClassificationTask`` (timed once, shared by every N);
* ``ens xN``: the independent deep ensemble (``timm.create_model('ens', ...)``) with its task;
* ``fdl xN``: the FDL ensemble with its task in the joint phase (features, similarity term, -L_FDL, head);
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
import statistics
from collections.abc import Callable

import timm
import torch
from _common import (
    OPTIMIZER_ARGS,
    add_timing_args,
    check_timing_args,
    make_train_step,
    print_header,
    ratio_row,
    run_rounds,
    setup_device,
)

import timm_ensembles
from timm_ensembles.losses import feature_difference_loss

NUM_CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    parser.add_argument('--base', default='resnet18', help='timm model name of the base network / members')
    parser.add_argument('--img-size', type=int, default=32, help='input height and width')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--members', type=int, nargs='+', default=[2, 3, 4], help='ensemble sizes N to time')
    add_timing_args(parser)
    args = parser.parse_args(argv)
    check_timing_args(parser, args)
    if args.batch_size < 1 or args.img_size < 1:
        parser.error('--batch-size and --img-size must be >= 1.')
    if any(n < 2 for n in args.members):
        parser.error('--members: an ensemble needs at least 2 members.')
    return args






def make_fdl_term_step(features: list[list[torch.Tensor]]) -> Callable[[], torch.Tensor]:
    """Forward and backward of ``feature_difference_loss`` alone on fixed leaf features.

    Returns:
        A closure that runs the term and returns its (detached) value.
    """
    def step() -> torch.Tensor:
        loss = feature_difference_loss(features)
        loss.backward()
        return loss.detach()
    return step


def clear_feature_grads(features: list[list[torch.Tensor]]) -> None:
    """Drop the leaves' gradients, so that each timed term backward writes them afresh (as in a real step)
    instead of also accumulating into the previous round's."""
    for member in features:
        for f in member:
            f.grad = None


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

        # the features the fdl task would tap, computed once; as leaves, the term's backward stops at them
        with torch.no_grad():
            _, features = fdl.model.forward_members_with_features(x, fdl.feature_taps, fdl.feature_indices)
        leaves = [[f.detach().requires_grad_() for f in member] for member in features]
        steps[f'FDL term x{n}'] = make_fdl_term_step(leaves)
        before[f'FDL term x{n}'] = lambda leaves=leaves: clear_feature_grads(leaves)
    return steps, before








def report(args: argparse.Namespace, times: dict[str, list[float]]) -> None:
    """Print one section per N: the step times, then the ratios."""
    ms = 1e3
    single = times['single']
    for n in args.members:
        ens, fdl, term = times[f'ens x{n}'], times[f'fdl x{n}'], times[f'FDL term x{n}']
        print(f'\n### N = {n}\n')
        print('| configuration | median (ms) | min (ms) | spread (max / min) |')
        print('|---|---:|---:|---:|')
        for name in ('single', f'ens x{n}', f'fdl x{n}', f'FDL term x{n}'):
            t = times[name]
            print(f'| {name} | {statistics.median(t) * ms:.1f} | {min(t) * ms:.1f} | {max(t) / min(t):.2f} |')
        print()
        print('| ratio | median of per-round ratios | ratio of minima |')
        print('|---|---:|---:|')
        print(ratio_row(f'ens x{n} / ({n} x single)', ens, single, scale=n))
        print(ratio_row(f'fdl x{n} / ({n} x single)', fdl, single, scale=n))
        print(ratio_row(f'fdl x{n} / ens x{n}', fdl, ens))
        print(ratio_row(f'FDL term x{n} / fdl x{n} (share of the step)', term, fdl))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = setup_device(args)
    print_header('Training step time: ensembles vs one network', argv, args.device,
                 f'base {args.base}, {args.img_size}x{args.img_size} input, batch {args.batch_size}, members'
                 f' {args.members}, {args.rounds} rounds after {args.warmup} warm-up steps; optimizer {OPTIMIZER_ARGS}')

    torch.manual_seed(0)
    # one fixed batch, made once: the time of data loading and of random number generation is not measured
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    target = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    steps, before = build_configs(args, x, target)
    times = run_rounds(args, steps, before)
    report(args, times)


if __name__ == '__main__':
    main()
