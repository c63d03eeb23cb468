"""Independent deep ensembles (methods/ens.py): every member learns its own cross-entropy alone."""
import timm
import torch
import torch.nn.functional as F
from conftest import IMG

import timm_ensembles
from timm_ensembles import DeepEnsembleTask
from timm_ensembles.models.builder import DEFAULT_BASES, DEFAULT_SIZES


def _batch(n=4):
    return torch.randn(n, 3, IMG, IMG), torch.randint(0, 4, (n,))


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_named_variants_of_every_default_base_and_size():
    assert {f'ens_{b}x{n}' for b in DEFAULT_BASES for n in DEFAULT_SIZES} <= set(timm.list_models('ens_*'))


def test_deep_ensemble_members_learn_only_their_own_loss():
    model = timm.create_model('ens', base_model='test_resnet', num_members=2, num_classes=4)
    task = timm_ensembles.create_task(model)
    assert isinstance(task, DeepEnsembleTask)
    x, y = _batch()
    out = task(x, y)
    logits = model.forward_members(x)
    torch.testing.assert_close(out['loss'], F.cross_entropy(logits[:, 0], y) + F.cross_entropy(logits[:, 1], y))
    out['loss'].backward()
    g_all = _grads(model.members[0])
    model.zero_grad()
    F.cross_entropy(model.members[0](x), y).backward()
    for name, g in _grads(model.members[0]).items():
        torch.testing.assert_close(g_all[name], g)
    assert set(out['components']) == {'ce'}
    torch.testing.assert_close(out['output'], model.combine(logits.detach()))
