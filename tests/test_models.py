"""The ensemble wrappers as timm models, over methods x tiny timm bases."""
import os
import tempfile

import pytest
import timm
import torch
from conftest import IMG, METHODS, TINY_BASES, model_kwargs
from timm.data import resolve_data_config
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

import timm_ensembles
from timm_ensembles import DeepEnsemble, FDLEnsemble
from timm_ensembles._builder import DEFAULT_BASES, DEFAULT_SIZES
from timm_ensembles._checkpoint import export_folder

PARAMS = [(m, b) for m in METHODS for b in TINY_BASES]


def _build(method, base, num_members=2, **kwargs):
    return timm.create_model(method, base_model=base, num_members=num_members,
                             **model_kwargs(base, num_classes=5, **kwargs))


@pytest.mark.parametrize('method,base', PARAMS)
def test_shapes_train_and_eval(method, base):
    model = _build(method, base, num_members=3)
    x = torch.randn(2, 3, IMG, IMG)
    for train in (True, False):
        model.train(train)
        assert model(x).shape == (2, 5)
        assert model.forward_members(x).shape == (2, 3, 5)
    assert model.num_classes == 5 and len(model.members) == 3
    assert model.num_features == 3 * model.members[0].num_features
    classifiers = model.get_classifier()  # every member's, then the ensemble head where it has weights
    assert classifiers[:3] == tuple(m.get_classifier() for m in model.members)
    assert classifiers[3:] == ((model.head,) if model.head.fc is not None else ())


@pytest.mark.parametrize('method,base', PARAMS)
def test_forward_is_head_of_members_and_features_path_matches(method, base):
    model = _build(method, base).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        members = model.forward_members(x)
        torch.testing.assert_close(model(x), model.combine(members), rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))
        logits, feats = model.forward_members_with_features(x, 'stages')
        torch.testing.assert_close(logits, members)
        assert len(feats) == 2 and len(feats[0]) > 1 and all(f.shape[0] == 2 for f in feats[0])


@pytest.mark.parametrize('method,base', PARAMS)
def test_members_are_independently_initialised(method, base):
    model = _build(method, base)
    a, b = (torch.cat([p.flatten() for p in m.parameters()]) for m in model.members)
    assert not torch.equal(a, b)


@pytest.mark.parametrize('method,base', PARAMS)
def test_data_config_is_the_base_models(method, base):
    model = _build(method, base)
    base_model = timm.create_model(base, **model_kwargs(base, num_classes=5))
    assert resolve_data_config(model=model) == resolve_data_config(model=base_model)


@pytest.mark.parametrize('method', METHODS)
def test_registered_names(method):
    names = set(timm.list_models(f'{method}_*'))
    assert {f'{method}_{b}x{n}' for b in DEFAULT_BASES for n in DEFAULT_SIZES} <= names
    assert method in timm.list_models(method)


def test_mission_name_builds():
    model = timm.create_model('fdl_resnet50x2')
    assert isinstance(model, FDLEnsemble) and model.base_model == 'resnet50' and model.num_members == 2
    assert model.num_classes == 1000 and model.pretrained_cfg['architecture'] == 'fdl_resnet50x2'
    assert resolve_data_config(model=model) == resolve_data_config(model=timm.create_model('resnet50'))


def test_dynamic_names_for_any_base():
    model = timm_ensembles.create_model('ens_test_efficientnetx3', num_classes=4)
    assert isinstance(model, DeepEnsemble) and model.num_members == 3 and model.base_model == 'test_efficientnet'
    # the generic architecture is what a reload needs
    assert model.pretrained_cfg['architecture'] == 'ens'
    # a base with an 'x' in its name parses (greedy base)
    assert timm_ensembles._registry.parse_dynamic_name('fdl_resnext50_32x4dx2') == dict(
        method='fdl', base_model='resnext50_32x4d', num_members=2)


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


def test_reset_classifier():
    model = _build('fdl', 'test_resnet')
    model.reset_classifier(3)
    assert model(torch.randn(2, 3, IMG, IMG)).shape == (2, 3) and model.num_classes == 3
    assert model.head.fc.out_features == 3
    model.reset_classifier(0)
    pooled = model(torch.randn(2, 3, IMG, IMG))
    assert pooled.shape == (2, model.num_features)


def test_conv_taps_are_the_references_convolutions():
    model = _build('fdl', 'test_resnet').eval()
    # every convolution but the shortcut projections ('downsample'), as the reference's name rule picks them
    n_convs = sum(isinstance(m, torch.nn.Conv2d) and 'downsample' not in n for n, m in model.members[0].named_modules())
    assert 0 < n_convs < sum(isinstance(m, torch.nn.Conv2d) for m in model.members[0].modules())
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        logits, feats = model.forward_members_with_features(x, 'convs')
        assert len(feats[0]) == n_convs and len(feats[1]) == n_convs
        assert torch.equal(logits, model.forward_members(x))
    # hooks are removed after the pass
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize('method', METHODS)
def test_export_reload_is_exact(tmp_path, method):
    model = _build(method, 'test_resnet', num_members=3).eval()
    export_folder(model, tmp_path)
    reloaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert type(reloaded) is type(model) and reloaded.num_members == 3 and reloaded.combine_mode == model.combine_mode
    x = torch.randn(4, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
        assert torch.equal(reloaded.forward_members(x), model.forward_members(x))


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
