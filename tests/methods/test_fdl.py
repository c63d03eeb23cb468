"""FDL ensembles (methods/fdl.py): the loss terms and their weights, the phases, the ensemble head's group and its
choice on validation data, the feature taps, bad options."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import IMG, TINY_BASES, model_kwargs
from timm.data import resolve_data_config
from timm.scheduler import create_scheduler_v2

import timm_ensembles
from timm_ensembles import FDLEnsemble
from timm_ensembles.losses import loss_similarity
from timm_ensembles.models.builder import DEFAULT_BASES, DEFAULT_SIZES
from timm_ensembles.models.ensemble import tapped_convs


def _fdl(base='test_resnet', num_members=2, **task_args):
    model = timm.create_model('fdl', base_model=base, num_members=num_members, **model_kwargs(base, num_classes=4))
    return timm_ensembles.create_task(model, **task_args)


def _batch(n=4):
    return torch.randn(n, 3, IMG, IMG), torch.randint(0, 4, (n,))


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _build(method, base, num_members=2, **kwargs):
    return timm.create_model(method, base_model=base, num_members=num_members,
                             **model_kwargs(base, num_classes=5, **kwargs))


def test_named_variants_of_every_default_base_and_size():
    assert {f'fdl_{b}x{n}' for b in DEFAULT_BASES for n in DEFAULT_SIZES} <= set(timm.list_models('fdl_*'))


def test_mission_name_builds():
    model = timm.create_model('fdl_resnet50x2')
    assert isinstance(model, FDLEnsemble) and model.base_model == 'resnet50' and model.num_members == 2
    assert model.num_classes == 1000 and model.pretrained_cfg['architecture'] == 'fdl_resnet50x2'
    assert resolve_data_config(model=model) == resolve_data_config(model=timm.create_model('resnet50'))


def test_preact_taps_are_the_stage_outputs_before_their_activation():
    model = _build('fdl', 'test_resnet').eval()  # deterministic (the test base drops paths in training)
    member = model.members[0]
    # by hand: the inputs of the stem's activation and of each stage's last block's closing ReLU (the test base mixes
    # basic blocks, closed by act2, and a bottleneck, by act3)
    blocks = [getattr(member, f'layer{i}')[-1] for i in range(1, 5)]
    acts = [member.act1] + [getattr(b, 'act3', None) or b.act2 for b in blocks]
    inputs = []
    handles = [a.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].clone())) for a in acts]
    x = torch.randn(4, 3, IMG, IMG)
    with torch.no_grad():
        member(x)
        for h in handles:
            h.remove()
        logits, pre = model.forward_members_with_features(x, 'preact')
        _, post = model.forward_members_with_features(x, 'stages')
    assert len(pre[0]) == len(inputs) == 5
    for p, q, hand in zip(pre[0], post[0], inputs):
        assert torch.equal(p, hand) and torch.equal(p.relu(), q)
    # signed, not the ReLU's output (at initialisation layer1's residual branch is zero, timm's zero_init_last, and its
    # ReLU's input is the non-negative shortcut)
    assert sum(bool(p.min() < 0) for p in pre[0]) == 4
    assert torch.equal(logits, model.forward_members(x))
    # the term reaches the members through the taken inputs (cloned before the in-place ReLU)
    features = model.train().forward_members_with_features(x, 'preact')[1]
    timm_ensembles.losses.feature_difference_loss(features).backward()
    # (the stem, and each closing block's last BatchNorm: the convolutions before it get none while timm's
    # zero_init_last keeps that BatchNorm's weight 0)
    for m in model.members:
        closing = [getattr(b, 'bn3', None) or b.bn2 for b in (getattr(m, f'layer{i}')[-1] for i in range(1, 5))]
        stem = next(c for c in m.modules() if isinstance(c, torch.nn.Conv2d))
        assert all(p.weight.grad.abs().sum() > 0 for p in (stem, *closing))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize('base', ('test_vit', 'test_convnext'))
def test_preact_taps_equal_the_stage_outputs_without_a_closing_activation(base):
    # a residual stream (ViT blocks, ConvNeXt stages) ends in an addition: nothing to take it before
    model = _build('fdl', base).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        pre = model.forward_members_with_features(x, 'preact')[1]
        post = model.forward_members_with_features(x, 'stages')[1]
    assert all(torch.equal(p, q) for p, q in zip(pre[0], post[0]))


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


@pytest.mark.parametrize('base', TINY_BASES)
def test_fdl_loss_equals_hand_assembled_terms(base):
    # the stage outputs as forward_intermediates returns them; the default taps' features: test_preact_taps_*
    task = _fdl(base, fdl_weight=0.3, similarity_weight=2.0, fdl_distance='mse', feature_taps='stages')
    task.on_epoch_start(1)  # joint phase
    x, y = _batch()
    out = task(x, y)
    model = task.model
    # the same terms, from the model's own forward passes (train mode: batch statistics, deterministic)
    logits, feats = [], []
    for member in model.members:
        final, inter = member.forward_intermediates(x)
        logits.append(member.forward_head(final))
        feats.append(inter)
    ce = [F.cross_entropy(lg, y) for lg in logits]
    fdl = sum(((a - b) ** 2).mean() for a, b in zip(*feats)) / len(feats[0])
    head_ce = F.cross_entropy(model.combine(torch.stack(logits, 1).detach()), y)
    # S bounded at a gap of 0.1 / 2.0: quadratic inside, linear beyond (losses.loss_similarity)
    gap, bound = abs(ce[0] - ce[1]), 0.05
    similarity = gap ** 2 if gap <= bound else 2 * bound * gap - bound ** 2
    expected = ce[0] + ce[1] + 2.0 * similarity - 0.3 * fdl + head_ce
    torch.testing.assert_close(out['loss'], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out['components']['fdl'], fdl.detach(), rtol=1e-5, atol=1e-6)
    assert out['components']['fdl'] > 0


def test_fdl_term_is_maximised():
    """The feature term enters with a minus sign: the loss falls by exactly the weighted L_FDL."""
    x, y = _batch()
    losses = {}
    for w in (0.0, 1.0):
        torch.manual_seed(1)
        task = _fdl(fdl_weight=w)
        task.on_epoch_start(1)
        out = task(x, y)
        losses[w] = (out['loss'], out['components']['fdl'])
    torch.testing.assert_close(losses[1.0][0], losses[0.0][0] - losses[1.0][1], rtol=1e-5, atol=1e-5)


def test_fdl_step_increases_feature_difference_when_alone():
    torch.manual_seed(0)
    task = _fdl(fdl_weight=1.0, similarity_weight=0.0)
    task.on_epoch_start(1)
    x, y = _batch(8)
    model = task.model
    with torch.no_grad():
        before = task(x, y)['components']['fdl']
    out = task(x, y)
    members = model.forward_members(x)
    ce_sum = F.cross_entropy(members[:, 0], y) + F.cross_entropy(members[:, 1], y)
    (out['loss'] - ce_sum - out['components']['head_ce']).backward()  # what is left is -L_FDL (S weighted 0)
    with torch.no_grad():
        for p in model.members.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
        after = task(x, y)['components']['fdl']
    assert after > before


def test_warmup_phase_is_cross_entropy_only():
    task = _fdl(fdl_weight=1.0, member_warmup_epochs=2)
    x, y = _batch()
    for epoch, phase in ((0, 'warmup'), (1, 'warmup'), (2, 'joint')):
        task.on_epoch_start(epoch)
        assert task.phase == phase
        comps = task(x, y)['components']
        assert ('fdl' in comps) == (phase == 'joint') and ('similarity' in comps) == (phase == 'joint')
        assert 'ce' in comps and 'head_ce' in comps


def test_fdl_weight_is_set_by_the_schedules_base_learning_rate():
    task = _fdl()
    optimizer = task.create_optimizer(opt='sgd', lr=0.1, momentum=0.9)
    task.on_epoch_start(1)
    x, y = _batch()
    # steady-state step of the -L_FDL optimiser (lr 0.03 by default, the reference's momentum 0.85) over the members'
    # (0.1, 0.9)
    expected = (0.03 / 0.15) / (0.1 / 0.1)
    assert task(x, y)['stats']['fdl_weight'] == pytest.approx(expected)
    # an annealed learning rate leaves the weight where it was: the term's step anneals with the schedule
    for group in optimizer.param_groups:
        group['lr'] = 1e-5
    assert task(x, y)['stats']['fdl_weight'] == pytest.approx(expected)
    task.create_optimizer(opt='sgd', lr=0.01, momentum=0.5)
    assert task.fdl_term_weight == pytest.approx((0.03 / 0.15) / (0.01 / 0.5))


def test_head_has_its_own_group_annealed_by_the_schedule():
    from timm.scheduler import create_scheduler_v2
    task = _fdl(head_lr=0.02, head_momentum=0.5)
    optimizer = task.create_optimizer(opt='sgd', lr=0.1, momentum=0.9, weight_decay=1e-4)
    head = {id(p) for p in task.model.head.parameters()}
    is_head = [any(id(p) in head for p in g['params']) for g in optimizer.param_groups]
    assert any(is_head)
    for g, h in zip(optimizer.param_groups, is_head):
        assert all((id(p) in head) == h for p in g['params'])
        assert (g['lr'], g['momentum']) == ((0.02, 0.5) if h else (0.1, 0.9))
    assert sum(len(g['params']) for g in optimizer.param_groups) == len(list(task.parameters()))
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=4, min_lr=0.0, step_on_epochs=False,
                                       updates_per_epoch=10)
    scheduler.step_update(num_updates=20)  # half-way: every group at half its base learning rate
    assert [g['lr'] for g in optimizer.param_groups] == pytest.approx([0.01 if h else 0.05 for h in is_head])


def test_loss_is_the_sum_of_its_terms_at_every_learning_rate():
    """The printed loss is what is minimised: member CEs + S - w L_FDL + head CE, with w fixed at the start."""
    task = _fdl()
    optimizer = task.create_optimizer(opt='sgd', lr=0.05, momentum=0.9)
    task.on_epoch_start(1)
    x, y = _batch()
    for lr in (0.05, 1e-5):
        for g in optimizer.param_groups:
            g['lr'] = lr
        out = task(x, y)
        c = out['components']
        w = (0.03 / 0.15) / (0.05 / 0.1)
        expected = 2 * c['ce'] + c['similarity'] - w * c['fdl'] + c['head_ce']
        torch.testing.assert_close(out['loss'].detach(), expected, rtol=1e-5, atol=1e-5)
        assert out['loss'] < 3 * (2 * c['ce'] + c['head_ce'])


def test_weights_need_an_optimizer_or_fixed_values():
    task = _fdl()
    task.on_epoch_start(1)
    with pytest.raises(RuntimeError, match='create_optimizer'):
        task(*_batch())


def test_similarity_uses_one_random_pair_for_three_members():
    task = _fdl(num_members=3, fdl_weight=0.0)
    task.on_epoch_start(1)
    task.eval()  # fixed member outputs, so only the pair changes between calls
    x, y = _batch()
    with torch.no_grad():
        ce = [F.cross_entropy(task.model.forward_members(x)[:, m], y) for m in range(3)]
        pair_values = {(i, j): loss_similarity(ce[i], ce[j], 0.1).item() for i in range(3) for j in range(i + 1, 3)}
        seen = set()
        for _ in range(30):
            s = task(x, y)['components']['similarity'].item()
            match = [p for p, v in pair_values.items() if v == pytest.approx(s, rel=1e-5, abs=1e-7)]
            assert match, f'S={s} is no pair of {pair_values}'
            seen.update(match)
    assert len(seen) == 3


def test_head_learns_from_detached_logits_only():
    torch.manual_seed(3)
    task = _fdl(fdl_weight=0.01)
    task.on_epoch_start(1)
    x, y = _batch()
    out = task(x, y)
    (out['loss'] - out['components']['head_ce']).backward()
    without_head = _grads(task.model.members)
    task.zero_grad()
    out = task(x, y)
    out['loss'].backward()
    assert without_head.keys() == _grads(task.model.members).keys()
    for name, g in _grads(task.model.members).items():
        torch.testing.assert_close(g, without_head[name])


def test_head_input_eval_uses_members_in_eval_mode():
    task = _fdl(fdl_weight=0.0, head_input='eval')
    task.on_epoch_start(1)
    x, y = _batch()
    out = task(x, y)
    assert task.model.training  # restored
    task.model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(task.model(x), y)
    torch.testing.assert_close(out['components']['head_ce'], expected)


def test_conv_taps_take_the_references_convolutions():
    """Every convolution named 'conv' (stem and residual branches), not the shortcut projections ('downsample')."""
    task = _fdl('resnet10t', feature_taps='convs', fdl_weight=1.0, fdl_distance='mse')
    task.on_epoch_start(1)
    x, y = _batch()
    out = task(x, y)
    outputs = [[], []]
    member = task.model.members[0]
    names = [n for n, m in member.named_modules() if isinstance(m, torch.nn.Conv2d)]
    tapped = [n for n in names if 'downsample' not in n]
    assert len(tapped) == 3 + 2 * 4 and len(names) == len(tapped) + 3  # tiered stem, 4 blocks, 3 projections
    hooks = [m.register_forward_hook(lambda _m, _i, o, k=k: outputs[k].append(o))
             for k, mem in enumerate(task.model.members) for n, m in mem.named_modules() if n in tapped]
    for mem in task.model.members:
        mem(x)
    for h in hooks:
        h.remove()
    expected = sum(((a - b) ** 2).mean() for a, b in zip(*outputs)) / len(outputs[0])
    torch.testing.assert_close(out['components']['fdl'], expected.detach(), rtol=1e-5, atol=1e-6)
    # a base whose convolutions carry no 'conv' in their names (timm's VGG: features.0, ...) taps all of them
    vgg = timm.create_model('vgg11', num_classes=4)
    assert [n for n, _ in tapped_convs(vgg)] == [
        n for n, m in vgg.named_modules() if isinstance(m, torch.nn.Conv2d)]


def test_distance_defaults_to_the_bounded_one_on_every_base():
    assert _fdl().fdl_distance == 'relative'  # stage outputs of a BatchNorm base
    assert _fdl(feature_taps='convs').fdl_distance == 'relative'  # pre-normalisation conv outputs
    assert _fdl(fdl_distance='mse', feature_taps='convs').fdl_distance == 'mse'  # the paper's, when asked
    model = timm.create_model('fdl', base_model='te_plain_net', num_members=2, num_classes=4)
    assert timm_ensembles.create_task(model).fdl_distance == 'relative'  # no normalisation layer at all
    with pytest.raises(ValueError, match="Unknown fdl_distance 'auto'"):
        _fdl(fdl_distance='auto')
    # the taps: the stage outputs before their final activation; the step: 0.03 there, 0.1 on the stage outputs after
    # it, the reference's 1e-4 on the pre-normalisation convolution outputs (a step that acts there killed members); a
    # given one is kept
    assert _fdl().feature_taps == 'preact'
    assert (_fdl().fdl_lr, _fdl(feature_taps='stages').fdl_lr, _fdl(feature_taps='convs').fdl_lr,
            _fdl(fdl_lr=1e-3).fdl_lr) == (0.03, 0.1, 1e-4, 1e-3)


def test_similarity_pairs_are_the_same_on_every_process_and_every_resume():
    """Tasks built after the same seed (as on every DDP process, or in a resumed run) draw the same pairs."""
    pairs = []
    for _ in range(2):
        torch.manual_seed(7)
        task = _fdl(num_members=4, fdl_weight=0.0)
        torch.manual_seed(1234 + len(pairs))  # the global RNG differs afterwards, as it does between processes
        task.on_epoch_start(3)
        draws = [torch.randperm(4, generator=task._pair_generator)[:2].tolist() for _ in range(5)]
        task.on_epoch_start(3)
        assert [torch.randperm(4, generator=task._pair_generator)[:2].tolist() for _ in range(5)] == draws
        pairs.append(draws)
    assert pairs[0] == pairs[1] and len({tuple(p) for p in pairs[0]}) > 1


def test_adaptive_optimizer_needs_a_fixed_weight():
    task = _fdl()
    with pytest.raises(ValueError, match='AdamW.*fdl_weight='):
        task.create_optimizer(opt='adamw', lr=1e-3)
    task = _fdl(fdl_weight=1e-3, head_lr=1e-3)
    task.create_optimizer(opt='adamw', lr=1e-3)
    assert task.fdl_term_weight == 1e-3


@pytest.mark.parametrize('bad,match', [
    (dict(feature_taps='all'), 'Unknown feature_taps'),
    (dict(head_input='test'), 'Unknown head_input'),
    (dict(fdl_momentum=1.0), 'fdl_momentum must be in'),
    (dict(member_warmup_epochs=-1), 'member_warmup_epochs must be >= 0'),
    (dict(member_warmup_epochs=1.5), 'member_warmup_epochs must be an integer'),
    (dict(fdl_lr='abc'), "fdl_lr must be a number, got 'abc'"),
    (dict(fdl_distance='cosine'), 'Unknown fdl_distance'),
    (dict(head_momentum=1.0), r'head_momentum must be in \[0, 1\)'),
    (dict(fdl_lr_typo=1e-4), r"Unknown option\(s\) \['fdl_lr_typo'\] for FDLTask.*valid options"),
])
def test_bad_task_options(bad, match):
    with pytest.raises(ValueError, match=match):
        _fdl(**bad)


def _train_plain_pair(**task_kwargs):
    """An FDL pair of the user's BatchNorm-free one-layer net (conftest's te_plain_net), a warm-up epoch and a joint
    epoch under a cosine schedule to 1e-5, on a learnable synthetic task (class templates in noise).

    Returns:
        The members' test accuracies after each epoch, and every L_FDL of the joint epoch.
    """
    torch.manual_seed(0)
    templates = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(123))
    gen = torch.Generator().manual_seed(1)

    def sample(n):
        y = torch.randint(0, 4, (n,), generator=gen)
        return templates[y] * 0.7 + torch.randn(n, 1, 16, 16, generator=gen), y

    (x_train, y_train), (x_test, y_test) = sample(2048), sample(1024)
    model = timm.create_model('fdl', base_model='te_plain_net', num_members=2, num_classes=4, in_chans=1)
    task = timm_ensembles.create_task(model, **task_kwargs)
    optimizer = task.create_optimizer(opt='sgd', lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = len(x_train) // 32
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=2, min_lr=1e-5, step_on_epochs=False,
                                       updates_per_epoch=steps)
    accuracies, distances, updates = [], [], 0
    for epoch in range(2):
        task.on_epoch_start(epoch)
        task.train()
        order = torch.randperm(len(x_train))
        for k in range(steps):
            idx = order[k * 32:(k + 1) * 32]
            out = task(x_train[idx], y_train[idx])
            if 'fdl' in out['components']:
                distances.append(float(out['components']['fdl']))
            out['loss'].backward()
            optimizer.step()
            optimizer.zero_grad()
            updates += 1
            scheduler.step_update(num_updates=updates)
        model.eval()
        with torch.no_grad():
            members = model.forward_members(x_test)
        accuracies.append([(members[:, m].argmax(-1) == y_test).float().mean().item() * 100 for m in range(2)])
    return accuracies, distances


def test_fdl_pair_of_a_net_without_normalisation_does_not_collapse():
    (warm, joint), distances = _train_plain_pair()
    assert min(warm) > 90 and all(map(math.isfinite, distances))
    assert all(j >= w - 1.5 for w, j in zip(warm, joint)), (warm, joint)
    # even with a term a hundred times heavier than the default step gives, the bounded distance holds (at most
    # N / (N - 1) = 2) and the members keep their accuracy ...
    (warm, joint), distances = _train_plain_pair(fdl_weight=1.0)
    assert max(distances) <= 2 and all(j >= w - 1.5 for w, j in zip(warm, joint)), (warm, joint)
    # ... where the paper's unbounded one grows without a bound of its own: the members inflate their features
    # (measured: 4.6 to 370 in one epoch; the cosine schedule's end stops it)
    (warm, joint), distances = _train_plain_pair(fdl_weight=1.0, fdl_distance='mse')
    assert distances[-1] > 20 * distances[0], (distances[0], distances[-1])


def test_head_or_average_is_chosen_on_validation_metrics(tmp_path):
    from timm_ensembles.files.model_folder import export_folder
    task = _fdl()
    model = task.model
    x, _ = _batch()
    note = task.select_on_validation(dict(acc=91.0, mean_probs_acc=90.5))
    assert model.combine_mode == 'linear' and 'ensemble head (91.00 %)' in note
    note = task.select_on_validation(dict(acc=90.0, mean_probs_acc=90.5))
    assert model.combine_mode == 'mean_probs' and model.head.fc is None and 'averaged probabilities (90.50 %)' in note
    model.eval()
    with torch.no_grad():
        expected = torch.log(model.forward_members(x).softmax(-1).mean(1))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # the choice is part of the saved model
    export_folder(model, tmp_path)
    reloaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert reloaded.combine_mode == 'mean_probs'
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    assert task.select_on_validation(dict(acc=80.0, mean_probs_acc=90.5)) is None  # nothing left to choose


def test_head_keeps_its_own_rate_under_layer_decay():
    task = _fdl()
    optimizer = task.create_optimizer(opt='sgd', lr=0.1, momentum=0.9, weight_decay=1e-4, layer_decay=0.5)
    rates = {id(p): g['initial_lr'] for g in optimizer.param_groups for p in g['params']}
    assert {rates[id(p)] for p in task.model.head.parameters()} == {task.head_lr} != {0.1}
    assert {rates[id(p)] for p in task.model.members.parameters()} == {0.1}
