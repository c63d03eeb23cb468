"""This package's deep ensemble against torchensemble's VotingClassifier: the same members, data and optimiser.

torchensemble (``pip install torchensemble``; a dependency of this benchmark only, not of the package) trains a
``VotingClassifier`` in ``fit``: per epoch, ``_parallel_fit_per_epoch`` runs for each estimator in turn (joblib, in
process with the default ``n_jobs=None``) over the whole loader, with the estimator's own optimiser; per batch
``zero_grad``, forward, ``CrossEntropyLoss``, ``backward``, ``step``, and a status print (with a ``.item()``) every
``log_interval`` batches, batch 0 included. Configurations, each timed per epoch over one fixed ``DataLoader``
(a ``TensorDataset`` of random images, no shuffling, so every configuration sees the same batches in the same order):

* ``torchensemble epoch``: one epoch of ``torchensemble.voting._parallel_fit_per_epoch`` for each estimator, as
  ``fit`` runs it (``log_interval`` larger than the epoch: only batch 0 prints, into a buffer);
* ``torchensemble fit``: ``VotingClassifier.fit(loader, epochs=1, save_model=False)``, which also builds its
  estimators (deep copies of the base estimator) and their optimisers;
* ``ens <strategy>``: ``timm.create_model('ens', base_model=..., num_members=N)`` with its task, per batch
  ``task(x, y)['loss']`` (the sum of the member cross-entropies, so each member gets its own loss's gradient),
  ``zero_grad``, ``backward``, ``step`` of one ``torch.optim.SGD`` over every member's parameters.

torchensemble's estimators start as copies of the ``ens`` members, and both sides use ``torch.optim.SGD(lr=0.05,
momentum=0.9)`` (not timm's ``sgd``, which is Nesterov). Before timing, one epoch of each from those equal weights
checks that the two train the same: the largest difference between a torchensemble estimator's weights and the
``ens loop`` member's is printed. Interleaved rounds (each round runs one epoch of every configuration); ratios to
``torchensemble epoch`` as the median of per-round ratios and the ratio of minima. Target: <= 1.

Usage::

    python benchmarks/torchensemble_vs.py --base resnet18 --img-size 32 --batch-size 64 --members 2 4 --batches 8
"""
import argparse
import contextlib
import copy
import io

import timm
import torch
from _common import (
    NUM_CLASSES,
    add_model_args,
    add_timing_args,
    check_args,
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

LR, MOMENTUM = 0.05, 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    add_model_args(parser, members=[2, 4])
    parser.add_argument('--batches', type=int, default=8, help='batches per epoch')
    parser.add_argument('--strategies', nargs='+', default=['loop', 'grouped'], choices=['loop', 'vmap', 'grouped'])
    add_timing_args(parser)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def ens_epoch(task, optimizer, loader):
    def epoch():
        for x, y in loader:
            loss = task(x, y)['loss']
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return loss.detach()
    return epoch


def te_epoch(voting, estimators, optimizers, loader, device):
    def epoch():
        with contextlib.redirect_stdout(io.StringIO()):
            for idx, (est, opt) in enumerate(zip(estimators, optimizers)):
                _, _, loss = voting._parallel_fit_per_epoch(loader, est, None, opt, torch.nn.CrossEntropyLoss(), idx,
                                                            0, 10 ** 9, device, True)
        return loss.detach()
    return epoch


def te_fit(classifier, loader):
    def fit():
        with contextlib.redirect_stdout(io.StringIO()):
            classifier.fit(loader, epochs=1, log_interval=10 ** 9, save_model=False)
        return torch.zeros(())
    return fit


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = setup_device(args)
    import logging

    from torchensemble import VotingClassifier, voting
    logging.getLogger().setLevel(logging.WARNING)  # torchensemble logs through the root logger
    print_header("Deep ensemble vs torchensemble's VotingClassifier", argv, args.device,
                 f'{model_setup(args)}, {args.batches} batches per epoch, members {args.members}, strategies'
                 f' {args.strategies}, {rounds_setup(args, "epochs")}; torch.optim.SGD(lr={LR}, momentum={MOMENTUM});'
                 ' fp32')
    torch.manual_seed(0)
    n_samples = args.batch_size * args.batches
    data = torch.utils.data.TensorDataset(
        torch.randn(n_samples, 3, args.img_size, args.img_size, device=device),
        torch.randint(0, NUM_CLASSES, (n_samples,), device=device))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=False)

    steps = {}
    for n in args.members:
        ref = timm.create_model('ens', base_model=args.base, num_members=n, num_classes=NUM_CLASSES).to(device).train()
        estimators = [copy.deepcopy(m) for m in ref.members]
        optimizers = [torch.optim.SGD(e.parameters(), lr=LR, momentum=MOMENTUM) for e in estimators]
        steps[f'torchensemble epoch x{n}'] = te_epoch(voting, estimators, optimizers, loader, device)
        classifier = VotingClassifier(estimator=copy.deepcopy(ref.members[0]), n_estimators=n,
                                      cuda=device.type == 'cuda')
        classifier.set_optimizer('SGD', lr=LR, momentum=MOMENTUM)
        steps[f'torchensemble fit x{n}'] = te_fit(classifier, loader)
        for name in args.strategies:
            model = copy.deepcopy(ref)
            try:
                model.set_member_strategy(name, example_input=data.tensors[0][:4])
            except StrategyError as e:
                print(f'- ens {name} x{n}: refused: {e}')
                continue
            task = timm_ensembles.create_task(model).train()
            steps[f'ens {name} x{n}'] = ens_epoch(task, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
                                                  loader)
            if name == 'loop':
                # the same training: one epoch of each from equal weights (the warm-up of the rounds goes on)
                steps[f'ens {name} x{n}']()
                steps[f'torchensemble epoch x{n}']()
                diff = max((p - q).abs().max().item() for e, m in zip(estimators, model.members)
                           for p, q in zip(e.parameters(), m.parameters()))
                print(f'- N = {n}: after one epoch from equal weights, largest |torchensemble - ens loop| weight'
                      f' difference {diff:.3g}')

    times = run_rounds(steps, args.rounds, args.warmup, device)
    for n in args.members:
        names = [k for k in steps if k.endswith(f' x{n}')]
        reference = times[f'torchensemble epoch x{n}']
        print(f'\n### N = {n} (times per epoch of {args.batches} batches)')
        time_table(times, names)
        rows = [ratio_row(f'{name} / torchensemble epoch x{n}', times[name], reference)
                for name in names if name.startswith('ens ')]
        rows.append(ratio_row(f'torchensemble fit x{n} / torchensemble epoch x{n}', times[f'torchensemble fit x{n}'],
                              reference))
        ratio_table(rows)


if __name__ == '__main__':
    main()
