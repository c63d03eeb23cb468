"""Fine-tuning a saved model of any family on new classes or input channels, as timm does for its own models:
classifiers re-initialised, first convolutions adapted (``adapt_input_conv``), every other weight kept."""
import pytest
import timm
import torch
from timm.models import adapt_input_conv

import timm_ensembles
from timm_ensembles.files.model_folder import export_folder
from timm_ensembles.models.builder import adaptable_layers

IMG = 32
FAMILIES = {
    'fdl': lambda: timm.create_model('fdl', base_model='test_resnet', num_members=2, num_classes=10),
    'ens': lambda: timm.create_model('ens', base_model='test_efficientnet', num_members=3, num_classes=10),
    'collab': lambda: timm.create_model('collab', base_model='test_resnet', num_heads=4, hierarchy=[2, 2],
                                        num_classes=10),
    'ban (student wrapper)': lambda: timm.create_model('ban', base_model='test_resnet', num_classes=10),
    'meal (student wrapper)': lambda: timm.create_model('meal', base_model='test_resnet', num_classes=10),
    'user net ensemble': lambda: timm.create_model('fdl', base_model='te_plain_net', num_members=2, num_classes=10,
                                                   in_chans=1),
}


def _bane(tmp_path):
    folders = []
    for k in range(2):
        export_folder(timm.create_model('test_resnet', num_classes=10), tmp_path / f'gen{k}')
        folders.append(str(tmp_path / f'gen{k}'))
    return timm_ensembles.create_bane(folders)


def _chans(family):
    return 1 if family == 'user net ensemble' else 3


def _saved(tmp_path, family):
    model = _bane(tmp_path) if family == 'bane' else FAMILIES[family]()
    c = _chans(family)
    export_folder(model, tmp_path / 'saved', data_config=dict(input_size=(c, IMG, IMG), mean=(0.5,) * c,
                                                              std=(0.5,) * c, crop_pct=1.0, interpolation='bilinear'))
    return model, tmp_path / 'saved'


@pytest.mark.parametrize('family', [*FAMILIES, 'bane'])
def test_fine_tune_on_new_classes_keeps_every_other_weight(tmp_path, family):
    model, folder = _saved(tmp_path, family)
    first_convs, classifiers = adaptable_layers(model)
    assert first_convs and classifiers
    tuned = timm.create_model(f'local-dir:{folder}', pretrained=True, num_classes=5)
    assert tuned.num_classes == 5
    saved = model.state_dict()
    new = tuned.state_dict()
    is_classifier = lambda k: any(k.startswith(c + '.') for c in classifiers)  # noqa: E731
    assert set(new) == set(saved)
    for key, value in new.items():
        if is_classifier(key):
            assert value.shape[0] == 5 and saved[key].shape[0] == 10, key
        else:
            assert torch.equal(value, saved[key]), key
    # a training step on the new classes
    if family == 'bane':
        return  # an inference model: its generations are trained one by one
    task_kwargs = dict(fdl_weight=1e-3) if family.startswith(('fdl', 'user')) else {}
    if 'student' in family:  # a teacher of the new classes
        task_kwargs['teachers'] = [timm.create_model('test_resnet', num_classes=5)]
    task = timm_ensembles.create_task(tuned, **task_kwargs)
    optimizer = task.create_optimizer(opt='sgd', lr=0.01, momentum=0.9)
    x, y = torch.randn(4, _chans(family), IMG, IMG), torch.randint(0, 5, (4,))
    out = task(x, y)
    assert out['output'].shape == (4, 5)
    out['loss'].backward()
    optimizer.step()


@pytest.mark.parametrize('family', [f for f in [*FAMILIES, 'bane'] if f != 'user net ensemble'])
def test_fine_tune_on_gray_input_adapts_the_first_convolutions(tmp_path, family):
    model, folder = _saved(tmp_path, family)
    first_convs, _ = adaptable_layers(model)
    tuned = timm.create_model(f'local-dir:{folder}', pretrained=True, in_chans=1)
    saved = model.state_dict()
    new = tuned.state_dict()
    for key, value in new.items():
        if any(key == f'{name}.weight' for name in first_convs):
            assert torch.equal(value, adapt_input_conv(1, saved[key])), key
        else:
            assert torch.equal(value, saved[key]), key
    tuned.eval()
    with torch.no_grad():
        assert tuned(torch.randn(2, 1, IMG, IMG)).shape == (2, 10)
    if family == 'bane':
        return
    task_kwargs = dict(fdl_weight=1e-3) if family == 'fdl' else {}
    if 'student' in family:
        task_kwargs['teachers'] = [timm.create_model('test_resnet', num_classes=10, in_chans=1)]
    task = timm_ensembles.create_task(tuned.train(), **task_kwargs)
    optimizer = task.create_optimizer(opt='sgd', lr=0.01, momentum=0.9)
    task(torch.randn(4, 1, IMG, IMG), torch.randint(0, 10, (4,)))['loss'].backward()
    optimizer.step()


def test_fine_tune_through_load_from_hub_and_a_folder_written_before_the_names_were_recorded(tmp_path):
    import json
    model, folder = _saved(tmp_path, 'fdl')
    config = json.loads((folder / 'config.json').read_text())
    assert config['pretrained_cfg']['classifier'] == ['members.0.fc', 'members.1.fc', 'head.fc']
    # an older export has no layer names: they are found on the model
    for key in ('classifier', 'first_conv'):
        config['pretrained_cfg'].pop(key)
    (folder / 'config.json').write_text(json.dumps(config))
    tuned = timm_ensembles.load_from_hub(f'local-dir:{folder}', num_classes=3).eval()
    assert tuned(torch.randn(1, 3, IMG, IMG)).shape == (1, 3)


def test_bad_fine_tuning_input(tmp_path):
    import json
    _, folder = _saved(tmp_path, 'fdl')
    with pytest.raises(ValueError, match='num_classes must be a whole number >= 0'):
        timm.create_model(f'local-dir:{folder}', pretrained=True, num_classes=-2)
    # a config whose class count was edited: only the classifiers do not fit
    config = json.loads((folder / 'config.json').read_text())
    config['num_classes'] = config['pretrained_cfg']['num_classes'] = 7
    config['model_args']['num_classes'] = 7
    (folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match=r'classifiers of .*members\.0\.fc.*pass num_classes='):
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    config['architecture'] = 'fdl_no_such_thing'
    (folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(Exception, match='fdl_no_such_thing'):
        timm.create_model(f'local-dir:{folder}', pretrained=True, num_classes=3)
