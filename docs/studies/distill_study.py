#!/usr/bin/env python3
"""Distillation study: born-again generations and their ensemble, and MEAL students of ensembles, over seeds.

    python docs/studies/distill_study.py --study output/study/fmnist --seeds 0 1 2 --base resnet18 \\
        -- --dataset fashion-mnist --train-subset 10000 --epochs 5

For each seed s it needs, in ``--study``, the runs of ``run_study.py`` with the same train.py arguments:
``<base>-s<s>`` (the teacher of the born-again chain, and the network trained alone), ``ens_<base>x2-s<s>`` and
``fdl_<base>x2-s<s>`` (the MEAL teachers); missing ones are trained first. Then it trains, with the same arguments:

* ``ban_<base>-s<s>/gen1``, ``gen2``: two born-again generations from ``<base>-s<s>`` (``--generations 2``; seeds
  s + 1000 and s + 2000);
* ``meal_<base>-ens-s<s>`` and ``meal_<base>-fdl-s<s>``: MEAL V1 students of the two ensembles (seed s);

evaluates the BAN ensembles of generations 1-2 and of the teacher with generations 1-2 (averaged probabilities) on
the same evaluation split, and prints a Markdown table of final-epoch accuracy (mean and spread over seeds).
Finished runs are not run again.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from run_study import split_passthrough

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run(cmd: list[str]) -> None:
    print('+', ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train(out: Path, args: list[str], extra: list[str]) -> None:
    if (out / 'results.json').exists():
        return
    resume = ['--resume', str(out)] if (out / 'checkpoint.pt').exists() else []
    run([sys.executable, str(ROOT / 'train.py'), *args, '--output', str(out), '--no-progress', *extra, *resume])


def final_acc(folder: Path) -> float:
    return json.loads((folder / 'results.json').read_text())['final_epoch']['acc']


def bane_acc(folders: list[Path], cache: Path) -> float:
    """Accuracy of the BAN ensemble of ``folders`` on the evaluation split their runs used (cached in a file)."""
    if cache.exists():
        return json.loads(cache.read_text())['acc']
    import timm
    import yaml
    from accelerate import Accelerator
    from timm.data import resolve_data_config

    import timm_ensembles
    from timm_ensembles import data as te_data
    from timm_ensembles._engine import evaluate

    run_args = yaml.safe_load((folders[-1] / 'args.yaml').read_text())
    train_ds, val_ds, _ = te_data.create_datasets(
        run_args['dataset'], root=run_args['data_dir'], train_split=run_args['train_split'],
        val_split=run_args['val_split'], train_subset=16, val_subset=run_args['val_subset'],
        img_mode='L' if run_args['in_chans'] == 1 else 'RGB')
    # the preprocessing the runs evaluated with, saved in their config.json
    data_config = resolve_data_config(model=timm.create_model(f'local-dir:{folders[-1]}', pretrained=True))
    _, loader = te_data.create_loaders(train_ds, val_ds, data_config, batch_size=256, workers=0)
    model = timm_ensembles.create_bane([str(f) for f in folders])
    metrics = evaluate(model, loader, Accelerator(cpu=True))
    cache.write_text(json.dumps(dict(acc=metrics['acc'], member_acc=metrics['member_acc'],
                                     folders=[str(f) for f in folders])))
    return metrics['acc']


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.2f} ± {sd:.2f}'


def main() -> int:
    argv, extra = split_passthrough(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--study', default='output/study/fmnist')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--base', default='resnet18')
    args = parser.parse_args(argv)
    study, base = Path(args.study), args.base
    rows: dict[str, list[float]] = {}
    for s in args.seeds:
        seed = ['--seed', str(s)]
        for model in (base, f'ens_{base}x2', f'fdl_{base}x2'):
            train(study / f'{model}-s{s}', ['--model', model, *seed], extra)
        teacher = study / f'{base}-s{s}'
        ban = study / f'ban_{base}-s{s}'
        if not (ban / 'gen2' / 'results.json').exists():
            run([sys.executable, str(ROOT / 'train.py'), '--model', f'ban_{base}', '--teacher', str(teacher),
                 '--generations', '2', '--output', str(ban), '--no-progress', *seed, *extra])
        for kind in ('ens', 'fdl'):
            train(study / f'meal_{base}-{kind}-s{s}',
                  ['--model', f'meal_{base}', '--teacher', str(study / f'{kind}_{base}x2-s{s}'), *seed], extra)
        results = {
            f'`{base}` alone (the BAN teacher)': final_acc(teacher),
            'BAN-1 (generation 1)': final_acc(ban / 'gen1'),
            'BAN-2 (generation 2)': final_acc(ban / 'gen2'),
            'BANE of generations 1-2': bane_acc([ban / 'gen1', ban / 'gen2'], ban / 'bane-1-2.json'),
            'BANE of the teacher and generations 1-2': bane_acc([teacher, ban / 'gen1', ban / 'gen2'],
                                                                ban / 'bane-0-1-2.json'),
            f'`ens_{base}x2` (MEAL teacher a)': final_acc(study / f'ens_{base}x2-s{s}'),
            f'MEAL student of `ens_{base}x2`': final_acc(study / f'meal_{base}-ens-s{s}'),
            f'`fdl_{base}x2` (MEAL teacher b)': final_acc(study / f'fdl_{base}x2-s{s}'),
            f'MEAL student of `fdl_{base}x2`': final_acc(study / f'meal_{base}-fdl-s{s}'),
        }
        for name, acc in results.items():
            rows.setdefault(name, []).append(acc)
    print(f'\n| model | accuracy (%) | per seed ({", ".join(map(str, args.seeds))}) |\n|---|---|---|')
    for name, values in rows.items():
        print(f"| {name} | {mean_sd(values)} | {' / '.join(f'{v:.2f}' for v in values)} |")
    return 0


if __name__ == '__main__':
    sys.exit(main())
