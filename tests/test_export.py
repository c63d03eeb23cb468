"""One-graph export (``timm_ensembles.export``, ``timm-ensembles-export``): every family to ONNX and torch.export, run
in onnxruntime and torch at two batch sizes against the model itself; the members' logits as a second output; the
fused member strategies; TorchScript's pointer to the export; and each kind of bad input, refused in one line with
nothing written."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from _hub_families import write_run
from conftest import METHODS, STUDENT_METHODS, create_method_model, create_method_task
from torch import nn

import timm_ensembles
from timm_ensembles.export import FORMATS, ExportError, main
from timm_ensembles.utils.extras import MissingExtraError

pytestmark = pytest.mark.usefixtures('one_torch_thread')

SIZE = (3, 32, 32)
NUM_CLASSES = 5
TOLERANCE = 1e-4  # largest absolute difference from eager the issue allows
SUFFIX = {'onnx': '.onnx', 'torch.export': '.pt2'}


def _runner(path: Path, format: str):
    """The written file as a function of a batch: its outputs, a list of tensors."""
    if format == 'onnx':
        session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
        return lambda x: [torch.from_numpy(o) for o in session.run(None, {'input': x.numpy()})]
    program = torch.export.load(path).module()
    return lambda x: list(torch.utils._pytree.tree_leaves(program(x)))


def _batches():
    # 2 is the batch the graph is traced at, 3 another: a graph whose batch size were fixed would fail on it
    return [torch.randn(b, *SIZE, generator=torch.Generator().manual_seed(b)) for b in (2, 3)]


def _onnx_dims(path: Path) -> dict[str, list]:
    graph = onnx.load(str(path)).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*graph.input, *graph.output)}


def _plain_keys() -> set[str]:
    """The weights of a plain timm ``test_resnet``, as they are named in its own state dict."""
    return set(timm.create_model('test_resnet', num_classes=NUM_CLASSES).state_dict())


# ---------------------------------------------------------------------------------------------------------------
# every family, both formats, against eager


@pytest.mark.parametrize('format', FORMATS)
@pytest.mark.parametrize('method', (*METHODS, 'plain'))
def test_every_family_exports_one_graph_that_matches_eager_at_two_batch_sizes(method, format, tmp_path):
    if method == 'plain':
        model = timm.create_model('test_resnet', num_classes=NUM_CLASSES)
    else:
        model = create_method_model(method, folder=tmp_path, num_classes=NUM_CLASSES)
    with torch.no_grad():  # a trained-looking model: BatchNorm statistics away from their initial values
        model.train()(torch.randn(8, *SIZE))
    model.eval()
    # a student is exported from its task, as train.py exports it (task.export_model())
    source = create_method_task(model) if method in STUDENT_METHODS else model
    path = timm_ensembles.export(source, tmp_path / f'model{SUFFIX[format]}', format, input_size=SIZE, verify=False)
    run = _runner(path, format)
    for x in _batches():
        with torch.no_grad():
            want = model(x)
        got, = run(x)
        assert got.shape == want.shape == (x.shape[0], NUM_CLASSES)
        assert (got - want).abs().max() <= TOLERANCE, (method, format)
    if format == 'onnx':
        assert _onnx_dims(path) == {'input': ['batch', *SIZE], 'logits': ['batch', NUM_CLASSES]}
    else:
        keys = set(torch.export.load(path).state_dict)
        if method in ('collab', 'plain', *STUDENT_METHODS):
            # a collaborative net's designated head and a student are exported as the plain base network
            assert keys == _plain_keys(), method
        else:
            assert keys == set(model.state_dict()), method  # the whole ensemble, every member


def test_the_members_logits_are_a_second_output_beside_the_combined_prediction(tmp_path):
    # majority vote (argmax, one-hot) and a calibration temperature, both inside the graph
    model = create_method_model('ensemble', folder=tmp_path, num_classes=NUM_CLASSES, combine='vote').eval()
    model.set_temperature(2.0)
    path = timm_ensembles.export(model, tmp_path / 'vote.onnx', members=True, input_size=SIZE, verify=False)
    assert _onnx_dims(path) == {'input': ['batch', *SIZE], 'logits': ['batch', NUM_CLASSES],
                                'member_logits': ['batch', 2, NUM_CLASSES]}
    run = _runner(path, 'onnx')
    for x in _batches():
        with torch.no_grad():
            want, want_members = model(x), model.forward_members(x)
        got, got_members = run(x)
        assert (got - want).abs().max() <= TOLERANCE and (got_members - want_members).abs().max() <= TOLERANCE


def test_a_collaborative_net_with_members_exports_every_head_and_its_designated_prediction(tmp_path):
    model = create_method_model('collab', folder=tmp_path, num_classes=NUM_CLASSES, head_index=1).eval()
    path = timm_ensembles.export(model, tmp_path / 'heads.pt2', 'torch.export', members=True, input_size=SIZE)
    run = _runner(path, 'torch.export')
    for x in _batches():
        with torch.no_grad():
            want, heads = model(x), model.forward_members(x)
        got, got_heads = run(x)
        assert got_heads.shape == (x.shape[0], 2, NUM_CLASSES)
        assert (got_heads - heads).abs().max() <= TOLERANCE and (got - heads[:, 1]).abs().max() <= TOLERANCE
        assert (got - want).abs().max() <= TOLERANCE


@pytest.mark.parametrize('strategy', ['vmap', 'grouped'])
def test_fused_member_strategies_export_the_loop_and_say_so(strategy, tmp_path, caplog):
    model = timm.create_model('fdl', base_model='test_resnet', num_members=2, num_classes=NUM_CLASSES,
                              member_strategy=strategy).eval()
    with caplog.at_level(logging.INFO, logger='timm_ensembles'):
        path = timm_ensembles.export(model, tmp_path / 'fdl.pt2', 'torch.export', input_size=SIZE)
    said = [r.getMessage() for r in caplog.records if f"not with member strategy '{strategy}'" in r.getMessage()]
    assert len(said) == 1 and 'the export runs the members one after another (loop)' in said[0]
    assert model.member_strategy == strategy  # the model keeps its own
    run = _runner(path, 'torch.export')
    for x in _batches():
        with torch.no_grad():
            want = model(x)  # run by the fused strategy
        assert (run(x)[0] - want).abs().max() <= TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# TorchScript


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')
@pytest.mark.parametrize('method', ['fdl', 'collab', 'ensemble'])
def test_torchscript_of_an_ensemble_is_one_line_pointing_to_the_export(method, tmp_path):
    model = create_method_model(method, folder=tmp_path, num_classes=NUM_CLASSES)
    with pytest.raises(RuntimeError) as e:
        torch.jit.script(model)
    message = str(e.value)
    assert message.startswith(f'torch.jit.script cannot compile {type(model).__name__}: ') and '\n' not in message
    assert "timm_ensembles.export(model, 'model.onnx')" in message and 'timm-ensembles-export' in message


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')
def test_students_still_script_as_their_base_does():
    student = create_method_model('ban', num_classes=NUM_CLASSES).eval()
    x = _batches()[0]
    with torch.no_grad():
        assert torch.allclose(torch.jit.script(student)(x), student(x), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line, nothing written


def test_a_combine_rule_that_cannot_be_traced_is_named_with_what_to_choose(tmp_path):
    model = timm.create_model('ens', base_model='test_resnet', num_members=2, num_classes=NUM_CLASSES)
    # a Python branch on tensor values, which torch.export cannot trace
    model.combine = lambda logits: logits.mean(1) if logits.sum() > 0 else logits.amax(1)
    with pytest.raises(ExportError) as e:
        timm_ensembles.export(model, tmp_path / 'm.onnx', input_size=SIZE)
    message = str(e.value)
    assert '\n' not in message and message.startswith("DeepEnsemble: torch.export cannot trace its combine rule")
    assert "the members trace. Choose combine='mean_probs' or 'mean_logits'" in message
    assert list(tmp_path.iterdir()) == []


def test_members_that_cannot_be_traced_are_named(tmp_path):
    model = timm.create_model('ens', base_model='test_resnet', num_members=2, num_classes=NUM_CLASSES)
    member = model.members[1]
    member.forward = lambda x: member.forward_head(member.forward_features(x)) * (1 if x.sum() > 0 else -1)
    with pytest.raises(ExportError) as e:
        timm_ensembles.export(model, tmp_path / 'm.pt2', 'torch.export', input_size=SIZE)
    message = str(e.value)
    assert '\n' not in message
    assert message.startswith("DeepEnsemble: torch.export cannot trace its members' forward (test_resnet: ")
    assert 'choose a base model that torch.export traces' in message
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_does_not_match_the_model_is_not_written(tmp_path):
    class Noisy(nn.Module):  # draws new numbers at every call: no file can match it
        def forward(self, x):
            return x.flatten(1)[:, :NUM_CLASSES] + torch.rand(x.shape[0], NUM_CLASSES)

    with pytest.raises(ExportError, match=r'^The exported graph differs from the model by up to .*: not written\.'):
        timm_ensembles.export(Noisy(), tmp_path / 'noisy.pt2', 'torch.export', input_size=SIZE)
    assert list(tmp_path.iterdir()) == []


def _read_only_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through any mode bits: a file system that refuses everyone
        return Path('/sys')
    folder = tmp_path / 'read-only'
    folder.mkdir(mode=0o500)
    return folder


@pytest.mark.parametrize('case, message', [
    ('format', "Unknown export format 'tflite': expected one of 'onnx', 'torch.export'."),
    ('folder', "is a folder: give the file to write, e.g. '"),
    ('no parent', "' does not exist."),
    ('read-only', 'give a path in a folder you can write to.'),
    ('members of one network', 'members=True: ResNet is one network, it has no members whose logits could be a second'
                               ' output; export it without members (--members).'),
    ('no such source', "is not a folder here: give a model, a train.py output folder, 'local-dir:<folder>' or"),
])
def test_bad_input_is_one_line_and_nothing_is_written(case, message, tmp_path):
    model = timm.create_model('test_resnet', num_classes=NUM_CLASSES)
    out = tmp_path / 'out'
    out.mkdir()
    kwargs = dict(model=model, path=out / 'm.onnx', format='onnx', input_size=SIZE)
    if case == 'format':
        kwargs['format'] = 'tflite'
    elif case == 'folder':
        kwargs['path'] = out
    elif case == 'no parent':
        kwargs['path'] = out / 'missing' / 'm.onnx'
    elif case == 'read-only':
        kwargs['path'] = _read_only_folder(tmp_path) / 'm.onnx'
    elif case == 'members of one network':
        kwargs['members'] = True
    else:
        kwargs['model'] = str(tmp_path / 'no-such-run')
    with pytest.raises(ExportError) as e:
        timm_ensembles.export(**kwargs)
    assert message in str(e.value) and '\n' not in str(e.value)
    assert list(out.iterdir()) == []


def test_onnx_without_the_export_extra_names_it_before_anything_is_built(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'onnxscript', None)  # as if it were not installed
    with pytest.raises(MissingExtraError, match=r"ONNX export \(timm_ensembles.export\) needs the package"
                                                r" 'onnxscript', which is not installed: pip install"
                                                r" 'timm-ensembles\[export\]'"):
        timm_ensembles.export(timm.create_model('test_resnet'), tmp_path / 'm.onnx', input_size=SIZE)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# the command line


def test_the_command_exports_a_run_folder_by_the_output_suffix(tmp_path, caplog):
    collab = create_method_model('collab', folder=tmp_path, num_classes=NUM_CLASSES)
    folder = write_run(collab, tmp_path / 'run', 'collab_test_resnetx2')
    with caplog.at_level(logging.INFO, logger='timm_ensembles'):
        assert main(['--model', str(folder), '--output', str(tmp_path / 'head.pt2')]) == 0
        assert main(['--model', f'local-dir:{folder}', '--output', str(tmp_path / 'heads.onnx'), '--members']) == 0
    log = caplog.text
    assert 'the designated head of CollaborativeNet (export_head), a plain ResNet' in log
    assert 'input [batch, 3, 32, 32]' in log  # the run's own data config
    assert 'matches the model in the loaded program at batch sizes 2 and 3' in log
    assert f'matches the model in onnxruntime {ort.__version__} at batch sizes 2 and 3' in log
    loaded = timm_ensembles.load_from_hub(str(folder)).eval()
    head, heads = _runner(tmp_path / 'head.pt2', 'torch.export'), _runner(tmp_path / 'heads.onnx', 'onnx')
    for x in _batches():
        with torch.no_grad():
            want, want_heads = loaded(x), loaded.forward_members(x)
        assert (head(x)[0] - want).abs().max() <= TOLERANCE
        got, got_heads = heads(x)
        assert (got - want).abs().max() <= TOLERANCE and (got_heads - want_heads).abs().max() <= TOLERANCE


def test_the_command_refuses_a_bad_output_before_loading_the_model(tmp_path):
    with pytest.raises(SystemExit) as e:  # the model does not exist either: the output is checked first
        main(['--model', str(tmp_path / 'no-such-run'), '--output', str(tmp_path)])
    assert str(e.value).startswith(f'error: --output {tmp_path}: ') and 'is a folder' in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(['--model', str(tmp_path / 'no-such-run'), '--output', str(tmp_path / 'm.onnx')])
    assert str(e.value).startswith('error: --model ') and list(tmp_path.iterdir()) == []


def test_python_dash_m_runs_the_command():
    proc = subprocess.run([sys.executable, '-m', 'timm_ensembles.export', '--help'], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, HF_HUB_OFFLINE='1'))
    assert proc.returncode == 0 and proc.stdout.startswith('usage: timm-ensembles-export')
    assert proc.stderr == ''  # no warning from runpy about the module imported with the package
