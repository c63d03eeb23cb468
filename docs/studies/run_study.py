#!/usr/bin/env python3
"""Run train.py for several models and seeds and print a Markdown table of final-epoch accuracy (mean and spread).

    python docs/studies/run_study.py --models resnet18 ens_resnet18x2 fdl_resnet18x2 --seeds 0 1 2 \\
        --out output/study -- --dataset fashion-mnist --train-subset 10000 --epochs 5

Everything after ``--`` goes to every train.py run. Runs that already have a results.json are not run again,
so an interrupted study continues where it stopped. Numbers are those of the final epoch (no selection on the
evaluation set).
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """This script's arguments, and those after ``--`` (for every train.py run)."""
    if '--' in argv:
        i = argv.index('--')
        return argv[:i], argv[i + 1:]
    return argv, []


def main() -> int:
    argv, extra = split_passthrough(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', required=True)
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--out', default='output/study')
    parser.add_argument('--launcher', default='', help="e.g. 'accelerate launch' (default: python)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    launcher = args.launcher.split() or [sys.executable]
    for model in args.models:
        for seed in args.seeds:
            run = out / f'{model}-s{seed}'
            if (run / 'results.json').exists():
                continue
            cmd = launcher + [str(ROOT / 'train.py'), '--model', model, '--seed', str(seed), '--output', str(run),
                              '--no-progress'] + extra
            if (run / 'checkpoint.pt').exists():
                cmd += ['--resume', str(run)]
            print('+', ' '.join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    print(table(out, args.models, args.seeds))
    return 0


def table(out: Path, models, seeds) -> str:
    rows = ['| model | ensemble acc (%) | mean member acc (%) | mean-probs acc (%) | seeds |', '|---|---|---|---|---|']
    for model in models:
        finals = [json.loads((out / f'{model}-s{s}' / 'results.json').read_text())['final_epoch'] for s in seeds]
        cells = [_mean_sd([f['acc'] for f in finals])]
        for key in ('member_acc_mean', 'mean_probs_acc'):
            cells.append(_mean_sd([f[key] for f in finals]) if key in finals[0] else '-')
        rows.append(f"| {model} | {' | '.join(cells)} | {len(finals)} |")
    return '\n'.join(rows)


def _mean_sd(values) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.2f} ± {sd:.2f}'


if __name__ == '__main__':
    sys.exit(main())
