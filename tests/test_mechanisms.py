"""Every method's own diagnostic (Task.mechanism), read from short real train.py runs: off its null value when the
mechanism is on, at it when the mechanism's weight is 0; MEAL's discriminators above chance."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from test_train import ROOT, _env, run_train

import timm_ensembles
from timm_ensembles.files.model_folder import export_folder
from timm_ensembles.train.checkpoint import load_initial_checkpoint

QUICK = ['--train-subset', '480', '--val-subset', '80', '--batch-size', '32', '--workers', '0', '--no-progress',
         '--img-size', '32']


def _epochs(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / 'metrics.jsonl').read_text().splitlines()]


def _train(folder: Path, model: str, *flags, epochs: int = 2) -> tuple[list[dict], str]:
    proc = run_train('--model', model, '--epochs', epochs, *QUICK, *flags, '--output', folder)
    return _epochs(folder), proc.stderr + proc.stdout


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    """A test_resnet that has learnt the digits well enough to be told from an untrained student."""
    folder = tmp_path_factory.mktemp('teacher') / 'run'
    _train(folder, 'test_resnet', epochs=4)
    return folder


@pytest.mark.parametrize('version', ['v1', 'v2'])
def test_meal_discriminators_tell_the_student_from_its_teachers(teacher, version, tmp_path):
    epochs, log = _train(tmp_path / 'run', 'meal_test_resnet', '--teacher', teacher, '--task-kwargs',
                         f'version={version}')
    first = epochs[0]
    # the untrained student's outputs are told from the teacher's: every discriminator ranks them well above chance
    accuracies = [v for k, v in first['train'].items() if k.startswith('disc_acc')]
    assert len(accuracies) == (6 if version == 'v1' else 1) and min(accuracies) > 0.6, first['train']
    assert first['mechanism']['disc_acc'] > 0.65
    # the blocks and the adversarial term both move the student; the block terms fall below the untrained student's
    assert first['mechanism']['share_blocks'] > 0 and first['mechanism']['share_adv'] > 0
    assert epochs[-1]['mechanism']['sim_vs_init'] < 0.95
    # one line says it: the epoch line ends with the diagnostics beside their null values
    assert 'mechanism: disc_acc ' in log and '(null 0.5)' in log
    results = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert results['mechanism']['disc_acc']['null'] == 0.5
    assert results['mechanism']['disc_acc']['value'] == epochs[-1]['mechanism']['disc_acc']


def test_meal_adversarial_term_alone_moves_the_student_towards_its_teacher(teacher, tmp_path):
    # no block term and no labels: only the discriminator of the outputs teaches (V2)
    epochs, _ = _train(tmp_path / 'run', 'meal_test_resnet', '--teacher', teacher, '--lr', '0.1', '--task-kwargs',
                       'version=v2', 'block_weights=[0.0]', epochs=4)
    gaps = [e['train']['entropy_gap'] for e in epochs]
    # the untrained student is near uniform, the teacher confident; the game makes the student's outputs about as sure
    # (then oscillates, as games do: a single epoch's value is not monotone)
    assert gaps[0] > 0.5 and min(abs(g) for g in gaps[1:]) < 0.5 * gaps[0], gaps
    assert epochs[0]['mechanism']['share_blocks'] == 0 and epochs[0]['mechanism']['share_adv'] == pytest.approx(1)
    assert max(e['mechanism']['disc_acc'] for e in epochs) > 0.65


@pytest.mark.parametrize('model,on,off,share', [
    ('fdl_test_resnetx2', [], ['fdl_weight=0.0'], 'share_fdl'),
    ('collab_test_resnetx2', [], ['beta=1.0'], 'share_consensus'),
    ('meal_test_resnet', ['version=v2'], ['version=v2', 'adversarial=none', 'block_weights=[0.0]', 'label_weight=1.0'],
     'share_blocks'),
    ('ban_test_resnet', [], ['teacher_weight=0.0', 'label_weight=1.0'], 'share_teacher'),
])
def test_every_methods_share_leaves_its_null_when_on_and_stays_at_it_with_weight_zero(teacher, model, on, off,
                                                                                       share, tmp_path):
    teachers = ['--teacher', teacher] if model.startswith(('meal', 'ban')) else []
    results = {}
    for name, kwargs in (('on', on), ('off', off)):
        epochs, log = _train(tmp_path / name, model, *teachers, *(['--task-kwargs', *kwargs] if kwargs else []))
        results[name] = epochs[-1]['mechanism']
        assert 'mechanism: ' in log and share in log
    assert results['on'][share] > 0, results
    assert results['off'][share] == 0, results  # exactly: the term's gradient is 0 when its weight is


def test_fdl_feature_distance_against_the_end_of_phase_zero(tmp_path):
    epochs, log = _train(tmp_path / 'run', 'fdl_test_resnetx2', epochs=3)
    # phase 0 (epoch 0) defines the reference: its own ratio is 1 exactly; the joint phase measures against it
    assert epochs[0]['mechanism']['feature_distance_vs_phase0'] == 1.0
    assert epochs[0]['mechanism']['share_fdl'] == 0.0  # the term is off in phase 0
    ratio = epochs[2]['mechanism']['feature_distance_vs_phase0']
    assert ratio == pytest.approx(epochs[2]['val']['feature_distance_rel'] / epochs[0]['val']['feature_distance_rel'])
    assert epochs[2]['mechanism']['share_fdl'] > 0
    # without phase 0 there is nothing to compare with: said once, recorded as null
    epochs, log = _train(tmp_path / 'nowarm', 'fdl_test_resnetx2', '--task-kwargs', 'member_warmup_epochs=0')
    assert [e['mechanism']['feature_distance_vs_phase0'] for e in epochs] == [None, None]
    assert log.count('mechanism feature_distance_vs_phase0: not computed (no phase 0') == 1


def test_fdl_pair_without_normalisation_at_a_common_learning_rate_finishes(tmp_path):
    """The user's BatchNorm-free one-layer net with one filter per member (studies/convnet.py, registered by
    --import), lr 0.1 with the step schedule close to the reference's: the paper's similarity term alone used to
    drive both members' losses to 1e19 within tens of updates of the joint phase."""
    cmd = [sys.executable, str(ROOT / 'train.py'), '--import', 'convnet', '--model', 'fdl_convnet1x2',
           '--model-kwargs', 'num_filters=1', 'img_size=32', '--img-size', '32', '--in-chans', '1', '--batch-size',
           '32', '--lr', '0.1', '--sched', 'step', '--decay-epochs', '1', '--decay-rate', '0.97', '--workers', '0',
           '--no-aug', '--epochs', '5', '--task-kwargs', 'feature_taps=convs', '--no-progress', '--output',
           str(tmp_path / 'run')]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=ROOT / 'studies')
    assert proc.returncode == 0, proc.stderr[-2000:]
    epochs = _epochs(tmp_path / 'run')
    assert len(epochs) == 5
    # both members keep learning (one filter each: about 90 % on the digits alone)
    assert min(epochs[-1]['val']['member_acc']) > 80, epochs[-1]['val']


def test_a_student_starts_from_a_trained_network_of_its_architecture(teacher):
    """MEAL V2's recipe: --initial-checkpoint of a plain network's folder loads into the student's bare network."""
    student = timm_ensembles.create_model('meal_test_resnet', num_classes=10)
    load_initial_checkpoint(student, teacher, exported=student.student)
    trained = load_file(teacher / 'model.safetensors')
    assert all(torch.equal(student.student.state_dict()[k], v) for k, v in trained.items())
    # weights that fit neither are still one line
    with pytest.raises(ValueError, match='does not fit MEALStudent'):
        other = timm.create_model('test_efficientnet', num_classes=10)
        folder = teacher.parent / 'other'
        export_folder(other, folder)
        load_initial_checkpoint(student, folder, exported=student.student)
