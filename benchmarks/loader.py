#!/usr/bin/env python3
"""Training-loader throughput of in-memory sources: timm's per-image transforms against the batched path.

    python benchmarks/loader.py --dataset fashion-mnist --img-size 28 --batch-size 128 --batches 100 --threads 1

Both loaders come from ``timm_ensembles.data.create_loaders`` on the same dataset and data config: the per-image path
by handing it timm's own training transform (what ``create_loaders`` gave in-memory sets before the batched path,
PIL decode, random resized crop, flip, to-tensor, normalise, one sample at a time, collated), the batched path by
default. Each round iterates ``--batches`` batches of every loader, interleaved; the table gives images per second and
their ratio. With ``--model``, one training step of that model on one batch is timed in the same rounds, and each
loader's share of a step (loader time / (loader time + step time)) is printed.
"""
import argparse
import ast
import itertools
import statistics
import sys

import torch
from _common import (
    NUM_CLASSES,
    OPTIMIZER_ARGS,
    add_timing_args,
    check_args,
    make_train_step,
    print_header,
    rounds_setup,
    run_rounds,
    setup_device,
)
from timm.data import create_transform

import timm_ensembles
from timm_ensembles import data as te_data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dataset', default='fashion-mnist')
    parser.add_argument('--img-size', type=int, default=28)
    parser.add_argument('--in-chans', type=int, default=1)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--batches', type=int, default=100, help='batches per loader per round')
    parser.add_argument('--interpolation', default='bicubic')
    parser.add_argument('--model', default=None, help='also time a training step of this model (any timm name)')
    parser.add_argument('--model-kwargs', default='{}', help='Python dict literal of model arguments')
    add_timing_args(parser)
    args = parser.parse_args(argv)
    check_args(parser, args)
    device = setup_device(args)
    print_header('Training loader: per-image timm transforms vs the batched in-memory path', argv, args.device,
                 f'dataset {args.dataset}, {args.in_chans}x{args.img_size}x{args.img_size}, batch {args.batch_size},'
                 f' {args.batches} batches per loader per round, {rounds_setup(args, "rounds")}, {args.interpolation}'
                 f', scale (0.5, 1), flip 0.5, one process (workers 0)')

    train_ds, val_ds, _ = te_data.create_datasets(args.dataset, img_mode='L' if args.in_chans == 1 else 'RGB')
    mean, std = (0.5,) * args.in_chans, (0.5,) * args.in_chans
    cfg = dict(input_size=(args.in_chans, args.img_size, args.img_size), interpolation=args.interpolation,
               mean=mean, std=std, crop_pct=1.0)
    per_image_tf = create_transform(cfg['input_size'], is_training=True, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                                    hflip=0.5, vflip=0., interpolation=args.interpolation, mean=mean, std=std,
                                    color_jitter=None, auto_augment=None, re_prob=0.)
    loaders = {
        'per-image (timm transforms)': te_data.create_loaders(
            train_ds, val_ds, cfg, args.batch_size, workers=0, hflip=0.5, train_transform=per_image_tf)[0],
        'batched': te_data.create_loaders(train_ds, val_ds, cfg, args.batch_size, workers=0, hflip=0.5)[0],
    }

    def load(loader) -> None:
        for x, _ in itertools.islice(loader, args.batches):
            x.to(device)

    # one timed call: --batches batches of a loader, or --batches training steps
    steps = {name: lambda loader=loader: load(loader) for name, loader in loaders.items()}
    if args.model:
        model = timm_ensembles.create_model(args.model, num_classes=NUM_CLASSES, in_chans=args.in_chans,
                                            **ast.literal_eval(args.model_kwargs)).to(device)
        task = timm_ensembles.create_task(model)
        optimizer = task.create_optimizer(**OPTIMIZER_ARGS)
        x, y = next(iter(loaders['batched']))
        step = make_train_step(task.train(), optimizer, x.to(device), y.to(device))

        def train() -> torch.Tensor:
            for _ in range(args.batches):
                loss = step()
            return loss
        steps['step'] = train
    times = run_rounds(steps, args.rounds, args.warmup, device)

    images = args.batches * args.batch_size
    per_image, batched = times['per-image (timm transforms)'], times['batched']
    print('\n| loader | img/s (median) | img/s (best) |\n|---|---:|---:|')
    for name in loaders:
        print(f'| {name} | {images / statistics.median(times[name]):.0f} | {images / min(times[name]):.0f} |')
    print('\n| ratio | median of rounds | of minima |\n|---|---:|---:|')
    print(f'| batched / per-image throughput | {statistics.median(p / b for p, b in zip(per_image, batched)):.1f}'
          f' | {min(per_image) / min(batched):.1f} |')
    if args.model:
        step_times = times['step']
        print(f'\nTraining step of `{args.model}` {args.model_kwargs}: {images / statistics.median(step_times):.0f}'
              ' img/s (median).\n\n| loader | share of a step (median of rounds) |\n|---|---:|')
        for name in loaders:
            share = statistics.median(t / (t + s) for t, s in zip(times[name], step_times))
            print(f'| {name} | {100 * share:.0f} % |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
