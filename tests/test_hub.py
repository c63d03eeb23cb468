"""Hub publishing and loading: model cards, every family round-tripping through real Hub clients and servers, the
offline paths, and each kind of bad input.

Servers (``_hub_servers``): uploads go to a small Hub-compatible server on 127.0.0.1 through the real huggingface_hub
client; downloads come from it and from olah, a real self-hosted Hub mirror. The client runs in subprocesses, since
huggingface_hub reads ``HF_ENDPOINT`` when it is imported.
"""
import ast
import hashlib
import json
import re
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import yaml
from _hub_families import ALLOWED_FILES, DATA_CONFIG, NUM_CLASSES, exported, families, fill_cache, probe, write_run
from safetensors.torch import load_file, save_file

import timm_ensembles
from timm_ensembles.files.model_folder import export_folder
from timm_ensembles.hub.card import generate_model_card
from timm_ensembles.hub.push import push_to_hub
from timm_ensembles.models.hub import check_config, load_from_hub, read_run

TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------------------
# model cards


def test_card_of_an_ensemble_run_has_its_method_members_dataset_and_numbers(tmp_path):
    fam = families(tmp_path)
    card = generate_model_card(fam['fdl'], 'org/fdl-digits')
    header, body = card.split('---\n')[1], card.split('---\n', 2)[2]
    assert '- timm-ensembles' in header and '- fdl' in header
    assert 'datasets:' not in header  # 'digits' is no Hub dataset: the card names it, the metadata does not
    assert 'Knowledge Diversification in Ensembles of Identical Neural Networks' in body
    assert '**Base model:** test_resnet' in body and '**Members:** 2' in body and '**Training data:** digits' in body
    assert '**Training:** 3 epochs, seed 7' in body and '**Image size:** 32x32' in body
    # the run's own numbers, per member and for the ensemble
    for row in ('| prediction (`model(x)`) | 81.25 |', '| member 0 | 80.00 |', '| member 1 | 78.75 |',
                '| averaged probabilities | 81.25 |', "| members' disagreement (fraction) | 0.1250 |"):
        assert row in body
    usage = body.split('```python\n')[1].split('```')[0]
    assert usage.startswith('import timm_ensembles')
    assert "timm.create_model('hf-hub:org/fdl-digits', pretrained=True)" in usage
    # installing and retraining: from the source (no index serves the package), the commands test_packaging runs
    assert 'pip install timm-ensembles' not in card
    assert ('Loading it needs timm-ensembles, installed from its source: `pip install .` in a checkout of its'
            ' repository, or the wheel that `pip wheel --no-deps .` builds there, and `import timm_ensembles`') in body
    assert ('install timm-ensembles from its source: `pip install .` in a checkout of its repository, or the wheel'
            ' that `pip wheel --no-deps .` builds there, then `accelerate launch -m timm_ensembles.train --config'
            ' args.yaml --output <new folder>`') in body


def test_card_shows_the_methods_diagnostics_beside_their_null_values(tmp_path):
    folder = families(tmp_path)['fdl']
    results = json.loads((folder / 'results.json').read_text())
    results['mechanism'] = dict(
        share_fdl=dict(value=0.0123456, null=0.0, note="share of the members' gradient from -L_FDL"),
        feature_distance_vs_phase0=dict(value=None, null=1.0, note='no phase 0 to compare with'))
    (folder / 'results.json').write_text(json.dumps(results))
    body = generate_model_card(folder, 'org/fdl-digits').split('---\n', 2)[2]
    assert "| `share_fdl` | 0.01235 | 0 | share of the members' gradient from -L_FDL |" in body
    assert '| `feature_distance_vs_phase0` | not computed | 1 | no phase 0 to compare with |' in body


def test_card_of_an_exported_head_is_for_plain_timm(tmp_path):
    fam = families(tmp_path)
    card = generate_model_card(fam['collab-head'], 'org/head')
    usage = card.split('```python\n')[1].split('```')[0]
    assert 'timm_ensembles' not in usage and usage.startswith('import timm\n')
    assert 'plain timm `test_resnet`' in card and 'collab_test_resnetx2' in card
    assert 'Collaborative Learning for Deep Neural Networks' in card
    # the results are the run's, one level up
    assert '| head 0 | 80.00 |' in card


def test_card_names_hub_datasets_in_its_metadata_and_never_a_local_path(tmp_path):
    folder = families(tmp_path)['fdl']
    # as train.py writes them: the name given in args.yaml, the resolved source in results.json
    (folder / 'args.yaml').write_text('model: fdl_test_resnetx2\ndataset: fashion-mnist\n')
    results = json.loads((folder / 'results.json').read_text())
    results['dataset'] = 'idx:/home/someone/data/fashion-mnist'
    (folder / 'results.json').write_text(json.dumps(results))
    card = generate_model_card(folder, 'org/x')
    assert 'datasets:\n- zalando-datasets/fashion_mnist\n' in card and '/home/someone' not in card
    (folder / 'args.yaml').write_text('model: fdl_test_resnetx2\ndataset: idx:/home/someone/data/my-scans\n')
    card = generate_model_card(folder, 'org/x')
    assert '**Training data:** my-scans' in card and '/home/someone' not in card and 'datasets:' not in card


def test_catalog_tags_carry_the_preprocessing_train_py_evaluated_with():
    from timm_ensembles.models.catalog import CATALOG

    for name, cfg in CATALOG.items():
        model = timm_ensembles.create_model(name.split('.')[0])
        # what train.py resolves for a 28 px dataset at its natural 32 px (data_args input_size and crop_pct 1.0)
        want = timm.data.resolve_data_config(dict(input_size=(3, 32, 32), crop_pct=1.0), model=model)
        got = timm.data.resolve_data_config(model=timm_ensembles.create_model(name))
        assert got == want, name
        assert cfg['num_classes'] == 10 and len(cfg['label_names']) == 10


def test_card_of_a_model_without_a_run(tmp_path):
    model = timm.create_model('ens', base_model='test_resnet', num_members=3, num_classes=NUM_CLASSES)
    card = generate_model_card(model, 'org/ens')
    assert '**Members:** 3' in card and 'Deep Ensembles' in card and 'Model Comparison' not in card


def _metadata(card: str):
    """The card's metadata as the Hub reads it: huggingface_hub's own parser (``ModelCard``, ``EvalResult``s)."""
    from huggingface_hub import ModelCard

    return ModelCard(card).data


def _metrics(data) -> list[tuple]:
    return [(r.dataset_type, r.dataset_split, r.metric_type, r.metric_name, r.metric_value) for r in data.eval_results]


def test_card_metadata_names_hub_bases_and_the_runs_numbers_as_huggingface_hub_parses_them(tmp_path, monkeypatch):
    from huggingface_hub import metadata_load

    folder = families(tmp_path)['fdl']
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'resnet18').mkdir()  # a teacher folder named like a timm model: a local path, never a Hub id
    (folder / 'args.yaml').write_text(yaml.safe_dump(dict(
        model='fdl_test_resnetx2', dataset='fashion-mnist', val_split='test', pretrained_base=True,
        teacher=['hf-hub:org/teacher@v2', 'resnet18', str(tmp_path / 'gen1'), 'local-dir:/somewhere/gen2', 'org/x'],
        model_kwargs=dict(members=['hf-hub:org/member-a', 'out/member-b']))))
    results = json.loads((folder / 'results.json').read_text())
    # --holdout: the test set's numbers are the card's, not the final epoch's on held-out training data
    results['test'] = dict(acc=90.5, loss=0.3125, ece=0.0421, num_samples=200, member_acc=[88.0, 87.0],
                           member_acc_mean=87.5, disagreement=0.0625)
    (folder / 'results.json').write_text(json.dumps(results))
    card = generate_model_card(folder, 'org/fdl-fmnist')
    (tmp_path / 'README.md').write_text(card)
    data = _metadata(card)
    assert (data.library_name, data.pipeline_tag) == ('timm', 'image-classification')
    # the base's timm weights (--pretrained-base), then the Hub teacher (no revision) and the Hub member
    assert data.base_model == ['timm/test_resnet.r160_in1k', 'org/teacher', 'org/member-a']
    assert data.model_name == 'fdl-fmnist'
    fmnist = ('zalando-datasets/fashion_mnist', 'test')
    assert _metrics(data) == [
        (*fmnist, 'accuracy', 'Top-1 accuracy (%)', 90.5),
        (*fmnist, 'nll', 'NLL (cross-entropy of the prediction)', 0.3125),
        (*fmnist, 'ece', 'ECE (expected calibration error)', 0.0421),
        (*fmnist, 'accuracy', "Members' mean top-1 accuracy (%)", 87.5),
        (*fmnist, 'disagreement', "Members' disagreement (fraction of images on which two members differ)", 0.0625)]
    assert all(r.task_type == 'image-classification' for r in data.eval_results)
    raw = metadata_load(tmp_path / 'README.md')
    assert raw['model-index'][0]['results'][0]['dataset']['name'] == 'fashion-mnist'


def test_card_metadata_leaves_out_what_the_run_does_not_have(tmp_path):
    folder = families(tmp_path)['fdl']
    (folder / 'args.yaml').write_text(f'model: fdl_test_resnetx2\ndataset: digits\nteacher: [{tmp_path / "gen1"}]\n')
    results = json.loads((folder / 'results.json').read_text())
    del results['final_epoch']['loss']  # no NLL recorded: none is made up
    (folder / 'results.json').write_text(json.dumps(results))
    card = generate_model_card(folder, 'org/fdl-digits')
    data = _metadata(card)
    assert data.base_model is None and 'base_model' not in card  # no Hub base, teacher or member
    # no --holdout: the final epoch's numbers, on the dataset's evaluation split; no NLL, no ECE
    assert _metrics(data) == [
        ('digits', None, 'accuracy', 'Top-1 accuracy (%)', 81.25),
        ('digits', None, 'accuracy', "Members' mean top-1 accuracy (%)", 79.375),
        ('digits', None, 'disagreement', "Members' disagreement (fraction of images on which two members differ)",
         0.125)]
    # a model without a run has no numbers: no model-index at all
    model = timm.create_model('ens', base_model='test_resnet', num_members=2, num_classes=NUM_CLASSES)
    card = generate_model_card(model, 'org/ens')
    assert _metadata(card).eval_results is None and 'model-index' not in card


def test_card_metadata_of_a_model_names_what_it_was_built_from(tmp_path):
    model = timm.create_model('ens', base_model='test_resnet', num_members=2, num_classes=NUM_CLASSES)
    # what timm's factory records for create_model(..., pretrained_base=True) (which would download the weights)
    model._model_args = dict(model.__dict__['_recorded_model_args'], pretrained_base=True)
    assert _metadata(generate_model_card(model, 'org/ens')).base_model == 'timm/test_resnet.r160_in1k'
    ensemble = timm_ensembles.ensemble_of([str(families(tmp_path)['collab'] / 'exported')] * 2)
    # a member loaded from a Hub repo carries it in its pretrained_cfg (timm sets source and hf_hub_id)
    ensemble.members[0].pretrained_cfg = dict(ensemble.members[0].pretrained_cfg, source='hf-hub',
                                              hf_hub_id='org/member@v1')
    assert _metadata(generate_model_card(ensemble, 'org/ensemble')).base_model == 'org/member'


# ---------------------------------------------------------------------------------------------------------------
# offline: local folders, a pre-filled cache, and bad input that needs no server


def test_every_family_reloads_from_its_folder_to_identical_outputs(tmp_path):
    x = probe()
    for name, obj in families(tmp_path / 'src').items():
        folder = obj if isinstance(obj, Path) else export_folder(exported(obj), tmp_path / name)
        with torch.no_grad():
            want = exported(obj)(x)
            got = load_from_hub(f'local-dir:{folder}').eval()(x)
        assert torch.equal(got, want), name


def test_push_without_a_token_fails_before_any_request(tmp_path, monkeypatch):
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))  # no token file there
    monkeypatch.setattr('huggingface_hub.constants.HF_TOKEN_PATH', str(tmp_path / 'hf' / 'token'))
    monkeypatch.setattr('huggingface_hub.constants.HF_STORED_TOKENS_PATH', str(tmp_path / 'hf' / 'stored_tokens'))
    fam = families(tmp_path)
    for source in (fam['fdl'], fam['ens']):
        with pytest.raises(PermissionError, match='needs a token .*HF_TOKEN.*hf auth login'):
            push_to_hub(source, 'org/name')


def test_folders_that_are_not_finished_runs_are_refused(tmp_path):
    (tmp_path / 'running').mkdir()
    torch.save({}, tmp_path / 'running' / 'checkpoint.pt')
    with pytest.raises(FileNotFoundError, match='no config.json.*still training'):
        read_run(tmp_path / 'running')
    with pytest.raises(FileNotFoundError, match='not a folder'):
        read_run(tmp_path / 'nowhere')
    folder = export_folder(timm.create_model('test_resnet', num_classes=3), tmp_path / 'noweights')
    (folder / 'model.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='no model.safetensors'):
        push_to_hub(folder, 'org/name', token='hf_test')


def test_unknown_architecture_says_what_is_missing(tmp_path):
    newer = dict(architecture='fdl2_resnet18x2', timm_ensembles_version='9.0.0')
    with pytest.raises(ValueError, match=r"'fdl2_resnet18x2'.*9\.0\.0.*install a newer one from its source"):
        check_config(newer, 'org/x')
    with pytest.raises(ValueError, match='import that package first'):
        check_config(dict(architecture='someone_elses_net'), 'org/x')
    folder = export_folder(timm.create_model('test_resnet', num_classes=3), tmp_path / 'm')
    config = json.loads((folder / 'config.json').read_text())
    assert config['timm_ensembles_version'] == timm_ensembles.__version__  # every export records its writer
    config.update(newer)
    (folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ValueError, match='9.0.0'):
        load_from_hub(str(folder))


def test_model_args_of_a_newer_version_give_a_clear_error(tmp_path):
    folder = export_folder(timm.create_model('fdl', base_model='test_resnet', num_members=2, num_classes=3),
                           tmp_path / 'm')
    config = json.loads((folder / 'config.json').read_text())
    config['model_args']['future_option'] = 'on'
    config['timm_ensembles_version'] = '9.0.0'
    (folder / 'config.json').write_text(json.dumps(config))
    # timm's own loader and this package's give the same message
    for load in (lambda: timm.create_model(f'local-dir:{folder}', pretrained=True), lambda: load_from_hub(str(folder))):
        with pytest.raises(TypeError, match=r"does not take the argument\(s\) \['future_option'\].*newer"):
            load()


def test_weights_that_do_not_fit_their_config_give_a_clear_error(tmp_path):
    folder = export_folder(timm.create_model('ens', base_model='test_resnet', num_members=2, num_classes=3),
                           tmp_path / 'm')
    # a config that records no checksum of its weights (timm's own, an older version's): the fit itself is checked
    config = json.loads((folder / 'config.json').read_text())
    del config['timm_ensembles_weights_sha256']
    (folder / 'config.json').write_text(json.dumps(config))
    weights = load_file(folder / 'model.safetensors')
    weights['members.1.fc.weight'] = torch.zeros(4, weights['members.1.fc.weight'].shape[1])
    save_file(weights, folder / 'model.safetensors')
    # only a classifier differs: the message names it and points to num_classes=
    with pytest.raises(RuntimeError, match=r"classifiers of .*\(members\.1\.fc\) do not fit .*num_classes="):
        load_from_hub(f'local-dir:{folder}')
    inner = next(k for k in weights if k.startswith('members.1.layer1.') and k.endswith('conv1.weight'))
    weights[inner] = torch.zeros(1, 1, 1, 1)
    save_file(weights, folder / 'model.safetensors')
    with pytest.raises(RuntimeError, match=rf"weights of .* do not fit the 'ens' model.*{re.escape(inner)}"):
        load_from_hub(f'local-dir:{folder}')
    with pytest.raises(ValueError, match='does not load as a model'):
        push_to_hub(folder, 'org/name', token='hf_test')  # checked before any request


def test_a_flipped_byte_in_the_weights_is_refused_on_load(tmp_path):
    ens = export_folder(timm.create_model('ens', base_model='test_resnet', num_members=2, num_classes=3),
                        tmp_path / 'e')
    plain = export_folder(timm.create_model('test_resnet', num_classes=3), tmp_path / 'p')  # e.g. a BAN student
    for folder in (ens, plain):
        timm.create_model(f'local-dir:{folder}', pretrained=True)  # intact: loads
        data = bytearray((folder / 'model.safetensors').read_bytes())
        data[-7] ^= 0x10  # one bit of one weight
        (folder / 'model.safetensors').write_bytes(bytes(data))
    message = r"weights of '.*' are not the ones its config.json was written with \(sha256 .*corrupted"
    for load in (lambda: timm.create_model(f'local-dir:{ens}', pretrained=True), lambda: load_from_hub(str(ens)),
                 lambda: load_from_hub(f'local-dir:{plain}')):
        with pytest.raises(RuntimeError, match=message):
            load()


def test_a_catalog_tag_and_hf_hub_names_load_from_an_offline_cache(tmp_path):
    from _hub_servers import run_client

    # the registered tag of the catalog, laid out as if uploaded, published and downloaded before
    model = timm_ensembles.create_model('ens_resnet18x2.fmnist')
    assert model.num_classes == 10 and model.pretrained_cfg['tag'] == 'fmnist'
    folder = export_folder(model, tmp_path / 'repo', data_config=DATA_CONFIG | dict(mean=model.pretrained_cfg['mean'],
                                                                                   std=model.pretrained_cfg['std']))
    fill_cache(tmp_path / 'cache', 'timm-ensembles/ens_resnet18x2.fmnist', folder)
    x = probe()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the client, so that the same kernels run and outputs can be compared exactly
    try:
        with torch.no_grad():
            torch.save(model.eval()(x), tmp_path / 'want.pt')
    finally:
        torch.set_num_threads(threads)
    torch.save(x, tmp_path / 'x.pt')
    code = _published('ens_resnet18x2.fmnist') + textwrap.dedent(f"""
        import torch, timm, timm_ensembles
        x, want = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'want.pt')!r})
        for name in ('ens_resnet18x2.fmnist', 'hf-hub:timm-ensembles/ens_resnet18x2.fmnist'):
            with torch.no_grad():
                assert torch.equal(timm.create_model(name, pretrained=True).eval()(x), want), name
        assert torch.equal(timm_ensembles.load_from_hub('timm-ensembles/ens_resnet18x2.fmnist').eval()(x), want)
        try:
            timm_ensembles.load_from_hub('timm-ensembles/not_downloaded')
        except FileNotFoundError as e:
            assert 'not in the local Hub cache' in str(e) and 'HF_HUB_OFFLINE' in str(e), e
        else:
            raise AssertionError('no error')
        print('ok')
    """)
    out = run_client(code, endpoint='http://127.0.0.1:9', tmp_path=tmp_path,
                     env=dict(HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path / 'cache')))
    assert out.stdout.strip().endswith('ok')


# ---------------------------------------------------------------------------------------------------------------
# the catalog: timm lists published weights only; pretrained=True says what is wrong in one line

CATALOG_PY = TESTS.parent / 'timm_ensembles' / 'models' / 'catalog.py'
NO_HUB = 'http://127.0.0.1:9'  # the discard port: nothing listens, a connection is refused at once


def _published(*tags: str) -> str:
    """Client code, run before ``import timm_ensembles``: the catalog with ``tags`` marked published, as flipping their
    ``published`` field does once they are uploaded (the package registers the catalog with timm when imported)."""
    return textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location('timm_ensembles.models.catalog', {str(CATALOG_PY)!r})
        catalog = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(catalog)
        for tag in {list(tags)!r}:
            catalog.CATALOG[tag]['published'] = True
    """)


def _error_line(text: str) -> str:
    """The one line an error printed, asserted to be one line."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_timm_lists_only_the_catalog_tags_that_are_published(tmp_path):
    from _hub_servers import run_client

    from timm_ensembles.models.catalog import CATALOG

    unpublished = {k for k, v in CATALOG.items() if not v['published']}
    assert {'fdl_resnet18x2.fmnist', 'ens_resnet18x2.fmnist', 'collab_resnet18x2.fmnist',
            'collab_resnet18x4.fmnist'} <= unpublished  # none is uploaded yet (hub/README.md)
    assert not unpublished & (set(timm.list_pretrained()) | set(timm.list_models(pretrained=True)))
    assert not any(timm.models.is_model_pretrained(k) for k in unpublished)
    assert unpublished <= set(timm.list_models(include_tags=True))  # registered tags still, with their preprocessing
    # one entry flipped: timm lists it, and it alone, with its repo; an unpublished tag's error names it
    out = run_client(_published('fdl_resnet18x2.fmnist') + textwrap.dedent("""
        import timm, timm_ensembles
        print(timm.list_pretrained('*.fmnist'), timm.get_pretrained_cfg('fdl_resnet18x2.fmnist').hf_hub_id)
        try:
            timm.create_model('ens_resnet18x2.fmnist', pretrained=True)
        except ValueError as e:
            print(e)
    """), NO_HUB, tmp_path, env=dict(HF_HUB_OFFLINE='1')).stdout.splitlines()
    assert out[0] == "['fdl_resnet18x2.fmnist'] timm-ensembles/fdl_resnet18x2.fmnist"
    assert "'ens_resnet18x2.fmnist' is not published" in out[1] and 'published tags: fdl_resnet18x2.fmnist)' in out[1]


@pytest.mark.parametrize('name', ['fdl_resnet18x2.fmnist', 'collab_resnet18x4.fmnist'])
def test_pretrained_for_an_unpublished_tag_is_one_line_with_its_training_command(name, tmp_path):
    arch = name.split('.')[0]
    for create in (timm.create_model, timm_ensembles.create_model):
        with pytest.raises(ValueError) as e:
            create(name, pretrained=True)
        assert _error_line(str(e.value)).startswith(f"'{name}' is not published: its weights are on no Hub yet")
        assert 'published tags: none)' in str(e.value)
        assert (f'`accelerate launch train.py --model {arch} --dataset fashion-mnist --train-subset 10000 --epochs 5'
                f' --seed 0 --output <folder>`') in str(e.value)
    # the same through train.py, before anything is written
    from timm_ensembles.train import main

    out = tmp_path / 'run'
    with pytest.raises(SystemExit) as e:
        main(['--model', name, '--pretrained', '--train-subset', '16', '--val-subset', '16', '--output', str(out)])
    assert _error_line(str(e.value.code)).startswith(f"error: '{name}' is not published")
    assert not out.exists()


def test_hub_readme_trains_and_pushes_every_catalog_entry_as_the_catalog_says():
    from timm_ensembles.models.catalog import CATALOG, hub_repo

    readme = (TESTS.parent / 'hub' / 'README.md').read_text()
    flags = re.search(r'^S="(.*)"$', readme, re.M).group(1).split()
    for name, entry in CATALOG.items():
        arch = name.split('.')[0]
        assert [f for f in flags if f != '--no-progress'] == entry['train'].split(), name
        assert f'accelerate launch train.py --model {arch} $S --output $O/{arch}-s0\n' in readme, name
        assert f'python hub/push.py $O/{arch}-s0 {hub_repo(name)}\n' in readme, name


@pytest.mark.parametrize('offline', [True, False], ids=['HF_HUB_OFFLINE', 'no-connection'])
def test_a_published_tag_neither_cached_nor_reachable_is_one_line_naming_the_repo(offline, tmp_path):
    from _hub_servers import run_client

    # the tag, an ensemble's base (pretrained_base) and a plain timm model; without a connection the tag alone:
    # huggingface_hub waits through its retries (about 23 s a file) before timm's downloads give up
    models = [('fdl_resnet18x2.fmnist', {}, 'fdl_resnet18x2.fmnist', 'timm-ensembles/fdl_resnet18x2.fmnist')]
    if offline:
        models += [('ens_test_resnetx2', dict(pretrained_base=True), 'test_resnet', 'timm/test_resnet.r160_in1k'),
                   ('test_resnet', {}, 'test_resnet', 'timm/test_resnet.r160_in1k')]
    out = run_client(_published('fdl_resnet18x2.fmnist') + textwrap.dedent(f"""
        import time, timm, timm_ensembles
        for name, kwargs in {[m[:2] for m in models]!r}:
            start = time.monotonic()
            try:
                timm_ensembles.create_model(name, pretrained=not kwargs, **kwargs)
            except OSError as e:
                print(type(e).__name__, round(time.monotonic() - start), repr(str(e)))
            else:
                raise AssertionError(name)
    """), NO_HUB, tmp_path, env=dict(HF_HUB_OFFLINE='1') if offline else {}).stdout.splitlines()
    assert len(out) == len(models), out
    for line, (_, _, what, repo) in zip(out, models):
        kind, seconds, error = line.split(' ', 2)
        error = ast.literal_eval(error)
        assert kind == ('FileNotFoundError' if offline else 'HubUnreachableError'), line
        assert int(seconds) < 10, line  # no retries: the cache is looked at once the Hub is known unreachable
        assert _error_line(error).startswith(f"The weights of '{what}' (Hub repo '{repo}') are not in the local Hub"
                                             f" cache ({tmp_path / 'hf_home' / 'hub'}) and "), error
        assert ('HF_HUB_OFFLINE is set' if offline else f'{NO_HUB} cannot be reached') in error
        assert 'HF_HUB_OFFLINE' in error


@pytest.mark.parametrize('args, what, repo', [
    (['--model', 'fdl_resnet18x2.fmnist', '--pretrained'], 'fdl_resnet18x2.fmnist',
     'timm-ensembles/fdl_resnet18x2.fmnist'),
    (['--model', 'ens_test_resnetx2', '--pretrained-base'], 'test_resnet', 'timm/test_resnet.r160_in1k'),
])
def test_train_py_with_weights_neither_cached_nor_reachable_is_one_error_line(args, what, repo, tmp_path):
    from _hub_servers import run_client

    out = tmp_path / 'run'
    argv = [*args, '--train-subset', '16', '--val-subset', '16', '--output', str(out)]
    proc = run_client(_published('fdl_resnet18x2.fmnist') + textwrap.dedent(f"""
        from timm_ensembles.train import main
        sys.exit(main({argv!r}))
    """), NO_HUB, tmp_path, env=dict(HF_HUB_OFFLINE='1'), check=False)
    assert proc.returncode == 1 and not proc.stdout and 'Traceback' not in proc.stderr
    # one error line, last; before it at most timm's own log of where it loads from
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr
    assert errors[0].startswith(f"error: The weights of '{what}' (Hub repo '{repo}') are not in the local Hub cache")
    assert 'HF_HUB_OFFLINE is set' in errors[0]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# against servers: uploads to the Hub-compatible test server, downloads from it and from olah


@pytest.fixture(scope='module')
def hub():
    from _hub_servers import FakeHub

    with FakeHub(tokens={'hf_test'}) as server:
        yield server


def _client(code: str, endpoint: str, tmp_path: Path, token: str | None = 'hf_test', **env):
    from _hub_servers import run_client

    prelude = f'import sys; sys.path.insert(0, {str(TESTS)!r})\n'
    env = dict(env, **({'HF_TOKEN': token} if token else {}))
    return run_client(prelude + textwrap.dedent(code), endpoint=endpoint, tmp_path=tmp_path, env=env).stdout


def test_every_family_round_trips_through_the_upload_server(hub, tmp_path):
    out = _client(f"""
        import torch, timm, timm_ensembles
        from pathlib import Path
        from _hub_families import exported, families, probe
        from timm_ensembles.hub.push import push_to_hub
        x = probe()
        for name, obj in families(Path({str(tmp_path / 'src')!r})).items():
            with torch.no_grad():
                want = exported(obj)(x)
            push_to_hub(obj, f'org/{{name}}')  # folders, models and tasks alike
            with torch.no_grad():
                got = timm.create_model(f'hf-hub:org/{{name}}', pretrained=True).eval()(x)
            assert torch.equal(got, want), name
            print(name, 'ok')
    """, hub.endpoint, tmp_path)
    names = ['fdl', 'ens', 'collab', 'collab-head', 'ban', 'meal', 'bane']
    assert out.split() == [w for n in names for w in (n, 'ok')]
    plain = set(timm.create_model('test_resnet').state_dict())
    for name in names:
        files = hub.files(f'org/{name}')
        assert set(files) <= ALLOWED_FILES and {'config.json', 'model.safetensors', 'README.md'} <= set(files), name
        keys = set(load_file_bytes(files['model.safetensors']))
        assert not any('teacher' in k or 'discrim' in k for k in keys), name
        if name in ('ban', 'meal', 'collab-head'):
            assert keys == plain, name  # the bare student / head: a plain timm model
        if name in ('fdl', 'collab'):  # folders: the run files come along, the checkpoint never
            assert {'results.json', 'metrics.jsonl', 'args.yaml'} <= set(files)
            assert b'| member 0 | 80.00 |' in files['README.md'] or b'| head 0 | 80.00 |' in files['README.md']
    # small files travel inside the commit request: what was committed is the record to check
    added = {f for c in hub.commit_log for f in c.added}
    assert 'model.safetensors' in added and not added & {'checkpoint.pt', 'pytorch_model.bin'}


def load_file_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def test_revisions_pull_requests_and_private_repos(hub, tmp_path):
    folder = write_run(timm.create_model('fdl', base_model='test_resnet', num_members=2, num_classes=NUM_CLASSES),
                       tmp_path / 'run', 'fdl_test_resnetx2')
    out = _client(f"""
        import torch, timm, timm_ensembles
        from _hub_families import probe
        from timm_ensembles.hub.push import push_to_hub
        folder = {str(folder)!r}
        want = timm.create_model(f'local-dir:{{folder}}', pretrained=True).eval()(probe())
        push_to_hub(folder, 'org/rev', revision='v1')
        info = push_to_hub(folder, 'org/pr', create_pr=True)
        print('pr', info.pr_url)
        push_to_hub(folder, 'org/private', private=True)
        for name in ('org/rev@v1', 'org/private'):
            assert torch.equal(timm_ensembles.load_from_hub(name).eval()(probe()), want), name
        for name, what in (('org/rev', 'has no config.json'), ('org/rev@v2', 'has no revision')):
            try:
                timm_ensembles.load_from_hub(name)
            except FileNotFoundError as e:
                assert what in str(e), e
            else:
                raise AssertionError(name)
        print('ok')
    """, hub.endpoint, tmp_path)
    assert out.strip().endswith('ok') and '/discussions/1' in out.split('pr ', 1)[1]
    assert 'config.json' in hub.files('org/rev', 'v1') and 'config.json' not in hub.files('org/rev', 'main')
    assert 'config.json' in hub.files('org/pr', 'refs/pr/1') and 'config.json' not in hub.files('org/pr', 'main')
    assert hub.repos['org/private'].private
    # without a token the private repo looks missing, as on the Hub
    out = _client("""
        import timm_ensembles
        try:
            timm_ensembles.load_from_hub('org/private')
        except FileNotFoundError as e:
            print(e)
    """, hub.endpoint, tmp_path / 'anon', token=None)
    assert "No model repo 'org/private'" in out and 'private' in out


def test_pushing_a_catalog_repo_says_to_mark_its_entry_published(hub, tmp_path):
    folder = write_run(timm.create_model('fdl', base_model='test_resnet', num_members=2, num_classes=NUM_CLASSES),
                       tmp_path / 'run', 'fdl_test_resnetx2')
    out = _client(f"""
        from timm_ensembles.hub.push import main
        main([{str(folder)!r}, 'timm-ensembles/fdl_resnet18x2.fmnist'])
        main([{str(folder)!r}, 'timm-ensembles/ens_resnet18x2.fmnist', '--revision', 'v1'])  # not main: not loaded
        main([{str(folder)!r}, 'org/fdl'])
    """, hub.endpoint, tmp_path)
    hints = [line for line in out.splitlines() if 'published=True' in line]
    assert hints == ["'fdl_resnet18x2.fmnist' is in the catalog, marked unpublished: set published=True on its entry in"
                     " timm_ensembles/models/catalog.py, so that timm lists it and"
                     " create_model('fdl_resnet18x2.fmnist', pretrained=True) loads it (hub/README.md,"
                     ' "Catalog")'], out


def test_a_model_pushes_to_a_new_branch_and_without_a_card_when_asked(hub, tmp_path):
    out = _client("""
        import torch, timm, timm_ensembles
        from _hub_families import probe
        from timm_ensembles.hub.push import push_to_hub
        model = timm.create_model('ens', base_model='test_resnet', num_members=2, num_classes=3).eval()
        push_to_hub(model, 'org/model-branch', revision='v2', model_card=False)
        with torch.no_grad():
            assert torch.equal(timm_ensembles.load_from_hub('org/model-branch@v2').eval()(probe()), model(probe()))
        try:
            push_to_hub(model, 'org/pr-and-branch', revision='v2', create_pr=True)
        except ValueError as e:
            print('refused:', e)
    """, hub.endpoint, tmp_path)
    assert 'refused: create_pr=True opens a pull request against the default branch' in out
    assert 'org/pr-and-branch' not in hub.repos  # refused before anything was sent
    assert set(hub.files('org/model-branch', 'v2')) == {'config.json', 'model.safetensors'}  # no card at all


def test_missing_repos_and_files_and_bad_tokens(hub, tmp_path):
    hub.add_files('org/not-a-model', {'README.md': b'# hello\n'})
    folder = export_folder(timm.create_model('test_resnet', num_classes=3), tmp_path / 'm')
    hub.add_files('org/no-weights', {'config.json': (folder / 'config.json').read_bytes()})
    out = _client("""
        import timm_ensembles
        from huggingface_hub.errors import HfHubHTTPError
        for name in ('org/nowhere', 'org/not-a-model', 'org/no-weights'):
            try:
                timm_ensembles.load_from_hub(name)
            except FileNotFoundError as e:
                print(type(e).__name__, e)
        try:
            timm_ensembles.push_to_hub(timm_ensembles.create_model('ens_test_resnetx2'), 'org/denied')
        except HfHubHTTPError as e:
            print('push refused', e.response.status_code)
    """, hub.endpoint, tmp_path, token='hf_wrong')
    assert "No model repo 'org/nowhere'" in out
    assert "'org/not-a-model' has no config.json: it is not a timm model repo" in out
    assert "FileNotFoundError The Hub repo 'org/no-weights' has a config.json but no weights" in out
    assert 'push refused 401' in out and 'org/denied' not in hub.repos


def test_every_family_downloads_from_olah_and_revisions_pin(tmp_path):
    from _hub_servers import Olah

    repos = {}
    for name, obj in families(tmp_path / 'src').items():
        repos[f'org/{name}'] = obj if isinstance(obj, Path) else export_folder(exported(obj), tmp_path / 'ex' / name)
    # two commits: the older one must be served by its sha and by a tag. Only old revisions are asked: olah 0.5.4
    # serves a file of a path that it served for one revision for the others too (seen here; the upload server's test
    # covers main against a branch)
    old = export_folder(timm.create_model('test_resnet', num_classes=NUM_CLASSES), tmp_path / 'old')
    new = export_folder(timm.create_model('test_resnet', num_classes=NUM_CLASSES + 1), tmp_path / 'new')
    repos['org/history'] = [old, new]
    with Olah(repos, root=tmp_path / 'olah') as olah:
        first = olah.commits['org/history'][0]
        olah.tag('org/history', 'v1', first)
        # the client compares what it downloads with the folders laid out (same process, same float reductions)
        folders = {name: str(f) for name, f in repos.items() if name != 'org/history'}
        out = _client(f"""
            import torch, timm, timm_ensembles
            from _hub_families import probe
            x = probe()
            def run(name):
                with torch.no_grad():
                    return timm.create_model(name, pretrained=True).eval()(x)
            for repo, folder in {folders!r}.items():
                assert torch.equal(run(f'hf-hub:{{repo}}'), run(f'local-dir:{{folder}}')), repo
                print(repo, 'ok')
            for rev, folder in (({first!r}, {str(old)!r}), ('v1', {str(old)!r})):
                with torch.no_grad():
                    got = timm_ensembles.load_from_hub(f'org/history@{{rev}}').eval()(x)
                assert torch.equal(got, run(f'local-dir:{{folder}}')), rev
            print('revisions ok')
            try:
                timm_ensembles.load_from_hub('org/nowhere')
            except FileNotFoundError as e:
                print(e)
        """, olah.endpoint, tmp_path, token=None)
    assert out.count(' ok') == 8 and 'revisions ok' in out
    assert "No model repo 'org/nowhere'" in out


def test_a_download_broken_off_is_retried_or_fails_clearly_and_leaves_no_corrupt_cache(hub, tmp_path):
    folder = export_folder(timm.create_model('ens', base_model='test_resnet', num_members=2, num_classes=3),
                           tmp_path / 'm')
    hub.add_files('org/flaky', {f.name: f.read_bytes() for f in folder.iterdir()})
    weights = (folder / 'model.safetensors').read_bytes()
    code = f"""
        import hashlib, json, torch, timm, timm_ensembles
        from pathlib import Path
        from _hub_families import probe
        from huggingface_hub import constants
        try:
            got = timm_ensembles.load_from_hub('org/flaky').eval()
        except ConnectionError as e:
            print('error:', e)
        else:
            want = timm.create_model('local-dir:{folder}', pretrained=True).eval()
            with torch.no_grad():
                print('identical', torch.equal(got(probe()), want(probe())))
        blobs = Path(constants.HF_HUB_CACHE) / 'models--org--flaky' / 'blobs'
        print('blobs', json.dumps(sorted(hashlib.sha256(b.read_bytes()).hexdigest() for b in blobs.iterdir())))
    """
    cache = dict(HF_HUB_CACHE=str(tmp_path / 'cache'))
    # two broken attempts: huggingface_hub retries (up to 5 times) and the model loads intact
    hub.fail_downloads('model.safetensors', times=2, after_bytes=1000)
    out = _client(code, hub.endpoint, tmp_path / 'a', **cache)
    assert 'identical True' in out
    # broken every time: a clear error, and what the cache holds is only complete files
    hub.fail_downloads('model.safetensors', times=100, after_bytes=1000)
    out = _client(code, hub.endpoint, tmp_path / 'b', **{'HF_HUB_CACHE': str(tmp_path / 'cache2')})
    assert "error: Downloading the weights of 'org/flaky' failed after huggingface_hub's retries" in out
    complete = {hashlib.sha256(v).hexdigest() for v in hub.files('org/flaky').values()}
    blobs = json.loads(out.split('blobs ', 1)[1])
    assert set(blobs) <= complete and hashlib.sha256(weights).hexdigest() not in blobs
    # the connection is back: the same cache serves a complete model
    hub.fail_downloads('model.safetensors', times=0)
    out = _client(code, hub.endpoint, tmp_path / 'b', **{'HF_HUB_CACHE': str(tmp_path / 'cache2')})
    assert 'identical True' in out


def test_a_repo_with_only_pytorch_model_bin_is_refused_before_any_pickle_is_fetched(hub, tmp_path):
    import io

    model = timm_ensembles.create_model('ens_test_resnetx2', num_classes=3)
    folder = export_folder(model, tmp_path / 'm')
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    hub.add_files('org/pickled', {'config.json': (folder / 'config.json').read_bytes(),
                                  'pytorch_model.bin': buffer.getvalue()})
    out = _client("""
        import timm, timm_ensembles
        for load in (lambda: timm_ensembles.load_from_hub('org/pickled'),
                     lambda: timm.create_model('hf-hub:org/pickled', pretrained=True)):
            try:
                load()
            except FileNotFoundError as e:
                print('refused:', e)
    """, hub.endpoint, tmp_path)
    assert out.count("refused: The Hub repo 'org/pickled' has no model.safetensors, only pytorch_model.bin") == 2
    assert not any(r.method == 'GET' and r.path.endswith('pytorch_model.bin') for r in hub.requests)


def test_a_pushed_card_carries_base_model_and_a_model_index_that_huggingface_hub_parses(hub, tmp_path):
    folder = families(tmp_path / 'src')['fdl']
    (folder / 'args.yaml').write_text('model: fdl_test_resnetx2\ndataset: digits\npretrained_base: true\n')
    _client(f"""
        from timm_ensembles.hub.push import push_to_hub
        push_to_hub({str(folder)!r}, 'org/card')
    """, hub.endpoint, tmp_path)
    data = _metadata(hub.files('org/card')['README.md'].decode())
    assert data.base_model == 'timm/test_resnet.r160_in1k' and data.library_name == 'timm'
    assert [(r.metric_type, r.metric_value) for r in data.eval_results] == [
        ('accuracy', 81.25), ('nll', 0.5), ('accuracy', 79.375), ('disagreement', 0.125)]


def test_a_pushed_folder_names_no_path_of_this_machine(hub, tmp_path):
    folder = write_run(timm.create_model('ban', base_model='test_resnet', num_classes=NUM_CLASSES), tmp_path / 'run',
                       'ban_test_resnet')
    local = str(tmp_path)
    (folder / 'args.yaml').write_text(
        f'model: ban_test_resnet\ndataset: idx:{local}/mnist\ndata_dir: {local}/data\nteacher:\n- {local}/teacher\n'
        f'output: {local}/run\nepochs: 3\nseed: 7\n')
    results = json.loads((folder / 'results.json').read_text())
    (folder / 'results.json').write_text(json.dumps(dict(results, teacher=[f'{local}/teacher'])))
    _client(f"""
        from timm_ensembles.hub.push import push_to_hub
        push_to_hub({str(folder)!r}, 'org/paths')
    """, hub.endpoint, tmp_path)
    files = hub.files('org/paths')
    assert {'args.yaml', 'results.json', 'README.md'} <= set(files)
    for name, data in files.items():
        assert local.encode() not in data and b'/tmp/' not in data, name
    args = yaml.safe_load(files['args.yaml'])
    assert args['dataset'] == 'idx:<local>/mnist' and args['teacher'] == ['<local>/teacher']


def test_private_on_an_existing_public_repo_is_refused(hub, tmp_path):
    hub.add_files('org/public', {'README.md': b'# public\n'})
    commits = len(hub.commit_log)
    out = _client("""
        import timm_ensembles
        try:
            timm_ensembles.push_to_hub(timm_ensembles.create_model('ens_test_resnetx2'), 'org/public', private=True)
        except ValueError as e:
            print('refused:', e)
    """, hub.endpoint, tmp_path)
    assert "refused: 'org/public' exists and is public: private=True cannot make it private" in out
    assert len(hub.commit_log) == commits and not hub.repos['org/public'].private


def test_a_repo_whose_weights_changed_after_export_is_refused(hub, tmp_path):
    for name, model in (('ens', timm_ensembles.create_model('ens_test_resnetx2', num_classes=3)),
                        ('plain', timm.create_model('test_resnet', num_classes=3))):
        folder = export_folder(model, tmp_path / name)
        data = bytearray((folder / 'model.safetensors').read_bytes())
        data[-7] ^= 0x10
        hub.add_files(f'org/flipped-{name}', {'config.json': (folder / 'config.json').read_bytes(),
                                              'model.safetensors': bytes(data)})
    out = _client("""
        import timm, timm_ensembles
        for load in (lambda: timm_ensembles.load_from_hub('org/flipped-ens'),
                     lambda: timm.create_model('hf-hub:org/flipped-ens', pretrained=True),
                     lambda: timm_ensembles.load_from_hub('org/flipped-plain')):
            try:
                load()
            except RuntimeError as e:
                print('refused:', e)
    """, hub.endpoint, tmp_path)
    assert out.count('are not the ones its config.json was written with') == 3, out


# ---------------------------------------------------------------------------------------------------------------
# loads that a repo's config cannot steer: its own safetensors only, other repos only when trusted


class _Unpickled:
    """Unpickled (never by this package), it creates the file it names: the proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


def _pickle_that_writes(marker: Path) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({'state_dict': _Unpickled(marker)}, buffer)
    return buffer.getvalue()


def _repo_files(folder: Path, **config_changes) -> dict[str, bytes]:
    config = json.loads((folder / 'config.json').read_text())
    for key, value in config_changes.items():
        section, _, entry = key.partition('__')
        config[section][entry] = value
    weights = (folder / 'model.safetensors').read_bytes()
    return {'config.json': json.dumps(config).encode(), 'model.safetensors': weights}


def test_a_pulled_config_that_says_where_weights_come_from_is_refused_before_anything_is_fetched(hub, tmp_path):
    marker = tmp_path / 'unpickled'
    pickled = _pickle_that_writes(marker)
    hub.add_files('org/elsewhere', {'pytorch_model.bin': pickled})
    entries = {'file': 'pytorch_model.bin', 'hf_hub_filename': 'pytorch_model.bin', 'hf_hub_id': 'org/elsewhere',
               'url': f'{hub.endpoint}/org/elsewhere/resolve/main/pytorch_model.bin'}
    repos = []
    for family, model in (('ens', timm_ensembles.create_model('ens_test_resnetx2', num_classes=3)),
                          ('plain', timm.create_model('test_resnet', num_classes=3))):
        folder = export_folder(model, tmp_path / family)
        for key, value in entries.items():
            repos.append(f'org/{family}-{key}')
            hub.add_files(repos[-1], {**_repo_files(folder, **{f'pretrained_cfg__{key}': value}),
                                      'pytorch_model.bin': pickled})
    before = len(hub.requests)
    out = _client(f"""
        import timm, timm_ensembles
        for repo in {repos!r}:
            loads = [timm_ensembles.load_from_hub,
                     lambda r: timm_ensembles.create_model(f'hf-hub:{{r}}', pretrained=True)]
            if repo.startswith('org/ens'):  # this package's models check in timm's own loader too
                loads.append(lambda r: timm.create_model(f'hf-hub:{{r}}', pretrained=True))
            for load in loads:
                try:
                    load(repo)
                except ValueError as e:
                    print(repr(str(e)))
                else:
                    print(repr(f'{{repo}} loaded'))
    """, hub.endpoint, tmp_path)
    lines = [ast.literal_eval(line) for line in out.splitlines()]
    assert len(lines) == 4 * 2 + 4 * 3, out
    for line in lines:
        assert _error_line(line) == line and re.match(
            r"The config\.json of '(hf-hub:)?org/(ens|plain)-(\w+)' says where to fetch weights from \(pretrained_cfg"
            r" (file|hf_hub_filename|hf_hub_id|url)='[^']+'\): timm-ensembles loads a model's own model\.safetensors"
            r" only, never a file, URL or repo that its config names", line), line
        assert re.search(r"-(\w+)' says .*\(pretrained_cfg (\w+)=", line).groups()[0] in line.split('(')[1]
    # nothing but the named repos' config.json was fetched: no pickle, no other repo, no weights at all
    fetched = {r.path for r in hub.requests[before:] if r.method == 'GET' and '/resolve/' in r.path}
    assert fetched == {f'/{repo}/resolve/main/config.json' for repo in repos}, fetched
    assert not marker.exists()


def test_an_ensemble_naming_members_in_other_repos_loads_them_only_when_trusted(hub, tmp_path):
    import io

    members = {name: export_folder(timm.create_model('test_resnet', num_classes=3), tmp_path / name)
               for name in ('member-a', 'member-b')}
    for name, folder in members.items():
        hub.add_files(f'org/{name}', _repo_files(folder))
    ensemble = timm_ensembles.ensemble_of([str(f) for f in members.values()])
    folder = export_folder(ensemble, tmp_path / 'ens')
    named = ['hf-hub:org/member-a', 'hf-hub:org/member-b']
    hub.add_files('org/ens-of-repos', _repo_files(folder, model_args__members=named))
    # members that break the rule, with the opt-in: only a pickle; weights that are not the recorded ones
    buffer = io.BytesIO()
    torch.save(timm.create_model('test_resnet', num_classes=3).state_dict(), buffer)
    hub.add_files('org/member-pickled', {'config.json': (members['member-a'] / 'config.json').read_bytes(),
                                         'pytorch_model.bin': buffer.getvalue()})
    flipped = _repo_files(members['member-b'])
    flipped['model.safetensors'] = flipped['model.safetensors'][:-7] + bytes([flipped['model.safetensors'][-7] ^ 1]) \
        + flipped['model.safetensors'][-6:]
    hub.add_files('org/member-flipped', flipped)
    hub.add_files('org/ens-pickled', _repo_files(folder, model_args__members=['hf-hub:org/member-a',
                                                                              'hf-hub:org/member-pickled']))
    hub.add_files('org/ens-flipped', _repo_files(folder, model_args__members=['hf-hub:org/member-a',
                                                                              'hf-hub:org/member-flipped']))

    before = len(hub.requests)
    refused = _client("""
        import argparse, timm, timm_ensembles
        from timm_ensembles.inference import load_model
        for load in (lambda: timm_ensembles.load_from_hub('org/ens-of-repos'),
                     lambda: timm.create_model('hf-hub:org/ens-of-repos', pretrained=True),
                     lambda: load_model(argparse.Namespace(model='hf-hub:org/ens-of-repos', checkpoint=None,
                                                           trust_member_repos=False))):
            try:
                load()
            except (ValueError, SystemExit) as e:
                print(repr(str(e)))
    """, hub.endpoint, tmp_path / 'untrusted')
    lines = [ast.literal_eval(line) for line in refused.splitlines()]
    members = "names models that live elsewhere as its members ('hf-hub:org/member-a', 'hf-hub:org/member-b'): they" \
              ' load only if you trust them, with load_from_hub('
    assert [line.split(members)[0] for line in lines] == [
        "'org/ens-of-repos' ", "'hf-hub:org/ens-of-repos' ",
        "error: --model hf-hub:org/ens-of-repos: 'hf-hub:org/ens-of-repos' "], refused
    for line in lines:
        assert _error_line(line) and 'trust_member_repos=True' in line and '--trust-member-repos' in line
    assert not any('/org/member-' in r.path for r in hub.requests[before:])  # not even their config.json

    before = len(hub.requests)
    trusted = _client(f"""
        import argparse, torch, timm, timm_ensembles
        from _hub_families import probe
        from timm_ensembles.inference import load_model
        with torch.no_grad():  # the ensemble as exported, its members recorded (same process, same float reductions)
            want = timm.create_model({f'local-dir:{folder}'!r}, pretrained=True).eval()(probe())
        for load in (lambda: timm_ensembles.load_from_hub('org/ens-of-repos', trust_member_repos=True),
                     lambda: timm.create_model('hf-hub:org/ens-of-repos', pretrained=True, trust_member_repos=True),
                     lambda: load_model(argparse.Namespace(model='hf-hub:org/ens-of-repos', checkpoint=None,
                                                           trust_member_repos=True))):
            with torch.no_grad():
                print('identical', torch.equal(load().eval()(probe()), want))
        for repo in ('org/ens-pickled', 'org/ens-flipped'):
            try:
                timm_ensembles.load_from_hub(repo, trust_member_repos=True)
            except (FileNotFoundError, RuntimeError, ValueError) as e:
                print(type(e).__name__, repr(str(e)))
    """, hub.endpoint, tmp_path / 'trusted')
    lines = trusted.splitlines()
    assert lines[:3] == ['identical True'] * 3, trusted
    assert len(lines) == 5, trusted
    pickled, flipped = (ast.literal_eval(line.split(' ', 1)[1]) for line in lines[3:])
    assert "cannot load teacher 'hf-hub:org/member-pickled'" in pickled and \
        "has no model.safetensors, only pytorch_model.bin: a pickle" in pickled
    assert "are not the ones its config.json was written with" in flipped and 'org/member-flipped' in flipped
    gets = [r.path for r in hub.requests[before:] if r.method == 'GET']
    assert any(p.endswith('/org/member-a/resolve/main/model.safetensors') for p in gets)
    assert not any(p.endswith('.bin') for p in gets)


def test_a_push_to_an_unreachable_hub_is_one_line(tmp_path):
    from _hub_servers import run_client

    folder = export_folder(timm.create_model('test_resnet', num_classes=3), tmp_path / 'm')
    for env, says in (({}, f'{NO_HUB} cannot be reached (ConnectError'),
                      ({'HF_HUB_OFFLINE': '1'}, 'HF_HUB_OFFLINE is set')):
        proc = run_client(f"""
            from timm_ensembles.hub.push import main
            main([{str(folder)!r}, 'org/anywhere'])
        """, NO_HUB, tmp_path, env=dict(env, HF_TOKEN='hf_test'), check=False)
        assert proc.returncode == 1 and not proc.stdout, proc.stderr
        assert _error_line(proc.stderr).startswith("error: Cannot push to 'org/anywhere': "), proc.stderr
        assert says in proc.stderr and 'push again' in proc.stderr
