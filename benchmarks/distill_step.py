"""Cost of distillation: a born-again or MEAL training step against the student's plain step plus the teachers'
forward passes, and the exported student's inference against the plain architecture.

Configurations, on one fixed random batch, SGD (lr 0.05, momentum 0.9):

* ``student``: the student architecture alone with its ``ClassificationTask``, one full training step;
* ``teacher fwd``: one forward pass of the teacher (``--base``, eval mode, no gradients);
* ``member fwd``: one forward pass of one member of the ensemble teacher (``ens_<base>x2``);
* ``ensemble fwd``: one forward pass of the whole ensemble teacher;
* ``ban``: ``ban_<base>`` taught by the teacher, one full training step;
* ``meal v1``: ``meal_<base>`` taught by the ensemble (its members are the zoo: one member per step, stage
  features, discriminators), one full training step;
* ``meal v2``: the same with ``version='v2'`` (the whole ensemble's averaged probabilities, one discriminator);
* ``plain eval`` / ``exported eval``: inference of the architecture and of the exported student.

The ratios: ``ban / (student + teacher fwd)``, ``meal v1 / (student + member fwd)``, ``meal v2 / (student +
ensemble fwd)``, each against the target 1.10; ``exported eval / plain eval`` against 1.00. Timing is interleaved
(every round times each configuration once), reported as the median of per-round ratios and the ratio of minima.

Usage::

    python benchmarks/distill_step.py --base resnet18 --img-size 32 --batch-size 64 --rounds 7
"""
import argparse
import statistics
from collections.abc import Callable

import torch
from _common import (
    OPTIMIZER_ARGS,
    add_timing_args,
    check_timing_args,
    make_train_step,
    print_header,
    run_rounds,
    setup_device,
)

import timm_ensembles

NUM_CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    parser.add_argument('--base', default='resnet18', help='timm model name of the student and the teachers')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--batch-size', type=int, default=64)
    add_timing_args(parser)
    args = parser.parse_args(argv)
    check_timing_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = setup_device(args)
    print_header('Distillation: training step and exported inference vs the plain student', argv, args.device,
                 f'base {args.base}, {args.img_size}x{args.img_size} input, batch {args.batch_size}, {args.rounds}'
                 f' rounds after {args.warmup} warm-up steps; optimizer {OPTIMIZER_ARGS}')
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    target = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)

    def create(name: str, **kwargs) -> torch.nn.Module:
        return timm_ensembles.create_model(name, num_classes=NUM_CLASSES, **kwargs).to(device)

    def train_step(model: torch.nn.Module, **task_kwargs) -> Callable[[], torch.Tensor]:
        task = timm_ensembles.create_task(model, **task_kwargs).train()
        task.on_epoch_start(0)
        return make_train_step(task, task.create_optimizer(**OPTIMIZER_ARGS), x, target)

    def infer(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
        model.eval()

        def run() -> torch.Tensor:
            with torch.no_grad():
                return model(x)
        return run

    teacher = create(args.base).eval()
    ensemble = create(f'ens_{args.base}x2').eval()
    steps = {
        'student': train_step(create(args.base)),
        'teacher fwd': infer(teacher),
        'member fwd': infer(ensemble.members[0]),
        'ensemble fwd': infer(ensemble),
        'ban': train_step(create(f'ban_{args.base}'), teachers=[teacher]),
        'meal v1': train_step(create(f'meal_{args.base}'), teachers=[ensemble]),
        'meal v2': train_step(create(f'meal_{args.base}'), teachers=[ensemble], version='v2'),
        'plain eval': infer(create(args.base)),
    }
    exported = timm_ensembles.create_task(create(f'ban_{args.base}'), teachers=[teacher]).export_model()
    steps['exported eval'] = infer(exported)
    times = run_rounds(args, steps, {})

    ms = 1e3
    print('\n| configuration | median (ms) | min (ms) | spread (max / min) |')
    print('|---|---:|---:|---:|')
    for name, t in times.items():
        print(f'| {name} | {statistics.median(t) * ms:.1f} | {min(t) * ms:.1f} | {max(t) / min(t):.2f} |')

    def ratio(num: str, den: list[str]) -> str:
        per_round = statistics.median(times[num][r] / sum(times[d][r] for d in den) for r in range(args.rounds))
        of_minima = min(times[num]) / sum(min(times[d]) for d in den)
        return f'| {num} / ({" + ".join(den)}) | {per_round:.3f} | {of_minima:.3f} |'
    print('\n| ratio | median of per-round ratios | ratio of minima |')
    print('|---|---:|---:|')
    print(ratio('ban', ['student', 'teacher fwd']))
    print(ratio('meal v1', ['student', 'member fwd']))
    print(ratio('meal v2', ['student', 'ensemble fwd']))
    print(ratio('exported eval', ['plain eval']))


if __name__ == '__main__':
    main()
