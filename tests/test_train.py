"""train.py end to end, in subprocesses as a user runs it: outputs, reload, resume, bad input, two processes."""
import csv
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file
from timm.data import resolve_data_config

import timm_ensembles  # noqa: F401  (registers the models for the reloads)
from timm_ensembles import data as te_data
from timm_ensembles.train.engine import evaluate

ROOT = Path(__file__).resolve().parents[1]
# a tiny, fast recipe on the embedded dataset
QUICK = ['--train-subset', '160', '--val-subset', '80', '--batch-size', '32', '--workers', '0', '--no-progress',
         '--img-size', '32']


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.pop('ACCELERATE_CONFIG_FILE', None)
    return env


def _train_cmd(args, launcher=None) -> list[str]:
    return (launcher or [sys.executable]) + [str(ROOT / 'train.py'), *map(str, args)]


def ddp_launcher(*machine_flags) -> list[str]:
    """`accelerate launch` of two DDP processes (gloo on a machine without a GPU), on one machine unless
    ``machine_flags`` say otherwise (``--num_machines 2 --machine_rank R ...``: one process on each machine)."""
    accelerate = shutil.which('accelerate', path=str(Path(sys.executable).parent))
    # a free port of its own: Accelerate's default (29500) is taken by a launch of another test worker (pytest -n 2)
    one_machine = ('--num_machines', '1', '--main_process_port', str(free_port()))
    return [accelerate, 'launch', '--multi_gpu', '--num_processes', '2', *(machine_flags or one_machine),
            '--mixed_precision', 'no', '--dynamo_backend', 'no']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_train(*args, launcher=None, check=True, timeout=600):
    cmd = _train_cmd(args, launcher)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f'train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
    return proc


def _val_metrics(folder: Path, val_subset=80) -> dict:
    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    _, val_ds, _ = te_data.create_datasets('digits', val_subset=val_subset)
    cfg = resolve_data_config(dict(input_size=(3, 32, 32), crop_pct=1.0), model=model)
    train_ds, _, _ = te_data.create_datasets('digits', train_subset=16)
    _, loader = te_data.create_loaders(train_ds, val_ds, cfg, batch_size=32, workers=0)
    return evaluate(model, loader, Accelerator(cpu=True))


def _val_accuracy(folder: Path, val_subset=80) -> float:
    return _val_metrics(folder, val_subset)['acc']


@pytest.fixture(scope='module')
def fdl_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('fdl') / 'run'
    proc = run_train('--model', 'fdl_test_resnetx2', '--epochs', '2', '--output', out, *QUICK)
    return out, proc.stdout + proc.stderr


def test_run_writes_a_timm_folder_that_reloads(fdl_run):
    out, log = fdl_run
    assert 'world size 1' in log and 'members' in log and 'val acc' in log
    for name in ('config.json', 'model.safetensors', 'metrics.jsonl', 'results.json', 'args.yaml', 'checkpoint.pt'):
        assert (out / name).is_file(), name
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'fdl' and config['model_args']['base_model'] == 'test_resnet'
    assert config['model_args']['num_members'] == 2 and config['num_classes'] == 10
    assert config['label_names'] == [str(i) for i in range(10)]
    lines = [json.loads(ln) for ln in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [ln['epoch'] for ln in lines] == [0, 1]
    assert 'fdl' not in lines[0]['train'] and 'fdl' in lines[1]['train']  # phase 0, then the joint phase
    assert len(lines[1]['val']['member_acc']) == 2
    results = json.loads((out / 'results.json').read_text())
    assert results['final_epoch'] == lines[-1]['val']
    # the exported folder evaluates to exactly the accuracy the run reported
    assert _val_accuracy(out) == results['final_epoch']['acc']
    # no training-only state in the export
    assert all(k.startswith(('members.', 'head.')) for k in load_file(out / 'model.safetensors'))


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    # data-loader workers on: their seeds, and so the augmentation, must repeat too; three members: the random
    # similarity pair must repeat
    args = ['--model', 'fdl_test_resnetx3', '--epochs', '3', *QUICK, '--workers', '2']
    run_train(*args, '--output', tmp_path / 'full')
    killed = tmp_path / 'killed'
    cmd = [sys.executable, str(ROOT / 'train.py'), *args, '--output', str(killed)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / 'checkpoint.pt').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / 'model.safetensors').exists(), 'the run finished before it could be killed'
    run_train('--resume', killed)  # the run's own args.yaml supplies every other setting
    full, resumed = load_file(tmp_path / 'full' / 'model.safetensors'), load_file(killed / 'model.safetensors')
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert [json.loads(ln)['epoch'] for ln in (killed / 'metrics.jsonl').read_text().splitlines()] == [0, 1, 2]


def test_resume_refuses_another_models_run(fdl_run, tmp_path):
    out, _ = fdl_run
    proc = run_train('--model', 'ens_test_resnetx2', '--epochs', '3', '--resume', out, '--output', tmp_path / 'x',
                     *QUICK, check=False)
    assert proc.returncode != 0
    assert 'is another run (' in proc.stderr
    assert "model: 'fdl_test_resnetx2' there, 'ens_test_resnetx2' here" in proc.stderr


def test_resume_refuses_another_dataset(fdl_run, tmp_path):
    out, _ = fdl_run
    copy = tmp_path / 'copy'
    shutil.copytree(out, copy)
    proc = run_train('--resume', copy, '--dataset', 'fashion-mnist', check=False)
    assert proc.returncode != 0 and "dataset: 'digits' there" in proc.stderr


def test_resume_of_a_finished_run_before_its_export(fdl_run, tmp_path):
    """Killed after the last checkpoint but before the export: the resume exports with the last epoch's numbers."""
    out, _ = fdl_run
    copy = tmp_path / 'copy'
    shutil.copytree(out, copy)
    for name in ('config.json', 'model.safetensors', 'results.json'):
        (copy / name).unlink()
    run_train('--resume', copy)
    assert json.loads((copy / 'results.json').read_text()) == json.loads((out / 'results.json').read_text())
    assert load_file(copy / 'model.safetensors').keys() == load_file(out / 'model.safetensors').keys()


def test_refuses_to_overwrite_a_run(fdl_run):
    out, _ = fdl_run
    proc = run_train('--model', 'fdl_test_resnetx2', '--epochs', '2', '--output', out, *QUICK, check=False)
    assert proc.returncode != 0 and 'already holds a run' in proc.stderr


def test_truncated_checkpoint(fdl_run, tmp_path):
    out, _ = fdl_run
    copy = tmp_path / 'copy'
    shutil.copytree(out, copy)
    ckpt = copy / 'checkpoint.pt'
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    proc = run_train('--model', 'fdl_test_resnetx2', '--epochs', '3', '--resume', copy, *QUICK, check=False)
    assert proc.returncode != 0
    assert 'truncated or corrupt' in proc.stderr and 'checkpoint-prev.pt' in proc.stderr


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    out = tmp_path / 'nan'
    # a huge fixed FDL weight blows the joint phase up; the warm-up epoch before it is sound
    proc = run_train('--model', 'fdl_test_resnetx2', '--epochs', '3', '--output', out, '--task-kwargs',
                     'fdl_weight=1e30', 'fdl_distance=mse', *QUICK, check=False)
    assert proc.returncode != 0
    assert 'Non-finite' in proc.stderr and 'epoch 1' in proc.stderr and 'not applied' in proc.stderr
    assert 'last good checkpoint' in proc.stderr and 'Traceback' not in proc.stderr
    state = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert state['epoch'] == 1
    assert all(torch.isfinite(v).all() for v in state['task'].values() if v.is_floating_point())


@pytest.mark.parametrize('args,message', [
    (['--model', 'fdl_test_resnetx1'], 'num_members >= 2'),
    (['--model', 'fdl_resnet1800x2'], "Unknown base model 'resnet1800'"),
    (['--model', 'fdl_test_resnetx2', '--dataset', '/no/such/folder'], '/no/such/folder'),
    (['--model', 'ens_vit_small_patch16_224x2', '--img-size', '32'], 'cannot take input size (3, 32, 32)'),
    (['--model', 'fdl_test_resnetx2', '--task-kwargs', 'fdl_rate=1'], "Unknown option(s) ['fdl_rate']"),
    (['--model', 'ens_test_resnetx2', '--calibrate'], '--calibrate fits the temperature on validation data the test'
                                                      ' set is not part of: add --holdout N'),
])
def test_bad_input_is_a_clear_error(args, message, tmp_path):
    proc = run_train(*args, '--epochs', '1', '--output', tmp_path / 'bad', *QUICK, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr


def test_yaml_config_and_plain_timm_model(tmp_path):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('model: test_resnet\nepochs: 1\nlr: 0.01\nsmoothing: 0.1\n')
    out = tmp_path / 'single'
    run_train('--config', cfg, '--output', out, *QUICK)
    args = (out / 'args.yaml').read_text()
    assert 'model: test_resnet' in args and 'lr: 0.01' in args
    assert json.loads((out / 'config.json').read_text())['architecture'] == 'test_resnet'
    bad = tmp_path / 'bad.yaml'
    bad.write_text('epochz: 3\n')
    proc = run_train('--config', bad, *QUICK, check=False)
    assert proc.returncode != 0 and "unknown keys" in proc.stderr and 'epochz' in proc.stderr


def test_layer_decay_trains_and_resumes_with_the_scaled_groups(tmp_path):
    out = tmp_path / 'ld'
    run_train('--model', 'ens_test_resnetx2', '--epochs', '2', '--layer-decay', '0.5', '--output', out, *QUICK)
    assert yaml.safe_load((out / 'args.yaml').read_text())['layer_decay'] == 0.5
    groups = torch.load(out / 'checkpoint.pt', weights_only=True)['optimizer']['param_groups']
    scales = sorted({g['lr_scale'] for g in groups})
    assert scales[-1] == 1.0 and scales[0] < 0.1  # the classifiers at the full rate, the stem decayed
    # another layer decay is another run
    proc = run_train('--resume', out, '--layer-decay', '0.9', check=False)
    assert proc.returncode != 0 and 'layer_decay: 0.5 there, 0.9 here' in proc.stderr


def test_tracking_log_lines_summary_csv_and_the_best_epoch(tmp_path):
    out = tmp_path / 'tracked'
    trackers = ['--log-with', 'tensorboard'] if importlib.util.find_spec('tensorboard') else []
    proc = run_train('--model', 'fdl_test_resnetx2', '--epochs', '3', '--log-interval', '2', '--eval-metric', 'loss',
                     *trackers, '--output', out, *QUICK)
    # 160 images in batches of 32: 5 updates an epoch, a line at updates 2 and 4 and at the epoch's end
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith('train ') and 'img/s' in ln]
    assert [ln.split(' | ')[1] for ln in lines] == [f'update {u}' for u in (2, 4, 5, 6, 8, 10, 12, 14, 15)]
    assert lines[0].startswith('train 0 [2/5]') and lines[2].startswith('train 0 [5/5]')

    records = [json.loads(ln) for ln in (out / 'metrics.jsonl').read_text().splitlines()]
    with open(out / 'summary.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['epoch']) for r in rows] == [0, 1, 2]
    header = list(rows[0])
    assert header[0] == 'epoch' and header[-1] == 'lr' and 'train_acc' in header and 'eval_member_acc_1' in header
    for r, rec in zip(rows, records):
        assert float(r['eval_loss']) == pytest.approx(rec['val']['loss'])
        assert float(r['eval_member_acc_1']) == pytest.approx(rec['val']['member_acc'][1])
        assert float(r['lr']) == pytest.approx(rec['lr'])
    # FDL's joint-phase terms: blank in its warm-up epoch
    assert rows[0]['train_fdl'] == '' and float(rows[1]['train_fdl']) == pytest.approx(records[1]['train']['fdl'])

    # best/: the epoch of the lowest validation loss, as a model that reloads to that epoch's validation loss
    best_epoch = min(records, key=lambda r: r['val']['loss'])['epoch']
    best = json.loads((out / 'results.json').read_text())['best_epoch']
    assert best == dict(metric='loss', value=pytest.approx(records[best_epoch]['val']['loss']), epoch=best_epoch)
    assert _val_metrics(out / 'best')['loss'] == pytest.approx(records[best_epoch]['val']['loss'], abs=1e-5)

    if trackers:  # the tracker got every epoch's validation metrics, at the update count
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(str(out / 'tracking' / 'timm-ensembles')).Reload()
        assert [e.step for e in events.Scalars('val/acc')] == [5, 10, 15]
        assert [e.value for e in events.Scalars('val/loss')] == pytest.approx([r['val']['loss'] for r in records])
        assert [e.step for e in events.Scalars('train/loss_interval')] == [2, 4, 5, 6, 8, 10, 12, 14, 15]


def test_the_best_epoch_is_the_validation_metrics_best_not_the_last(tmp_path, monkeypatch):
    """Validation losses scripted to 2.0, 1.0, 1.5: best/ holds epoch 1's weights, and the final folder epoch 2's."""
    from timm_ensembles.train import loop, trainer
    losses, weights = iter([2.0, 1.0, 1.5]), []

    def scripted(model, *args, **kwargs):
        metrics = evaluate(model, *args, **kwargs)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        return dict(metrics, loss=next(losses))

    monkeypatch.setattr(loop, 'evaluate', scripted)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    out = tmp_path / 'run'
    trainer.main(['--model', 'test_resnet', '--epochs', '3', '--eval-metric', 'loss', '--output', str(out), *QUICK])
    assert json.loads((out / 'results.json').read_text())['best_epoch'] == dict(metric='loss', value=1.0, epoch=1)
    best, final = load_file(out / 'best' / 'model.safetensors'), load_file(out / 'model.safetensors')
    assert all(torch.equal(best[k], weights[1][k]) for k in best) and len(best) > 0
    assert all(torch.equal(final[k], weights[2][k]) for k in final)
    assert not all(torch.equal(best[k], final[k]) for k in best)


def test_checkpoint_hist_keeps_the_n_best_epochs_through_a_crash_and_resume(tmp_path, monkeypatch):
    """Validation losses scripted to 3.0, 1.0, 2.0, 0.5, 1.5 with --checkpoint-hist 2: checkpoints/ ends with epochs
    3 and 1, each holding its epoch's weights; epochs that fall out are removed. The run fails while saving epoch 3
    (after exporting it, before its checkpoint) and is resumed: the ranking comes back from the checkpoint, the
    unlisted export of epoch 3 is swept and redone, and epoch 2 goes once epoch 3's checkpoint is written."""
    from timm_ensembles.train import loop, trainer
    losses = {0: 3.0, 1: 1.0, 2: 2.0, 3: 0.5, 4: 1.5}
    epochs, weights, seen = iter([0, 1, 2, 3, 3, 4]), {}, []

    def scripted(model, *args, **kwargs):
        epoch = next(epochs)
        weights[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        return dict(evaluate(model, *args, **kwargs), loss=losses[epoch])

    save_checkpoint = loop.save_checkpoint

    def failing_at_epoch_3(states, folder):
        seen.append(sorted(p.name for p in (folder / 'checkpoints').iterdir()))
        if states['epoch'] == 4 and len(seen) == 4:
            raise OSError('disk full')
        return save_checkpoint(states, folder)

    monkeypatch.setattr(loop, 'evaluate', scripted)
    monkeypatch.setattr(loop, 'save_checkpoint', failing_at_epoch_3)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    out = tmp_path / 'run'
    with pytest.raises(SystemExit, match='disk full'):
        trainer.main(['--model', 'test_resnet', '--epochs', '5', '--eval-metric', 'loss', '--checkpoint-hist', '2',
                      '--output', str(out), *QUICK])
    # what each save found before writing its checkpoint: the new epoch exported, the dropped one still there
    assert seen == [['epoch-0'], ['epoch-0', 'epoch-1'], ['epoch-0', 'epoch-1', 'epoch-2'],
                    ['epoch-1', 'epoch-2', 'epoch-3']]
    state = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert state['checkpoint_hist'] == [dict(epoch=1, loss=1.0), dict(epoch=2, loss=2.0)]
    trainer.main(['--resume', str(out)])
    assert seen[4] == ['epoch-1', 'epoch-2', 'epoch-3']  # epoch 3 swept at the start, exported again
    assert seen[5] == ['epoch-1', 'epoch-3']  # epoch 2 removed after epoch 3's checkpoint; epoch 4 did not enter
    results = json.loads((out / 'results.json').read_text())
    assert results['checkpoint_hist'] == [dict(epoch=3, loss=0.5), dict(epoch=1, loss=1.0)]
    assert results['best_epoch'] == dict(metric='loss', value=0.5, epoch=3)
    assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == ['epoch-1', 'epoch-3']  # no temporaries
    for epoch in (1, 3):
        kept = load_file(out / 'checkpoints' / f'epoch-{epoch}' / 'model.safetensors')
        assert all(torch.equal(kept[k], weights[epoch][k]) for k in kept) and len(kept) > 0
    # the same export as best/: timm loads it the same way
    model = timm.create_model(f"local-dir:{out / 'checkpoints' / 'epoch-3'}", pretrained=True)
    assert model.num_classes == 10
    best = load_file(out / 'best' / 'model.safetensors')
    assert all(torch.equal(best[k], weights[3][k]) for k in best)


def test_checkpoint_hist_is_off_by_default(fdl_run):
    out, _ = fdl_run
    assert not (out / 'checkpoints').exists()
    assert 'checkpoint_hist' not in json.loads((out / 'results.json').read_text())


def test_augmentation_flags_reach_timms_transforms(tmp_path, monkeypatch, caplog):
    """--aa / --reprob / --remode / --recount / --color-jitter build timm's transforms: on an image folder, and on the
    in-memory digits in gray, which then leave the batched path for timm's per-image transform."""
    from PIL import Image

    from timm_ensembles.train import trainer
    loaders = []
    create_loaders = te_data.create_loaders

    def recording(*args, **kwargs):
        result = create_loaders(*args, **kwargs)
        loaders.append(result[0])
        return result

    monkeypatch.setattr(te_data, 'create_loaders', recording)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    folder = tmp_path / 'pets'
    rng = torch.Generator().manual_seed(0)
    for split in ('train', 'validation'):
        for cls in ('cat', 'dog'):
            (folder / split / cls).mkdir(parents=True)
            for i in range(8):
                pixels = torch.randint(0, 256, (20, 24, 3), generator=rng, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / split / cls / f'{i}.png')
    quick = ['--model', 'test_resnet', '--epochs', '1', '--batch-size', '8', '--workers', '0', '--no-progress',
             '--img-size', '32']
    trainer.main([*quick, '--dataset', str(folder), '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.5', '--remode',
                  'const', '--recount', '2', '--output', str(tmp_path / 'folder')])
    tfs = {type(t).__name__: t for t in loaders[-1].dataset.transform.transforms}
    assert 'RandAugment' in tfs and tfs['RandAugment'].ops[0].magnitude == 9
    assert (tfs['RandomErasing'].probability, tfs['RandomErasing'].mode, tfs['RandomErasing'].max_count) == (
        0.5, 'const', 2)
    with caplog.at_level('INFO'):
        trainer.main([*quick, '--in-chans', '1', '--train-subset', '64', '--val-subset', '32', '--aa',
                      'rand-m9-mstd0.5-inc1', '--color-jitter', '0.2', '--output', str(tmp_path / 'digits')])
    dataset = loaders[-1].dataset
    assert isinstance(dataset, te_data.SubsetDataset)  # not the batched BatchAugmentDataset
    assert 'RandAugment' in [type(t).__name__ for t in dataset.transform.transforms]
    assert "auto-augment 'rand-m9-mstd0.5-inc1': the in-memory training images take timm's per-image" in caplog.text
    assert yaml.safe_load((tmp_path / 'digits' / 'args.yaml').read_text())['aa'] == 'rand-m9-mstd0.5-inc1'
    # another augmentation is another run
    with pytest.raises(SystemExit, match="aa: 'rand-m9-mstd0.5-inc1' there, 'rand-m5-mstd0.5' here"):
        trainer.main(['--resume', str(tmp_path / 'digits'), '--aa', 'rand-m5-mstd0.5'])


def test_model_ema_is_evaluated_exported_and_resumed(tmp_path):
    out = tmp_path / 'ema'
    run_train('--model', 'ens_test_resnetx2', '--epochs', '2', '--model-ema', '--model-ema-decay', '0.5',
              '--output', out, *QUICK)
    results = json.loads((out / 'results.json').read_text())
    ema_acc = results['ema']['final_epoch']['acc']
    assert _val_accuracy(out / 'ema') == pytest.approx(ema_acc)  # every member's average, reloaded
    ema_weights, final = load_file(out / 'ema' / 'model.safetensors'), load_file(out / 'model.safetensors')
    assert ema_weights.keys() == final.keys() and not all(torch.equal(ema_weights[k], final[k]) for k in final)
    with open(out / 'summary.csv', newline='') as f:
        assert float(list(csv.DictReader(f))[-1]['eval_ema_acc']) == pytest.approx(ema_acc)
    # the average is in the checkpoint: a finished run resumed before its export exports the same average
    (out / 'results.json').unlink()
    shutil.rmtree(out / 'ema')
    run_train('--resume', out)
    again = load_file(out / 'ema' / 'model.safetensors')
    assert all(torch.equal(again[k], ema_weights[k]) for k in ema_weights)


def test_model_ema_follows_every_update(tmp_path, monkeypatch):
    """One EMA update per optimizer update (2 epochs of 5 batches, 2 batches an update: 3 an epoch); with decay 0
    the average is the model itself, exactly."""
    from timm_ensembles.train import trainer
    steps = []

    class Recording(trainer.ModelEmaV3):
        def update(self, model, step=None):
            steps.append(step)
            super().update(model, step=step)

    monkeypatch.setattr(trainer, 'ModelEmaV3', Recording)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    out = tmp_path / 'run'
    trainer.main(['--model', 'test_resnet', '--epochs', '2', '--grad-accum-steps', '2', '--model-ema',
                  '--model-ema-decay', '0', '--output', str(out), *QUICK])
    assert steps == [1, 2, 3, 4, 5, 6]
    ema_weights, final = load_file(out / 'ema' / 'model.safetensors'), load_file(out / 'model.safetensors')
    assert all(torch.equal(ema_weights[k], final[k]) for k in final)


@pytest.mark.parametrize('model', ['test_resnet', 'ens_test_resnetx2', 'fdl_test_resnetx2', 'collab_test_resnetx2',
                                   'ban_test_resnet', 'meal_test_resnet'])
def test_timms_recipe_mixup_cutmix_ema_and_layer_decay_for_every_method(model, fdl_run, tmp_path):
    out = tmp_path / 'run'
    teacher = ['--teacher', fdl_run[0]] if model[:3] in ('ban', 'mea') else []
    proc = run_train('--model', model, *teacher, '--epochs', '2', '--mixup', '0.2', '--cutmix', '1.0',
                     '--mixup-off-epoch', '1', '--smoothing', '0.1', '--model-ema', '--model-ema-decay', '0.9',
                     '--layer-decay', '0.75', '--output', out, *QUICK)
    records = [json.loads(ln) for ln in (out / 'metrics.jsonl').read_text().splitlines()]
    assert len(records) == 2 and all(math.isfinite(r['train']['loss']) for r in records)
    results = json.loads((out / 'results.json').read_text())
    assert _val_accuracy(out / 'ema') == pytest.approx(results['ema']['final_epoch']['acc'])
    assert 'Traceback' not in proc.stderr


def test_mixup_mixes_every_training_batch_until_its_off_epoch(tmp_path, monkeypatch):
    from timm_ensembles.train import inputs, trainer
    mixed = []

    class Recording(inputs.Mixup):
        def __call__(self, x, target):
            x, target = super().__call__(x, target)
            mixed.append((target.shape, float(target.sum(-1).mean())))
            return x, target

    monkeypatch.setattr(inputs, 'Mixup', Recording)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    trainer.main(['--model', 'ens_test_resnetx2', '--epochs', '3', '--mixup', '0.2', '--mixup-off-epoch', '2',
                  '--output', str(tmp_path / 'run'), *QUICK])
    # 5 batches of 32 in each of epochs 0 and 1, none in epoch 2; soft targets over the 10 classes, rows summing to 1
    assert len(mixed) == 10 and all(shape == (32, 10) and total == pytest.approx(1.0) for shape, total in mixed)


def test_timms_short_flags_and_amp():
    from timm_ensembles.train import check_args, parse_args
    args = parse_args(['-b', '16', '-j', '0', '--amp', '--amp-dtype', 'bfloat16'])
    check_args(args)
    assert (args.batch_size, args.workers, args.mixed_precision) == (16, 0, 'bf16')
    args = parse_args(['--amp'])
    check_args(args)
    assert args.mixed_precision == 'fp16'  # timm's default amp dtype


def test_timms_c_is_config(tmp_path):
    from timm_ensembles.train import check_args, parse_args
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('epochs: 3\nsched: step\n')
    args = parse_args(['-c', str(cfg), '--epochs', '4'])
    check_args(args)
    assert (args.epochs, args.sched) == (4, 'step')  # the flag over the file over the default


def test_one_channel_run_exports_one_channel_statistics(tmp_path):
    """A model whose config carries ImageNet's three means, trained on gray input, exports one mean and std."""
    out = tmp_path / 'gray'
    run_train('--model', 'test_resnet', '--in-chans', '1', '--epochs', '1', '--output', out, *QUICK)
    cfg = json.loads((out / 'config.json').read_text())['pretrained_cfg']
    assert cfg['input_size'] == [1, 32, 32] and len(cfg['mean']) == 1 and len(cfg['std']) == 1
    base_mean = timm.create_model('test_resnet').pretrained_cfg['mean']
    assert len(base_mean) == 3 and cfg['mean'][0] == pytest.approx(sum(base_mean) / 3)
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 10)


def test_holdout_validates_on_training_images_and_tests_once(tmp_path):
    out = tmp_path / 'holdout'
    proc = run_train('--model', 'fdl_test_resnetx2', '--epochs', '2', '--holdout', '100', '--calibrate', '--output',
                     out, *QUICK)
    results = json.loads((out / 'results.json').read_text())
    assert results['final_epoch']['num_samples'] == 100 and results['test']['num_samples'] == 80
    assert results['holdout'] == 100 and results['selection'].startswith('forward: the ')
    assert results['selection'] in proc.stderr + proc.stdout and 'test acc' in proc.stderr + proc.stdout
    # the choice was made on the held-out images and is what the saved model does on the test images
    val, test = results['final_epoch'], results['test']
    assert json.loads((out / 'config.json').read_text())['model_args']['combine'] == (
        'mean_probs' if val['mean_probs_acc'] > val['acc'] else 'linear')
    assert _val_accuracy(out) == test['acc']
    # --calibrate: the temperature fitted on the held-out images is the exported model's, applied by its forward
    cal = results['calibration']
    assert 'error' not in cal and cal['temperature'] > 0 and cal['nll_after'] <= cal['nll_before']
    assert f"temperature {cal['temperature']:.4g}" in proc.stderr + proc.stdout
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert model.temperature == cal['temperature']
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.combine(model.forward_members(x)) / cal['temperature'])
    # the held-out count is part of the run: another is refused on resume
    proc = run_train('--model', 'fdl_test_resnetx2', '--epochs', '2', '--holdout', '50', '--resume', out, *QUICK,
                     check=False)
    assert proc.returncode != 0 and 'holdout: 100 there, 50 here' in proc.stderr


def test_two_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` starts two gloo processes on a machine without a GPU."""
    out = tmp_path / 'ddp'
    launcher = ddp_launcher()
    proc = run_train('--model', 'fdl_test_resnetx3', '--epochs', '2', '--output', out, '--cpu', *QUICK,
                     launcher=launcher)
    log = proc.stdout + proc.stderr
    assert 'world size 2' in log
    results = json.loads((out / 'results.json').read_text())
    assert results['world_size'] == 2
    # gather_for_metrics drops the duplicated tail: every validation sample counted once
    assert results['final_epoch']['num_samples'] == 80
    assert _val_accuracy(out) == results['final_epoch']['acc']
    # only the main process claims the folder; the other takes its verdict: both refuse to write over the run
    before = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    start = time.time()
    proc = run_train('--model', 'fdl_test_resnetx3', '--epochs', '2', '--output', out, '--cpu', *QUICK,
                     launcher=launcher, check=False, timeout=300)
    assert proc.returncode != 0 and time.time() - start < 200
    assert proc.stderr.count(f"error: '{out}' already holds a run") == 2, proc.stderr[-3000:]
    assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == before
    # both processes stop together on a non-finite loss (no process left waiting in an all-reduce)
    proc = run_train('--model', 'fdl_test_resnetx2', '--epochs', '3', '--output', tmp_path / 'nan', '--cpu',
                     '--task-kwargs', 'fdl_weight=1e30', 'fdl_distance=mse', *QUICK, launcher=launcher, check=False,
                     timeout=300)
    assert proc.returncode != 0 and 'Non-finite' in proc.stderr


def run_two_machines(*args, logs: Path, machine_args=((), ()), timeout=300) -> list[subprocess.CompletedProcess]:
    """Two "machines" on the loopback, one process each, launched as two nodes are (the same command on each, with
    its --machine_rank); ``machine_args[r]``: the arguments that only machine r gets (what its own disk holds)."""
    port = free_port()
    procs, results = [], []
    try:
        for rank in (0, 1):
            launcher = ddp_launcher('--num_machines', '2', '--machine_rank', str(rank), '--main_process_ip',
                                    '127.0.0.1', '--main_process_port', str(port))
            out, err = open(logs / f'machine{rank}.out', 'w+'), open(logs / f'machine{rank}.err', 'w+')
            procs.append((subprocess.Popen(_train_cmd([*args, *machine_args[rank]], launcher), stdout=out,
                                           stderr=err, text=True, env=_env(), cwd=ROOT, start_new_session=True),
                          out, err))
        deadline = time.time() + timeout
        for proc, out, err in procs:
            proc.wait(timeout=max(deadline - time.time(), 1))
            out.seek(0), err.seek(0)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()))
    finally:
        for proc, out, err in procs:
            if proc.poll() is None:  # a process left waiting: its launcher and workers go with it
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            out.close(), err.close()
    return results


def test_two_machines_train_as_two_processes_on_one(tmp_path):
    """`accelerate launch --num_machines 2 --machine_rank 0|1` (one process each, gloo on the loopback) trains the
    run that two processes on one machine train; only the main process writes. A machine that lacks an input (here
    the checkpoint to resume, on machine 0's disk only) stops both with its line instead of leaving one waiting."""
    # a learning rate that moves the weights from the first update: rank 1's half of each batch (its shard, its
    # augmentation) shows in them
    args = ['--model', 'ens_test_resnetx2', '--epochs', '1', '--lr', '0.05', '--warmup-epochs', '0', '--cpu',
            '--dataset-download', *QUICK]  # --dataset-download: the inputs read in turns (digits fetch nothing)
    one, two = tmp_path / 'one', tmp_path / 'two'
    start = time.time()
    run_train(*args, '--output', one, launcher=ddp_launcher())
    single = time.time() - start
    machines = run_two_machines(*args, '--output', two, logs=tmp_path)
    assert [p.returncode for p in machines] == [0, 0], machines[1].stderr[-3000:] + machines[0].stderr[-3000:]
    assert 'world size 2' in machines[0].stdout + machines[0].stderr
    assert 'world size' not in machines[1].stdout + machines[1].stderr  # the main process alone logs
    assert json.loads((two / 'results.json').read_text())['world_size'] == 2
    a, b = load_file(one / 'model.safetensors'), load_file(two / 'model.safetensors')
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], msg=k)
    lines = [[json.loads(ln) for ln in (run / 'metrics.jsonl').read_text().splitlines()] for run in (one, two)]
    assert [ln['train'] for ln in lines[1]] == [pytest.approx(ln['train'], rel=1e-6) for ln in lines[0]]
    assert [ln['val']['loss'] for ln in lines[1]] == [pytest.approx(ln['val']['loss'], rel=1e-6) for ln in lines[0]]
    print(f'two processes on one machine {single:.0f} s; on two {time.time() - start - single:.0f} s')
    # machine 1 lacks the run folder to resume: both stop, machine 0 with machine 1's line, and nothing is written
    three, missing = tmp_path / 'three', tmp_path / 'only-on-machine-0'
    start = time.time()
    machines = run_two_machines(*args, '--output', three, logs=tmp_path, timeout=240,
                                machine_args=(('--resume', one), ('--resume', missing)))
    assert [p.returncode != 0 for p in machines] == [True, True] and time.time() - start < 200
    line = next((ln for ln in machines[1].stderr.splitlines() if ln.startswith('error: ')), '')
    assert str(missing) in line, machines[1].stderr[-3000:]
    assert f'{line} [process 1 on ' in machines[0].stderr, machines[0].stderr[-3000:]
    assert not three.exists()


def test_a_deepspeed_launch_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """What `accelerate launch --use_deepspeed` (or a config's distributed_type) sets: refused in one line naming what
    runs instead, on the CPU too (where Accelerate would fail on DeepSpeed's import). FSDP: test_train_fsdp.py."""
    from timm_ensembles import train
    monkeypatch.setenv('ACCELERATE_USE_DEEPSPEED', 'true')
    out = tmp_path / 'run'
    with pytest.raises(SystemExit) as e:
        train.main(['--model', 'test_resnet', '--epochs', '1', '--output', str(out), *QUICK])
    message = str(e.value.code)
    assert message.startswith('error: DeepSpeed is not supported by this trainer (ACCELERATE_USE_DEEPSPEED is set')
    assert '\n' not in message and 'accelerate launch --use_fsdp --fsdp_version 2' in message
    assert not out.exists() and not list(tmp_path.iterdir())


def test_mixed_precision_and_gradient_accumulation(tmp_path):
    out = tmp_path / 'bf16'
    proc = run_train('--model', 'fdl_test_resnetx2', '--epochs', '2', '--output', out, '--mixed-precision', 'bf16',
                     '--grad-accum-steps', '2', '--task-kwargs', 'feature_taps=convs', *QUICK)
    assert 'mixed precision bf16' in proc.stdout + proc.stderr
    lines = [json.loads(ln) for ln in (out / 'metrics.jsonl').read_text().splitlines()]
    assert lines[1]['train']['fdl'] > 0
    state = torch.load(out / 'checkpoint.pt', weights_only=True)
    # 160 samples / batch 32 = 5 batches an epoch, 2 per update -> 3 updates an epoch (the last one partial)
    assert state['num_updates'] == 6


def test_checkpoint_rotation_keeps_a_readable_checkpoint(tmp_path):
    from timm_ensembles.train.checkpoint import load_checkpoint, save_checkpoint
    for epoch in (1, 2, 3):
        save_checkpoint(dict(task={'w': torch.full((2,), float(epoch))}, epoch=epoch), tmp_path)
    assert load_checkpoint(tmp_path)['epoch'] == 3
    assert load_checkpoint(tmp_path / 'checkpoint-prev.pt')['epoch'] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint-prev.pt', 'checkpoint.pt']  # no leftovers


def test_a_failed_write_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    from timm_ensembles.train import checkpoint as _checkpoint
    _checkpoint.save_checkpoint(dict(task={}, epoch=1), tmp_path)

    def failing_save(obj, f):
        f.write(b'half a checkpoint')
        raise OSError('disk full')

    monkeypatch.setattr(_checkpoint.torch, 'save', failing_save)
    with pytest.raises(OSError, match='disk full'):
        _checkpoint.save_checkpoint(dict(task={}, epoch=2), tmp_path)
    monkeypatch.undo()
    assert _checkpoint.load_checkpoint(tmp_path)['epoch'] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pt']


class _BlowUpTask(torch.nn.Module):
    """A task whose 'fdl' term is infinite from its second call on."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.calls = 0

    def forward(self, x, target):
        self.calls += 1
        ce = (self.w * x.mean()).sum()
        fdl = torch.tensor(float('inf') if self.calls > 1 else 1.0)
        return dict(loss=ce - fdl, output=None, components=dict(ce=ce.detach(), fdl=fdl))


def test_non_finite_term_is_named_and_its_step_not_applied():
    from timm_ensembles.train.engine import NonFiniteLossError, train_one_epoch
    task = _BlowUpTask()
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
    accelerator = Accelerator(cpu=True)
    loader = [(torch.ones(2, 3), torch.zeros(2, dtype=torch.long))] * 3
    with pytest.raises(NonFiniteLossError, match=r'epoch 4, update 1: fdl blew up') as err:
        train_one_epoch(task, loader, optimizer, accelerator, epoch=4, show_progress=False)
    assert 'ce' not in str(err.value).split('blew up')[0]
    assert task.w.tolist() == pytest.approx([0.9, 0.9])  # the first, finite step only


def test_collaborative_run_writes_the_multi_head_and_the_exported_model(tmp_path):
    out = tmp_path / 'collab'
    proc = run_train('--model', 'collab_test_resnetx2', '--epochs', '1', '--output', out, *QUICK)
    log = proc.stdout + proc.stderr
    assert 'members ' in log and 'mean-probs' in log and "'exported'" in log
    results = json.loads((out / 'results.json').read_text())['final_epoch']
    assert len(results['member_acc']) == 2 and results['acc'] == results['member_acc'][0]
    multi = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    plain = timm.create_model(f'local-dir:{out / "exported"}', pretrained=True).eval()
    assert type(plain).__name__ == 'ResNet' and plain.num_classes == 10
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), multi(x))
    assert _val_accuracy(out / 'exported') == results['acc']


def test_born_again_generations_and_their_ensemble(fdl_run, tmp_path):
    teacher = tmp_path / 'teacher'
    run_train('--model', 'test_resnet', '--epochs', '1', '--output', teacher, *QUICK)
    out = tmp_path / 'ban'
    proc = run_train('--model', 'ban_test_resnet', '--teacher', teacher, '--generations', '2', '--epochs', '1',
                     '--seed', '5', '--output', out, *QUICK)
    seeds, teachers = [], []
    for k in (1, 2):
        gen = out / f'gen{k}'
        args = yaml.safe_load((gen / 'args.yaml').read_text())
        seeds.append(args['seed'])
        teachers.append(args['teacher'])
        # the folder is the bare student: a plain timm model, no teacher weights
        assert json.loads((gen / 'config.json').read_text())['architecture'] == 'test_resnet'
        assert set(load_file(gen / 'model.safetensors')) == set(timm.create_model('test_resnet').state_dict())
        state = torch.load(gen / 'checkpoint.pt', weights_only=True)['task']
        # the student and the task's diagnostic (the untrained student's divergence), never a teacher's weight
        assert all(k.startswith('model.student.') for k in state if k != 'initial_kl') and 'initial_kl' in state
    assert seeds == [1005, 2005] and teachers == [[str(teacher)], [str(out / 'gen1')]]
    assert 'kd' in proc.stdout + proc.stderr
    # running it again skips the finished generations
    again = run_train('--model', 'ban_test_resnet', '--teacher', teacher, '--generations', '2', '--epochs', '1',
                      '--seed', '5', '--output', out, *QUICK)
    assert 'generation 2: done' in again.stdout + again.stderr
    bane = timm.create_model('bane', generations=[str(out / 'gen1'), str(out / 'gen2')])
    assert bane.num_members == 2 and bane.combine_mode == 'mean_probs'
    # a model whose task takes no teachers says so
    proc = run_train('--model', 'ens_test_resnetx2', '--teacher', teacher, '--epochs', '1', *QUICK, check=False)
    assert proc.returncode != 0 and "Unknown option(s) ['teachers']" in proc.stderr
    proc = run_train('--model', 'ban_test_resnet', '--epochs', '1', *QUICK, check=False)
    assert proc.returncode != 0 and 'needs at least one teacher' in proc.stderr


def test_meal_student_of_an_ensemble_under_two_processes(fdl_run, tmp_path):
    teacher, _ = fdl_run
    launcher = ddp_launcher()
    out = tmp_path / 'meal'
    proc = run_train('--model', 'meal_test_resnet', '--teacher', teacher, '--epochs', '1', '--output', out, '--cpu',
                     *QUICK, launcher=launcher)
    log = proc.stdout + proc.stderr
    assert 'world size 2' in log and 'disc' in log
    assert set(load_file(out / 'model.safetensors')) == set(timm.create_model('test_resnet').state_dict())
    state = torch.load(out / 'checkpoint.pt', weights_only=True)['task']
    assert any(k.startswith('discriminators.') for k in state) and not any('members' in k for k in state)
    assert _val_accuracy(out) == json.loads((out / 'results.json').read_text())['final_epoch']['acc']


def test_teacher_flags_replace_the_configs_and_a_yaml_string_is_one_teacher(tmp_path):
    from timm_ensembles import train
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('teacher: /some/folder\n')
    assert train.parse_args(['--config', str(cfg)]).teacher == ['/some/folder']
    assert train.parse_args(['--config', str(cfg), '--teacher', 'a', '--teacher', 'b']).teacher == ['a', 'b']
    assert train.parse_args([]).teacher is None


SNAPSHOT = ['--snapshot-subset', '20', '--snapshot-weights']


@pytest.fixture(scope='module')
def snapshot_runs(tmp_path_factory):
    """Two runs of one ensemble that differ only in their seed, and a plain model, all with weight snapshots."""
    root = tmp_path_factory.mktemp('snapshots')
    logs = {}
    for name, model, seed, epochs in (('seed0', 'ens_test_resnetx2', 0, 2), ('seed1', 'ens_test_resnetx2', 1, 2),
                                      ('plain', 'test_resnet', 0, 1)):
        proc = run_train('--model', model, '--seed', seed, '--epochs', epochs, '--output', root / name, *SNAPSHOT,
                         *QUICK)
        logs[name] = proc.stdout + proc.stderr
    return root, logs


def _snapshot_inputs(model, indices, val_subset=80):
    """The run's snapshot subset through the evaluation transform, in train.py's batches."""
    train_ds, val_ds, _ = te_data.create_datasets('digits', train_subset=16, val_subset=val_subset)
    cfg = resolve_data_config(dict(input_size=(3, 32, 32), crop_pct=1.0), model=model)
    te_data.create_loaders(train_ds, val_ds, cfg, batch_size=32, workers=0)
    return torch.utils.data.DataLoader(torch.utils.data.Subset(val_ds, indices.tolist()), batch_size=32)


def test_snapshots_hold_the_exported_models_predictions_and_weights(snapshot_runs):
    from timm_ensembles.train.snapshots import predict_members, read_snapshots
    root, logs = snapshot_runs
    out = root / 'seed0'
    assert sorted(p.name for p in (out / 'snapshots').iterdir()) == [
        'epoch_000.safetensors', 'epoch_000.weights.safetensors', 'epoch_001.safetensors',
        'epoch_001.weights.safetensors', 'epoch_init.safetensors', 'epoch_init.weights.safetensors']
    snaps = read_snapshots(out, weights=True)
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    num_params = sum(p.numel() for p in model.members[0].parameters())
    assert snaps.epochs == [-1, 0, 1] and snaps.logits.shape == (3, 20, 2, 10)
    assert snaps.weights.shape == (3, 2, num_params)
    # the initialisation (epoch -1) is the model before its first update: other weights, other predictions
    assert not torch.equal(snaps.weights[0], snaps.weights[1]) and not torch.equal(snaps.logits[0], snaps.logits[1])
    assert snaps.meta == dict(model='ens_test_resnetx2', dataset='digits', num_classes='10', num_members='2',
                              format='1')
    # the last snapshot is the exported model's forward_members on those inputs, with the evaluation transform
    logits, targets = predict_members(model, _snapshot_inputs(model, snaps.indices))
    assert torch.equal(targets, snaps.targets)
    # train.py forwarded with one thread, this process may use two: other kernels, the same values to float32 rounding
    torch.testing.assert_close(snaps.logits[-1], logits, rtol=1e-5, atol=1e-5)
    assert not torch.equal(snaps.logits[1], snaps.logits[2])  # an epoch of training apart
    # and its weights are the exported members' parameters, flattened in sorted-name order
    for m, member in enumerate(model.members):
        params = dict(member.named_parameters())
        flat = torch.cat([params[k].detach().reshape(-1) for k in sorted(params)])
        assert torch.equal(snaps.weights[-1, m], flat)
    # the evaluation pass logs the members' diversity
    assert 'disagree ' in logs['seed0'] and 'feat-dist ' in logs['seed0']
    val = [json.loads(ln)['val'] for ln in (out / 'metrics.jsonl').read_text().splitlines()]
    assert all(0 <= v['disagreement'] <= 1 and v['feature_distance'] > 0 for v in val)


def test_runs_with_other_seeds_snapshot_the_same_inputs(snapshot_runs):
    from timm_ensembles.train.snapshots import read_snapshots
    root, _ = snapshot_runs
    a, b = read_snapshots(root / 'seed0'), read_snapshots(root / 'seed1')
    assert torch.equal(a.indices, b.indices) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.logits, b.logits)
    assert len(set(a.targets.tolist())) == 10  # stratified: 2 samples of each class


def test_snapshots_of_a_plain_model_are_one_member(snapshot_runs):
    from timm_ensembles.train.snapshots import read_snapshots
    root, logs = snapshot_runs
    snaps = read_snapshots(root / 'plain', weights=True)
    model = timm.create_model(f'local-dir:{root / "plain"}', pretrained=True)
    params = dict(model.named_parameters())
    assert snaps.logits.shape == (2, 20, 1, 10) and snaps.meta['num_members'] == '1'
    assert torch.equal(snaps.weights[-1, 0], torch.cat([params[k].detach().reshape(-1) for k in sorted(params)]))
    assert 'disagree' not in logs['plain']


def test_resumed_run_rewrites_the_snapshots_of_the_epochs_it_redoes(snapshot_runs, tmp_path):
    """Killed after epoch 0's checkpoint, with a half-done epoch 1 behind it: the resume ends with the snapshots of
    the uninterrupted run."""
    from safetensors.torch import save_file

    from timm_ensembles.train.snapshots import read_snapshots
    root, _ = snapshot_runs
    full, copy = root / 'seed0', tmp_path / 'copy'
    shutil.copytree(full, copy)
    os.replace(copy / 'checkpoint-prev.pt', copy / 'checkpoint.pt')  # the checkpoint after epoch 0
    for name in ('config.json', 'model.safetensors', 'results.json'):
        (copy / name).unlink()
    stale = read_snapshots(copy)
    save_file(dict(logits=torch.zeros_like(stale.logits[1]), targets=stale.targets, indices=stale.indices),
              copy / 'snapshots' / 'epoch_001.safetensors', metadata=dict(stale.meta, epoch='1'))
    (copy / 'snapshots' / 'epoch_001.weights.safetensors').unlink()
    run_train('--resume', copy)
    a, b = read_snapshots(full, weights=True), read_snapshots(copy, weights=True)
    assert a.epochs == b.epochs == [-1, 0, 1] and a.meta == b.meta
    for key in ('logits', 'targets', 'indices', 'weights'):
        assert torch.equal(getattr(a, key), getattr(b, key)), key


@pytest.mark.parametrize('args,message', [
    (['--model', 'ens_test_resnetx2', '--snapshot-subset', '81'], '--snapshot-subset 81 is larger than the'
                                                                   ' validation set (80 samples'),
    (['--model', 'collab_test_resnetx2', *SNAPSHOT], 'members share layers'),
])
def test_bad_snapshot_flags_are_clear_errors(args, message, tmp_path):
    proc = run_train(*args, '--epochs', '1', '--output', tmp_path / 'bad', *QUICK, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    assert not (tmp_path / 'bad' / 'checkpoint.pt').exists()


@pytest.mark.parametrize('args,message', [
    (['--snapshot-weights'], '--snapshot-weights needs --snapshot-subset N'),
    (['--snapshot-subset', '-1'], r'--snapshot-subset -1: must be a whole number >= 0 \(0: no snapshots\)'),
])
def test_snapshot_flags_are_checked_before_anything_is_built(args, message):
    from timm_ensembles import train
    with pytest.raises(SystemExit, match=message):
        train.main(args)


def test_neighbouring_seeds_do_not_replay_each_others_epochs():
    from timm_ensembles.train import epoch_seed
    # seed s + 1 used to take seed s's data order of the next epoch (seed + epoch)
    orders = {(s, e): epoch_seed(s, e) for s in range(5) for e in range(200)}
    assert len(set(orders.values())) == len(orders)
    assert [epoch_seed(0, e) for e in range(3)] == [0, 1, 2]  # seed 0 keeps its archived runs' data order
    assert 0 <= epoch_seed(10 ** 9, 7) < 2 ** 32


# --- timm's train.py habits: --data-dir image folders, timm's flags, plateau, --resume extending --epochs


def _pets(root: Path, per_class: int) -> Path:
    """A 2-class image folder as timm reads one: <split>/<class>/<image>, dark cats and bright dogs."""
    from PIL import Image
    rng = torch.Generator().manual_seed(0)
    for split, count in (('train', per_class), ('validation', per_class // 2)):
        for cls, level in (('cat', 40), ('dog', 200)):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                noise = torch.randint(-20, 20, (16, 16, 3), generator=rng)
                Image.fromarray((noise + level).clamp(0, 255).to(torch.uint8).numpy()).save(
                    root / split / cls / f'{i}.png')
    return root


# plateau on the validation accuracy, halving the rate after an epoch without improvement; small steps (down to 0),
# so that the accuracy stalls within the first epochs
PLATEAU = ['--sched', 'plateau', '--patience-epochs', '0', '--decay-rate', '0.5', '--lr', '1e-3', '--min-lr', '0']


@pytest.fixture(scope='module')
def folder_run(tmp_path_factory):
    """timm's command for an image folder (--data-dir, no --dataset), named by --experiment, with --sched plateau."""
    tmp = tmp_path_factory.mktemp('folder')
    pets = _pets(tmp / 'pets', per_class=12)
    proc = run_train('--model', 'test_resnet', '--data-dir', pets, '--epochs', '4', '--batch-size', '8', '--workers',
                     '0', '--no-progress', '--img-size', '32', *PLATEAU, '--output', tmp / 'runs', '--experiment',
                     'pets')
    return pets, tmp / 'runs' / 'pets', proc.stderr


def test_data_dir_trains_on_the_folder_and_the_first_lines_say_so(folder_run):
    pets, out, log = folder_run
    config = json.loads((out / 'config.json').read_text())
    assert config['num_classes'] == 2 and config['label_names'] == ['cat', 'dog']
    assert json.loads((out / 'results.json').read_text())['dataset'] == str(pets)
    lines = log.splitlines()
    assert lines[0] == 'model: test_resnet (ResNet, trained by CrossEntropyTask)', lines[:3]
    summary = lines[:lines.index(next(ln for ln in lines if ln.startswith('train 0')))]
    assert f'  dataset: {pets} (image folder: training {pets}/train, validation {pets}/validation)' in summary
    assert '  classes: 2 (cat, dog)' in summary and '  splits: training 24, validation 12' in summary
    assert '  input: 3x32x32, bilinear' in '\n'.join(summary) and 'world size 1' in '\n'.join(summary)


def test_plateau_steps_on_the_validation_metric_after_each_epoch(folder_run):
    """timm's train.py: lr_scheduler.step(epoch + 1, metric) after every epoch; ReduceLROnPlateau in 'max' mode
    (accuracy), relative threshold 1e-4, patience 0: the rate halves after every epoch that does not beat the best."""
    _, out, _ = folder_run
    records = [json.loads(ln) for ln in (out / 'metrics.jsonl').read_text().splitlines()]
    lr, best = 1e-3, None
    for r in records:
        assert r['lr'] == pytest.approx(lr), records
        acc = r['val']['acc']
        if best is None or acc > best * (1 + 1e-4):
            best = acc
        else:
            lr *= 0.5
    assert records[-1]['lr'] < 1e-3, records  # the test's data must plateau within the run


def test_resume_with_more_epochs_extends_the_run_as_timm(fdl_run, tmp_path):
    """The schedule is rebuilt over the new epoch count and taken up at the run's update (timm's --resume): a cosine
    from 0.05 to 1e-5 over 3 epochs of 5 updates is at 1e-5 + (0.05 - 1e-5) (1 + cos(2 pi / 3)) / 2 at update 10."""
    out, _ = fdl_run
    copy = tmp_path / 'copy'
    shutil.copytree(out, copy)
    proc = run_train('--resume', copy, '--epochs', '3')
    expected = 1e-5 + (0.05 - 1e-5) * (1 + math.cos(2 * math.pi / 3)) / 2
    assert (f'--epochs 2 -> 3: the run continues from epoch 2 to 3; the cosine schedule is rebuilt over 3 epochs and'
            f" taken up at update 10, as timm's --resume does: learning rate 1e-05 -> {expected:.6g}") in proc.stderr
    records = [json.loads(ln) for ln in (copy / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [0, 1, 2] and records[:2] == [
        json.loads(ln) for ln in (out / 'metrics.jsonl').read_text().splitlines()]
    assert records[2]['lr'] == pytest.approx(1e-5)  # the new schedule's end
    assert json.loads((copy / 'results.json').read_text())['epochs'] == 3
    assert yaml.safe_load((copy / 'args.yaml').read_text())['epochs'] == 3
    shrink = run_train('--resume', copy, '--epochs', '2', check=False)
    assert shrink.returncode != 0 and shrink.stderr.strip().splitlines() == [
        f'error: --resume {copy} --epochs 2: the run has 3 epochs; a resumed run can be extended (a larger --epochs)'
        f' but not shortened: give --epochs 3 or more.']


def test_timms_model_and_data_flags_reach_the_model_and_its_data_config(fdl_run, tmp_path):
    from timm_ensembles.train import trainer
    args = trainer.parse_args(['--model', 'fdl_test_resnetx2', '--drop', '0.25', '--drop-path', '0.125',
                               '--input-size', '3', '32', '48', '--mean', '0.25', '--std', '0.5', '0.25', '1',
                               '--eval-metric', 'top1', '--initial-checkpoint', str(fdl_run[0])])
    trainer.check_args(args)
    assert (args.in_chans, args.eval_metric) == (3, 'acc')
    info = te_data.DatasetInfo('digits', 10, None, 32, 0.)
    model, task, _, data_config = trainer._create_task(args, {}, 10, info)
    for member in model.members:
        assert member.drop_rate == 0.25
        assert [m.drop_prob for m in member.modules() if type(m).__name__ == 'DropPath'][-1] == pytest.approx(0.125)
    assert data_config['input_size'] == (3, 32, 48)
    assert (tuple(data_config['mean']), tuple(data_config['std'])) == ((0.25,) * 3, (0.5, 0.25, 1.0))
    # --initial-checkpoint: the run folder's exported weights, exactly
    exported = load_file(fdl_run[0] / 'model.safetensors')
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in exported.items())


def test_initial_checkpoint_never_unpickles_and_must_fit(fdl_run, tmp_path):
    from timm_ensembles.train.checkpoint import load_initial_checkpoint
    model = timm.create_model('test_resnet', num_classes=10)
    pickled = tmp_path / 'evil.pth'
    torch.save({'state_dict': model.state_dict(), 'payload': _Unpicklable()}, pickled)
    with pytest.raises(ValueError, match=r'cannot read .*evil\.pth as weights \(RuntimeError: weights_only=True'
                                         r' blocked loading'):
        load_initial_checkpoint(model, pickled)
    with pytest.raises(ValueError, match=r'does not fit ResNet: \d+ weights of the model missing \(e\.g\. conv1.*'
                                         r'\d+ weights the model does not have \(e\.g\. members\.0\.'):
        load_initial_checkpoint(model, fdl_run[0])
    with pytest.raises(ValueError, match='is a train.py checkpoint'):
        load_initial_checkpoint(model, fdl_run[0] / 'checkpoint.pt')
    plain = tmp_path / 'plain.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, plain)
    fresh = timm.create_model('test_resnet', num_classes=10)
    load_initial_checkpoint(fresh, plain)  # timm's checkpoint layout, DDP prefix cleaned, as timm loads it
    assert torch.equal(fresh.fc.weight, model.fc.weight)


class _Unpicklable:
    """A class a weights_only load refuses (what a malicious pickle would carry)."""


def test_plateau_state_resumes_with_its_patience_counters():
    """timm's PlateauLRScheduler.state_dict keeps only best and last_epoch: the checkpoint keeps the patience and
    cooldown counters too, so a resumed run decays on the same epoch as an uninterrupted one."""
    import argparse

    from timm_ensembles.train.optim import SchedulerState, create_scheduler

    def plateau():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        args = argparse.Namespace(sched='plateau', epochs=10, decay_epochs=1, decay_milestones=[90], decay_rate=0.5,
                                  min_lr=0.0, warmup_lr=0.0, warmup_epochs=0, patience_epochs=2, eval_metric='acc')
        return create_scheduler(optimizer, args, updates_per_epoch=1)[0], optimizer

    run, optimizer = plateau()
    for epoch, acc in enumerate((50, 40, 40), start=1):  # best 50, then two epochs without improvement
        run.step(epoch, acc)
    saved = SchedulerState(run).state_dict()
    resumed, resumed_optimizer = plateau()
    SchedulerState(resumed).load_state_dict(saved)
    run.step(4, 40)
    resumed.step(4, 40)  # the third epoch without improvement: beyond a patience of 2, both decay
    assert optimizer.param_groups[0]['lr'] == resumed_optimizer.param_groups[0]['lr'] == 0.5


def test_clip_modes_clip_as_timms_dispatch_clip_grad():
    """One SGD step (lr 1, no momentum) on gradients of 100 everywhere: 'value' clips each to 0.5; 'norm' scales the
    whole gradient to norm 1; 'agc' with factor 0.01 scales each unit of the body to 0.01 of its weight norm (rows of
    four ones: norm 2, so 0.02 for a gradient row of norm 200: 0.01 per weight) and leaves the classifier alone."""
    from timm_ensembles.train.engine import train_one_epoch

    class Task(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 2, bias=False)
            self.head = torch.nn.Linear(2, 3, bias=False)
            for p in self.parameters():
                torch.nn.init.ones_(p)

        def get_classifier(self):
            return self.head

        def forward(self, x, target):
            return dict(loss=100 * (self.body.weight.sum() + self.head.weight.sum()), output=None, components={})

    batches = [(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))]
    after = {}
    for mode, value in (('value', 0.5), ('norm', 1.0), ('agc', 0.01)):
        task = Task()
        optimizer = torch.optim.SGD(task.parameters(), lr=1.0, momentum=0.0)
        train_one_epoch(task, batches, optimizer, Accelerator(cpu=True), 0, clip_grad=value, clip_mode=mode,
                        show_progress=False)
        after[mode] = (task.body.weight.detach(), task.head.weight.detach())
    assert torch.equal(after['value'][0], torch.full((2, 4), 0.5)) and torch.equal(after['value'][1],
                                                                                 torch.full((3, 2), 0.5))
    step = torch.cat([(1 - w).flatten() for w in after['norm']])
    assert torch.allclose(step, torch.full((14,), 1 / math.sqrt(14)))  # the norm-1 direction of equal gradients
    assert torch.allclose(after['agc'][0], torch.full((2, 4), 0.99)) and torch.equal(after['agc'][1],
                                                                                   torch.full((3, 2), -99.))


def test_the_summary_flags_a_member_count_beyond_the_registered_variants_with_its_size(tmp_path, monkeypatch):
    """fdl_resnet18x22 (a typo for x2) builds 22 members: the summary says so with the size each checkpoint will take,
    which is what train.py's checkpoint of the model, the task and an SGD step's momentum takes (within 2 %)."""
    import io

    from timm_ensembles.train import trainer
    from timm_ensembles.train.summary import format_bytes, run_summary
    args = trainer.parse_args(['--model', 'fdl_test_resnetx5', *map(str, QUICK)])
    trainer.check_args(args)
    args.member_strategy = 'loop'
    train_ds, val_ds, test_ds, info, num_classes = trainer._create_datasets(args)
    _, task, _, data_config = trainer._create_task(args, {}, num_classes, info)
    optimizer = task.create_optimizer(opt=args.opt, lr=args.lr, momentum=args.momentum)
    lines = run_summary(args, info, task, dict(training=train_ds, validation=val_ds, test=test_ds), data_config,
                        Accelerator(cpu=True), optimizer)
    members = next(ln for ln in lines if ln.startswith('  members:'))
    assert members.startswith('  members: 5 x test_resnet (1.5 MB a member); warning: more than any registered'
                              ' variant (x2-x4): 5 networks, '), members
    assert 'Is fdl_test_resnetx5 the name you meant?' in members
    assert '  splits: training 160 (of 1437), validation 80 (of 360)' in lines
    for p in task.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # the momentum buffers exist from the first step on
    buffer = io.BytesIO()
    torch.save(dict(task=task.state_dict(), optimizer=optimizer.state_dict()), buffer)
    size = float(members.split('5 networks, ')[1].split(' a checkpoint')[0].split()[0]) * 1e6
    assert size == pytest.approx(len(buffer.getvalue()), rel=0.02), (format_bytes(len(buffer.getvalue())), members)
    short = run_summary(trainer.parse_args(['--model', 'fdl_test_resnetx3']), info, task, {}, data_config,
                        Accelerator(cpu=True), optimizer)
    assert 'warning' not in '\n'.join(short)
    # a disk with less room than two checkpoints (three while one is replaced) and the exports: said up front
    import collections

    from timm_ensembles.train import summary as _summary
    assert 'free on the disk' not in '\n'.join(run_summary(args, info, task, {}, data_config, Accelerator(cpu=True),
                                                           optimizer, output=tmp_path / 'run'))
    monkeypatch.setattr(_summary.shutil, 'disk_usage',
                        lambda p: collections.namedtuple('usage', 'total used free')(0, 0, 10 ** 6))
    lines = run_summary(args, info, task, {}, data_config, Accelerator(cpu=True), optimizer, output=tmp_path / 'run')
    needed = lines[-1].split('will take up to ')[1].split(':')[0]
    assert lines[-1] == (f'  warning: 1 MB free on the disk of {tmp_path / "run"}, where the run will take up to'
                         f' {needed}: a save that finds the disk full stops the run (its last checkpoint kept)')
    # three checkpoints and two exported models (final, best/) of 5 members of 1.5 MB each
    assert float(needed.split()[0]) * 1e6 == pytest.approx(3 * size + 2 * 5 * 1.5e6, rel=0.05)


def test_a_plateau_run_extended_by_resume_is_the_longer_run(folder_run, tmp_path):
    """A plateau schedule has no length: three epochs extended to four by --resume train exactly the four-epoch run
    (its learning rate, decayed on the metric, and its counters carried over), weights bitwise."""
    pets, out, _ = folder_run
    short = tmp_path / 'short'
    run_train('--model', 'test_resnet', '--data-dir', pets, '--epochs', '3', '--batch-size', '8', '--workers', '0',
              '--no-progress', '--img-size', '32', *PLATEAU, '--output', short)
    run_train('--resume', short, '--epochs', '4')
    lrs = [[json.loads(ln)['lr'] for ln in (folder / 'metrics.jsonl').read_text().splitlines()] for folder in (out,
                                                                                                            short)]
    assert lrs[0] == lrs[1] and lrs[0][-1] < lrs[0][0]
    full, extended = load_file(out / 'model.safetensors'), load_file(short / 'model.safetensors')
    assert all(torch.equal(full[k], extended[k]) for k in full)
