"""timm-ensembles-predict and timm-ensembles-validate: every family and a plain timm model, exported as train.py
exports them, checked against a direct forward of the model on images preprocessed by hand; bad input is one line."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import METHODS, create_method_model
from PIL import Image
from timm.data import create_transform, resolve_data_config

from timm_ensembles import data as te_data
from timm_ensembles import metrics
from timm_ensembles.analysis import uncertainty
from timm_ensembles.files.model_folder import export_folder
from timm_ensembles.files.run_folder import RunFolder
from timm_ensembles.predict import main as predict
from timm_ensembles.validate import main as validate

pytestmark = pytest.mark.usefixtures('one_torch_thread')

FILES = ('a.png', 'z.png', 'cats/b.png', 'cats/deep/c.jpg')


def _export(model, folder, label_names=None):
    """``model`` exported with a data config of its own (32 px, bicubic, crop 0.8), which predict must take: any
    other preprocessing gives other probabilities."""
    config = dict(resolve_data_config(model=model), input_size=(3, 32, 32), interpolation='bicubic', crop_pct=0.8)
    export_folder(model, folder, model_config=dict(label_names=label_names) if label_names else None,
                  data_config=config)
    return config


def _transform(config):
    return create_transform(**{k: config[k] for k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct',
                                                      'crop_mode')})


def _read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for name in FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / name)
    (folder / 'notes.txt').write_text('not an image')
    return folder


@pytest.mark.parametrize('method', [*METHODS, 'test_resnet'])
def test_predict_writes_the_models_own_probabilities_members_and_uncertainty(method, images, tmp_path):
    names = [f'class{i}' for i in range(5)]
    model = (timm.create_model('test_resnet', num_classes=5) if method == 'test_resnet'
             else create_method_model(method, folder=tmp_path, num_classes=5)).eval()
    _export(model, tmp_path / 'model', names)
    out = tmp_path / 'predictions.csv'
    assert predict([str(images), '--model', str(tmp_path / 'model'), '--output', str(out), '--topk', '3',
                    '-j', '0', '--no-progress']) == 0

    rows = _read_csv(out)
    # every image, recursively, in timm's order; the target is the image's subfolder, blank at the top
    assert [r['filename'] for r in rows] == sorted(FILES, key=timm.utils.misc.natural_key)
    assert [r['target'] for r in rows] == ['' if '/' not in f else f.split('/')[-2] for f in sorted(FILES)]
    # the data config the model reloads with: the exported one (an ensemble of trained models takes its members')
    config = resolve_data_config(model=timm.create_model(f'local-dir:{tmp_path / "model"}'))
    x = torch.stack([_transform(config)(Image.open(images / r['filename']).convert('RGB')) for r in rows])
    with torch.no_grad():
        probs = model(x).softmax(-1)
        members = model.forward_members(x) if hasattr(model, 'forward_members') else model(x)[:, None]
    top = probs.topk(3, dim=-1)
    for k in range(3):
        assert [r[f'pred{k + 1}'] for r in rows] == [names[i] for i in top.indices[:, k]]
        np.testing.assert_allclose([float(r[f'prob{k + 1}']) for r in rows], top.values[:, k], rtol=1e-5)
    assert 'prob4' not in rows[0]
    np.testing.assert_allclose([float(r['entropy']) for r in rows],
                               uncertainty.predictive_entropy(metrics.ensemble_probs(members)), rtol=1e-5)
    if not hasattr(model, 'forward_members'):
        assert not any(c.startswith('member') or c == 'mutual_information' for c in rows[0])
        return
    member_top = members.softmax(-1).max(-1)
    for m in range(members.shape[1]):
        assert [r[f'member{m}_pred'] for r in rows] == [names[i] for i in member_top.indices[:, m]]
        np.testing.assert_allclose([float(r[f'member{m}_prob']) for r in rows], member_top.values[:, m], rtol=1e-5)
    assert f'member{members.shape[1]}_pred' not in rows[0]
    np.testing.assert_allclose([float(r['expected_entropy']) for r in rows], uncertainty.expected_entropy(members),
                               rtol=1e-5)
    np.testing.assert_allclose([float(r['mutual_information']) for r in rows],
                               uncertainty.mutual_information(members), rtol=1e-4, atol=1e-8)


def test_predict_on_a_dataset_names_each_row_by_index_and_its_label(tmp_path):
    _export(timm.create_model('test_resnet', num_classes=10), tmp_path / 'plain')
    out = tmp_path / 'digits.csv'
    assert predict(['--dataset', 'digits', '--model', f'local-dir:{tmp_path / "plain"}', '--output', str(out),
                    '--topk', '1', '-j', '0', '--no-progress']) == 0
    rows = _read_csv(out)
    _, val_ds, _ = te_data.create_datasets('digits')
    assert [int(r['index']) for r in rows] == list(range(360))
    # a model without label names is named by the dataset's classes ('0'..'9' for the digits)
    assert [r['target'] for r in rows] == [str(t) for t in val_ds.targets]
    assert {r['pred1'] for r in rows} <= {str(i) for i in range(10)}


def _trained_fdl():
    """An FDL ensemble fitted for a few steps on digits, so that its members' predictions differ from image to
    image and from each other."""
    torch.manual_seed(0)
    model = create_method_model('fdl', num_classes=10)
    config = dict(resolve_data_config(model=model), input_size=(3, 32, 32))
    train_ds, _, _ = te_data.create_datasets('digits', train_subset=256)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for x, y in te_data.create_eval_loader(train_ds, config, 64, 0):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_validate_gives_the_accuracy_calibration_and_member_numbers_of_a_direct_forward(tmp_path, capsys):
    model = _trained_fdl()
    config = _export(model, tmp_path / 'fdl')
    _, val_ds, _ = te_data.create_datasets('digits')
    x = torch.stack([_transform(config)(Image.fromarray(img).convert('RGB')) for img in val_ds.images])
    y = torch.as_tensor(val_ds.targets)
    with torch.no_grad():
        logits, members = model(x), model.forward_members(x)
    member_pred = members.argmax(-1)
    assert member_pred.unique().numel() > 2 and (member_pred[:, 0] != member_pred[:, 1]).any()  # not a constant

    (tmp_path / 'out').mkdir()
    results = tmp_path / 'out' / 'results.json'
    # one batch, as the direct forward: the same sums, so the counts are equal exactly
    args = ['--model', str(tmp_path / 'fdl'), '-b', '512', '-j', '0', '--no-progress', '--results-file', str(results)]
    assert validate(['--dataset', 'digits', *args]) == 0
    got = json.loads(results.read_text())
    assert got['top1'] == 100 * (logits.argmax(-1) == y).sum().item() / 360
    assert got['top5'] == 100 * (logits.topk(5).indices == y[:, None]).any(-1).sum().item() / 360
    assert got['member_acc'] == [100 * (member_pred[:, m] == y).sum().item() / 360 for m in range(2)]
    assert got['member_acc_mean'] == pytest.approx(sum(got['member_acc']) / 2)
    assert got['mean_probs_acc'] == 100 * (members.softmax(-1).mean(1).argmax(-1) == y).sum().item() / 360
    assert got['disagreement'] == pytest.approx((member_pred[:, 0] != member_pred[:, 1]).double().mean().item())
    assert got['nll'] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert got['ece'] == pytest.approx(metrics.expected_calibration_error(logits.softmax(-1), y), abs=1e-6)
    assert (got['dataset'], got['split'], got['num_samples']) == ('digits', 'validation', 360)
    shown = capsys.readouterr().out
    assert f"top1 {got['top1']:.2f}" in shown and f"mean-probs {got['mean_probs_acc']:.2f}" in shown

    # a train.py folder is validated on the dataset and split its run recorded
    RunFolder(tmp_path / 'fdl').write_args(dict(dataset='digits', data_dir=None, val_split='validation'))
    assert validate(args) == 0
    assert json.loads(results.read_text()) == got


@pytest.mark.parametrize('command, argv, message', [
    (predict, ['{images}', '--model', '{tmp}/missing'], '--model {tmp}/missing: the model folder does not exist'),
    (validate, ['--dataset', 'digits', '--model', '{tmp}/missing'], 'the model folder does not exist'),
    (predict, ['{tmp}/empty', '--model', '{tmp}/plain'], '{tmp}/empty holds no images (searched recursively for'),
    (predict, ['{images}', '--model', 'fdl_test_resnetx2x'], "--model fdl_test_resnetx2x: Unknown model"),
    (validate, ['--dataset', 'digits', '--model', 'resnet_nope'], "Unknown model 'resnet_nope'. Close matches:"),
    (validate, ['--dataset', 'digits', '--model', '{tmp}/plain'],
     '--model {tmp}/plain predicts 5 classes, but the dataset digits has 10'),
    (predict, ['--dataset', 'digits', '--model', '{tmp}/plain'], 'predicts 5 classes, but the dataset digits has 10'),
    (validate, ['--model', '{tmp}/plain'], 'no data: give --dataset NAME'),
    (predict, ['{images}', '--model', 'fdl_test_resnetx2', '--num-classes', '5', '--checkpoint',
               '{tmp}/plain/model.safetensors'],
     "is not a checkpoint of fdl_test_resnetx2: 156 of the model's weights missing"),
])
def test_bad_input_is_one_line_before_anything_is_written(command, argv, message, images, tmp_path, monkeypatch):
    (tmp_path / 'empty' / 'sub').mkdir(parents=True)
    (tmp_path / 'empty' / 'sub' / 'readme.txt').write_text('no images here')
    _export(timm.create_model('test_resnet', num_classes=5), tmp_path / 'plain')
    monkeypatch.chdir(tmp_path)
    argv = [a.format(tmp=tmp_path, images=images) for a in argv] + ['-j', '0', '--results-file'
                                                                     if command is validate else '--output', 'out']
    with pytest.raises(SystemExit) as e:
        command(argv)
    assert str(e.value).startswith('error: ') and '\n' not in str(e.value)
    assert message.format(tmp=tmp_path) in str(e.value)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('command, argv, line', [
    (predict, ['--topk', '0'], '--topk 0: must be a whole number >= 1.'),
    (predict, ['--batch-size', '0'], '--batch-size 0: must be a whole number >= 1.'),
    (validate, ['--num-classes', '0'], '--num-classes 0: must be a whole number >= 1.'),
    (validate, ['-j', '-1'], '--workers -1: must be a whole number >= 0.'),
    (validate, ['--bins', '0'], '--bins 0: must be a whole number >= 1.'),
])
def test_a_number_out_of_its_range_is_one_line_naming_the_flag(command, argv, line, tmp_path):
    out = ['--results-file' if command is validate else '--output', str(tmp_path / 'out')]
    with pytest.raises(SystemExit) as e:
        command(['--model', 'test_resnet', '--dataset', 'digits', *out, *argv])
    assert e.value.code == f'error: {line}'
    assert not (tmp_path / 'out').exists()


def test_the_commands_run_as_modules_with_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'timm_ensembles.validate', '--model', str(tmp_path / 'none'),
                           '--dataset', 'digits'], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f'error: --model {tmp_path / "none"}: the model folder does not exist; give a'
                                        ' train.py output folder (config.json + model.safetensors), local-dir:<folder>,'
                                        ' hf-hub:<org>/<name>, or a timm model name with --pretrained or --checkpoint.']


def test_import_registers_a_users_model_for_the_commands(images, tmp_path, monkeypatch):
    (tmp_path / 'predict_user_models.py').write_text(
        'import timm\nfrom timm.models import register_model\n\n\n@register_model\n'
        'def te_predict_user_net(pretrained=False, **kwargs):\n'
        "    return timm.create_model('test_resnet', **kwargs)\n")
    _export(timm.create_model('test_resnet', num_classes=5), tmp_path / 'plain')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'path', list(sys.path))
    argv = [str(images), '--model', 'te_predict_user_net', '--num-classes', '5', '--checkpoint',
            str(tmp_path / 'plain' / 'model.safetensors'), '-j', '0', '--no-progress']
    with pytest.raises(SystemExit, match="Unknown model 'te_predict_user_net'"):
        predict(argv)
    assert predict([*argv, '--import', 'predict_user_models']) == 0
    assert len(_read_csv(tmp_path / 'predictions.csv')) == len(FILES)
    sys.modules.pop('predict_user_models', None)
