"""The study runner (studies/study.py): runs survive interruption, finished runs are skipped, tables come from
the run folders."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / 'studies' / 'study.py'


def _study(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    proc = subprocess.run([sys.executable, str(STUDY), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=900, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f'study.py failed:\n{proc.stdout}\n{proc.stderr}')
    return proc


@pytest.mark.slow
def test_study_resumes_skips_and_tabulates(tmp_path):
    common = ('--seeds', '0', '--out', tmp_path, '--archive', tmp_path / 'archive')
    first = _study('run', 'smoke', *common)
    out = tmp_path / 'smoke'
    for name in ('test_resnet', 'ens_x2', 'fdl_x2'):
        assert (out / f'{name}-s0' / 'results.json').exists()
    assert (out / 'ban-s0' / 'gen3' / 'results.json').exists()
    assert not list(out.glob('*.lock'))
    # the archive keeps the small files of every finished run, never weights
    archived = tmp_path / 'archive' / 'smoke'
    assert (archived / 'ban-s0' / 'gen2' / 'metrics.jsonl').exists() and (archived / 'fdl_x2-s0' / 'args.yaml').exists()
    assert not list(archived.rglob('*.safetensors')) and not list(archived.rglob('*.pt'))
    # the table comes from the folders: the single network's final-epoch accuracy, and a paired difference
    single = json.loads((out / 'test_resnet-s0' / 'results.json').read_text())['final_epoch']['acc']
    assert f'| test_resnet | {single:.2f} ± 0.00 |' in first.stdout
    assert '| ban: BANE of the teacher and generations 1-3 |' in first.stdout
    # an interrupted run (its checkpoint left, no results) is resumed; a finished one is not run again
    (out / 'ens_x2-s0' / 'results.json').unlink()
    stamp = (out / 'fdl_x2-s0' / 'results.json').stat().st_mtime_ns
    second = _study('run', 'smoke', *common)
    commands = [ln for ln in second.stdout.splitlines() if ln.startswith('+ ')]
    assert len(commands) == 1 and '--resume' in commands[0] and 'ens_x2-s0' in commands[0]
    assert (out / 'fdl_x2-s0' / 'results.json').stat().st_mtime_ns == stamp
    # rows whose runs are not all finished are left out, and named
    (out / 'ens_x2-s0' / 'results.json').unlink()
    table = _study('table', 'smoke', '--from-runs', *common).stdout
    assert 'not finished for every seed yet: ens_x2' in table
    assert '| fdl_x2 |' in _study('table', 'smoke', *common).stdout  # the archive still has every row
    # with a seed not run yet, no row is complete: each run is named with what its finished seeds (generations) gave
    table = _study('table', 'smoke', '--seeds', '0', '1', *common[2:]).stdout
    assert f'test_resnet (seed 0: {single:.2f})' in table
    gens = [json.loads((out / 'ban-s0' / f'gen{k}' / 'results.json').read_text())['final_epoch']['acc']
            for k in (1, 2, 3)]
    assert 'ban (seed 0: ' + ' / '.join(f'{a:.2f}' for a in gens) + ')' in table
    # a joint evaluation cached for other runs (these trained again since) is not read: it is made anew from the weights
    # (55.55 % is no accuracy on 64 images)
    bane = archived / 'ban-s0' / 'bane-t-1-2-3.json'
    record = json.loads(bane.read_text())
    bane.write_text(json.dumps(dict(record, acc=55.55, made_from='other runs')))
    (out / 'ban-s0' / 'bane-t-1-2-3.json').unlink()
    table = _study('table', 'smoke', *common).stdout
    assert f"| ban: BANE of the teacher and generations 1-3 | {record['acc']:.2f} ± 0.00 |" in table
    assert '55.55' not in table and json.loads(bane.read_text())['made_from'] == record['made_from']
    # and where the weights are gone too, the table says so instead of printing a number of other runs
    bane.write_text(json.dumps(dict(record, made_from='other runs')))
    (out / 'ban-s0' / 'bane-t-1-2-3.json').unlink()
    (out / 'ban-s0' / 'gen1' / 'model.safetensors').unlink()
    proc = _study('table', 'smoke', *common, check=False)
    assert proc.returncode != 0 and 'made from runs trained again since' in proc.stderr
    # a new session: the run folders are gone, the archive is kept; nothing is trained again, the table is the archive's
    bane.write_text(json.dumps(record))
    shutil.rmtree(out)
    again = _study('run', 'smoke', *common)
    assert not [ln for ln in again.stdout.splitlines() if ln.startswith('+ ')]
    assert f'| test_resnet | {single:.2f} ± 0.00 |' in again.stdout
    assert f"| ban: BANE of the teacher and generations 1-3 | {record['acc']:.2f} ± 0.00 |" in again.stdout
    # a student to train whose teacher only the archive has (no weights) stops before training anything, saying how
    shutil.rmtree(archived / 'ban-s0')
    proc = _study('run', 'smoke', *common, check=False)
    assert proc.returncode != 0 and 'run smoke --seeds 0 --fresh' in proc.stderr and not list(out.iterdir())
    assert 'ban seed 0 learns from test_resnet, which an earlier session finished' in proc.stderr
    # as does one whose teacher is neither trained here nor among the runs to train
    proc = _study('run', 'smoke', '--runs', 'ban', '--fresh', *common, check=False)
    assert proc.returncode != 0 and 'not among the runs to train: add test_resnet to --runs' in proc.stderr
    # --fresh trains the archived teacher again here, then the student, and the archive takes their results
    fresh = _study('run', 'smoke', '--runs', 'test_resnet', 'ban', '--fresh', *common)
    commands = [ln for ln in fresh.stdout.splitlines() if ln.startswith('+ ')]
    assert len(commands) == 2 and 'test_resnet-s0' in commands[0] and '--teacher' in commands[1]
    assert (archived / 'ban-s0' / 'gen3' / 'results.json').exists()
    assert sorted(p.name for p in out.iterdir()) == ['ban-s0', 'ban-s0.log', 'test_resnet-s0', 'test_resnet-s0.log']


def test_unknown_study_is_refused():
    proc = _study('run', 'no-such-study', check=False)
    assert proc.returncode != 0 and "unknown studies ['no-such-study']" in proc.stderr


def _load_study_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location('study', STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diagnostics_table_reads_each_runs_mechanism_and_its_distance_against_the_same_seed_pair(tmp_path, monkeypatch):
    study = _load_study_module()
    monkeypatch.setitem(study.STUDIES, 'probe', ('smoke', ['ens_x2', 'fdl_x2-vs-pair'], (0, 1)))
    runs = {  # per seed: the first epoch's diagnostics (metrics.jsonl), the final ones and the test-set distances
        'ens_x2': [(None, None, 0.5, 0.05), (None, None, 0.6, 0.07)],
        'fdl_x2-vs-pair': [(0.01, 0.04, 0.75, 0.06), (0.03, 0.06, 0.9, 0.08)],
    }
    for name, seeds in runs.items():
        for seed, (first, final, distance, disagreement) in enumerate(seeds):
            folder = tmp_path / 'smoke' / f'{name}-s{seed}'
            folder.mkdir(parents=True)
            epoch = dict(acc=90.0, feature_distance_rel=distance, disagreement=disagreement)
            # a divergence has no null value (None): the table says so instead of failing
            mechanism = None if final is None else {'share_fdl': dict(value=final, null=0.0, note=''),
                                                    'kl': dict(value=2 * final, null=None, note='')}
            (folder / 'results.json').write_text(json.dumps(dict(final_epoch=epoch, mechanism=mechanism)))
            line = dict(epoch=0, mechanism=None if first is None else {'share_fdl': first, 'kl': 2 * first})
            (folder / 'metrics.jsonl').write_text(json.dumps(line) + '\n')
    args = study.argparse.Namespace(seeds=None, out=str(tmp_path / 'out'), archive=str(tmp_path), from_runs=False)
    table = study.diagnostics('probe', args).splitlines()
    assert table[2] == '| ens_x2 |  | 0.55 ± 0.07 | 6.00 ± 1.41 % |'
    # share_fdl: first epoch 0.02 (mean), final 0.05 ± 0.014; distance 0.825 ± 0.106, each seed 1.5 x its pair's
    assert table[3] == ('| fdl_x2-vs-pair | share_fdl 0.02 → 0.05 ± 0.014 (0); kl 0.04 → 0.1 ± 0.028 (no null value) |'
                        ' 0.82 ± 0.11 (× 1.50 ± 0.00 ens_x2) | 7.00 ± 1.41 % |')


def test_noisy_copy_flips_the_share_asked_to_other_classes_and_keeps_the_rest(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / 'studies'))
    from noisy_labels import noisy_copy
    src = tmp_path / 'src'
    src.mkdir()
    clean = np.arange(10_000, dtype=np.uint8) % 10
    header = (2049).to_bytes(4, 'big') + len(clean).to_bytes(4, 'big')
    (src / 'train-labels-idx1-ubyte').write_bytes(header + clean.tobytes())
    for name in ('train-images-idx3-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'):
        (src / name).write_bytes(b'kept as it is')
    changed = noisy_copy(src, tmp_path / 'dst', 0.4, seed=0)
    raw = (tmp_path / 'dst' / 'train-labels-idx1-ubyte').read_bytes()
    noisy = np.frombuffer(raw, dtype=np.uint8, offset=8)
    assert raw[:8] == header and noisy.max() < 10
    assert changed == (noisy != clean).mean() and abs(changed - 0.4) < 0.02  # 10,000 draws: sd 0.005
    # a flipped label goes to each of the nine other classes about equally often (0.4 / 9 of the labels each)
    offsets = np.bincount(((noisy.astype(int) - clean) % 10)[noisy != clean], minlength=10)
    assert offsets[0] == 0 and offsets[1:].min() > 0.7 * len(clean) * 0.4 / 9
    # the other files are the source's, linked; a second call writes nothing and gives the same share
    assert (tmp_path / 'dst' / 't10k-labels-idx1-ubyte').is_symlink()
    assert (tmp_path / 'dst' / 't10k-labels-idx1-ubyte').read_bytes() == b'kept as it is'
    mtime = (tmp_path / 'dst' / 'train-labels-idx1-ubyte').stat().st_mtime_ns
    assert noisy_copy(src, tmp_path / 'dst', 0.4, seed=0) == changed
    assert (tmp_path / 'dst' / 'train-labels-idx1-ubyte').stat().st_mtime_ns == mtime
