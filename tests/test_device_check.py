"""benchmarks/device_check.py end to end on the CPU (--cpu: a GPU's defaults, fp16 through a CPU grad scaler)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_runs_every_family_in_bf16_and_fp16(tmp_path):
    out = tmp_path / 'check.json'
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'device_check.py'), '--cpu', '--out', str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'all checks passed' in proc.stdout and '| members | precision | loop |' in proc.stdout
    report = json.loads(out.read_text())
    assert report['ok'] and report['defaults'] == dict(device_type='cuda', member_strategy='auto', channels_last=True,
                                                       fused_opt=True, mixed_precision='bf16', pin_memory=True)
    runs = {(r['family'], r['precision']): r for r in report['runs']}
    assert set(runs) == {(f, p) for f in ('fdl', 'ens', 'collab', 'ban', 'meal') for p in ('bf16', 'fp16')}
    for (_, precision), run in runs.items():
        assert run['ok'] and 'error' not in run, run
        # SGD is not fused under fp16 (its fused kernel and fp16's grad scaler do not mix)
        assert run['flags'] == dict(member_strategy='auto', channels_last=True, fused_opt=precision == 'bf16',
                                    mixed_precision=precision)
        # every export of the model written from it in channels_last (collab's 'exported' is a plain model it builds)
        assert {'best', 'ema'} <= set(run['exports']) and all(v for k, v in run['exports'].items() if k != 'exported')
        assert run['reload']['weights_equal'] and run['reload']['same_format_max_diff'] == 0
        assert run['resume']['exact'] and run['resume']['epoch_moved'] > 0  # a CPU is deterministic
        assert (run['scaler'] is not None) == (precision == 'fp16') and run['resume']['scaler_equal']
    # Accelerate shards on GPUs only: the FSDP runs are skipped here, saying where the CPU path is tested
    assert [(r['family'], r['ok']) for r in report['fsdp']] == [('fdl', None), ('collab', None), ('meal', None)]
    assert all('tests/test_train_fsdp.py' in r['skipped'] for r in report['fsdp'])
    # auto's timing of each strategy, by precision; vmap is left out under autocast
    table = {r['precision']: r for r in report['strategies']}
    assert set(table) == {'fp32', 'bf16', 'fp16'}
    assert 'vmap' in table['fp32']['median_ms'] and 'vmap' not in table['bf16']['median_ms']
    assert {'loop', 'grouped'} <= set(table['bf16']['median_ms']) and table['bf16']['choice'] in table['bf16'][
        'median_ms']
