"""The device check: every family trained with the device's defaults, resumed, reloaded, in bf16 and fp16, and the
member strategies timed, in one call that writes one JSON.

Run it whenever a GPU is at hand (it takes a minute or two on one; nothing is downloaded)::

    python benchmarks/device_check.py --out device_check.json
    python benchmarks/device_check.py --cpu --out device_check_cpu.json     # anywhere: a GPU's defaults on the CPU

For each family (``--families``: fdl, ens, collab, ban, meal; ``<method>_<base>x2`` ensembles, ``<method>_<base>``
students taught by the ens run's folder) and each precision (bf16, fp16), on ``--train-subset`` images of the
embedded digits, it runs ``timm_ensembles.train`` in this process as a user would, leaving every device-dependent
flag at its default (member strategy, channels_last, fused optimizer, pinned memory; the precision is named):

1. **train** two epochs: evaluation, checkpoint, best/, --checkpoint-hist and --model-ema exports every epoch;
2. **reload** the final export with ``timm.create_model('local-dir:...', pretrained=True)``: its weights must be the
   live model's, bitwise, and its logits on a fixed batch the live model's (in the live model's memory format and
   with its members run by the loop: bitwise on a CPU, to kernel rounding on a GPU; in timm's default format within
   TF32's rounding);
3. **resume** a copy of the run from its epoch-0 checkpoint (as a kill between the epochs leaves it) for the second
   epoch: the final weights must be the uninterrupted run's. Bitwise where the kernels are deterministic (a CPU) and
   ``auto`` chose the same strategies again; otherwise the distance to the uninterrupted weights must be under 5 %
   of the distance the second epoch moved them (a broken resume, another data order, a lost optimizer state or
   learning rate, moves them about as far as the epoch does).

Then **FSDP**: each of fdl, collab and meal (``--fsdp-families``) trained as its bf16 run above, but under
Accelerate's FSDP2 (``accelerate launch --use_fsdp --fsdp_version 2 --num_processes 1``: Accelerate's preparation of
the task the trainer sharded, its optimizer mapping and mixed-precision policy, the gathered checkpoints and exports);
its final weights must be the unsharded run's within the resume tolerance below, and its epoch-0 checkpoint must
resume unsharded to its own final weights. One process: the data and BatchNorm statistics are the unsharded run's
(two processes' sharding is tested against DDP on the CPU, tests/test_train_fsdp.py). Skipped with ``--cpu``:
Accelerate shards on GPUs only.

Then the member-strategy table: ``EnsembleModel.set_member_strategy('auto')`` (``models.strategies.AutoStrategy``) times
every strategy that accepts ``ens_<base>xN`` on a training batch, in fp32, bf16 and fp16 autocast, and the table
prints its median times and its choice.

``--cpu`` runs on the CPU with the defaults a CUDA GPU with bf16 gets (``DeviceDefaults.for_device('cuda')``), and
fp16 through ``CpuFp16Accelerator`` (Accelerate runs fp16 on a CPU in fp32; this gives it float16 autocast and
torch's CPU GradScaler as on a GPU), at tiny sizes (fp16 runs at 8 px: CPU fp16 backward passes are ~50x slower
than fp32). The suite runs it so (tests/test_device_check.py). Without a GPU and without ``--cpu`` it refuses.

The JSON holds the machine, the versions, the resolved defaults, every run (its flags as args.yaml records them, the
validation accuracy, seconds per epoch, auto's choices, the reload and resume comparisons, the grad scaler's state,
or the error it stopped with), the strategy table, and ``ok``; the exit status is 1 when any check failed.
"""
import argparse
import contextlib
import dataclasses
import json
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock

import accelerate
import timm
import torch
import yaml
from _common import NUM_CLASSES, cpu_name
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import timm_ensembles
from timm_ensembles.files.run_folder import RunFolder
from timm_ensembles.models import registry as _registry
from timm_ensembles.train import checkpoint as _checkpoint
from timm_ensembles.train import loop, trainer
from timm_ensembles.train.device import CpuFp16Accelerator, DeviceDefaults, device_defaults

FAMILIES = ('fdl', 'ens', 'collab', 'ban', 'meal')
PRECISIONS = ('bf16', 'fp16')
FSDP_FAMILIES = ('fdl', 'collab', 'meal')
TABLE_PRECISIONS = ('fp32', 'bf16', 'fp16')
# the second epoch of a resumed run may differ from the uninterrupted one's by this share of what the epoch moved the
# weights, where kernels are not deterministic or auto chose another strategy
RESUME_TOLERANCE = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True, help='the JSON report')
    parser.add_argument('--cpu', action='store_true',
                        help="on the CPU, with a CUDA GPU's defaults and fp16 as a GPU runs it, at tiny sizes")
    parser.add_argument('--families', nargs='+', default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument('--precisions', nargs='+', default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument('--fsdp-families', nargs='*', default=list(FSDP_FAMILIES), choices=FSDP_FAMILIES,
                        help='the families also trained under FSDP2 (GPU only)')
    parser.add_argument('--base', default='test_resnet', help='the timm base model of every family')
    parser.add_argument('--members', type=int, nargs='+', default=None,
                        help='ensemble sizes of the strategy table (default: 2 4; 2 with --cpu)')
    parser.add_argument('--train-subset', type=int, default=None, help='training images (default 512; 16 with --cpu)')
    parser.add_argument('--val-subset', type=int, default=None, help='validation images (default 256; 16 with --cpu)')
    parser.add_argument('--batch-size', type=int, default=None, help='default 64; 8 with --cpu')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--output-dir', default=None, help='where the runs are written (default: a temporary folder,'
                        ' removed afterwards)')
    parser.add_argument('--verbose', action='store_true', help="show the runs' own log lines")
    args = parser.parse_args(argv)
    tiny = args.cpu
    args.members = args.members or ([2] if tiny else [2, 4])
    args.train_subset = args.train_subset or (16 if tiny else 512)
    args.val_subset = args.val_subset or (16 if tiny else 256)
    args.batch_size = args.batch_size or (8 if tiny else 64)
    if not args.cpu and not torch.cuda.is_available():
        parser.error('no CUDA GPU here: pass --cpu to run a GPU\'s defaults on the CPU')
    if any(n < 2 for n in args.members):
        parser.error('--members: an ensemble has at least 2 members')
    if {'ban', 'meal'} & set(args.families) and 'ens' not in args.families:
        parser.error('--families: ban and meal learn from the ens run, so ens must be among them')
    return args


def _model_name(family: str, base: str) -> str:
    return f'{family}_{base}x2' if family in _registry.list_ensemble_methods() else f'{family}_{base}'


def _img_size(args: argparse.Namespace, precision: str) -> int:
    # CPU fp16 convolutions' backward pass is ~50x slower than fp32's
    return min(args.img_size, 8) if args.cpu and precision == 'fp16' else args.img_size


@contextlib.contextmanager
def _device_patches(args: argparse.Namespace, captured: dict):
    """What makes a run of train.py here a GPU run's stand-in (with --cpu) and lets the check see the live model of
    every export (the model as train.py holds it, after the export wrote it)."""
    export_folder = _checkpoint.export_folder

    def capture(model, folder, **kwargs):
        out = export_folder(model, folder, **kwargs)
        captured[Path(folder).name.removeprefix('.').removesuffix('.tmp')] = model
        return out

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(loop, 'export_folder', capture))  # the final export's
        stack.enter_context(mock.patch.object(_checkpoint, 'export_folder', capture))  # export_new_folder's
        if args.cpu:
            stack.enter_context(mock.patch.object(
                trainer, 'device_defaults', lambda device_type, opt, precision, sharded=False:
                DeviceDefaults.for_device('cuda', opt, True, precision, sharded=sharded)))
            stack.enter_context(mock.patch.object(trainer, 'Accelerator', CpuFp16Accelerator))
        yield


def _train(args: argparse.Namespace, argv: list[str]) -> tuple[dict, float]:
    """One ``train.main`` run in this process; returns the live models by export folder name and the seconds."""
    # Accelerate fixes the mixed precision of its process-wide state once set: each run starts afresh
    AcceleratorState._reset_state(True)
    captured = {}
    start = time.perf_counter()
    with _device_patches(args, captured):
        code = trainer.main(argv)
    if code:
        raise RuntimeError(f'train.main returned {code}')
    return captured, time.perf_counter() - start


def _is_channels_last(model: torch.nn.Module) -> bool:
    weights = [p for p in model.parameters() if p.ndim == 4]
    return all(p.is_contiguous(memory_format=torch.channels_last) for p in weights) and \
        any(not p.is_contiguous() for p in weights)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _choices(model: torch.nn.Module) -> dict | None:
    info = getattr(model, 'member_strategy_info', None)
    return None if info is None else info.get('choices', {info.get('strategy'): info.get('strategy')})


def _reload_check(folder: Path, live: torch.nn.Module, img_size: int, device: torch.device) -> dict:
    """The export reloaded as timm users load it, against the live model it was written from."""
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).to(device).eval()
    live_state, state = live.state_dict(), reloaded.state_dict()
    weights_equal = live_state.keys() == state.keys() and all(torch.equal(state[k], v) for k, v in live_state.items())
    x = torch.randn(4, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(device)
    live.eval()
    if hasattr(live, 'set_member_strategy'):
        live.set_member_strategy('loop')  # the reloaded model's (a new model runs its members in a loop)
    with torch.no_grad():
        expected = live(x)
        default_format = _max_diff(reloaded(x), expected)
        same_format = _max_diff(reloaded.to(memory_format=torch.channels_last)(x) if _is_channels_last(live)
                                else reloaded(x), expected)
    scale = float(expected.abs().max())
    # TF32 convolutions (cuDNN's default) round to ~1e-3 relative; another memory format picks other kernels
    tolerance = 1e-5 * max(scale, 1) if device.type == 'cpu' else 1e-2 * max(scale, 1)
    return dict(weights_equal=weights_equal, logits_max_abs=scale, same_format_max_diff=same_format,
                default_format_max_diff=default_format, live_channels_last=_is_channels_last(live),
                ok=weights_equal and same_format <= tolerance and default_format <= tolerance)


def _task_prefix(task_state: dict, key: str) -> str:
    """Where an exported weight sits in the task's state dict (``model.`` for most tasks, ``model.student.``...)."""
    found = [k[:-len(key)] for k in task_state if k == key or k.endswith(f'.{key}')]
    return min(found, key=len) if found else ''


def _resume_check(args: argparse.Namespace, full: Path, choices: dict | None, device: torch.device) -> dict:
    """A copy of the run resumed from its epoch-0 checkpoint, against the uninterrupted run."""
    resumed = full.with_name(full.name + '-resumed')
    shutil.copytree(full, resumed)
    shutil.move(resumed / 'checkpoint-prev.pt', resumed / 'checkpoint.pt')
    for name in ('model.safetensors', 'config.json', 'results.json'):
        (resumed / name).unlink()
    captured, seconds = _train(args, ['--resume', str(resumed)])
    final, again = load_file(full / 'model.safetensors'), load_file(resumed / 'model.safetensors')
    # the weights after epoch 0, from the epoch-0 checkpoint (the task's state: the model under 'model.')
    before = torch.load(full / RunFolder.PREVIOUS_CHECKPOINT, map_location='cpu', weights_only=True)['task']
    keys = [k for k in final if final[k].is_floating_point()]
    prefix = _task_prefix(before, keys[0])
    moved = sum(float((final[k].double() - before[prefix + k].double()).norm() ** 2) for k in keys) ** 0.5
    distance = sum(float((again[k].double() - final[k].double()).norm() ** 2) for k in keys) ** 0.5
    exact = again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)
    same_choices = _choices(captured[resumed.name]) == choices
    end, end_again = (torch.load(p / 'checkpoint.pt', map_location='cpu', weights_only=True) for p in (full, resumed))
    scaler_equal = end.get('scaler') == end_again.get('scaler')
    deterministic = device.type == 'cpu' and same_choices
    ok = (exact if deterministic else distance <= RESUME_TOLERANCE * moved) and scaler_equal and \
        end_again['num_updates'] == end['num_updates']
    return dict(seconds=seconds, exact=exact, distance=distance, epoch_moved=moved,
                distance_share=distance / moved if moved else None, same_auto_choices=same_choices,
                scaler_equal=scaler_equal, expected_exact=deterministic, ok=ok)


def _family_argv(args: argparse.Namespace, family: str, precision: str, img_size: int, output: Path,
                 teacher: Path | None) -> list[str]:
    """The flags of a family's run: two epochs with the device's defaults, --model-ema and --checkpoint-hist."""
    model = _model_name(family, args.base)
    argv = ['--model', model, '--mixed-precision', precision, '--epochs', '2', '--train-subset', str(args.train_subset),
            '--val-subset', str(args.val_subset), '--batch-size', str(args.batch_size), '--img-size', str(img_size),
            '--workers', '0', '--no-progress', '--log-interval', '1000', '--model-ema', '--checkpoint-hist', '1',
            '--output', str(output)]
    if family in _registry._student_methods:
        argv += ['--teacher', str(teacher)]
    return argv + (['--cpu'] if args.cpu else [])


def _weights_distance(a: dict, b: dict) -> float:
    keys = [k for k in a if a[k].is_floating_point()]
    return sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in keys) ** 0.5


def _fsdp_family(args: argparse.Namespace, family: str, root: Path, teacher: Path | None, device: torch.device) -> dict:
    """One family's bf16 run again under Accelerate's FSDP2 (one process), against the unsharded run."""
    model, precision = _model_name(family, args.base), 'bf16'
    record = dict(family=family, model=model, precision=precision, ok=False)
    unsharded, full = root / f'{family}-{precision}', root / f'{family}-{precision}-fsdp'
    if not (unsharded / 'model.safetensors').is_file():
        record['error'] = 'no unsharded run to compare with (it failed)'
        return record
    accelerate_cli = shutil.which('accelerate', path=str(Path(sys.executable).parent)) or 'accelerate'
    cmd = [accelerate_cli, 'launch', '--use_fsdp', '--fsdp_version', '2', '--num_processes', '1', '--num_machines',
           '1', '--mixed_precision', precision, '--dynamo_backend', 'no', '-m', 'timm_ensembles.train',
           *_family_argv(args, family, precision, _img_size(args, precision), full, teacher)]
    try:
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        record['seconds'] = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f'the FSDP run failed ({proc.returncode}): {proc.stderr[-2000:]}')
        log = proc.stdout + proc.stderr
        sharded = 'FSDP2: the task sharded' in log and 'DistributedType.FSDP' in log
        final, reference = load_file(full / 'model.safetensors'), load_file(unsharded / 'model.safetensors')
        before = torch.load(unsharded / RunFolder.PREVIOUS_CHECKPOINT, map_location='cpu', weights_only=True)['task']
        prefix = _task_prefix(before, next(iter(reference)))
        moved = _weights_distance(reference, {k: before[prefix + k] for k in reference})
        distance = _weights_distance(final, reference) if final.keys() == reference.keys() else float('inf')
        record.update(sharded_by_accelerate=sharded, distance=distance, epoch_moved=moved,
                      distance_share=distance / moved if moved else None,
                      resume=_resume_check(args, full, None, device))
        record['ok'] = sharded and distance <= RESUME_TOLERANCE * moved and record['resume']['ok']
    except (Exception, SystemExit) as e:  # noqa: BLE001  (recorded; the other families still run)
        record['error'] = f'{type(e).__name__}: {e}'
        record['traceback'] = traceback.format_exc(limit=8)
    return record


def _run_family(args: argparse.Namespace, family: str, precision: str, root: Path, teacher: Path | None,
                device: torch.device) -> dict:
    model = _model_name(family, args.base)
    img_size = _img_size(args, precision)
    record = dict(family=family, model=model, precision=precision, img_size=img_size, ok=False)
    full = root / f'{family}-{precision}'
    if family in _registry._student_methods and teacher is None:
        record['error'] = 'no teacher: the ens run failed'
        return record
    argv = _family_argv(args, family, precision, img_size, full, teacher)
    try:
        captured, seconds = _train(args, argv)
        live = captured[full.name]
        resolved = yaml.safe_load((full / 'args.yaml').read_text())
        metrics = [json.loads(line) for line in (full / 'metrics.jsonl').read_text().splitlines()]
        checkpoint = torch.load(full / 'checkpoint.pt', map_location='cpu', weights_only=True)
        record.update(
            seconds=seconds, epoch_seconds=[m['seconds'] for m in metrics],
            val_acc=[m['val']['acc'] for m in metrics],
            flags={k: resolved[k] for k in ('member_strategy', 'channels_last', 'fused_opt', 'mixed_precision')},
            auto_choices=_choices(live),
            exports={name: _is_channels_last(m) for name, m in captured.items()},
            scaler=checkpoint.get('scaler'))
        record['reload'] = _reload_check(full, live, img_size, device)
        record['resume'] = _resume_check(args, full, record['auto_choices'], device)
        finite = all(torch.isfinite(torch.tensor(m['val']['loss'])) for m in metrics)
        record['ok'] = finite and record['reload']['ok'] and record['resume']['ok'] and \
            (precision != 'fp16' or record['scaler'] is not None)
    except (Exception, SystemExit) as e:  # noqa: BLE001  (recorded; the other families still run)
        record['error'] = f'{type(e).__name__}: {e}'
        record['traceback'] = traceback.format_exc(limit=8)
    return record


def _strategy_table(args: argparse.Namespace, device: torch.device, defaults: DeviceDefaults) -> list[dict]:
    """auto's timings of every strategy that accepts ``ens_<base>xN``, on a training batch, per precision."""
    rows = []
    for n in args.members:
        for precision in TABLE_PRECISIONS:
            img_size = _img_size(args, precision)
            torch.manual_seed(0)
            model = timm.create_model('ens', base_model=args.base, num_members=n, num_classes=NUM_CLASSES)
            model = model.to(device).train()
            if defaults.channels_last:
                model.to(memory_format=torch.channels_last)
            x = torch.randn(args.batch_size, 3, img_size, img_size, device=device)
            dtype = dict(bf16=torch.bfloat16, fp16=torch.float16).get(precision)
            row = dict(members=n, precision=precision, img_size=img_size, batch_size=args.batch_size)
            try:
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    model.set_member_strategy('auto', example_input=x)
                info = model.member_strategy_info
                row.update(choice=model.member_strategy, refused=info['refused'],
                           median_ms={k: v * 1e3 for t in info['timings'].values() for k, v in t.items()})
            except Exception as e:  # noqa: BLE001
                row['error'] = f'{type(e).__name__}: {e}'
            rows.append(row)
    return rows


def _print_table(rows: list[dict]) -> None:
    names = list(dict.fromkeys(k for r in rows for k in r.get('median_ms', {})))
    print('\n### Member strategies: auto\'s median time of a training pass (forward and backward), ms\n')
    print('| members | precision | ' + ' | '.join(names) + ' | auto chose |')
    print('|---:|---|' + '---:|' * len(names) + '---|')
    for r in rows:
        cells = [f"{r['median_ms'][k]:.1f}" if k in r.get('median_ms', {}) else '-' for k in names]
        print(f"| {r['members']} | {r['precision']} | " + ' | '.join(cells) + f" | {r.get('choice', r.get('error'))} |")
    refused = {k: v for r in rows for k, v in r.get('refused', {}).items()}
    for name, why in refused.items():
        print(f'- {name} refused (in some row): {why}')


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    if not args.verbose:  # the runs' epochs and loads; the report holds what they found
        logging.basicConfig(level=logging.INFO, format='%(message)s')
        for name in ('timm_ensembles', 'timm'):
            logging.getLogger(name).setLevel(logging.WARNING)
    device = torch.device('cpu' if args.cpu else 'cuda')
    defaults = DeviceDefaults.for_device('cuda', 'sgd', bf16=True) if args.cpu else device_defaults('cuda', 'sgd')
    report = dict(
        command=' '.join(['python', *sys.argv]) if argv is None else f'device_check.main({argv!r})',
        machine=dict(platform=platform.platform(), cpu=cpu_name(), torch_threads=torch.get_num_threads()),
        device=dict(type=device.type, name=torch.cuda.get_device_name() if device.type == 'cuda' else cpu_name(),
                    bf16=device.type == 'cpu' or torch.cuda.is_bf16_supported(),
                    capability=list(torch.cuda.get_device_capability()) if device.type == 'cuda' else None),
        versions=dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                      cudnn=torch.backends.cudnn.version() if device.type == 'cuda' else None, timm=timm.__version__,
                      accelerate=accelerate.__version__, timm_ensembles=timm_ensembles.__version__),
        defaults=dataclasses.asdict(defaults),
        settings=dict(base=args.base, train_subset=args.train_subset, val_subset=args.val_subset,
                      batch_size=args.batch_size, img_size=args.img_size, stand_in=args.cpu),
        runs=[])
    print(f"device check on {report['device']['name']} ({device.type}{', a GPU stand-in' if args.cpu else ''}):"
          f" defaults {report['defaults']}", flush=True)
    root = Path(args.output_dir or tempfile.mkdtemp(prefix='device-check-'))
    root.mkdir(parents=True, exist_ok=True)
    try:
        teachers = {}
        # ens first: ban and meal learn from its run
        families = sorted(args.families, key=lambda f: f != 'ens')
        for family in families:
            for precision in args.precisions:
                if precision == 'bf16' and not report['device']['bf16']:
                    report['runs'].append(dict(family=family, precision=precision, ok=None,
                                               skipped='the GPU does not compute bf16 natively'))
                    continue
                record = _run_family(args, family, precision, root, teachers.get(precision), device)
                if family == 'ens' and record['ok']:
                    teachers[precision] = root / f'ens-{precision}'
                report['runs'].append(record)
                status = 'ok' if record['ok'] else f"FAILED {record.get('error', '')}"
                print(f"{record['model']} {precision}: {status} ({record.get('seconds', 0):.1f} s; val acc"
                      f" {record.get('val_acc')}; reload {record.get('reload', {}).get('same_format_max_diff')};"
                      f" resume exact {record.get('resume', {}).get('exact')})", flush=True)
        report['fsdp'] = [dict(family=f, ok=None, skipped='Accelerate shards on GPUs only (the CPU path:'
                               ' tests/test_train_fsdp.py)') for f in args.fsdp_families] if args.cpu else \
            [_fsdp_family(args, f, root, teachers.get('bf16'), device) for f in args.fsdp_families]
        for record in report['fsdp']:
            status = 'ok' if record['ok'] else record.get('skipped') or f"FAILED {record.get('error', '')}"
            print(f"{record['family']} under FSDP2: {status} (weights off the unsharded run's by"
                  f" {record.get('distance_share')} of what the epoch moved them)", flush=True)
        report['strategies'] = _strategy_table(args, device, defaults)
        _print_table(report['strategies'])
    finally:
        if args.output_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    report['ok'] = all(r['ok'] is not False for r in report['runs'] + report['fsdp']) and \
        not any('error' in r for r in report['strategies'])
    report['seconds'] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"\n{'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'} in {report['seconds']:.0f} s;"
          f' report: {args.out}')
    return 0 if report['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
