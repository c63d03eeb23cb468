"""The package as a user installs it: the built wheel's trainer and console scripts outside the checkout, ``--import``
of a user's module, and the optional extras' messages."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from timm_ensembles import analysis as analyze
from timm_ensembles.train import main as train_main
from timm_ensembles.utils import extras as _extras
from timm_ensembles.utils.extras import MissingExtraError, require

ROOT = Path(__file__).resolve().parents[1]
QUICK = ['--train-subset', '96', '--val-subset', '48', '--batch-size', '32', '--workers', '0', '--no-progress']


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **extra)
    env.pop('ACCELERATE_CONFIG_FILE', None)
    return env


@pytest.fixture(scope='module')
def installed_wheel(tmp_path_factory):
    """The wheel built from a copy of the package's sources, installed into a folder of its own (``--target``): the
    package and its console scripts as ``pip install timm-ensembles`` gives them, without the checkout."""
    if importlib.util.find_spec('setuptools') is None:
        pytest.skip('setuptools is not installed here: the wheel is built without build isolation (offline)')
    tmp = tmp_path_factory.mktemp('wheel')
    src = tmp / 'src'
    src.mkdir()
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / 'timm_ensembles', src / 'timm_ensembles', ignore=shutil.ignore_patterns('__pycache__'))
    pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q']
    subprocess.run([*pip, 'wheel', '--no-deps', '--no-build-isolation', '-w', str(tmp / 'dist'), str(src)], check=True,
                   capture_output=True, timeout=300)
    wheel, = (tmp / 'dist').glob('timm_ensembles-*.whl')
    site = tmp / 'site'
    subprocess.run([*pip, 'install', '--no-deps', '--target', str(site), str(wheel)], check=True, capture_output=True,
                   timeout=300)
    work = tmp / 'work'  # the user's folder: no checkout in it or above it
    work.mkdir()
    return site, work


def _run(cmd, cwd, site, timeout=600):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=_env(PYTHONPATH=str(site)))
    assert proc.returncode == 0, f'{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}'
    return proc


@pytest.mark.slow
def test_the_wheel_trains_with_accelerate_and_its_scripts_outside_the_checkout(installed_wheel):
    site, work = installed_wheel
    where = _run([sys.executable, '-c', 'import timm_ensembles; print(timm_ensembles.__file__)'], work, site)
    assert Path(where.stdout.strip()).is_relative_to(site)  # the wheel's package, not the editable checkout
    assert not (site / 'train.py').exists()  # nothing of the checkout came with it

    accelerate = shutil.which('accelerate', path=str(Path(sys.executable).parent))
    _run([accelerate, 'launch', '--num_processes', '1', '--num_machines', '1', '--mixed_precision', 'no',
          '--dynamo_backend', 'no', '-m', 'timm_ensembles.train', '--model', 'ens_test_resnetx2', '--epochs', '1',
          '--img-size', '32', *QUICK, '--output', 'ens'], work, site)
    assert (work / 'ens' / 'model.safetensors').is_file() and (work / 'ens' / 'results.json').is_file()

    _run([site / 'bin' / 'timm-ensembles-push', 'ens', 'me/ens_test', '--card-only', 'card.md'], work, site)
    # the run validated on the dataset it recorded, and its predictions, by the console scripts
    shown = _run([site / 'bin' / 'timm-ensembles-validate', '--model', 'ens', '-j', '0', '--no-progress'], work, site)
    assert 'ens on digits (validation, 360 images)' in shown.stdout and 'mean-probs' in shown.stdout
    _run([site / 'bin' / 'timm-ensembles-predict', '--model', 'ens', '--dataset', 'digits', '-j', '0'], work, site)
    assert (work / 'predictions.csv').read_text().startswith('index,target,pred1,prob1,')
    card = (work / 'card.md').read_text()
    assert '`ens_test_resnetx2`' in card and 'accelerate launch -m timm_ensembles.train --config args.yaml' in card

    # the console script trains too, and a finished run is refused as any run of the trainer refuses it
    proc = subprocess.run([str(site / 'bin' / 'timm-ensembles-train'), '--model', 'ens_test_resnetx2', '--epochs', '1',
                           *QUICK, '--output', 'ens'], capture_output=True, text=True, cwd=work,
                          env=_env(PYTHONPATH=str(site)), timeout=300)
    assert proc.returncode != 0 and "'ens' already holds a run" in proc.stderr


@pytest.mark.slow
def test_import_trains_a_model_registered_in_a_users_file(installed_wheel):
    site, work = installed_wheel
    # the FDL paper's one-layer network without normalisation, as a user's own file beside them
    shutil.copy(ROOT / 'studies' / 'convnet.py', work / 'my_convnet.py')
    _run([site / 'bin' / 'timm-ensembles-train', '--import', 'my_convnet', '--model', 'fdl_convnet1x2',
          '--model-kwargs', 'num_filters=4', '--in-chans', '1', '--img-size', '28', '--epochs', '2', *QUICK,
          '--output', 'fdl'], work, site)
    config = (work / 'fdl' / 'config.json').read_text()
    assert '"base_model": "convnet1"' in config


@pytest.mark.parametrize('source, message', [
    (None, "--import absent_user_module: no module named 'absent_user_module' here"),
    ('import not_installed_anywhere\n', "the module imports 'not_installed_anywhere', which is not installed"),
    ('x = 1\nraise RuntimeError("no GPU here")\n', 'failed while it ran: RuntimeError: no GPU here ('),
    ('def broken(:\n', 'failed while it ran: SyntaxError'),
    ('from timm import no_such_name\n', 'failed while it ran: ImportError'),
])
def test_a_failing_import_names_the_module_before_anything_is_written(source, message, tmp_path, monkeypatch,
                                                                      capsys):
    module = 'absent_user_module'
    if source is not None:
        module = f'user_models_{abs(hash(source))}'
        (tmp_path / f'{module}.py').write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'path', list(sys.path))
    with pytest.raises(SystemExit) as e:
        train_main(['--import', module, '--model', 'test_resnet', '--output', str(tmp_path / 'out')])
    assert message in str(e.value) and f'--import {module}' in str(e.value)
    if source is not None and 'RuntimeError' in message:
        assert f'{module}.py, line 2' in str(e.value)  # where in the user's file
    assert not (tmp_path / 'out').exists()
    sys.modules.pop(module, None)


@pytest.mark.parametrize('module, extra', [('matplotlib.figure', 'analysis'), ('torchmetrics', 'analysis'),
                                           ('datasets', 'hub')])
def test_a_missing_extra_names_the_package_and_the_extra(module, extra, monkeypatch):
    parts = module.split('.')
    for i in range(len(parts)):  # as if it were not installed, also where another test imported it already
        monkeypatch.setitem(sys.modules, '.'.join(parts[:i + 1]), None)
    with pytest.raises(MissingExtraError, match=rf"needs the package '{module.split('.')[0]}', which is not"
                                               rf" installed: pip install 'timm-ensembles\[{extra}\]'"):
        require(module, 'this')


def test_a_missing_dependency_of_an_installed_extra_package_is_its_own_error(monkeypatch, tmp_path):
    # the extra's package is there, and something it imports is missing: that error, not "install the extra"
    (tmp_path / 'extra_pkg_here').mkdir()
    (tmp_path / 'extra_pkg_here' / '__init__.py').write_text('import dependency_not_there\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(_extras.EXTRAS, 'fake', ('extra_pkg_here',))
    with pytest.raises(ModuleNotFoundError) as e:
        require('extra_pkg_here', 'this')
    assert not isinstance(e.value, MissingExtraError) and e.value.name == 'dependency_not_there'


def test_the_report_and_hub_datasets_ask_for_their_extra_before_any_work(monkeypatch, tmp_path):
    # torchmetrics imports matplotlib when it sees it installed: imported first, as where matplotlib is really missing
    require('torchmetrics', 'this')
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    with pytest.raises(SystemExit, match=r"the report's plots \(--no-plots skips them\) needs the package"
                                         r" 'matplotlib'.*timm-ensembles\[analysis\]"):
        analyze.main([str(tmp_path / 'no_run_needed'), '--out', str(tmp_path / 'report')])
    assert not (tmp_path / 'report').exists()

    monkeypatch.setitem(sys.modules, 'datasets', None)
    with pytest.raises(SystemExit, match=r"--dataset hfds/some/repo \(a dataset on the Hugging Face Hub, read by"
                                         r" timm\) needs the package 'datasets'.*timm-ensembles\[hub\]"):
        train_main(['--dataset', 'hfds/some/repo', '--model', 'test_resnet', '--output', str(tmp_path / 'out')])
    assert not (tmp_path / 'out').exists()
