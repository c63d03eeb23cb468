"""Collaborative multi-head networks: sharing, the objective, backpropagation rescaling, export, bad input."""
import math
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import IMG, TINY_BASES, model_kwargs
from safetensors.torch import load_file, save_file

import timm_ensembles
from timm_ensembles import CollaborativeNet
from timm_ensembles.files.model_folder import export_folder
from timm_ensembles.methods.collab import collaborative_soft_loss, default_splits
from timm_ensembles.models.split import grad_rescale

SCHEMES = {'simple2': dict(num_heads=2), 'tree4': dict(num_heads=4, hierarchy=[2, 2])}
PARAMS = [(b, s) for b in TINY_BASES for s in SCHEMES]


def _build(base, **kwargs):
    return timm.create_model('collab', base_model=base, **model_kwargs(base, num_classes=5, **kwargs))


def _x(batch=4):
    return torch.randn(batch, 3, IMG, IMG)


@pytest.mark.parametrize('base,scheme', PARAMS)
def test_shapes_and_every_parameter_gets_a_gradient(base, scheme):
    model = _build(base, **SCHEMES[scheme])
    heads = model.num_heads
    x = _x()
    for train in (True, False):
        model.train(train)
        assert model(x).shape == (4, 5)
        assert model.forward_members(x).shape == (4, heads, 5)
    task = timm_ensembles.create_task(model.train())
    out = task(x, torch.randint(0, 5, (4,)))
    out['loss'].backward()
    missing = [n for n, p in task.named_parameters() if p.grad is None]
    assert not missing
    assert set(out['components']) == {'ce', 'kl'}


@pytest.mark.parametrize('base,scheme', PARAMS)
def test_exported_head_equals_the_head_exactly(base, scheme):
    model = _build(base, **SCHEMES[scheme]).eval()
    x = _x()
    with torch.no_grad():
        members = model.forward_members(x)
        assert torch.equal(model(x), members[:, 0])
        for h in range(model.num_heads):
            exported = model.export_head(h).eval()
            assert type(exported) is type(timm.create_model(base, **model_kwargs(base)))
            assert torch.equal(exported(x), members[:, h])


def test_shared_weights_are_stored_once():
    model = _build('test_resnet', num_heads=4, hierarchy=[2, 2], split=[2, 3])
    plain = timm.create_model('test_resnet', num_classes=5)

    def count(prefixes):
        return sum(p.numel() for n, p in plain.named_parameters() if n.split('.')[0] in prefixes)
    # trunk (stem, layer1, layer2) once, layer3 twice (one per subtree), layer4 and the classifier four times
    expected = count({'conv1', 'bn1', 'layer1', 'layer2'}) + 2 * count({'layer3'}) + 4 * count({'layer4', 'fc'})
    assert sum(p.numel() for p in model.parameters()) == expected
    assert {n.split('.')[2] for n in model.state_dict() if n.startswith('heads.1.')} == {'layer4', 'fc'}
    assert {n.split('.')[2] for n in model.state_dict() if n.startswith('heads.2.')} == {'layer3', 'layer4', 'fc'}


EXTRA_BASES = [
    ('vgg11', dict(mlp_ratio=0.01)),
    ('densenet121', dict(block_config=(1, 1, 1, 1))),
    ('mobilenetv3_small_050', {}),
    ('deit_tiny_distilled_patch16_224', dict(img_size=IMG, depth=2)),
    ('vit_tiny_patch16_224', dict(img_size=IMG, depth=3, reg_tokens=4, class_token=False, global_pool='avg')),
]


@pytest.mark.parametrize('base,kwargs', EXTRA_BASES, ids=[b for b, _ in EXTRA_BASES])
def test_export_equality_over_more_families_and_configs(base, kwargs):
    model = timm.create_model('collab', base_model=base, num_heads=4, hierarchy=[2, 2], num_classes=5, **kwargs)
    model.eval()
    x = _x(2)
    with torch.no_grad():
        members = model.forward_members(x)
        for h in range(4):
            assert torch.equal(model.export_head(h).eval()(x), members[:, h])


def test_grad_rescale_is_identity_forward_and_scales_backward():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    branches = [grad_rescale(x, 1 / 3) for _ in range(3)]
    assert all(torch.equal(b, x) for b in branches)
    # d/dx of 3*y1 + 6*y2 + 9*y3 with each branch's gradient divided by 3: (3 + 6 + 9) / 3 = 6 per element
    (3 * branches[0] + 6 * branches[1] + 9 * branches[2]).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([6.0, 6.0]))


# (hierarchy, split, the gradient factor of the weights in each stage: stem, layer1..layer4; the classifier 1)
RESCALE_CASES = [
    ([2, 2], [1, 3], [1 / 4, 1 / 4, 1 / 2, 1 / 2, 1]),
    ([2, 3], [1, 3], [1 / 6, 1 / 6, 1 / 3, 1 / 3, 1]),
    ([3, 2], [2, 3], [1 / 6, 1 / 6, 1 / 6, 1 / 2, 1]),
    ([2, 2, 2], [1, 2, 3], [1 / 8, 1 / 8, 1 / 4, 1 / 2, 1]),
]


@pytest.mark.parametrize('hierarchy,split,factors', RESCALE_CASES, ids=[str(c[0]) for c in RESCALE_CASES])
def test_backward_rescaling_divides_shared_gradients_by_the_branch_count(hierarchy, split, factors):
    # the gradient a shared weight receives is the sum over the heads below it, divided by the branch count at
    # every split on the way: the product of the branching factors below its stage
    model = _build('test_resnet', num_heads=math.prod(hierarchy), hierarchy=hierarchy, split=split,
                   dtype=torch.float64)
    task = timm_ensembles.create_task(model)
    x, y = _x().double(), torch.randint(0, 5, (4,))
    grads = {}
    for rescale in (True, False):
        model.backward_rescale = rescale
        model.zero_grad()
        task(x, y)['loss'].backward()
        grads[rescale] = {n: p.grad.clone() for n, p in model.named_parameters()}
    stage = {'conv1': 0, 'bn1': 0, 'layer1': 1, 'layer2': 2, 'layer3': 3, 'layer4': 4, 'fc': 5}
    for name, g in grads[True].items():
        factor = (factors + [1])[stage[name.split('.')[2]]]
        torch.testing.assert_close(g, grads[False][name] * factor, rtol=1e-12, atol=1e-15, msg=name)


def test_soft_loss_hand_computed():
    # heads' logits for one sample, 3 heads, 2 classes, T = 2
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]])
    T = 2.0

    def softmax(v):
        e = [math.exp(a) for a in v]
        return [a / sum(e) for a in e]

    expected = []
    for h in range(3):
        others = [z[0, g].tolist() for g in range(3) if g != h]
        target = [(others[0][c] + others[1][c]) / 2 for c in range(2)]
        q = softmax([t / T for t in target])
        p = softmax([v / T for v in z[0, h].tolist()])
        expected.append(T * T * sum(qc * math.log(qc / pc) for qc, pc in zip(q, p)))
    torch.testing.assert_close(collaborative_soft_loss(z, T), torch.tensor(expected), rtol=1e-6, atol=1e-7)
    # T^2 scaling: at T = 1 the same formula with no factor; head 0's target is the mean of heads 1 and 2
    q0 = softmax([1.0, 0.5])
    p0 = softmax([1.0, 0.0])
    kl0 = sum(a * math.log(a / b) for a, b in zip(q0, p0))
    torch.testing.assert_close(collaborative_soft_loss(z, 1.0)[0], torch.tensor(kl0), rtol=1e-6, atol=1e-7)


def test_soft_targets_exclude_the_head_itself_and_are_detached():
    torch.manual_seed(0)
    z = torch.randn(8, 4, 10)
    changed = z.clone()
    changed[:, 2] += torch.randn(8, 10) * 5
    # head 2's own logits enter only its prediction: its target is the same, so the loss changes by the
    # difference of the predictions alone, computed here against the unchanged target
    others = torch.cat([z[:, :2], z[:, 3:]], dim=1).mean(1)
    q = F.softmax(others / 3.0, -1)
    expected = 9.0 * F.kl_div(F.log_softmax(changed[:, 2] / 3.0, -1), q, reduction='batchmean')
    torch.testing.assert_close(collaborative_soft_loss(changed, 3.0)[2], expected, rtol=1e-5, atol=1e-6)
    leaf = z.clone().requires_grad_()
    collaborative_soft_loss(leaf, 3.0)[0].backward()
    assert torch.count_nonzero(leaf.grad[:, 1:]) == 0 and torch.count_nonzero(leaf.grad[:, 0]) > 0


def test_task_loss_is_the_sum_of_the_head_losses():
    model = _build('test_resnet', num_heads=3)
    task = timm_ensembles.create_task(model, beta=0.3, temperature=4.0)
    x, y = _x(), torch.randint(0, 5, (4,))
    out = task(x, y)
    logits = model.forward_members(x).detach()
    ce = torch.stack([F.cross_entropy(logits[:, h], y) for h in range(3)])
    expected = (0.3 * ce + 0.7 * collaborative_soft_loss(logits, 4.0)).sum()
    torch.testing.assert_close(out['loss'], expected, rtol=1e-5, atol=1e-6)


def test_names_defaults_and_reload(tmp_path):
    assert timm.is_model('collab_resnet18x2') and timm.is_model('collab_convnext_tinyx4')
    assert not timm.is_model('collab_resnet18x3')
    # x4 means 2-way sharing at two depths for every base, registered variant or not
    assert timm.create_model('collab_resnet18x4', num_classes=5).hierarchy == [2, 2]
    model = timm_ensembles.create_model('collab_test_resnetx4', num_classes=5).eval()
    assert model.num_heads == 4 and model.hierarchy == [2, 2] and model.splits == default_splits(4, 2) == [2, 3]
    assert timm_ensembles.create_model('collab_test_resnetx3', num_classes=5).hierarchy == [3]
    with pytest.raises(ValueError, match=r"means hierarchy=\[2, 2\], but hierarchy=\[4\] was passed"):
        timm_ensembles.create_model('collab_test_resnetx4', hierarchy=[4])
    export_folder(model, tmp_path / 'collab')
    reloaded = timm.create_model(f'local-dir:{tmp_path / "collab"}', pretrained=True).eval()
    assert isinstance(reloaded, CollaborativeNet) and reloaded.splits == [2, 3] and reloaded.hierarchy == [2, 2]
    x = _x()
    with torch.no_grad():
        assert torch.equal(reloaded.forward_members(x), model.forward_members(x))


def test_exported_head_loads_with_plain_timm(tmp_path):
    model = _build('test_convnext', num_heads=2, head_index=1).eval()
    export_folder(model.export_head(), tmp_path / 'head')
    x = _x()
    with torch.no_grad():
        expected = model(x)
    save_file({'x': x}, tmp_path / 'x.safetensors')
    script = (
        'import sys, timm, torch\n'
        'from safetensors.torch import load_file, save_file\n'
        f"m = timm.create_model('local-dir:{tmp_path / 'head'}', pretrained=True).eval()\n"
        "assert not any(k.startswith('timm_ensembles') for k in sys.modules)\n"
        f"x = load_file('{tmp_path / 'x.safetensors'}')['x']\n"
        'with torch.no_grad():\n'
        f"    save_file({{'y': m(x), 'is_plain': torch.tensor(type(m).__name__ == 'ConvNeXt')}},"
        f" '{tmp_path / 'y.safetensors'}')\n"
    )
    subprocess.run([sys.executable, '-c', script], check=True, env={'HF_HUB_OFFLINE': '1', 'PATH': ''})
    got = load_file(tmp_path / 'y.safetensors')
    assert bool(got['is_plain'])
    assert torch.equal(got['y'], expected)


def test_mean_combines_average_the_heads_and_another_head_can_be_designated():
    x = _x()
    model = _build('test_resnet', num_heads=2, combine='mean_logits').eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_members(x).mean(1))
    model = _build('test_resnet', num_heads=3, combine='mean_probs').eval()
    with torch.no_grad():
        members = model.forward_members(x)
        torch.testing.assert_close(model(x).softmax(-1), members.softmax(-1).mean(1))
        model.combine_mode, model.head_index = 'head', 2
        assert torch.equal(model(x), members[:, 2])
        assert torch.equal(model.forward_head(model.forward_features(x)), members[:, 2])
    with pytest.raises(ValueError, match=r'head index in 0\.\.2'):
        model.head_index = 3


def test_reset_classifier_then_export_and_no_weight_decay():
    model = _build('test_vit', num_heads=2)
    assert model.no_weight_decay() == {'heads.0.pos_embed', 'heads.0.cls_token'}
    model.reset_classifier(7, 'avg')
    model.eval()
    x = _x(2)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        assert torch.equal(model.export_head(1).eval()(x), model.forward_members(x)[:, 1])


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _build('test_resnet', num_heads=4, hierarchy=[2, 2])
    task = timm_ensembles.create_task(model)
    x, y = _x(), torch.randint(0, 5, (4,))
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        task(x, y)['loss'].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_pretrained_base_heads_get_their_own_classifiers(monkeypatch):
    # stand-in for timm's pretrained weights (no download in tests): every head starts from the same weights
    weights = timm.create_model('test_resnet', num_classes=5).state_dict()
    real = timm.create_model

    def fake_create(name, pretrained=False, **kwargs):
        model = real(name, **kwargs)
        if pretrained:
            model.load_state_dict(weights)
        return model
    monkeypatch.setattr(timm, 'create_model', fake_create)
    model = CollaborativeNet('test_resnet', num_heads=2, split=2, pretrained_base=True, num_classes=5)
    assert torch.equal(model.heads[0].layer3[0].conv1.weight, model.heads[1].layer3[0].conv1.weight)
    assert not torch.equal(model.heads[0].fc.weight, model.heads[1].fc.weight)


@pytest.mark.parametrize('kwargs,match', [
    (dict(split=7), r'valid split points are 0 \(after the stem, if it has one\) to 4'),
    (dict(num_heads=4, hierarchy=[2, 2], split=[3, 2]), 'strictly increasing'),
    (dict(num_heads=1), 'num_heads >= 2'),
    (dict(num_heads=4, hierarchy=[2, 3]), r'gives 6 heads, but num_heads=4'),
    (dict(num_heads=4, hierarchy=[4, 1]), 'branching factors >= 2'),
    (dict(num_heads=4, hierarchy=[2, 2], split=3), 'one stage index per level'),
    (dict(head_index=2), r'head index in 0\.\.1'),
    (dict(combine='linear'), 'Unknown combine mode'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _build('test_resnet', **kwargs)


def test_bad_export_index_and_unsupported_family():
    model = _build('test_resnet', num_heads=2)
    with pytest.raises(ValueError, match=r'head index in 0\.\.1, got 2'):
        model.export_head(2)
    with pytest.raises(ValueError, match=r"Cannot split 'test_byobnet' \(ByobNet\).*register_split_layout"):
        _build('test_byobnet', num_heads=2)
    with pytest.raises(ValueError, match='beta'):
        timm_ensembles.create_task(model, beta=1.5)


def test_a_weight_outside_the_layout_is_refused():
    model = timm.create_model('test_resnet')
    model.extra = torch.nn.Linear(2, 2)  # a configuration the ResNet layout does not foresee
    with pytest.raises(ValueError, match="does not place 'extra.weight' of 'test_resnet'"):
        timm_ensembles.get_split_layout(model, 'test_resnet')
