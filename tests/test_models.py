"""Every registered method as a timm model (conftest.METHODS x tiny timm bases): names, forward paths, data config,
classifiers, export; the ensemble container, the builder's arguments and errors. Each method's own tests are in
tests/methods/test_<module>.py."""
import json
import os
import tempfile

import pytest
import timm
import torch
from conftest import (
    ENSEMBLE_METHODS,
    IMG,
    MEMBER_METHODS,
    METHOD_MODULES,
    METHODS,
    STUDENT_METHODS,
    TINY_BASES,
    create_method_model,
    create_method_task,
    method_reference_model,
    model_kwargs,
)
from timm.data import resolve_data_config
from timm.models import build_model_with_cfg, generate_default_cfgs, get_model_args, register_model

import timm_ensembles
from timm_ensembles import DeepEnsemble, EnsembleModel
from timm_ensembles.files.model_folder import export_folder
from timm_ensembles.models.builder import DEFAULT_BASES, DEFAULT_SIZES
from timm_ensembles.models.registry import _size_args, parse_dynamic_name

PARAMS = [(m, b) for m in METHODS for b in TINY_BASES]


def _build(method, base, num_members=2, **kwargs):
    return timm.create_model(method, base_model=base, num_members=num_members,
                             **model_kwargs(base, num_classes=5, **kwargs))


def _x(batch=2):
    return torch.randn(batch, 3, IMG, IMG)


def _classifier_layers(model):
    """The linear layers of ``get_classifier()`` (one module or a tuple; an ensemble head holds its map as ``fc``)."""
    found = model.get_classifier()
    return [getattr(c, 'fc', c) for c in (found if isinstance(found, tuple) else (found,))]


def _data_config(model):
    # a config read back from config.json holds lists where a registry's holds tuples
    return {k: tuple(v) if isinstance(v, list) else v for k, v in resolve_data_config(model=model).items()}


def _normalised(args):
    return json.loads(json.dumps(args))


# ---- every method ----
@pytest.mark.parametrize('method', METHODS)
def test_registered_names(method):
    """The generic name builds; the named variants are every default base (in each size the method names), and the
    smallest builds the model the generic name builds with those arguments, under its own name."""
    assert timm.is_model(method)
    parsed = {n: parse_dynamic_name(n) for n in timm.list_models(module=METHOD_MODULES[method])}
    variants = {n: p for n, p in parsed.items() if p is not None and p['method'] == method}
    if not variants:  # no pre-registered variant (bane: generations of any base; ensemble: of trained models)
        return
    assert {p['base_model'] for p in variants.values()} == set(DEFAULT_BASES)
    size_arg = _size_args.get(method)
    if size_arg is not None:
        sizes = {p[size_arg] for p in variants.values()}
        assert sizes <= set(DEFAULT_SIZES)
        assert set(variants) == {f'{method}_{b}x{n}' for b in DEFAULT_BASES for n in sizes}
    name = min(variants, key=lambda n: (variants[n]['base_model'] != 'resnet18', variants[n].get(size_arg, 0)))
    model = timm.create_model(name, num_classes=5)
    assert type(model) is type(create_method_model(method, 'test_resnet'))
    assert model.pretrained_cfg['architecture'] == name
    for key, value in variants[name].items():
        if key != 'method':
            assert getattr(model, key) == value, key


@pytest.mark.parametrize('method', ENSEMBLE_METHODS + STUDENT_METHODS)  # the others have no base model to name
def test_dynamic_names_build_the_generic_model(method):
    base = 'test_efficientnet'
    name = f'{method}_{base}x3' if method in ENSEMBLE_METHODS else f'{method}_{base}'
    model = timm_ensembles.create_model(name, num_classes=4)
    generic = create_method_model(method, base, size=3, num_classes=4)
    assert type(model) is type(generic) and model.model_args == generic.model_args
    # the generic architecture is what a reload needs
    assert model.pretrained_cfg['architecture'] == method


def test_dynamic_names_for_any_base():
    model = timm_ensembles.create_model('ens_test_efficientnetx3', num_classes=4)
    assert isinstance(model, DeepEnsemble) and model.num_members == 3 and model.base_model == 'test_efficientnet'
    # the generic architecture is what a reload needs
    assert model.pretrained_cfg['architecture'] == 'ens'
    # a base with an 'x' in its name parses (greedy base)
    assert timm_ensembles.models.registry.parse_dynamic_name('fdl_resnext50_32x4dx2') == dict(
        method='fdl', base_model='resnext50_32x4d', num_members=2)


@pytest.mark.parametrize('method,base', PARAMS)
def test_shapes_train_and_eval(tmp_path, method, base):
    model = create_method_model(method, base, folder=tmp_path, size=3)
    x = _x()
    for train in (True, False):
        model.train(train)
        assert model(x).shape == (2, 5)
        if method not in STUDENT_METHODS:  # a student is one network
            assert model.forward_members(x).shape == (2, 3, 5)
    assert model.num_classes == 5
    assert all(layer.out_features == 5 for layer in _classifier_layers(model))


@pytest.mark.parametrize('method,base', PARAMS)
def test_forward_is_the_combined_members_and_the_features_path(tmp_path, method, base):
    model = create_method_model(method, base, folder=tmp_path).eval()
    x = _x()
    with torch.no_grad():
        out = model(x)
        if method not in STUDENT_METHODS:
            assert torch.equal(out, model.combine(model.forward_members(x)))
        if method in MEMBER_METHODS:  # trained models of any architectures have no feature map in common
            return
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), out)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)


@pytest.mark.parametrize('method,base', [(m, b) for m in ENSEMBLE_METHODS for b in TINY_BASES])
def test_members_are_independently_initialised(method, base):
    """Members (or heads) differ in every weight they hold alike (a collaborative head's own stages); students are one
    network, and an ensemble of trained models is given its members."""
    model = create_method_model(method, base)
    first, second = (dict(unit.named_parameters()) for unit in getattr(model, 'members', None) or model.heads)
    alike = [n for n in first.keys() & second.keys() if first[n].dim() > 1]  # weights, not the norms' ones and zeros
    assert alike
    assert all(not torch.equal(first[n], second[n]) for n in alike)


@pytest.mark.parametrize('method,base', PARAMS)
def test_data_config_is_the_base_models(tmp_path, method, base):
    model = create_method_model(method, base, folder=tmp_path)
    assert _data_config(model) == _data_config(method_reference_model(model))


@pytest.mark.parametrize('method,base', PARAMS)
def test_export_reload_is_exact(tmp_path, method, base):
    """The model, and what its task exports (a student's bare network, a collaborative head), reload from their
    folders with timm alone and give the same outputs bit for bit."""
    model = create_method_model(method, base, folder=tmp_path, size=3).eval()
    task = create_method_task(model)
    x = _x(4)
    for name, exported in dict(model=model, export_model=task.export_model(), **task.exports()).items():
        exported.eval()
        export_folder(exported, tmp_path / name)
        reloaded = timm.create_model(f'local-dir:{tmp_path / name}', pretrained=True).eval()
        assert type(reloaded) is type(exported)
        assert _normalised(get_model_args(reloaded)) == _normalised(get_model_args(exported))
        with torch.no_grad():
            assert torch.equal(reloaded(x), exported(x))
            if hasattr(exported, 'forward_members'):
                assert torch.equal(reloaded.forward_members(x), exported.forward_members(x))


@pytest.mark.parametrize('method,base', PARAMS)
def test_reset_classifier(tmp_path, method, base):
    """As timm's: new classifiers of the new class count, every other weight kept; 0 classes: pooled features."""
    model = create_method_model(method, base, folder=tmp_path).eval()
    if method in MEMBER_METHODS:
        with pytest.raises(NotImplementedError, match="keeps its members' classes"):
            model.reset_classifier(3)  # an ensemble of trained models predicts its members' classes
        return
    x = _x()
    with torch.no_grad():
        features = model.forward_features(x)
        model.reset_classifier(3)
        assert model.num_classes == 3 and model(x).shape == (2, 3)
        assert all(layer.out_features == 3 for layer in _classifier_layers(model))
        assert torch.equal(model.forward_features(x), features)
    # the new classifiers are part of the saved model
    export_folder(model, tmp_path / 'reset')
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'reset'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        without = create_method_model(method, base, num_classes=0).eval()
        assert without(x).shape == (2, without.num_features) and without.num_features == model.num_features


# ---- the ensemble container (models/ensemble.py) of the ensemble methods ----
@pytest.mark.parametrize('method,base', [(m, b) for m in ENSEMBLE_METHODS for b in TINY_BASES])
def test_ensemble_container_members_features_and_classifiers(method, base):
    model = create_method_model(method, base, size=3).eval()
    if not isinstance(model, EnsembleModel):
        pytest.skip(f'{type(model).__name__} is not the ensemble container (heads on a shared trunk)')
    assert len(model.members) == 3
    assert model.num_features == 3 * model.members[0].num_features
    classifiers = model.get_classifier()  # every member's, then the ensemble head where it has weights
    assert classifiers[:3] == tuple(m.get_classifier() for m in model.members)
    assert classifiers[3:] == ((model.head,) if model.head.fc is not None else ())
    x = _x()
    with torch.no_grad():
        logits, feats = model.forward_members_with_features(x, 'stages')
        assert torch.equal(logits, model.forward_members(x))
        assert len(feats) == 3 and len(feats[0]) > 1 and all(f.shape[0] == 2 for f in feats[0])


def test_kwargs_are_passed_to_members():
    model = timm.create_model('fdl', base_model='test_resnet', num_classes=7, in_chans=1, global_pool='max',
                              drop_rate=0.25, dtype=torch.float64)
    for member in model.members:
        assert member.num_classes == 7 and member.drop_rate == 0.25
        assert member.conv1[0].in_channels == 1 if isinstance(member.conv1, torch.nn.Sequential) else \
            member.conv1.in_channels == 1
        assert member.global_pool.pool_type == 'max'
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.global_pool == 'max' and model.in_chans == 1
    assert model(torch.randn(2, 1, IMG, IMG, dtype=torch.float64)).shape == (2, 7)
    vit = timm.create_model('ens', base_model='test_vit', img_size=48, num_classes=3)
    assert all(m.patch_embed.img_size == (48, 48) for m in vit.members)


def test_export_reload_dynamic_name_and_no_base_download(tmp_path):
    model = timm_ensembles.create_model('fdl_test_convnextx2', num_classes=3).eval()
    # a recorded pretrained_base must not make the reload fetch the base's weights
    model._model_args = dict(model.__dict__['_recorded_model_args'], pretrained_base=True)
    assert 'pretrained_base' not in model.model_args
    export_folder(model, tmp_path)
    reloaded = timm.create_model(f'local-dir:{tmp_path}').eval()  # not pretrained: rebuilt from model_args only
    assert reloaded.base_model == 'test_convnext' and reloaded.num_members == 2
    reloaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_compile_matches_eager():
    model = _build('fdl', 'test_resnet').eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


# a model of the user's own, registered with timm, with "pretrained" weights in a local file
class _UserNet(torch.nn.Module):
    def __init__(self, num_classes=1000, in_chans=3, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 8
        self.conv = torch.nn.Conv2d(in_chans, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, num_classes)

    def forward_features(self, x):
        return self.conv(x).relu()

    def forward_head(self, x, pre_logits=False):
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes, global_pool=None):
        self.num_classes = num_classes
        self.fc = torch.nn.Linear(8, num_classes)


# the user's weights file: written by the test that loads it (one per pytest process)
_USER_WEIGHTS = os.path.join(tempfile.gettempdir(), f'te_user_net-{os.getpid()}.safetensors')
default_cfgs = generate_default_cfgs({'te_user_net.local': dict(
    file=_USER_WEIGHTS, num_classes=10, mean=(0.5,), std=(0.5,), input_size=(3, 16, 16))})


@register_model
def te_user_net(pretrained=False, **kwargs):
    return build_model_with_cfg(_UserNet, 'te_user_net', pretrained, **kwargs)


def test_user_registered_base_and_pretrained_base():
    from safetensors.torch import save_file
    weights = _UserNet(num_classes=10).state_dict()
    save_file(weights, _USER_WEIGHTS)
    model = timm.create_model('fdl', base_model='te_user_net', num_members=2, pretrained_base=True)
    for member in model.members:
        assert torch.equal(member.conv.weight, weights['conv.weight'])
    assert resolve_data_config(model=model)['mean'] == (0.5,)
    assert 'pretrained_base' not in model.model_args
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 10)


# ---- bad input ----
def test_unknown_base_names_close_matches():
    with pytest.raises(ValueError, match="Unknown base model 'resnet5O'.*Close matches: .*resnet50"):
        timm.create_model('fdl', base_model='resnet5O')


@pytest.mark.parametrize('n', [1, 0, -2, 2.5, True])
def test_too_few_members(n):
    with pytest.raises(ValueError, match='num_members >= 2'):
        timm.create_model('ens', base_model='test_resnet', num_members=n)


def test_dynamic_name_with_one_member():
    with pytest.raises(ValueError, match='num_members >= 2'):
        timm_ensembles.create_model('fdl_test_resnetx1')


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"Unknown model 'fdll_resnet18x2'.*<method>_<base>x<N>"):
        timm_ensembles.create_model('fdll_resnet18x2')


def test_named_variant_rejects_other_base():
    with pytest.raises(ValueError, match="built with base_model='resnet18'"):
        timm.create_model('fdl_resnet18x2', base_model='resnet34')


def test_generic_name_needs_base():
    with pytest.raises((ValueError, TypeError), match='base_model'):
        timm.create_model('fdl')


def test_pretrained_without_published_weights():
    with pytest.raises(ValueError, match='no published weights.*pretrained_base=True'):
        timm.create_model('fdl_resnet18x2', pretrained=True)


def test_bad_combine_mode():
    with pytest.raises(ValueError, match='Unknown combine mode'):
        _build('ens', 'test_resnet', combine='vote')


@pytest.mark.parametrize('name, prefixes', [
    ('fdl_test_resnetx2', ('members.0.', 'members.1.')),
    ('collab_test_resnetx2', ('heads.0.', 'heads.1.')),
    ('ban_test_resnet', ('student.',)),
])
def test_layer_decay_decays_every_member_by_its_own_depth(name, prefixes):
    from timm.optim import create_optimizer_v2
    model = timm_ensembles.create_model(name, num_classes=4)
    base = timm.create_model('test_resnet', num_classes=4)
    scale_of = {}
    for m in (model, base):
        names = {id(p): n for n, p in m.named_parameters()}
        for group in create_optimizer_v2(m, 'sgd', lr=0.1, layer_decay=0.5).param_groups:
            scale_of.update({(m is base, names[id(p)]): group['lr_scale'] for p in group['params']})
    for (is_base, n), scale in scale_of.items():
        if is_base:
            continue
        if n.startswith('head.'):  # the ensemble head goes with the classifiers
            assert scale == scale_of[(True, 'fc.weight')]
            continue
        prefix = next(p for p in prefixes if n.startswith(p))
        if (True, n[len(prefix):]) in scale_of:  # a weight the base has: the base's depth, whichever member holds it
            assert scale == scale_of[(True, n[len(prefix):])], n
    assert len({s for (b, _), s in scale_of.items() if not b}) == len({s for (b, _), s in scale_of.items() if b})


@pytest.mark.parametrize('name, prefixes', [
    ('ens_te_plain_netx2', ('members.0.', 'members.1.')), ('fdl_te_plain_netx2', ('members.0.', 'members.1.')),
    ('ban_te_plain_net', ('student.',)),
])
def test_layer_decay_of_a_users_model_without_group_matcher_is_timms_own(name, prefixes):
    """A user's net without group_matcher: timm groups it itself (auto_group_layers); in an ensemble or a student
    every member gets that grouping, and an ensemble's head goes with the classifiers."""
    from timm.optim import create_optimizer_v2
    base = timm.create_model('te_plain_net', num_classes=4)
    model = timm_ensembles.create_model(name, num_classes=4, in_chans=1)
    scale_of = {}
    for m in (base, model):
        names = {id(p): n for n, p in m.named_parameters()}
        for group in create_optimizer_v2(m, 'sgd', lr=0.1, layer_decay=0.5).param_groups:
            scale_of.update({(m is base, names[id(p)]): group['lr_scale'] for p in group['params']})
    assert scale_of[(True, 'conv.weight')] == 0.5 and scale_of[(True, 'fc.weight')] == 1.0  # timm's own
    for (is_base, n), scale in scale_of.items():
        if not is_base:
            own = next((n[len(p):] for p in prefixes if n.startswith(p)), 'fc.weight')  # the head: a classifier
            assert scale == scale_of[(True, own)], n


def test_features_only_gives_the_members_maps_side_by_side():
    model = timm.create_model('ens', base_model='test_resnet', num_members=2, features_only=True, out_indices=(1, 3))
    base = timm.create_model('test_resnet', features_only=True, out_indices=(1, 3))
    assert model.feature_info.channels() == [2 * c for c in base.feature_info.channels()]
    assert model.feature_info.reduction() == base.feature_info.reduction()
    full = timm.create_model('ens', base_model='test_resnet', num_members=2).eval()
    wanted = model.state_dict()  # timm's feature wrapper holds the ensemble as .model, its unused layers pruned
    model.load_state_dict({f'model.{k}': v for k, v in full.state_dict().items() if f'model.{k}' in wanted})
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        levels = model.eval()(x)
        per_member = [m.forward_intermediates(x, indices=(1, 3), intermediates_only=True) for m in full.members]
    for level, k in zip(levels, range(2)):
        torch.testing.assert_close(level, torch.cat([p[k] for p in per_member], dim=1))


@pytest.mark.parametrize('method', METHODS)
def test_temperature_divides_forward_and_survives_export(tmp_path, method):
    """Temperature scaling as a property of the model: forward's logits divided by T, recorded in model_args, back
    after a reload, gone with the classes it was fitted to."""
    model = create_method_model(method, 'test_resnet', folder=tmp_path).eval()
    x = _x()
    with torch.no_grad():
        plain = model(x)
        model.set_temperature(2.5)
        assert torch.equal(model(x), plain / 2.5)
    assert model.model_args['temperature'] == 2.5
    export_folder(model, tmp_path / 'calibrated')
    reloaded = timm.create_model(f'local-dir:{tmp_path / "calibrated"}', pretrained=True).eval()
    with torch.no_grad():
        assert reloaded.temperature == 2.5 and torch.equal(reloaded(x), model(x))
    model.set_temperature(1)
    assert 'temperature' not in model.model_args
    for bad in (0, -1.0, float('nan'), float('inf'), True, '2'):
        with pytest.raises(ValueError, match='finite number > 0'):
            model.set_temperature(bad)
    if method not in MEMBER_METHODS:  # an ensemble of trained models keeps its members' classes
        reloaded.reset_classifier(3)
        assert reloaded.temperature == 1.0 and 'temperature' not in reloaded.model_args


def test_temperature_needs_a_classifier():
    with pytest.raises(ValueError, match="built without one \\(features_only\\)"):
        timm.create_model('ens', base_model='test_resnet', num_members=2, features_only=True, temperature=2.0)
    model = timm.create_model('ens', base_model='test_resnet', num_members=2, num_classes=0)
    with pytest.raises(ValueError, match='no classifier'):
        model.set_temperature(2.0)
