"""A GPU's defaults, run on the CPU through train.py: channels_last, the fused optimizer, member strategy auto and
bf16 autocast (what ``DeviceDefaults.for_device('cuda')`` gives a run), and AMP fp16 with its grad scaler, through
training, evaluation, checkpoint, every export, reload and resume.

The runs are in-process (``train.main``) with ``train.device_defaults`` answering for a CUDA device with bf16, so the
flags are left unset and resolved as on a GPU. Accelerate runs fp16 on a CPU in fp32 (no autocast, no scaler):
``CpuFp16Accelerator`` gives it float16 autocast and ``torch.amp.GradScaler('cpu')`` as Accelerate does on a GPU.
Image sizes: the fp16 runs take 8 px images, as CPU fp16 convolutions' backward pass is ~50x slower than fp32's;
the bf16 runs 32 px, as oneDNN's bf16 backward pass of a 3x3 stride-2 convolution on a 1x1 input (test_resnet's
layer4 at 16 px) gives NaN weight gradients at random on this CPU (torch 2.14.1; fp32 is unaffected).
"""
import argparse
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import timm_ensembles  # noqa: F401  (registers the models for the reloads)
from timm_ensembles.files.model_folder import export_folder
from timm_ensembles.train import checkpoint as _checkpoint
from timm_ensembles.train import loop, trainer
from timm_ensembles.train.device import FUSED_OPTS, CpuFp16Accelerator, DeviceDefaults, DeviceSettings, device_defaults

# the GPU's pinned memory, asked for on a machine without one
pytestmark = [pytest.mark.usefixtures('one_torch_thread'),
              pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")]

TINY = ['--train-subset', '32', '--val-subset', '16', '--batch-size', '8', '--workers', '0', '--no-progress',
        '--log-interval', '100']
IMG_SIZE = dict(bf16=32, fp16=8)


def test_defaults_by_device_kind_and_flags_win():
    gpu = DeviceDefaults.for_device('cuda', 'sgd', bf16=True)
    assert (gpu.member_strategy, gpu.channels_last, gpu.fused_opt, gpu.mixed_precision, gpu.pin_memory) == \
        ('auto', True, True, 'bf16', True)
    # a GPU without bf16 leaves the precision to Accelerate's config; optimizers without a fused kernel stay unfused
    old = DeviceDefaults.for_device('cuda', 'lamb', bf16=False)
    assert (old.mixed_precision, old.fused_opt, old.channels_last) == (None, False, True)
    assert all(DeviceDefaults.for_device('cuda', opt, bf16=True).fused_opt for opt in ('AdamW', 'nesterov'))
    # fused SGD under fp16's grad scaler starts from uninitialised momentum after a skipped first step: not by default
    fp16 = {opt: DeviceDefaults.for_device('cuda', opt, bf16=True, mixed_precision='fp16') for opt in FUSED_OPTS}
    assert {opt: d.fused_opt for opt, d in fp16.items()} == dict(sgd=False, nesterov=False, momentum=False,
                                                                 adam=True, adamw=True)
    assert fp16['sgd'].mixed_precision == 'bf16'  # the default, which the given fp16 overrides in resolve()
    cpu = DeviceDefaults.for_device('cpu', 'sgd', bf16=True)
    assert (cpu.member_strategy, cpu.channels_last, cpu.fused_opt, cpu.mixed_precision, cpu.pin_memory) == \
        ('loop', False, False, None, False)
    args = argparse.Namespace(member_strategy='grouped', channels_last=False, fused_opt=None, mixed_precision=None)
    assert vars(gpu.resolve(args)) == dict(member_strategy='grouped', channels_last=False, fused_opt=True,
                                           mixed_precision='bf16')


@pytest.mark.parametrize('name', FUSED_OPTS)
def test_the_fused_optimizers_exist_on_the_cpu(name):
    """The GPU default --fused-opt, on the optimizers it names, as the task builds them."""
    task = timm_ensembles.create_task(timm.create_model('test_resnet', num_classes=3))
    optimizer = task.create_optimizer(opt=name, lr=0.1, weight_decay=0, fused=True)
    assert optimizer.defaults['fused'] is True
    task(torch.randn(2, 3, 16, 16), torch.tensor([0, 2]))['loss'].backward()
    optimizer.step()


def test_export_of_a_channels_last_model_is_contiguous_and_leaves_the_model_as_it_was(tmp_path):
    model = timm.create_model('ens', base_model='test_resnet', num_members=2, num_classes=3)
    model.to(memory_format=torch.channels_last)
    conv = model.members[0].conv1[0].weight
    assert not conv.is_contiguous()
    export_folder(model, tmp_path)
    assert model.members[0].conv1[0].weight is conv and conv.is_contiguous(memory_format=torch.channels_last)
    saved = load_file(tmp_path / 'model.safetensors')
    assert all(t.is_contiguous() for t in saved.values())
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


@pytest.fixture
def fresh_accelerate():
    """Accelerate's process-wide state (its mixed precision is fixed once set) reset around each test, as
    Accelerate's own test cases do."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _is_channels_last(model: torch.nn.Module) -> bool:
    # (a 1x1 convolution's weight is contiguous in both formats)
    weights = [p for p in model.parameters() if p.ndim == 4]
    return all(p.is_contiguous(memory_format=torch.channels_last) for p in weights) and \
        any(not p.is_contiguous() for p in weights)


def _gpu_run(monkeypatch, argv: list[str]) -> dict:
    """``train.main(argv)`` with a CUDA device's defaults on the CPU; returns the live model of the final export (and
    of every other export) as train.py held it after exporting."""
    monkeypatch.setattr(trainer, 'device_defaults', lambda device_type, opt, mixed_precision, sharded=False:
                        DeviceDefaults.for_device('cuda', opt, bf16=True, mixed_precision=mixed_precision,
                                                  sharded=sharded))
    monkeypatch.setattr(trainer, 'Accelerator', CpuFp16Accelerator)
    exported = {}

    def capture(model, folder, **kwargs):
        out = export_folder(model, folder, **kwargs)
        # checkpoints/epoch-E is exported to a temporary folder (<prefix>epoch-E.new), then renamed
        name = Path(folder).name.removeprefix(_checkpoint.TEMPORARY_PREFIX).removesuffix('.new')
        exported[name] = (model, _is_channels_last(model))
        return out

    monkeypatch.setattr(loop, 'export_folder', capture)
    monkeypatch.setattr(_checkpoint, 'export_folder', capture)  # export_new_folder's
    assert trainer.main(argv) == 0
    return exported


def test_fused_sgd_under_fp16_is_refused_and_the_device_defaults_read_accelerates_precision(
        tmp_path, monkeypatch, fresh_accelerate):
    with pytest.raises(SystemExit, match=r"^error: --fused-opt with --opt sgd under fp16: torch's fused SGD .* pass"
                                         r' --no-fused-opt, or use bf16 or --opt adamw\.$'):
        _gpu_run(monkeypatch, ['--model', 'test_resnet', '--mixed-precision', 'fp16', '--fused-opt', *TINY,
                               '--output', str(tmp_path / 'run')])
    assert not (tmp_path / 'run').exists()
    # `accelerate launch --mixed_precision fp16` (or its config) says fp16 through the environment
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'fp16')
    assert (device_defaults('cuda', 'sgd').fused_opt, device_defaults('cuda', 'adamw').fused_opt) == (False, True)
    assert device_defaults('cuda', 'sgd', mixed_precision='bf16').fused_opt is True  # a flag wins over the config
    monkeypatch.delenv('ACCELERATE_MIXED_PRECISION')
    assert device_defaults('cuda', 'sgd').fused_opt is True


def _choices(model: torch.nn.Module):
    return model.member_strategy_info.get('choices') if hasattr(model, 'member_strategy_info') else None


SNAPSHOTS = ['--snapshot-subset', '8', '--snapshot-weights']


@pytest.mark.parametrize('model,precision,extra', [
    ('ens_test_resnetx2', 'bf16', SNAPSHOTS),
    ('test_resnet', 'bf16', SNAPSHOTS),
    ('collab_test_resnetx2', 'bf16', []),
    ('ens_test_resnetx2', 'fp16', []),  # SGD: not fused under fp16
    ('test_resnet', 'fp16', ['--opt', 'adamw']),  # fused AdamW with the grad scaler
])
def test_gpu_defaults_train_checkpoint_export_reload_and_resume(model, precision, extra, tmp_path, monkeypatch,
                                                                fresh_accelerate):
    full = tmp_path / 'full'
    argv = ['--model', model, '--epochs', '2', '--model-ema', '--checkpoint-hist', '1', *TINY, *extra,
            '--img-size', str(IMG_SIZE[precision])]
    if precision != 'bf16':  # bf16 is the defaults' own
        argv += ['--mixed-precision', precision]
    exported = _gpu_run(monkeypatch, [*argv, '--output', str(full)])
    args = yaml.safe_load((full / 'args.yaml').read_text())
    fused = precision == 'bf16' or args['opt'] == 'adamw'
    assert (args['member_strategy'], args['channels_last'], args['fused_opt'], args['mixed_precision']) == \
        ('auto', True, fused, precision)

    # trained and evaluated every epoch, in the precision asked for; every export written from a channels_last
    # model that stayed one
    metrics = [json.loads(line) for line in (full / 'metrics.jsonl').read_text().splitlines()]
    assert [m['epoch'] for m in metrics] == [0, 1] and all(m['val']['num_samples'] == 16 for m in metrics)
    names = {'full', 'best', 'ema', 'epoch-0', 'epoch-1'} & set(exported)
    assert {'full', 'best', 'ema'} < names, sorted(exported)  # and the --checkpoint-hist epoch
    assert all(exported[n][1] for n in names), {n: exported[n][1] for n in names}
    assert ('exported' in exported) == model.startswith('collab')  # collab's extra export, its plain model
    live = exported['full'][0]
    choices = _choices(live)
    state = torch.load(full / 'checkpoint.pt', weights_only=True)
    if precision == 'fp16':
        assert state['scaler']['scale'] > 0  # the grad scaler's state is checkpointed
    saved = load_file(full / 'model.safetensors')
    assert saved.keys() == live.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in live.state_dict().items())
    if extra == SNAPSHOTS:  # --snapshot-weights: the last epoch's member weights are the exported ones
        snap = load_file(full / 'snapshots' / 'epoch_001.weights.safetensors')
        members = getattr(live, 'members', [live])
        assert all(torch.equal(snap[f'member{m}.{k}'], v) for m, member in enumerate(members)
                   for k, v in member.named_parameters())

    # reloaded as a timm user would: the live model's weights; its outputs in the live model's memory format (and
    # member strategy) are the live model's, bitwise, and in timm's default format equal to rounding
    reloaded = timm.create_model(f'local-dir:{full}', pretrained=True).eval()
    assert not _is_channels_last(reloaded)
    x = torch.randn(4, 3, IMG_SIZE[precision], IMG_SIZE[precision])
    live.eval()
    if hasattr(live, 'set_member_strategy'):
        live.set_member_strategy('loop')
    with torch.no_grad():
        expected = live(x)
        torch.testing.assert_close(reloaded(x), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(reloaded.to(memory_format=torch.channels_last)(x), expected)

    # resumed after epoch 0 (its checkpoint, as a kill between the epochs leaves it): the uninterrupted run's weights
    resumed = tmp_path / 'resumed'
    shutil.copytree(full, resumed)
    shutil.move(resumed / 'checkpoint-prev.pt', resumed / 'checkpoint.pt')
    for name in ('model.safetensors', 'config.json', 'results.json'):
        (resumed / name).unlink()
    exported_again = _gpu_run(monkeypatch, ['--resume', str(resumed)])
    assert exported_again['resumed'][1]
    again = load_file(resumed / 'model.safetensors')
    assert again.keys() == saved.keys()
    if choices is None or _choices(exported_again['resumed'][0]) == choices:
        assert all(torch.equal(again[k], v) for k, v in saved.items())
    else:
        # auto timed the strategies again and chose another for some kind of call: the same function, summed in
        # another order (about 1e-6 relative in fp32, more under autocast)
        for k, v in saved.items():
            torch.testing.assert_close(again[k], v, rtol=1e-2, atol=1e-3)
    final = torch.load(resumed / 'checkpoint.pt', weights_only=True)
    assert final['epoch'] == 2 and final['num_updates'] == state['num_updates']
    if precision == 'fp16':
        assert final['scaler'] == state['scaler']  # the scale and its growth count carried across the resume


def test_settings_take_each_flag_given_else_its_default_and_leave_the_flags_as_given():
    gpu = DeviceDefaults.for_device('cuda', 'sgd', bf16=True)
    given = dict(member_strategy='grouped', channels_last=False, fused_opt=None, mixed_precision=None)
    args = argparse.Namespace(**given)
    assert gpu.settings(args) == DeviceSettings(member_strategy='grouped', channels_last=False, fused_opt=True,
                                                mixed_precision='bf16', pin_memory=True)
    assert vars(gpu.resolve(args))['fused_opt'] is True and vars(args) == given  # resolve gives a copy
