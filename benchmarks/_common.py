"""What the benchmarks share: their common flags and checks, the machine description, a fixed batch, the timed steps,
interleaved timing rounds, and the tables of times and ratios."""
import argparse
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import timm
import torch

# benchmark the package of the checkout these scripts belong to, whether or not (and whichever version) is installed
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import timm_ensembles  # noqa: E402

NUM_CLASSES = 10
OPTIMIZER_ARGS = dict(opt='sgd', lr=0.05, momentum=0.9)


def add_model_args(parser: argparse.ArgumentParser, base: str = 'resnet18', batch_size: int = 64,
                   members: Sequence[int] | None = None,
                   base_help: str = 'timm model name of the base network') -> None:
    """``--base``, ``--img-size``, ``--batch-size`` and, when ``members`` gives its default, ``--members``."""
    parser.add_argument('--base', default=base, help=base_help)
    parser.add_argument('--img-size', type=int, default=32, help='input height and width')
    parser.add_argument('--batch-size', type=int, default=batch_size)
    if members is not None:
        parser.add_argument('--members', type=int, nargs='+', default=list(members), help='ensemble sizes N')


def add_device_args(parser: argparse.ArgumentParser, threads: int | None = None) -> None:
    """``--device`` and ``--threads``."""
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--threads', type=int, default=threads,
                        help='torch intra-op threads' + (' (default: torch\'s)' if threads is None else ''))


def add_timing_args(parser: argparse.ArgumentParser) -> None:
    """The flags every timing benchmark takes: ``--rounds``, ``--warmup``, ``--device``, ``--threads``."""
    parser.add_argument('--rounds', type=int, default=7, help='timed rounds (each times every configuration once)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per configuration before the rounds')
    add_device_args(parser)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One error line for a bad value of any of the flags above that ``args`` has."""
    if hasattr(args, 'rounds') and (args.rounds < 1 or args.warmup < 0):
        parser.error('--rounds must be >= 1 and --warmup >= 0.')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: CUDA is not available in this torch build or machine.')
    if args.threads is not None and args.threads < 1:
        parser.error('--threads must be >= 1 (leave it out for torch\'s default).')
    if hasattr(args, 'batch_size') and (args.batch_size < 1 or args.img_size < 1):
        parser.error('--batch-size and --img-size must be >= 1.')
    if any(n < 2 for n in getattr(args, 'members', ())):
        parser.error('--members: an ensemble needs at least 2 members.')


def setup_device(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and, on a GPU, let cuDNN pick its algorithms during the warm-up steps."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    return device


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


def model_setup(args: argparse.Namespace) -> str:
    """The setup line's description of the model and batch (``add_model_args``'s flags)."""
    return f'base {args.base}, {args.img_size}x{args.img_size} input, batch {args.batch_size}'


def rounds_setup(args: argparse.Namespace, unit: str = 'steps') -> str:
    """The setup line's description of the timing (``add_timing_args``'s flags); ``unit`` is what one warm-up runs."""
    return f'{args.rounds} rounds after {args.warmup} warm-up {unit}'


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


def fixed_batch(batch_size: int, img_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed torch with 0 and draw one random batch of images and class targets, made once: the time of data loading
    and of random number generation is not measured. The models built after it draw from the same seeded stream.

    Returns:
        ``(x, target)``.
    """
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    target = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    return x, target


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


def make_infer_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Inference of ``model`` (put in eval mode) on the fixed batch, without gradients.

    Returns:
        A closure that runs the forward pass and returns its output.
    """
    model.eval()

    def step() -> torch.Tensor:
        with torch.no_grad():
            return model(x)
    return step


def make_term_step(term: Callable[[list[list[torch.Tensor]]], torch.Tensor],
                   features: list[list[torch.Tensor]]) -> Callable[[], torch.Tensor]:
    """Forward and backward of a loss term alone on fixed leaf features (one list per member); the network backward
    it feeds is left out. Pair it with :func:`clear_grads` run before each step.

    Returns:
        A closure that runs the term and returns its (detached) value.
    """
    def step() -> torch.Tensor:
        loss = term(features)
        loss.backward()
        return loss.detach()
    return step


def clear_grads(features: list[list[torch.Tensor]]) -> None:
    """Drop the leaves' gradients, so that each timed backward writes them afresh (as in a real step) instead of also
    accumulating into the previous round's."""
    for member in features:
        for f in member:
            f.grad = None


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer reads when the work is done, not when it was queued."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def run_rounds(steps: dict[str, Callable[[], torch.Tensor | None]], rounds: int, warmup: int,
               device: torch.device | str = 'cpu',
               before: dict[str, Callable[[], None]] | None = None) -> dict[str, list[float]]:
    """Warm up every configuration (``warmup`` untimed calls each), then time them interleaved: each of ``rounds``
    rounds calls every configuration once, in order, so that changes in the machine's load hit all of them alike.

    Args:
        steps: The timed closure of each configuration; one that returns a loss has it checked for NaN/inf.
        before: For some configurations, an untimed closure to run before each of its calls.

    Returns:
        Seconds per call of each configuration, one entry per round.
    """
    device = torch.device(device)
    before = before or {}
    last_loss: dict[str, torch.Tensor | None] = {}
    for name, step in steps.items():
        for _ in range(warmup):
            before.get(name, lambda: None)()
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name, step in steps.items():
            before.get(name, lambda: None)()
            synchronize(device)
            t0 = time.perf_counter()
            last_loss[name] = step()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
        print(f'round {r + 1}/{rounds} done', file=sys.stderr, flush=True)
    # a diverged run (NaN/inf) can run at a different speed than a healthy one, so say so rather than hide it
    for name, loss in last_loss.items():
        if loss is not None and not torch.isfinite(loss).all():
            print(f'WARNING: {name}: non-finite loss {loss.item()} in the last round; its time may be'
                  ' unrepresentative.', file=sys.stderr)
    return times


def time_table(times: dict[str, list[float]], names: Iterable[str]) -> None:
    """Print, after a blank line, the step times of ``names``: median, minimum and spread (slowest / fastest round),
    in ms."""
    print('\n| configuration | median (ms) | min (ms) | spread (max / min) |')
    print('|---|---:|---:|---:|')
    for name in names:
        t = times[name]
        print(f'| {name} | {statistics.median(t) * 1e3:.1f} | {min(t) * 1e3:.1f} | {max(t) / min(t):.2f} |')


def ratio_row(label: str, num: list[float], *dens: list[float], scale: float = 1.0) -> str:
    """A ratio table row: the median of per-round ratios, and the ratio of minima.

    Args:
        num: The numerator's time per round.
        dens: The denominator's time per round; several are summed (round by round, and minimum by minimum).
        scale: A factor of the denominator (N for "N x single").
    """
    per_round = statistics.median(a / (scale * sum(d[r] for d in dens)) for r, a in enumerate(num))
    of_minima = min(num) / (scale * sum(min(d) for d in dens))
    return f'| {label} | {per_round:.3f} | {of_minima:.3f} |'


def ratio_table(rows: Iterable[str]) -> None:
    """Print, after a blank line, a table of :func:`ratio_row` rows."""
    print('\n| ratio | median of per-round ratios | ratio of minima |')
    print('|---|---:|---:|')
    for row in rows:
        print(row)
