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
    from timm_ensembles import train as trainer
    if trainer._TRACKER_PACKAGES[tracker][0]():
        pytest.skip(f'{tracker} is installed here')
    out = tmp_path / 'run'
    with pytest.raises(SystemExit, match=rf"--log-with {tracker}: the package '{package}' is not installed here;"
                                         rf" pip install {package}"):
        trainer.main(['--model', 'test_resnet', '--log-with', 'tensorboard', tracker, '--output', str(out)])
    assert not out.exists()


def test_mixup_is_refused_for_a_task_that_cannot_take_soft_targets(tmp_path, monkeypatch):
    from timm_ensembles import ClassificationTask
    from timm_ensembles import train as trainer
    monkeypatch.setattr(ClassificationTask, 'accepts_soft_targets', False)
    out = tmp_path / 'run'
    with pytest.raises(SystemExit, match='--mixup/--cutmix give mixed .soft. targets, which ClassificationTask of'
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
    (run / '.checkpoint.pt.1234.tmp').write_bytes(b'half a save')  # what a killed save leaves
    prev = run / 'checkpoint-prev.pt'
    state = torch.load(prev, weights_only=True)
    assert state['epoch'] == 1
    # resume from the backup, with one more epoch to train (the epoch count is part of the run: change it in place)
    proc = run_train('--resume', prev, check=False)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert torch.load(run / 'checkpoint.pt', weights_only=True)['epoch'] == 2
    # the corrupt file did not become the backup
    assert torch.load(prev, weights_only=True)['epoch'] == 1
    assert not list(run.glob('.*.tmp'))


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

    from timm_ensembles._checkpoint import export_folder
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
    (out / '.checkpoint.pt.new').mkdir()  # the main process's first save cannot replace a folder
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
                                             worker_init_fn=functools.partial(te_data._seed_worker, rank),
                                             generator=torch.Generator().manual_seed(0))
        return next(iter(loader))[0]
    assert torch.equal(draws(0), draws(0)) and not torch.equal(draws(0), draws(1))


def test_fp16_overflow_steps_are_skipped_and_only_a_run_of_them_stops(monkeypatch):
    from timm_ensembles import _engine

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
    from timm_ensembles import train as trainer
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
        from timm_ensembles import train as trainer
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
