"""Cost of collaborative learning: the multi-head training step against one plain model's, and the exported head's
inference against the plain base.

Configurations, all on one fixed random batch in train mode with SGD (lr 0.05, momentum 0.9):

* ``single``: the base model with its ``CrossEntropyTask``, one full training step (forward, backward, optimizer
  step, zero_grad);
* ``collab xH``: ``collab_<base>xH`` as registered (H = 2: one split; H = 4: a 2-way split at two depths) with
  ``CollaborativeTask``, one full training step;
* ``plain eval`` and ``exported eval``: inference (eval mode, ``torch.no_grad()``) of the base model and of
  ``export_head()`` of the collaborative network: the same architecture, so the ratio should be 1.00.

The FLOP ratio the split implies counts the shared trunk once: the forward FLOPs of each segment of the base
(stem, each stage, tail and classifier, measured with ``torch.utils.flop_counter.FlopCounterMode``) times the
number of branches that run it, over the base's FLOPs. Beside it, the measured FLOP ratio of a whole training step
(forward and backward, same counter). The target: the step-time ratio within 10 % of the FLOP ratio.

Timing is interleaved (every round times each configuration once) and reported as the median of per-round ratios
and the ratio of minima, as in ``step_time.py``.

Usage::

    python benchmarks/collab_step.py --base resnet18 --img-size 32 --batch-size 64 --heads 2 4 --rounds 7
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
    fixed_batch,
    make_infer_step,
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
from torch.utils.flop_counter import FlopCounterMode

import timm_ensembles


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    add_model_args(parser)
    parser.add_argument('--heads', type=int, nargs='+', default=[2, 4], choices=[2, 4],
                        help='head counts of the registered collab_<base>x<H> variants to time')
    add_timing_args(parser)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def implied_flop_ratio(model: timm_ensembles.CollaborativeNet, plain: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs of the multi-head network with each segment counted once per branch that runs it, over the
    plain model's; ``plain`` is run segment by segment through the collaborative network's layout."""
    layout = model.layout
    per_segment = []
    with torch.no_grad():
        z = x
        for j in range(layout.num_segments):
            per_segment.append(flops(lambda j=j, z=z: layout.run(plain, j, z)))
            z = layout.run(plain, j, z)
        per_segment[-1] += flops(lambda: plain.forward_head(z))
        total = flops(lambda: plain(x))
    if sum(per_segment) != total:
        raise RuntimeError(f'segment FLOPs {sum(per_segment)} do not add up to the model\'s {total}')
    runs = [model.num_heads // model._group[model._segment_level[j]] for j in range(layout.num_segments)]
    return sum(f * r for f, r in zip(per_segment, runs)) / total


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = setup_device(args)
    print_header('Collaborative learning: training step and exported inference vs one plain model', argv,
                 args.device, f'{model_setup(args)}, heads {args.heads}, {rounds_setup(args)}; optimizer'
                 f' {OPTIMIZER_ARGS}')
    x, target = fixed_batch(args.batch_size, args.img_size, device)

    steps, flop_rows = {}, []
    plain = timm.create_model(args.base, num_classes=NUM_CLASSES).to(device)
    single = timm_ensembles.create_task(plain).train()
    single_step = make_train_step(single, single.create_optimizer(**OPTIMIZER_ARGS), x, target)
    steps['single'] = single_step
    single_train_flops = flops(single_step)
    exported = None
    for h in args.heads:
        model = timm_ensembles.create_model(f'collab_{args.base}x{h}', num_classes=NUM_CLASSES).to(device)
        task = timm_ensembles.create_task(model).train()
        step = make_train_step(task, task.create_optimizer(**OPTIMIZER_ARGS), x, target)
        steps[f'collab x{h}'] = step
        implied = implied_flop_ratio(model, plain.eval(), x)
        flop_rows.append((h, model.splits, model.hierarchy, implied, flops(step) / single_train_flops))
        exported = exported or model.export_head().eval()
    steps['plain eval'] = make_infer_step(timm.create_model(args.base, num_classes=NUM_CLASSES).to(device), x)
    steps['exported eval'] = make_infer_step(exported, x)
    plain.train()
    times = run_rounds(steps, args.rounds, args.warmup, device)

    time_table(times, times)
    print('\n| heads | split | hierarchy | implied FLOP ratio (trunk once) | measured training-step FLOP ratio |')
    print('|---|---|---|---:|---:|')
    for h, splits, hierarchy, implied, measured in flop_rows:
        print(f'| {h} | {splits} | {hierarchy} | {implied:.3f} | {measured:.3f} |')
    rows = []
    for h, *_, implied, _ in flop_rows:
        rows.append(ratio_row(f'collab x{h} / single (step time)', times[f'collab x{h}'], times['single']))
        rows.append(ratio_row(f'collab x{h} step-time ratio / implied FLOP ratio', times[f'collab x{h}'],
                              times['single'], scale=implied))
    rows.append(ratio_row('exported eval / plain eval (inference)', times['exported eval'], times['plain eval']))
    ratio_table(rows)


if __name__ == '__main__':
    main()
