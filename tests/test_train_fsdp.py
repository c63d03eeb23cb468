"""train.py under FSDP2 (``accelerate launch --use_fsdp --fsdp_version 2``) on two CPU processes. Accelerate shards
only on GPUs, so there the trainer shards the task itself over its gloo processes (``train/sharded.py``), on the code
path a GPU run takes but for Accelerate's preparation: each family trains, checkpoints, resumes and exports as the
same run under DDP, whose processes see the same batches (and DDP's two processes are tested against one in
test_train.py); a checkpoint written by either resumes under the other. The device check
(benchmarks/device_check.py) runs Accelerate's own FSDP on a GPU."""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import QUICK, ddp_launcher, free_port, run_train

from timm_ensembles.train.device import DeviceDefaults


def fsdp_launcher(*flags) -> list[str]:
    """`accelerate launch` of two FSDP2 processes (gloo on a machine without a GPU)."""
    accelerate = shutil.which('accelerate', path=str(Path(sys.executable).parent))
    return [accelerate, 'launch', '--num_processes', '2', '--num_machines', '1', '--main_process_port',
            str(free_port()), '--mixed_precision', 'no', '--dynamo_backend', 'no', '--use_fsdp', '--fsdp_version', '2',
            *flags]


COMMON = ['--epochs', '2', '--model-ema', '--checkpoint-hist', '1', '--holdout', '40', '--cpu', *QUICK]
FAMILIES = {
    # a wrap policy naming the members' blocks: units inside the members' units
    'fdl': (['--model', 'fdl_test_resnetx2', '--calibrate', '--snapshot-subset', '8', '--snapshot-weights'],
            ['--fsdp_auto_wrap_policy', 'TRANSFORMER_BASED_WRAP', '--fsdp_transformer_layer_cls_to_wrap',
             'BasicBlock']),
    # a GPU's sharded default given on the CPU: fused AdamW (the strategy is the loop when sharded)
    'ens-fused-adamw': (['--model', 'ens_test_resnetx2', '--opt', 'adamw', '--lr', '0.01', '--fused-opt'], []),
    'collab': (['--model', 'collab_test_resnetx2', '--calibrate', '--snapshot-subset', '8'], []),
    'meal': (['--model', 'meal_test_resnet', '--snapshot-subset', '8', '--snapshot-weights'], []),
}


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp('teacher') / 'ens'
    run_train('--model', 'ens_test_resnetx2', '--epochs', '1', '--output', out, *QUICK)
    return out


def _close(a, b, where: str):
    """``a`` and ``b`` equal, floats to float tolerance; the mechanism's gradient shares left out (not measured under
    FSDP, whose forward uses gathered copies of the parameters)."""
    if isinstance(a, dict):
        # (the hash of the weights config.json records: they are compared to float tolerance)
        keys = {k for k in a if not str(k).startswith('share_') and k != 'timm_ensembles_weights_sha256'}
        assert keys == {k for k in b if not str(k).startswith('share_') and k != 'timm_ensembles_weights_sha256'}, where
        for k in keys:
            _close(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f'{where}[{i}]')
    elif isinstance(a, torch.Tensor):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, equal_nan=True, msg=lambda m: f'{where}: {m}')
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6, nan_ok=True), where
    else:
        assert a == b, where


def assert_same_run(a: Path, b: Path):
    """Every file the run ``a`` wrote, ``b`` wrote the same (but the seconds an epoch took)."""
    files = sorted(p.relative_to(a) for p in a.rglob('*') if p.is_file() and p.name != 'args.yaml')
    assert files == sorted(p.relative_to(b) for p in b.rglob('*') if p.is_file() and p.name != 'args.yaml')
    for f in files:
        if f.suffix == '.safetensors':
            _close(load_file(a / f), load_file(b / f), str(f))
        elif f.suffix == '.pt':
            _close(torch.load(a / f, weights_only=True), torch.load(b / f, weights_only=True), str(f))
        elif f.suffix == '.jsonl':
            lines = [[json.loads(ln) for ln in (r / f).read_text().splitlines()] for r in (a, b)]
            for x, y in zip(*lines, strict=True):
                x.pop('seconds'), y.pop('seconds')
                _close(x, y, str(f))
        elif f.suffix == '.json':
            _close(json.loads((a / f).read_text()), json.loads((b / f).read_text()), str(f))
        elif f.suffix == '.csv':  # the columns (its values are metrics.jsonl's)
            header = [[c for c in (r / f).read_text().splitlines()[0].split(',') if '_share_' not in c] for r in (a, b)]
            assert header[0] == header[1], f


def _cut_after_first_epoch(run: Path, to: Path) -> Path:
    """A copy of a finished 2-epoch run as a kill during its second epoch leaves it: the checkpoint of epoch 0, the
    final exports not written."""
    shutil.copytree(run, to)
    for name in ('checkpoint.pt', 'model.safetensors', 'config.json', 'results.json'):
        (to / name).unlink()
    shutil.rmtree(to / 'ema')
    (to / 'checkpoint-prev.pt').rename(to / 'checkpoint.pt')
    return to


@pytest.mark.slow
@pytest.mark.parametrize('family', list(FAMILIES))
def test_sharded_run_trains_checkpoints_resumes_and_exports_as_ddp(family, teacher, tmp_path):
    flags, policy = FAMILIES[family]
    args = [*flags, *(['--teacher', teacher] if family == 'meal' else []), *COMMON]
    ddp, fsdp = tmp_path / 'ddp', tmp_path / 'fsdp'
    run_train(*args, '--output', ddp, launcher=ddp_launcher())
    proc = run_train(*args, '--output', fsdp, launcher=fsdp_launcher(*policy))
    log = proc.stdout + proc.stderr
    assert 'FSDP2: the task sharded over 2 processes' in log
    assert ('member strategy: loop' in log) == (family != 'collab' and family != 'meal')  # the sharded default
    assert ('the modules the wrap policy names' in log) == bool(policy)
    # the metrics of every epoch (the EMA's too), the checkpoints (the optimizer's state in the unsharded format),
    # best/, checkpoints/ (--checkpoint-hist), ema/, the snapshots (weights gathered), the calibrated,
    # validation-selected export, results.json
    assert_same_run(ddp, fsdp)
    # a sharded checkpoint resumes unsharded, and an unsharded one sharded, each to the uninterrupted run
    resumed = _cut_after_first_epoch(fsdp, tmp_path / 'fsdp-cut')
    run_train('--resume', resumed, launcher=ddp_launcher())
    assert_same_run(ddp, resumed)
    resumed = _cut_after_first_epoch(ddp, tmp_path / 'ddp-cut')
    proc = run_train('--resume', resumed, launcher=fsdp_launcher(*policy))
    assert 'resumed from' in proc.stdout + proc.stderr
    assert_same_run(ddp, resumed)


@pytest.mark.parametrize('args, launch, message', [
    (['--model', 'fdl_test_resnetx2'], ['--fsdp_version', '1'],
     "fsdp_version 1: this trainer shards with FSDP2 (fully_shard), which keeps the parameter groups and the models'"
     " own entry points; set fsdp_version: 2"),
    (['--model', 'fdl_test_resnetx2', '--member-strategy', 'vmap'], [],
     "member strategy 'vmap' reads the members' weights stacked, which FSDP splits across processes: use"
     " member_strategy='loop' under FSDP (--member-strategy loop)."),
    (['--model', 'fdl_test_resnetx2'], ['--fsdp_auto_wrap_policy', 'TRANSFORMER_BASED_WRAP',
                                        '--fsdp_transformer_layer_cls_to_wrap', 'Block'],
     "fsdp_transformer_layer_cls_to_wrap names ['Block'], which FDLEnsemble has no module of"),
    (['--model', 'collab_test_resnetx2'], ['--fsdp_auto_wrap_policy', 'TRANSFORMER_BASED_WRAP',
                                           '--fsdp_transformer_layer_cls_to_wrap', 'BasicBlock'],
     'CollaborativeNet shares its low layers between heads through views, so no module inside it can be a shard'
     ' unit of its own'),
    (['--model', 'fdl_test_resnetx2', '--fused-opt'], [],
     "--fused-opt with --opt sgd under FSDP: torch's fused SGD kernel has no rule for sharded parameters (DTensor);"
     ' pass --no-fused-opt, or use --opt adamw.'),
    (['--model', 'fdl_test_resnetx2', '--channels-last'], [],
     'error: --channels-last under FSDP: FSDP2 cannot shard non-contiguous (channels_last) parameters; pass'
     ' --no-channels-last (the default when sharded).'),
    (['--model', 'fdl_test_resnetx2'], ['--fsdp_activation_checkpointing', 'true'],
     'fsdp_activation_checkpointing: Accelerate applies it only to a model it shards itself'),
])
def test_an_fsdp_launch_this_trainer_cannot_run_is_refused_in_one_line(args, launch, message, tmp_path):
    out = tmp_path / 'run'
    proc = run_train(*args, '--epochs', '1', '--output', out, '--cpu', *QUICK, launcher=fsdp_launcher(*launch),
                     check=False, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith('error: ')]
    assert proc.returncode != 0 and lines and all(message in ln for ln in lines), proc.stderr[-3000:]
    assert not out.exists()


def test_one_cpu_process_asked_to_shard_trains_unsharded_and_says_so(tmp_path, monkeypatch, caplog):
    from timm_ensembles import train
    monkeypatch.setenv('ACCELERATE_USE_FSDP', 'true')
    monkeypatch.setenv('FSDP_VERSION', '2')
    out = tmp_path / 'run'
    with caplog.at_level(logging.INFO):
        assert train.main(['--model', 'fdl_test_resnetx2', '--epochs', '1', '--output', str(out), *QUICK]) == 0
    assert 'FSDP on one CPU process: no process group to shard over, the task trains unsharded' in caplog.text
    assert (out / 'model.safetensors').is_file()


def test_a_gpus_defaults_when_sharded():
    # the fused strategies read the members' weights stacked, which sharding splits: a GPU's default (auto) is the
    # loop when sharded; SGD's fused kernel cannot step sharded parameters (Adam's and AdamW's can)
    assert DeviceDefaults.for_device('cuda', 'sgd', bf16=True).member_strategy == 'auto'
    sharded = {opt: DeviceDefaults.for_device('cuda', opt, bf16=True, sharded=True) for opt in ('sgd', 'adamw')}
    assert sharded['sgd'].member_strategy == sharded['adamw'].member_strategy == 'loop'
    assert not sharded['sgd'].fused_opt and sharded['adamw'].fused_opt
    # FSDP2 cannot shard channels_last (non-contiguous) parameters: a GPU's channels_last is off when sharded
    assert DeviceDefaults.for_device('cuda', 'sgd', bf16=True).channels_last
    assert not sharded['sgd'].channels_last and not sharded['adamw'].channels_last
    assert DeviceDefaults.for_device('cuda', 'sgd', bf16=True).fused_opt  # unsharded, SGD's is fused
    assert DeviceDefaults.for_device('cpu', sharded=True).member_strategy == 'loop'


def test_fused_adamw_steps_sharded_parameters_and_fused_sgd_cannot(tmp_path):
    """What the sharded defaults rest on, in two gloo processes: torch's fused AdamW steps DTensor parameters, its
    fused SGD has no sharding rule (a torch that gains one makes SGD's fused default possible again)."""
    script = tmp_path / 'fused.py'
    script.write_text(
        'import torch, torch.distributed as dist\n'
        'from torch.distributed.fsdp import fully_shard\n'
        "dist.init_process_group('gloo')\n"
        'model = fully_shard(torch.nn.Linear(8, 2))\n'
        'for make in (lambda p: torch.optim.AdamW(p, fused=True), lambda p: torch.optim.SGD(p, lr=0.1, fused=True)):\n'
        '    optimizer = make(model.parameters())\n'
        '    model(torch.randn(4, 8)).sum().backward()\n'
        '    try:\n'
        '        optimizer.step()\n'
        '        verdict = "steps"\n'
        '    except NotImplementedError:\n'
        '        verdict = "cannot"\n'
        '    if dist.get_rank() == 0:  # (one writer: two processes interleave their prints in the pipe)\n'
        "        print(type(optimizer).__name__, verdict, flush=True)\n"
        'dist.destroy_process_group()\n')
    torchrun = shutil.which('torchrun', path=str(Path(sys.executable).parent))
    proc = subprocess.run([torchrun, '--nproc_per_node', '2', '--master_port', str(free_port()), str(script)],
                          capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split('\n') == ['AdamW steps', 'SGD cannot', ''], proc.stdout


def test_the_checkpoint_keeps_the_optimizers_own_indexing_under_sharding():
    """The gathered optimizer state (keyed by parameter name, as torch's distributed state dicts give it) becomes
    ``Optimizer.state_dict()``'s own, group for group, and back: what makes checkpoints resume across sharding."""
    from conftest import create_method_model, create_method_task
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from timm_ensembles.train.sharded import _by_index, _by_name, _names
    torch.manual_seed(0)
    task = create_method_task(create_method_model('fdl'))
    task.on_epoch_start(1)
    optimizer = task.create_optimizer('sgd', lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert len(optimizer.param_groups) > 1  # FDL's head has a group of its own
    task(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))['loss'].backward()
    optimizer.step()
    named = get_optimizer_state_dict(task, optimizer, options=StateDictOptions(full_state_dict=True))
    names = _names(task, optimizer)
    assert names == [n for g in named['param_groups'] for n in g['params']]
    _close(optimizer.state_dict(), _by_index(named, names), 'by index')
    _close(named, _by_name(optimizer.state_dict(), names), 'by name')
