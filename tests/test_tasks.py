"""The training task of every registered method (conftest.METHODS x tiny timm bases): a finite loss and a gradient for
every trainable parameter in every phase; layer decay, soft targets, the task contract and registry. Each method's own
objective is tested in tests/methods/test_<module>.py."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import IMG, METHODS, TINY_BASES, create_method_model, create_method_task
from timm.scheduler import create_scheduler_v2

import timm_ensembles
from timm_ensembles import CrossEntropyTask, FDLTask


def _batch(n=4):
    return torch.randn(n, 3, IMG, IMG), torch.randint(0, 4, (n,))


@pytest.mark.parametrize('method', METHODS)
def test_layer_decay_scales_the_model_as_timm_does_and_keeps_the_tasks_own_groups(tmp_path, method):
    from timm.optim import create_optimizer_v2
    model = create_method_model(method, 'test_resnet', folder=tmp_path, num_classes=4)
    task = create_method_task(model)
    # timm's own layer decay of the model alone: the scale and weight decay every model parameter must get
    names = {id(p): n for n, p in model.named_parameters()}
    expected = {}
    for g in create_optimizer_v2(model, 'sgd', lr=0.1, weight_decay=1e-4, layer_decay=0.5).param_groups:
        expected.update({f'model.{names[id(p)]}': (g['lr_scale'], g['weight_decay']) for p in g['params']})
    assert len({scale for scale, _ in expected.values()}) >= 3  # several depths

    groups = task.param_groups(1e-4, 0.5)  # what the task asks for: its own rates (FDL's head) and scales
    optimizer = task.create_optimizer(opt='sgd', lr=0.1, momentum=0.9, weight_decay=1e-4, layer_decay=0.5)
    assert [[id(p) for p in g['params']] for g in optimizer.param_groups] == [
        [id(p) for p in g['params']] for g in groups]
    task_names = {id(p): n for n, p in task.named_parameters()}
    seen = []
    for g, asked in zip(optimizer.param_groups, groups):
        assert g['initial_lr'] == asked.get('lr', 0.1)
        for p in g['params']:
            n = task_names[id(p)]
            seen.append(n)
            if n in expected:
                assert (g['lr_scale'], g['weight_decay']) == expected[n], n
            else:  # the task's own trained parts beside the model (MEAL's discriminators), at their own scale
                assert not n.startswith('model.') and g['lr_scale'] == asked['lr_scale'], n
        # scaled from the first step, before any scheduler step
        assert g['lr'] == pytest.approx(g['initial_lr'] * g['lr_scale'])
    assert sorted(seen) == sorted(n for n, p in task.named_parameters() if p.requires_grad)
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=4, min_lr=0.0, step_on_epochs=False,
                                       updates_per_epoch=10)
    scheduler.step_update(num_updates=20)  # half-way: every group at half its scaled rate
    assert [g['lr'] for g in optimizer.param_groups] == pytest.approx(
        [g['initial_lr'] * g['lr_scale'] / 2 for g in optimizer.param_groups])


# the task options under which a method uses the labels (a born-again student learns its teacher's predictions alone)
LABEL_OPTIONS = {'ban': [dict(label_weight=0.5), dict(variant='cwtm')], 'meal': [dict(label_weight=0.5),
                                                                                  dict(version='v2')]}


@pytest.mark.parametrize('method, task_args', [('test_resnet', {})] + [
    (m, args) for m in METHODS for args in LABEL_OPTIONS.get(m, [{}])])
def test_one_hot_soft_targets_give_the_loss_of_the_labels(tmp_path, method, task_args):
    """Mixup's targets are [B, C] probabilities; every task that accepts them computes, for one-hot rows, the loss
    (and every term) of the class indices, with label smoothing as the task applies it, in every phase."""
    if method == 'test_resnet':  # a plain timm model
        model = timm.create_model(method, num_classes=4)
    else:
        model = create_method_model(method, 'test_resnet', folder=tmp_path, num_classes=4)
    task = create_method_task(model, label_smoothing=0.1, **task_args)
    assert task.accepts_soft_targets
    task.create_optimizer(opt='sgd', lr=0.1, momentum=0.9)
    x, y = _batch(6)
    for epoch in (0, 1):
        # the same state for both targets: the same random draws (a teacher, a permutation) and the same buffers (a
        # spectral-norm discriminator moves its power-iteration vectors at every forward in training)
        state = copy.deepcopy(task.state_dict())
        task.on_epoch_start(epoch)
        hard = task(x, y)
        task.load_state_dict(state)
        task.on_epoch_start(epoch)
        soft = task(x, F.one_hot(y, 4).float())
        torch.testing.assert_close(soft['loss'], hard['loss'], rtol=1e-5, atol=1e-6)
        assert soft['components'].keys() == hard['components'].keys()
        for k, v in hard['components'].items():
            torch.testing.assert_close(soft['components'][k], v, rtol=1e-5, atol=1e-6)


def test_a_task_with_the_older_param_groups_signature_still_builds_its_optimizer():
    class OwnGroups(timm_ensembles.CrossEntropyTask):
        def param_groups(self, weight_decay):
            return [dict(params=list(self.parameters()), weight_decay=weight_decay)]

    optimizer = OwnGroups(timm.create_model('test_resnet')).create_optimizer(opt='sgd', lr=0.1, weight_decay=1e-4)
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]['weight_decay'] == 1e-4


def test_a_task_says_whether_it_takes_soft_targets():
    class LabelsOnly(timm_ensembles.Task):
        def forward(self, x, target):
            return dict(loss=self.model(x)[torch.arange(len(target)), target].sum(), output=None, components={})

    assert not LabelsOnly(timm.create_model('test_resnet')).accepts_soft_targets  # the base says no


@pytest.mark.parametrize('method,base', [(m, b) for m in METHODS for b in TINY_BASES])
def test_every_parameter_gets_a_gradient_in_every_phase(tmp_path, method, base):
    """A finite loss, and, as DDP runs with the task's find_unused_parameters (False: no graph traversal to find unused
    ones), a gradient for every trainable parameter in every step of every phase; the optimizer steps them all."""
    task = create_method_task(create_method_model(method, base, folder=tmp_path, num_classes=4))
    optimizer = task.create_optimizer(opt='sgd', lr=0.1, momentum=0.9)
    trainable = [p for p in task.parameters() if p.requires_grad]
    stepped = [p for g in optimizer.param_groups for p in g['params']]
    assert trainable and sorted(map(id, stepped)) == sorted(map(id, trainable))
    task.train()
    for epoch in (0, 1):  # FDL's warm-up and joint phases; one phase elsewhere
        optimizer.zero_grad(set_to_none=True)
        task.on_epoch_start(epoch)
        out = task(*_batch())
        assert out['loss'].shape == () and torch.isfinite(out['loss'])
        assert out['output'].shape == (4, 4)
        assert all(not v.requires_grad and torch.isfinite(v).all() for v in out['components'].values())
        out['loss'].backward()
        missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
        if not task.find_unused_parameters:  # a task that says True is allowed to leave some out
            assert not missing
        assert all(torch.isfinite(p.grad).all() for p in trainable if p.grad is not None)


def test_task_names_do_not_clash_with_timm_task():
    # our tasks are not timm.task's (task.py says why), so no public name of the package may be one of timm.task's:
    # a user importing both must not get two classes of one name
    import timm.task
    ours = {n for n in dir(timm_ensembles) if not n.startswith('_')}
    assert ours.isdisjoint(timm.task.__all__), sorted(ours & set(timm.task.__all__))
    assert not issubclass(timm_ensembles.Task, timm.task.TrainingTask)


def test_task_registry():
    assert timm_ensembles.get_task_cls(timm.create_model('fdl_resnet18x2')) is FDLTask
    assert timm_ensembles.get_task_cls(timm.create_model('test_resnet')) is CrossEntropyTask
    plain = timm_ensembles.create_task(timm.create_model('test_resnet', num_classes=4), label_smoothing=0.1)
    x, y = _batch()
    out = plain(x, y)
    torch.testing.assert_close(out['loss'], F.cross_entropy(plain.model(x), y, label_smoothing=0.1))
