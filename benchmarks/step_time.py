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
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

# time the package of the checkout this script belongs to, whether or not (and whichever version) is installed
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import timm_ensembles  # noqa: E402
from timm_ensembles.losses import feature_difference_loss  # noqa: E402

NUM_CLASSES = 10
OPTIMIZER_ARGS = dict(opt='sgd', lr=0.05, momentum=0.9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    parser.add_argument('--base', default='resnet18', help='timm model name of the base network / members')
    parser.add_argument('--img-size', type=int, default=32, help='input height and width')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--members', type=int, nargs='+', default=[2, 3, 4], help='ensemble sizes N to time')
    parser.add_argument('--rounds', type=int, default=7, help='timed rounds (each times every configuration once)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per configuration before the rounds')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch\'s)')
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.batch_size < 1 or args.img_size < 1:
        parser.error('--rounds, --batch-size and --img-size must be >= 1 and --warmup >= 0.')
    if any(n < 2 for n in args.members):
        parser.error('--members: an ensemble needs at least 2 members.')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: CUDA is not available in this torch build or machine.')
    return args


def cpu_name() -> str:
    """The CPU's model name (``platform.processor()`` is often just the architecture on Linux)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_train_step(task: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                    target: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One full training step of ``task`` on the fixed batch, as a training loop runs it.

    Returns:
        A closure that runs the step and returns the (detached) loss.
    """
    def step() -> torch.Tensor:
        loss = task(x, target)['loss']
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


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


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer reads when the work is done, not when it was queued."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def run_rounds(args: argparse.Namespace, steps: dict[str, Callable[[], torch.Tensor]],
               before: dict[str, Callable[[], None]]) -> dict[str, list[float]]:
    """Warm up every configuration, then time them interleaved.

    Returns:
        Seconds per step of each configuration, one entry per round.
    """
    device = torch.device(args.device)
    last_loss: dict[str, torch.Tensor] = {}
    for name, step in steps.items():
        for _ in range(args.warmup):
            before.get(name, lambda: None)()
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            before.get(name, lambda: None)()
            synchronize(device)
            t0 = time.perf_counter()
            last_loss[name] = step()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
        print(f'round {r + 1}/{args.rounds} done', file=sys.stderr, flush=True)
    # a diverged run (NaN/inf) can run at a different speed than a healthy one, so say so rather than hide it
    for name, loss in last_loss.items():
        if not torch.isfinite(loss).all():
            print(f'WARNING: {name}: non-finite loss {loss.item()} in the last round; its time may be'
                  ' unrepresentative.', file=sys.stderr)
    return times


def ratio_row(label: str, num: list[float], den: list[float], scale: float = 1.0) -> str:
    """A ratio table row: median of per-round ratios, and ratio of minima."""
    per_round = statistics.median(a / (scale * b) for a, b in zip(num, den))
    of_minima = min(num) / (scale * min(den))
    return f'| {label} | {per_round:.3f} | {of_minima:.3f} |'


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
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == 'cuda':
        # as a training run would: conv algorithms are picked during the warm-up steps, not the timed ones
        torch.backends.cudnn.benchmark = True
    device_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name()

    print('## Training step time: ensembles vs one network\n')
    print(f'- command: `python {shlex.join(sys.argv if argv is None else [sys.argv[0], *argv])}`')
    print(f'- machine: {platform.platform()}, processor {platform.processor() or "?"} ({cpu_name()}), '
          f'torch threads {torch.get_num_threads()}')
    print(f'- device: {args.device} ({device_name})')
    print(f'- python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, '
          f'timm_ensembles from {Path(timm_ensembles.__file__).parent}')
    print(f'- base {args.base}, {args.img_size}x{args.img_size} input, batch {args.batch_size}, members {args.members}'
          f', {args.rounds} rounds after {args.warmup} warm-up steps; optimizer {OPTIMIZER_ARGS}')
    sys.stdout.flush()

    torch.manual_seed(0)
    # one fixed batch, made once: the time of data loading and of random number generation is not measured
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    target = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    steps, before = build_configs(args, x, target)
    times = run_rounds(args, steps, before)
    report(args, times)


if __name__ == '__main__':
    main()
