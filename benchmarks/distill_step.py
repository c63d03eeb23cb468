"""Cost of distillation: a born-again or MEAL training step against the student's plain step plus the teachers'
forward passes, and the exported student's inference against the plain architecture.

Configurations, on one fixed random batch, SGD (lr 0.05, momentum 0.9):

* ``student``: the student architecture alone with its ``CrossEntropyTask``, one full training step;
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
from collections.abc import Callable

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

import timm_ensembles


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    add_model_args(parser, base_help='timm model name of the student and the teachers')
    add_timing_args(parser)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = setup_device(args)
    print_header('Distillation: training step and exported inference vs the plain student', argv, args.device,
                 f'{model_setup(args)}, {rounds_setup(args)}; optimizer {OPTIMIZER_ARGS}')
    x, target = fixed_batch(args.batch_size, args.img_size, device)

    def create(name: str, **kwargs) -> torch.nn.Module:
        return timm_ensembles.create_model(name, num_classes=NUM_CLASSES, **kwargs).to(device)

    def train_step(model: torch.nn.Module, **task_kwargs) -> Callable[[], torch.Tensor]:
        task = timm_ensembles.create_task(model, **task_kwargs).train()
        task.on_epoch_start(0)
        return make_train_step(task, task.create_optimizer(**OPTIMIZER_ARGS), x, target)

    teacher = create(args.base).eval()
    ensemble = create(f'ens_{args.base}x2').eval()
    steps = {
        'student': train_step(create(args.base)),
        'teacher fwd': make_infer_step(teacher, x),
        'member fwd': make_infer_step(ensemble.members[0], x),
        'ensemble fwd': make_infer_step(ensemble, x),
        'ban': train_step(create(f'ban_{args.base}'), teachers=[teacher]),
        'meal v1': train_step(create(f'meal_{args.base}'), teachers=[ensemble]),
        'meal v2': train_step(create(f'meal_{args.base}'), teachers=[ensemble], version='v2'),
        'plain eval': make_infer_step(create(args.base), x),
    }
    exported = timm_ensembles.create_task(create(f'ban_{args.base}'), teachers=[teacher]).export_model()
    steps['exported eval'] = make_infer_step(exported, x)
    times = run_rounds(steps, args.rounds, args.warmup, device)

    time_table(times, times)

    def ratio(num: str, den: list[str]) -> str:
        return ratio_row(f'{num} / ({" + ".join(den)})', times[num], *(times[d] for d in den))
    ratio_table([
        ratio('ban', ['student', 'teacher fwd']),
        ratio('meal v1', ['student', 'member fwd']),
        ratio('meal v2', ['student', 'ensemble fwd']),
        ratio('exported eval', ['plain eval']),
    ])


if __name__ == '__main__':
    main()
