"""Bad input through train.py and the API: one line that names the flag, value and what is allowed, no traceback,
no output written; resumes that would silently be another run; checkpoint rotation; labels; workers' seeds."""
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_train import QUICK, ROOT, _env, run_train

from timm_ensembles import data as te_data
from timm_ensembles.data.loaders import _seed_worker
from timm_ensembles.train.checkpoint import TEMPORARY_PREFIX


@pytest.mark.parametrize('args, message', [
    (['--clip-grad', '-1'], '--clip-grad -1.0: must be a gradient norm > 0'),
    (['--clip-grad', '0'], '--clip-grad 0.0: must be a gradient norm > 0'),
    (['--img-size', '0'], '--img-size 0: must be a whole number of pixels >= 1'),
    (['--num-classes', '0'], '--num-classes 0: must be a whole number >= 1'),
    (['--hflip', '7'], '--hflip 7.0: must be a probability in [0, 1]'),
    (['--scale', '2', '1'], '--scale 2.0 1.0: must be two area fractions MIN MAX with 0 < MIN <= MAX <= 1'),
    (['--epochs', '0'], '--epochs 0: must be a whole number >= 1'),
    (['--lr', '-1'], '--lr -1.0: must be a number > 0'),
    (['--layer-decay', '0'], '--layer-decay 0.0: must be a factor in (0, 1] (omit it for none)'),
    (['--log-interval', '0'], '--log-interval 0: must be a whole number of updates >= 1'),
    (['--model-ema', '--model-ema-decay', '1'], '--model-ema-decay 1.0: must be a number in [0, 1)'),
    (['--mixup', '0.2', '--batch-size', '33'], '--batch-size 33: mixup and cutmix pair every image with another'),
    (['--cutmix-minmax', '0', '2'], '--cutmix-minmax 0.0 2.0: must be two box size ratios MIN MAX'),
    (['--amp', '--mixed-precision', 'no'], '--amp --amp-dtype float16 and --mixed-precision no disagree'),
    (['--model', 'test_resnet', '--eval-metric', 'mean_probs_acc'],
     '--eval-metric mean_probs_acc: test_resnet has no members to average'),
    (['--batch-size', '0'], '--batch-size 0: must be a whole number >= 1'),
    (['--grad-accum-steps', '0'], '--grad-accum-steps 0: must be a whole number >= 1'),
    (['--smoothing', '2'], '--smoothing 2.0: must be a number in [0, 1)'),
    (['--in-chans', '2'], '--in-chans 2: must be 1 (gray) or 3 (colour)'),
    (['--task-kwargs', 'fdl_lr'], "--task-kwargs 'fdl_lr': options are key=value pairs"),
    (['--task-kwargs', 'fdl_lr=abc'], "fdl_lr must be a number, got 'abc'"),
    (['--num-classes', '5'], 'training split has labels outside 0..4'),
    (['--no-aug', '--aa', 'rand-m9-mstd0.5-inc1'], '--no-aug trains without augmentation, and --aa asks for some'),
    (['--no-aug', '--reprob', '0.25', '--color-jitter', '0.4'],
     '--no-aug trains without augmentation, and --color-jitter and --reprob ask for some'),
    (['--aa', 'rand-x9'], '--aa rand-x9: not a policy timm knows (Unknown RandAugment config section)'),
    (['--aa', 'v7'], '--aa v7: not a policy timm knows'),
    (['--reprob', '1.5'], '--reprob 1.5: must be a probability in [0, 1]'),
    (['--recount', '0'], '--recount 0: must be a whole number of boxes >= 1'),
    (['--color-jitter', '-0.4'], '--color-jitter -0.4: must be a factor >= 0'),
    (['--checkpoint-hist', '-1'], '--checkpoint-hist -1: must be a whole number of epochs >= 0'),
])
def test_bad_flags_are_one_line_before_anything_is_written(args, message, tmp_path):
    out = tmp_path / 'run'
    proc = run_train('--model', 'fdl_test_resnetx2', '--epochs', '1', *QUICK, *args, '--output', out, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-1500:]
    assert 'Traceback' not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize('tracker, package', [('wandb', 'wandb'), ('comet_ml', 'comet-ml'), ('aim', 'aim')])
def test_a_tracker_that_is_not_installed_is_named_with_its_package(tracker, package, tmp_path):
    from timm_ensembles.train import cli, trainer
    if cli._TRACKER_PACKAGES[tracker][0]():
        pytest.skip(f'{tracker} is installed here')
    out = tmp_path / 'run'
    with pytest.raises(SystemExit, match=rf"--log-with {tracker}: the package '{package}' is not installed here;"
                                         rf" pip install {package}"):
        trainer.main(['--model', 'test_resnet', '--log-with', 'tensorboard', tracker, '--output', str(out)])
    assert not out.exists()


def test_mixup_is_refused_for_a_task_that_cannot_take_soft_targets(tmp_path, monkeypatch):
    from timm_ensembles import CrossEntropyTask
    from timm_ensembles.train import trainer
    monkeypatch.setattr(CrossEntropyTask, 'accepts_soft_targets', False)
    out = tmp_path / 'run'
    with pytest.raises(SystemExit, match='--mixup/--cutmix give mixed .soft. targets, which CrossEntropyTask of'
                                         ' test_resnet cannot learn from'):
        trainer.main(['--model', 'test_resnet', '--mixup', '0.2', '--output', str(out), *map(str, QUICK)])
    assert not out.exists()


def test_a_config_that_is_not_yaml_or_not_a_mapping(tmp_path):
    for text, message in (('epochs: [1,\n', 'is not valid YAML'), ('- 1\n- 2\n', 'must hold a mapping'),
                          ('scale: 0.5\n', '--scale 0.5: must be two area fractions')):
        cfg = tmp_path / 'cfg.yaml'
        cfg.write_text(text)
        proc = run_train('--config', cfg, *QUICK, '--output', tmp_path / 'run', check=False)
        assert proc.returncode != 0 and message in proc.stderr and 'Traceback' not in proc.stderr


@pytest.fixture(scope='module')
def resumed_run(tmp_path_factory):
    """A run of two epochs that was resumed once (so its args.yaml was written by a resumed run)."""
    out = tmp_path_factory.mktemp('resumed') / 'run'
    run_train('--model', 'fdl_test_resnetx2', '--epochs', '2', '--output', out, *QUICK,
              '--task-kwargs', 'feature_indices=(1,2)')
    (out / 'results.json').unlink()
    run_train('--resume', out)  # a tuple task option resumes: it is compared as YAML reads it back
    return out


def test_args_yaml_never_carries_resume_output_or_config(resumed_run, tmp_path):
    recorded = yaml.safe_load((resumed_run / 'args.yaml').read_text())
    assert not {'resume', 'output', 'config'} & set(recorded)
    assert recorded['task_kwargs'] == {'feature_indices': [1, 2]}
    # the reproduction recipe the model card prints: a new run, not a resumption of the old one
    new = tmp_path / 'again'
    proc = run_train('--config', resumed_run / 'args.yaml', '--output', new)
    assert 'resumed from' not in proc.stderr + proc.stdout
    assert json.loads((new / 'results.json').read_text())['epochs'] == 2


@pytest.mark.parametrize('flags, changed', [
    (['--lr', '0.5'], 'lr: 0.05 there, 0.5 here'),
    (['--batch-size', '16'], 'batch_size: 32 there, 16 here'),
    (['--seed', '7'], 'seed: 0 there, 7 here'),
    (['--train-subset', '64'], 'train_subset: 160 there, 64 here'),
])
def test_resume_with_a_changed_flag_is_refused(resumed_run, flags, changed):
    proc = run_train('--resume', resumed_run, *flags, check=False)
    assert proc.returncode != 0 and changed in proc.stderr and 'Traceback' not in proc.stderr


def test_rotation_never_replaces_a_readable_backup_with_a_corrupt_checkpoint(resumed_run, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(resumed_run, run)
    (run / 'results.json').unlink()
    (run / 'checkpoint.pt').write_bytes((run / 'checkpoint.pt').read_bytes()[:1000])  # corrupt
    (run / f'{TEMPORARY_PREFIX}checkpoint.pt.1234').write_bytes(b'half a save')  # what a killed save leaves
    (run / '.notes.tmp').write_text('a file of the user')  # never swept: not a name the trainer makes
    prev = run / 'checkpoint-prev.pt'
    state = torch.load(prev, weights_only=True)
    assert state['epoch'] == 1
    # resume from the backup, with one more epoch to train (the epoch count is part of the run: change it in place)
    proc = run_train('--resume', prev, check=False)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert torch.load(run / 'checkpoint.pt', weights_only=True)['epoch'] == 2
    # the corrupt file did not become the backup
    assert torch.load(prev, weights_only=True)['epoch'] == 1
    assert not list(run.glob(f'{TEMPORARY_PREFIX}*')) and (run / '.notes.tmp').read_text() == 'a file of the user'


def test_sparse_idx_labels_and_a_folder_named_fashion(tmp_path):
    rng = np.random.default_rng(0)
    for name in ('sparse', 'my-fashion-copy'):
        folder = tmp_path / name
        folder.mkdir()
        for stem, n in (('train', 40), ('t10k', 10)):
            images = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
            labels = (np.arange(n) % 10).astype(np.uint8)
            if name == 'sparse' and stem == 'train':
                labels[3] = 200  # one corrupt byte
            header = (0x803).to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in images.shape)
            (folder / f'{stem}-images-idx3-ubyte').write_bytes(header + images.tobytes())
            (folder / f'{stem}-labels-idx1-ubyte').write_bytes((0x801).to_bytes(4, 'big') + n.to_bytes(4, 'big')
                                                               + labels.tobytes())
    with pytest.raises(ValueError, match=r'not the classes 0\.\.K-1 \(the highest is 200.*200 \(1 images\)'):
        te_data.create_datasets(f"idx:{tmp_path / 'sparse'}")
    _, _, info = te_data.create_datasets(f"idx:{tmp_path / 'my-fashion-copy'}")
    assert info.class_names == [str(i) for i in range(10)] and info.default_hflip == 0.0


def test_a_teacher_of_other_classes_with_the_same_count(tmp_path):
    import timm

    from timm_ensembles.files.model_folder import export_folder
    teacher = export_folder(timm.create_model('test_resnet', num_classes=10), tmp_path / 'teacher',
                            model_config=dict(label_names=[f'shoe{i}' for i in range(10)]))
    proc = run_train('--model', 'ban_test_resnet', '--teacher', teacher, '--epochs', '1', *QUICK,
                     '--output', tmp_path / 'student', check=False)
    assert proc.returncode != 0 and "was trained on other classes: its class 0 is 'shoe0'" in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_a_failed_save_on_the_main_process_stops_both_processes_at_once(tmp_path):
    accelerate = shutil.which('accelerate', path=str(Path(sys.executable).parent))
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'summary.csv').mkdir()  # the main process's first save cannot replace a folder
    cmd = [accelerate, 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1', '--mixed_precision',
           'no', '--dynamo_backend', 'no', str(ROOT / 'train.py'), '--model', 'ens_test_resnetx2', '--epochs', '2',
           '--cpu', '--output', str(out), *map(str, QUICK)]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    assert 'saving epoch 0' in proc.stderr and 'failed' in proc.stderr
    assert 'the main process failed saving epoch 0' in proc.stderr  # the other process says why it stops
    assert time.time() - start < 200  # not the collective timeout (30 minutes)


def test_loader_workers_draw_per_rank():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(()), 0

    def draws(rank):
        import functools
        loader = torch.utils.data.DataLoader(Noise(), batch_size=4, num_workers=1,
                                             worker_init_fn=functools.partial(_seed_worker, rank),
                                             generator=torch.Generator().manual_seed(0))
        return next(iter(loader))[0]
    assert torch.equal(draws(0), draws(0)) and not torch.equal(draws(0), draws(1))


def test_fp16_overflow_steps_are_skipped_and_only_a_run_of_them_stops(monkeypatch):
    from timm_ensembles.train import engine as _engine

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return torch.full_like(g, float('inf')) if Task.overflow else g

    class Task(torch.nn.Module):
        overflow = True

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, y):
            return dict(loss=InfGrad.apply(self.w) * x.mean(), output=None, components={})

    class Accelerator:
        num_processes, sync_gradients, is_local_main_process = 1, True, False
        scaler = object()  # fp16: a GradScaler skips the overflow steps

        def accumulate(self, _):
            import contextlib
            return contextlib.nullcontext()

        def backward(self, loss):
            loss.backward()

        def clip_grad_norm_(self, params, _):
            return torch.stack([p.grad.norm() for p in params]).norm()

    class SkippingOptimizer:  # as the scaler's step: nothing applied on an overflow step
        def step(self):
            pass

        def zero_grad(self, set_to_none=True):
            task.w.grad = None

    task = Task()
    optimizer = SkippingOptimizer()
    batches = [(torch.ones(2), torch.zeros(2))] * 5
    _engine.train_one_epoch(task, batches, optimizer, Accelerator(), 0, show_progress=False)  # 5 overflows: fine
    monkeypatch.setattr(_engine, 'MAX_FP16_OVERFLOWS', 3)
    with pytest.raises(_engine.NonFiniteLossError, match='Non-finite gradient'):
        _engine.train_one_epoch(task, batches, optimizer, Accelerator(), 0, show_progress=False)
    Accelerator.scaler = None  # fp32: the first non-finite gradient stops
    with pytest.raises(_engine.NonFiniteLossError, match='update 0'):
        _engine.train_one_epoch(task, batches[:1], optimizer, Accelerator(), 0, show_progress=False)


# --- timm's train.py habits: a bad --data-dir, timm's spellings, misspelt flags, schedulers and optimizers


def _refusal(argv, tmp_path, capsys) -> str:
    """The one line train.py answers ``argv`` with (in this process), after checking that nothing was written."""
    from timm_ensembles.train import trainer
    out = tmp_path / 'run'
    with pytest.raises(SystemExit) as e:
        trainer.main([*argv, '--output', str(out)])
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    assert message.strip() and '\n' not in message.strip(), message
    assert not out.exists()
    return message.strip()


def _folder(root: Path, layout: dict) -> Path:
    from PIL import Image
    for split, classes in layout.items():
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(root / split / cls / '0.png')
    return root


@pytest.mark.parametrize('make, message', [
    (lambda root: root, r'error: --data-dir \S+/data does not exist\.$'),
    (lambda root: root.mkdir() or root, r'error: --data-dir \S+/data is empty: an image folder holds'),
    (lambda root: _folder(root, {'train': ('cat',), 'validation': ('cat',)}),
     r"error: --data-dir \S+: \S+/train holds one class only \('cat'\): a classifier needs two or more"),
    (lambda root: (root / 'train' / 'cat').mkdir(parents=True) or (root / 'train' / 'cat' / 'a.txt').write_text('x')
     and root, r'error: --data-dir \S+/data holds no images \(timm reads .png, .jpg, .jpeg\) and no MNIST-format'),
    (lambda root: _folder(root, {'train': ('cat', 'dog'), 'valid': ('cat', 'dog')}) and (root / 'test').mkdir()
     or root, None),  # timm's synonym valid for validation: no error (checked below)
])
def test_a_bad_data_dir_is_one_line_before_any_output(make, message, tmp_path, capsys):
    root = make(tmp_path / 'data')
    argv = ['--model', 'test_resnet', '--data-dir', str(root), '--epochs', '1', '--workers', '0', '--no-progress']
    if message is None:
        from timm_ensembles.train import trainer
        args = trainer.parse_args(argv)
        trainer.check_args(args)
        assert trainer._create_datasets(args)[3].split_paths[1] == str(root / 'valid')
        return
    assert re.match(message, _refusal(argv, tmp_path, capsys))


@pytest.mark.parametrize('argv, message', [
    (['--torchcompile'], "error: --torchcompile is how timm's train.py spells it; here: --compile"),
    (['--log-wandb'], "error: --log-wandb is how timm's train.py spells it; here: --log-with wandb"),
    (['--train-num-samples', '100'], 'here: --train-subset N (a fixed, stratified subset of the training split)'),
    (['--epochz', '3'], 'error: unrecognized argument --epochz; did you mean --epochs?'),
    (['--val-splt', 'val'], 'unrecognized argument --val-splt; did you mean --val-split?'),
    (['--sched', 'cosin'], "error: --sched cosin: not a scheduler timm knows; did you mean cosine? timm's are cosine,"
                           ' tanh, step, multistep, plateau, poly, wsd, rsqrt, constant, none.'),
    (['--sched', 'wsd', '--decay-epochs', '9'], 'error: --sched wsd: wsd schedule requires 0 < decay_epochs <='),
    (['--opt', 'adamx'], 'error: --opt adamx: not an optimizer timm knows; did you mean adamax'),
    (['--opt', 'lookahead_adamx'], 'error: --opt lookahead_adamx: not an optimizer timm knows'),
    (['--opt', 'my_adamw'], 'error: --opt my_adamw: timm reads <name> or lookahead_<name>'),
    (['--dataset', 'digits', '--data-dir', '/tmp'], 'error: --dataset digits is the embedded dataset and reads no'
                                                     ' folder, but --data-dir /tmp names one'),
    (['--input-size', '3', '32', '32', '--img-size', '64'], 'error: --input-size 3 32 32 and --img-size 64 disagree'),
    (['--input-size', '2', '32', '32'], 'error: --input-size 2 32 32: must be C H W: 1 (gray) or 3 (colour)'),
    (['--std', '0.5', '0'], 'error: --std 0.5 0.0: must be one value > 0, or one per channel.'),
    (['--in-chans', '1', '--mean', '0.1', '0.2', '0.3'], 'error: --mean 0.1 0.2 0.3: 3 values for 1 input channels'),
    (['--drop', '0.1', '--model-kwargs', 'drop_rate=0.2'], 'error: --drop 0.1 and --model-kwargs drop_rate=0.2'),
    (['--drop-path', '1.5'], 'error: --drop-path 1.5: must be a rate in [0, 1).'),
    (['--experiment', '../up'], 'error: --experiment ../up: a folder name, not a path'),
    (['--initial-checkpoint', '/no/such.pth'], 'error: --initial-checkpoint /no/such.pth: no such file or folder.'),
    (['--clip-mode', 'agx'], "argument --clip-mode: invalid choice: 'agx' (choose from 'norm', 'value', 'agc')"),
])
def test_timm_flags_and_misspellings_are_one_line(argv, message, tmp_path, capsys):
    assert message in _refusal(['--model', 'test_resnet', *argv], tmp_path, capsys)


def test_a_refused_flag_is_the_whole_output_not_the_usage(tmp_path):
    for argv in (['--torchcompile'], ['--data-dir', str(tmp_path / 'none')]):
        proc = run_train(*argv, '--output', tmp_path / 'run', check=False)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / 'run').exists()


def test_a_config_never_imports_a_module_only_the_command_line_does(tmp_path):
    from timm_ensembles.train import parse_args

    # a module that leaves a line in a file each time it is imported
    (tmp_path / 'te_marker_module.py').write_text(
        "import os\nwith open(os.environ['TE_MARKER'], 'a') as f:\n    f.write('imported\\n')\n")
    marker, config, out = tmp_path / 'marker', tmp_path / 'args.yaml', tmp_path / 'run'
    # as a downloaded args.yaml of a run started with --import records it
    config.write_text(yaml.safe_dump(dict(model='test_resnet', epochs=1, imports=['te_marker_module'])))

    def train(*args):  # from tmp_path, where the module lies (train.py looks for --import modules there)
        return subprocess.run([sys.executable, str(ROOT / 'train.py'), *map(str, args)], capture_output=True,
                              text=True, env=dict(_env(), TE_MARKER=str(marker)), cwd=tmp_path, timeout=600)

    refused = (', which only the command line can give (a config file never imports a module or trusts other repos):'
               ' if you trust them, give them there: ')
    proc = train('--config', config, *QUICK, '--output', out)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f'error: {config} asks for --import te_marker_module{refused}--config {config} --import te_marker_module']
    assert not marker.exists() and not out.exists()
    # named on the command line, the module runs, once, and the run records it
    train('--config', config, '--import', 'te_marker_module', *QUICK, '--output', out).check_returncode()
    assert marker.read_text() == 'imported\n'
    assert yaml.safe_load((out / 'args.yaml').read_text())['imports'] == ['te_marker_module']
    # --resume reads the run's own args.yaml: its modules are named again on the command line, nothing is touched
    files = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    proc = train('--resume', out)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f'error: the run in {out} was started with --import te_marker_module{refused}--resume {out} --import'
        f' te_marker_module']
    assert marker.read_text() == 'imported\n'
    assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == files
    assert parse_args(['--resume', str(out), '--import', 'te_marker_module']).imports == ['te_marker_module']
    # the opt-in to other repos, likewise: from the command line only
    config.write_text(yaml.safe_dump(dict(model='test_resnet', trust_member_repos=True)))
    with pytest.raises(SystemExit, match=f'asks for --trust-member-repos{re.escape(refused)}--config'):
        parse_args(['--config', str(config)])
    assert parse_args(['--config', str(config), '--trust-member-repos']).trust_member_repos
    config.write_text(yaml.safe_dump(dict(model='test_resnet', model_kwargs=dict(trust_member_repos=True))))
    with pytest.raises(SystemExit, match='asks for --trust-member-repos'):
        parse_args(['--config', str(config)])


# --- a run folder is owned: one trainer at a time, a run's files never written over, only our temporaries swept


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the lock of a run holding it aside), by its path relative to it: what 'nothing
    changed' is compared on, bitwise."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*'))
            if p.is_file() and p.name != '.timm-ensembles.lock'}


def _one_line(proc) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith('error: ') and 'Traceback' not in proc.stderr, proc.stderr
    return lines[-1]


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """A finished one-epoch run of a plain timm model (copied by the tests that change it)."""
    out = tmp_path_factory.mktemp('owned') / 'run'
    run_train('--model', 'test_resnet', '--epochs', '1', '--output', out, *QUICK)
    return out


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


@pytest.mark.parametrize('resume', [False, True])
def test_a_second_trainer_or_resume_on_a_folder_in_use_is_refused_and_the_first_finishes_intact(
        finished, tmp_path, resume):
    import signal
    if resume:  # two --resume of one run (a requeued cluster job): both would extend it to two epochs
        out = _copy(finished, tmp_path / 'run')
        args = ['--resume', out, '--epochs', '2']
    else:
        out = tmp_path / 'run'
        args = ['--model', 'test_resnet', '--epochs', '2', '--output', out, *QUICK]
    lock = out / '.timm-ensembles.lock'
    first = subprocess.Popen([sys.executable, str(ROOT / 'train.py'), *map(str, args)], env=_env(), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (lock.is_file() and lock.read_text()) and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        first.send_signal(signal.SIGSTOP)  # holds its lock, whatever the second one takes to start
        holder = json.loads(lock.read_text())
        before = _files(out)
        second = run_train(*args, check=False)
        line = _one_line(second)
        assert f"'{out}' is in use by another run (host {holder['host']}, pid {first.pid}, since" in line, line
        assert 'Wait for that run to finish (or stop it), or choose another --output.' in line
        assert _files(out) == before  # the second wrote nothing
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert [json.loads(ln)['epoch'] for ln in (out / 'metrics.jsonl').read_text().splitlines()] == [0, 1]
    assert json.loads((out / 'results.json').read_text())['epochs'] == 2
    assert not lock.exists()  # released at the end


def test_a_stale_lock_is_taken_over_with_a_line_and_a_held_one_names_its_holder(tmp_path):
    from timm_ensembles.files.run_folder import RunBusyError, RunLock
    folder = tmp_path / 'run'
    folder.mkdir()
    # a lock file whose holder was killed: the kernel dropped its flock, the record stays
    (folder / '.timm-ensembles.lock').write_text(json.dumps(dict(host='node7', pid=123, since='2024-01-01 00:00')))
    lines = []
    with RunLock(folder).acquire(lines.append) as held:
        assert lines == [f'{folder}: the lock left by host node7, pid 123, since 2024-01-01 00:00 is stale (that run'
                         f' is gone: killed or crashed); taken over']
        record = json.loads(held.path.read_text())
        with pytest.raises(RunBusyError, match=rf"^'{folder}' is in use by another run \(host {record['host']}, pid"
                                               rf" {record['pid']}, since "):
            RunLock(folder).acquire()  # another open file description: flock refuses it, as another process
    assert not (folder / '.timm-ensembles.lock').exists() and folder.is_dir()
    # a folder made for the lock alone goes with it
    with RunLock(tmp_path / 'new' / 'run').acquire():
        pass
    assert not (tmp_path / 'new').exists()


def test_a_folder_holding_a_run_is_never_written_by_a_new_run(finished, tmp_path):
    out = _copy(finished, tmp_path / 'run')
    for name in ('checkpoint.pt', 'checkpoint-prev.pt'):  # deleted to save space: the run is still there
        (out / name).unlink(missing_ok=True)
    before = _files(out)
    line = _one_line(run_train('--model', 'test_resnet', '--epochs', '1', '--output', out, *QUICK, check=False))
    assert line == (f"error: '{out}' already holds a run (config.json, model.safetensors, metrics.jsonl,"
                    f' results.json), which a new run would write over: it is finished (--resume {out} with a larger'
                    f' --epochs extends it); choose another --output, or pass --overwrite to move its files aside into'
                    f' {out}/overwritten-<time>.')
    assert _files(out) == before
    # --resume A --output B, with a run in B
    line = _one_line(run_train('--resume', finished, '--output', out, check=False))
    assert line.startswith(f"error: --resume {finished} --output {out}: '{out}' already holds another run (config.json,"
                           f' model.safetensors, metrics.jsonl, results.json), which this one would write over')
    assert _files(out) == before


def test_overwrite_moves_the_earlier_run_aside_and_leaves_other_files(finished, tmp_path):
    out = _copy(finished, tmp_path / 'run')
    (out / 'notes.txt').write_text('mine')
    before = _files(out)
    proc = run_train('--model', 'test_resnet', '--epochs', '1', '--output', out, '--overwrite', '--seed', '1', *QUICK)
    aside = [p for p in out.iterdir() if p.name.startswith('overwritten-')]
    assert len(aside) == 1 and f'moved aside into {aside[0]}' in proc.stderr
    moved = _files(aside[0])
    assert moved == {k: v for k, v in before.items() if k != 'notes.txt'}  # every file of the run, bitwise
    assert (out / 'notes.txt').read_text() == 'mine'
    assert yaml.safe_load((out / 'args.yaml').read_text())['seed'] == 1  # the new run
    assert 'overwrite' not in yaml.safe_load((out / 'args.yaml').read_text())  # its recipe never moves a run aside


def test_cleanup_removes_only_what_the_trainer_left(finished, tmp_path):
    out = _copy(finished, tmp_path / 'run')
    (out / 'results.json').unlink()  # killed before its results: the resume exports again, without training
    # what kills leave: a half-written save, a hidden export folder holding a whole model (in the run and in best/)
    (out / f'{TEMPORARY_PREFIX}checkpoint.pt.x1').write_bytes(b'half')
    shutil.copytree(out / 'best', out / f'{TEMPORARY_PREFIX}export.x2')
    shutil.copytree(out / 'best', out / 'best' / f'{TEMPORARY_PREFIX}export.x3')
    mine = {'.draft.tmp': b'a', '.old.new': b'b', '.export-mine/x': b'c', 'best/.notes.tmp': b'd'}
    for name, data in mine.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    proc = run_train('--resume', out)
    assert 'removed what a killed save or export left' in proc.stderr
    assert not [p for p in out.rglob(f'{TEMPORARY_PREFIX}*')]
    assert all((out / name).read_bytes() == data for name, data in mine.items())


def test_resume_with_a_teacher_retrained_in_place_is_refused(tmp_path):
    import timm

    from timm_ensembles.files.model_folder import export_folder
    teacher = tmp_path / 'teacher'
    labels = dict(label_names=[str(i) for i in range(10)])
    export_folder(timm.create_model('test_resnet', num_classes=10), teacher, model_config=labels)
    student = tmp_path / 'student'
    run_train('--model', 'ban_test_resnet', '--teacher', teacher, '--epochs', '1', '--output', student, *QUICK)
    (student / 'results.json').unlink()  # stopped before its end: a resume would continue with the teacher
    torch.manual_seed(1)
    export_folder(timm.create_model('test_resnet', num_classes=10), teacher, model_config=labels)  # retrained
    before = _files(student)
    line = _one_line(run_train('--resume', student, check=False))
    assert re.fullmatch(rf"error: --resume {student}: teacher '{teacher}' changed \(test_resnet, sha256 [0-9a-f]{{12}}"
                        rf' then, test_resnet, sha256 [0-9a-f]{{12}} now\): retrained or replaced in place since the'
                        rf' run started\. Resume with the teacher it started from, or start a new run in another'
                        rf' --output\.', line), line
    assert _files(student) == before


def test_generations_run_again_with_other_flags_are_refused_and_overwrite_trains_them_anew(tmp_path):
    import timm

    from timm_ensembles.files.model_folder import export_folder
    teacher = export_folder(timm.create_model('test_resnet', num_classes=10), tmp_path / 'teacher',
                            model_config=dict(label_names=[str(i) for i in range(10)]))
    out = tmp_path / 'ban'
    args = ['--model', 'ban_test_resnet', '--teacher', teacher, '--generations', '2', '--output', out, *QUICK]
    run_train(*args, '--epochs', '1')
    before = _files(out)
    again = run_train(*args, '--epochs', '1')  # the same command: both generations kept as they are
    assert 'generation 1: done' in again.stderr and 'generation 2: done' in again.stderr
    assert _files(out) == before
    line = _one_line(run_train(*args, '--epochs', '2', '--lr', '0.01', check=False))
    assert line == (f"error: generation 1 in '{out}/gen1' was made by another command (epochs: 1 there, 2 here; lr:"
                    f' 0.05 there, 0.01 here): run the command it was made with to continue it, choose another'
                    f' --output, or pass --overwrite to move its files aside and train it anew.')
    assert _files(out) == before
    run_train(*args, '--epochs', '2', '--lr', '0.01', '--overwrite')
    for k in (1, 2):
        gen = out / f'gen{k}'
        assert yaml.safe_load((gen / 'args.yaml').read_text())['epochs'] == 2
        aside = [p for p in gen.iterdir() if p.name.startswith('overwritten-')]
        assert len(aside) == 1
        assert _files(aside[0]) == {n.split('/', 1)[1]: b for n, b in before.items() if n.startswith(f'gen{k}/')}


# --- one line, nothing lost: output paths, full disks, data and models that cannot train


def test_an_output_that_is_a_file_or_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    from timm_ensembles.analysis import main as analyze
    from timm_ensembles.files import run_folder as _run
    from timm_ensembles.train import trainer
    file = tmp_path / 'file'
    file.write_text('x')
    for argv, message in (
            ([], f"error: --output {file}: '{file}' is a file, not a folder; give a folder that can be written."),
            (['--experiment', 'e'], f"error: --output {file}/e: '{file}' above it is a file, not a folder;")):
        with pytest.raises(SystemExit) as e:
            trainer.main(['--model', 'test_resnet', '--output', str(file), *argv])
        assert e.value.code.startswith(message) and '\n' not in e.value.code
    with pytest.raises(SystemExit, match=rf"^error: --out {file}: '{file}' is a file, not a folder; give a folder"):
        analyze([str(tmp_path / 'any-run'), '--out', str(file)])
    assert file.read_text() == 'x'
    # a read-only disk (access() says so; root writes anywhere else, so the test asks the same way)
    monkeypatch.setattr(_run.os, 'access', lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(SystemExit, match=rf"^error: --output {tmp_path}/run: '{tmp_path}' cannot be written \(a"
                                         r' read-only disk, or no permission\); give a folder that can be written\.$'):
        trainer.main(['--model', 'test_resnet', '--output', str(tmp_path / 'run')])
    assert not (tmp_path / 'run').exists()


def test_a_full_disk_at_a_checkpoint_says_so_and_what_is_kept(tmp_path, monkeypatch):
    import errno

    from timm_ensembles.train import checkpoint as _checkpoint
    from timm_ensembles.train import loop, trainer
    out = tmp_path / 'run'
    saves, before = [], {}
    real_save, real_save_epoch = _checkpoint.torch.save, loop._save_epoch

    def save_epoch(run, record, *args, **kwargs):
        if record['epoch'] == 1:
            before.update(_files(out))
        return real_save_epoch(run, record, *args, **kwargs)

    def full_disk(obj, f):
        saves.append(obj['epoch'])
        if len(saves) == 2:
            f.write(b'part of a checkpoint')
            raise OSError(errno.ENOSPC, 'No space left on device')
        real_save(obj, f)

    monkeypatch.setattr(loop, '_save_epoch', save_epoch)
    monkeypatch.setattr(_checkpoint.torch, 'save', full_disk)
    with pytest.raises(SystemExit) as e:
        trainer.main(['--model', 'test_resnet', '--epochs', '2', '--output', str(out), *map(str, QUICK)])
    assert e.value.code == (f'error: saving epoch 1 to {out} failed: the disk is full (No space left on device).'
                            f" Kept: the checkpoint after epoch 0 ('{out}/checkpoint.pt'); --resume {out} continues"
                            f' from it (once the cause is fixed).')
    after = _files(out)
    # the checkpoint, its metrics (the epoch's line taken back) and args as they were; no temporary left
    for name in ('checkpoint.pt', 'metrics.jsonl', 'args.yaml'):
        assert after[name] == before[name], name
    assert not [n for n in after if TEMPORARY_PREFIX in n] and 'model.safetensors' not in after


def test_a_failed_save_claims_only_a_checkpoint_that_exists(tmp_path):
    from timm_ensembles.train.outputs import _kept
    nothing = 'No epoch had been saved: nothing of this run is kept to resume from.'
    assert _kept(None) == nothing and _kept((tmp_path / 'checkpoint.pt', 3)) == nothing  # gone: not claimed
    (tmp_path / 'checkpoint.pt').write_bytes(b'x')
    assert _kept((tmp_path / 'checkpoint.pt', 3)).startswith("Kept: the checkpoint after epoch 2 ('")


def test_a_full_disk_at_the_final_export_says_so_and_the_resume_exports(tmp_path, monkeypatch):
    import errno

    import timm.models

    from timm_ensembles.train import trainer
    out = tmp_path / 'run'
    before = {}
    real = timm.models.save_for_hf

    def full_disk(model, folder, **kwargs):
        if Path(folder).parent == out:  # the final export (best/ is a folder below)
            before.update(_files(out))
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real(model, folder, **kwargs)

    monkeypatch.setattr(timm.models, 'save_for_hf', full_disk)
    argv = ['--model', 'test_resnet', '--epochs', '1', '--output', str(out), *map(str, QUICK)]
    with pytest.raises(SystemExit) as e:
        trainer.main(argv)
    assert e.value.code == (f'error: exporting the final model to {out} failed: the disk is full (No space left on'
                            f" device). Kept: the checkpoint after epoch 0 ('{out}/checkpoint.pt'); --resume {out}"
                            f' exports the model without training again (once the cause is fixed).')
    assert _files(out) == before and 'model.safetensors' not in before
    monkeypatch.undo()
    assert trainer.main(['--resume', str(out)]) == 0  # as the line says
    assert (out / 'model.safetensors').is_file() and (out / 'checkpoint.pt').read_bytes() == before['checkpoint.pt']


def _idx(folder: Path, train_shape: tuple[int, int, int]) -> Path:
    folder.mkdir()
    for stem, shape in (('train', train_shape), ('t10k', (10, 8, 8))):
        images = np.zeros(shape, dtype=np.uint8)
        labels = (np.arange(shape[0]) % 2).astype(np.uint8)
        header = (0x803).to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in shape)
        (folder / f'{stem}-images-idx3-ubyte').write_bytes(header + images.tobytes())
        (folder / f'{stem}-labels-idx1-ubyte').write_bytes((0x801).to_bytes(4, 'big') + shape[0].to_bytes(4, 'big')
                                                           + labels.tobytes())
    return folder


@pytest.mark.parametrize('argv, message', [
    (['--batch-size', '1'], "error: --batch-size 1: test_resnet's BatchNorm layer layer4.0.bn1 would see one value"
                            ' per channel (input (1, 96, 1, 1)) in training, which it cannot normalise; use'
                            ' --batch-size 2 or more.'),
    (['--model-kwargs', 'num_classes=5'], 'error: --model-kwargs num_classes=5: the model has 5 outputs, but the data'
                                          ' has 10 classes (digits): leave num_classes out of --model-kwargs'),
    (['--num-classes', '20'], 'error: --num-classes 20: digits has 10 classes (labels 0..9); a head of 20 would learn'
                              ' 10 classes that no image has, and export 20 classes with 10 label names. Leave'
                              " --num-classes out (the dataset's count) or give 10."),
])
def test_models_that_cannot_train_on_the_data_are_one_line(argv, message, tmp_path, capsys):
    assert _refusal(['--model', 'test_resnet', '--epochs', '1', *map(str, QUICK), *argv], tmp_path,
                    capsys).startswith(message)


def test_batch_size_one_is_refused_only_where_a_batchnorm_cannot_normalise():
    import timm

    from timm_ensembles import create_task
    from timm_ensembles.train import trainer
    args = trainer.parse_args(['--model', 'test_vit', '--batch-size', '1'])
    vit = create_task(timm.create_model('test_vit', img_size=32, num_classes=10))
    trainer._check_batch_of_one(args, vit, dict(input_size=(3, 32, 32)), range(100))  # LayerNorm: trains
    resnet = create_task(timm.create_model('test_resnet', num_classes=10))
    trainer._check_batch_of_one(args, resnet, dict(input_size=(3, 160, 160)), range(100))  # 5x5 maps: trains
    counts = [m.num_batches_tracked.item() for m in resnet.modules() if hasattr(m, 'num_batches_tracked')]
    assert resnet.training and counts and not any(counts)  # the probe changed no statistic
    with pytest.raises(SystemExit, match='layer4.0.bn1 would see one value per channel'):
        trainer._check_batch_of_one(args, resnet, dict(input_size=(3, 32, 32)), range(100))


@pytest.mark.parametrize('shape, message', [
    ((0, 8, 8), r'holds no images \(its header says shape \(0, 8, 8\)\)'),
    ((10, 0, 0), r'holds images of 0x0 pixels \(its header says shape \(10, 0, 0\)\)'),
])
def test_an_idx_folder_without_images_or_pixels_is_one_line(shape, message, tmp_path, capsys):
    folder = _idx(tmp_path / 'idx', shape)
    line = _refusal(['--model', 'test_resnet', '--dataset', f'idx:{folder}', '--epochs', '1', '--workers', '0'],
                    tmp_path, capsys)
    assert re.match(rf'error: IDX file {folder}/train-images-idx3-ubyte {message}: an IDX dataset needs at least one'
                    r' image', line), line


def test_every_file_of_a_run_follows_the_umask(finished):
    import os
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(p.relative_to(finished)): p.stat().st_mode & 0o777 for p in finished.rglob('*') if p.is_file()}
    assert {'model.safetensors', 'checkpoint.pt', 'best/model.safetensors', 'args.yaml'} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
