"""What the benchmarks share: the machine description, one training step, interleaved timing rounds, ratio rows."""
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

# benchmark the package of the checkout these scripts belong to, whether or not (and whichever version) is installed
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import timm_ensembles  # noqa: E402

OPTIMIZER_ARGS = dict(opt='sgd', lr=0.05, momentum=0.9)


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


def print_header(title: str, argv: list[str] | None, device: str, setup: str) -> None:
    """The report's title, then the command, machine, versions and setup, so that a pasted report says what ran."""
    device_name = torch.cuda.get_device_name(torch.device(device)) if device == 'cuda' else cpu_name()
    print(f'## {title}\n')
    print(f'- command: `python {shlex.join(sys.argv if argv is None else [sys.argv[0], *argv])}`')
    print(f'- machine: {platform.platform()}, processor {platform.processor() or "?"} ({cpu_name()}), '
          f'torch threads {torch.get_num_threads()}')
    print(f'- device: {device} ({device_name})')
    print(f'- python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, '
          f'timm_ensembles from {Path(timm_ensembles.__file__).parent}')
    print(f'- {setup}')
    sys.stdout.flush()


def setup_device(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and, on a GPU, let cuDNN pick its algorithms during the warm-up steps."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    return device


def add_timing_args(parser: argparse.ArgumentParser) -> None:
    """The flags every timing benchmark takes."""
    parser.add_argument('--rounds', type=int, default=7, help='timed rounds (each times every configuration once)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per configuration before the rounds')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch\'s)')


def check_timing_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.rounds < 1 or args.warmup < 0:
        parser.error('--rounds must be >= 1 and --warmup >= 0.')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: CUDA is not available in this torch build or machine.')


def time_table(times: dict[str, list[float]], names: list[str]) -> None:
    """Print the step times of ``names``: median, minimum and spread (slowest / fastest round), in ms."""
    print('| configuration | median (ms) | min (ms) | spread (max / min) |')
    print('|---|---:|---:|---:|')
    for name in names:
        t = times[name]
        print(f'| {name} | {statistics.median(t) * 1e3:.1f} | {min(t) * 1e3:.1f} | {max(t) / min(t):.2f} |')
