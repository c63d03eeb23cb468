"""Training step of an N-member ensemble under each member strategy, against N x one member's step.

One *step* is what a training loop does per batch, as in ``step_time.py``: the task's forward, ``loss.backward()``,
``optimizer.step()`` and ``optimizer.zero_grad()``, in train mode on one fixed random batch, SGD (lr 0.05, momentum
0.9). Configurations:

* ``single``: the base model alone with its ``CrossEntropyTask``;
* ``<strategy> xN``: the ensemble (``ens`` by default, ``--method fdl`` for the FDL ensemble in its joint phase)
  with its task, its members run by ``loop``, ``vmap`` or ``grouped`` (``EnsembleModel.set_member_strategy``); a
  strategy that refuses the base is reported and skipped. Every ensemble of one N starts from the same weights.
  ``grouped`` picks, per convolution, a grouped kernel or the members' own convolutions by timing its first batch
  (``conv_kernel='tune'``); ``--grouped-kernels grouped split`` adds ``grouped:grouped xN`` and ``grouped:split xN``,
  fused networks with one kernel kind throughout, and the report says how many layers ``tune`` gave to each.

After the warm-up steps every round times each configuration once (interleaved); the ratios are the median of
per-round ratios and the ratio of minima:

* ``<strategy> xN / (N x single)``: 1 when the members cost exactly N trainings of one; the target where one member
  saturates the device is <= 1.05;
* ``<strategy> xN / loop xN``: the target where one member leaves the device idle is <= 0.75 (25 % below the loop).

The script also asks ``auto`` what it would choose for this model and batch (its own short timing) and prints its
choice beside the timings.

Usage::

    python benchmarks/strategies.py --base resnet10t --img-size 32 --batch-size 8 --members 2 4 --threads 2
    python benchmarks/strategies.py --base resnet18 --img-size 32 --batch-size 64 --members 2 4 --threads 2
"""
import argparse
import copy

import timm
from _common import (
    NUM_CLASSES,
    OPTIMIZER_ARGS,
    add_model_args,
    add_timing_args,
    check_args,
    fixed_batch,
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
from timm_ensembles.models.strategies import StrategyError

STRATEGIES = ('loop', 'vmap', 'grouped')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    add_model_args(parser, base='resnet10t', batch_size=8, members=[2, 4], base_help='timm model name of the members')
    parser.add_argument('--strategies', nargs='+', default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument('--method', default='ens', choices=['ens', 'fdl'])
    parser.add_argument('--grouped-kernels', nargs='+', default=['tune'], choices=['tune', 'grouped', 'split'],
                        help="conv kernels of the grouped strategy to time ('tune' is the strategy's default)")
    add_timing_args(parser)
    args = parser.parse_args(argv)
    check_args(parser, args)
    if 'loop' not in args.strategies:
        parser.error('--strategies must include loop, the reference of the ratios.')
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = setup_device(args)
    print_header('Training step of an ensemble by member strategy', argv, args.device,
                 f'{model_setup(args)}, method {args.method}, members {args.members}, strategies {args.strategies},'
                 f' {rounds_setup(args)}; optimizer {OPTIMIZER_ARGS}; fp32')
    x, target = fixed_batch(args.batch_size, args.img_size, device)

    steps = {}
    single = timm_ensembles.create_task(timm.create_model(args.base, num_classes=NUM_CLASSES)).to(device).train()
    steps['single'] = make_train_step(single, single.create_optimizer(**OPTIMIZER_ARGS), x, target)
    refused, auto_choice, grouped = {}, {}, {}
    for n in args.members:
        ref = timm.create_model(args.method, base_model=args.base, num_members=n, num_classes=NUM_CLASSES).to(device)
        variants = [(s, None) for s in args.strategies if s != 'grouped']
        if 'grouped' in args.strategies:
            variants += [('grouped', k) for k in args.grouped_kernels]
        for name, kernel in variants:
            label = name if kernel in (None, 'tune') else f'{name}:{kernel}'
            model = copy.deepcopy(ref).train()
            try:
                model.set_member_strategy(name, example_input=x[:4])
            except StrategyError as e:
                refused[f'{label} x{n}'] = str(e)
                continue
            if kernel is not None:
                model._member_strategy.set_conv_kernel(kernel)
                grouped[f'{label} x{n}'] = model._member_strategy
            task = timm_ensembles.create_task(model).train()
            task.on_epoch_start(1)  # FDL: the joint phase, with features and every term
            steps[f'{label} x{n}'] = make_train_step(task, task.create_optimizer(**OPTIMIZER_ARGS), x, target)
        model = copy.deepcopy(ref).train()
        model.set_member_strategy('auto')
        task = timm_ensembles.create_task(model).train()
        task.on_epoch_start(1)
        make_train_step(task, task.create_optimizer(**OPTIMIZER_ARGS), x, target)()
        auto_choice[n] = (model.member_strategy, model.member_strategy_info)
    for name, why in refused.items():
        print(f'- {name}: refused: {why}')

    times = run_rounds(steps, args.rounds, args.warmup, device)
    for n in args.members:
        names = [k for k in steps if k.endswith(f' x{n}')]
        print(f'\n### N = {n}')
        time_table(times, ['single', *names])
        rows = [ratio_row(f'{name} / ({n} x single)', times[name], times['single'], scale=n) for name in names]
        rows += [ratio_row(f'{name} / loop x{n}', times[name], times[f'loop x{n}']) for name in names[1:]]
        ratio_table(rows)
        for label, strategy in grouped.items():
            if label.endswith(f' x{n}') and strategy.conv_kernel == 'tune':
                print(f'\n`{label}`: conv kernels chosen by timing: {strategy.conv_kernels()}')
        choice, info = auto_choice[n]
        timings = next(iter(info['timings'].values()), {})
        print(f'\nauto chose `{choice}` for this batch (its own timing, median ms: '
              + ', '.join(f'{k} {v * 1e3:.1f}' for k, v in timings.items()) + ')')


if __name__ == '__main__':
    main()
