"""MEAL students (methods/meal.py): block alignment and distances on hand-computed cases, the adversarial game, teacher
zoos (V1) and averaged teachers (V2); bad input."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import IMG

import timm_ensembles
from timm_ensembles.methods.meal import Discriminator, align, block_distance, standardise


def _student(method, num_classes=5, base='test_resnet'):
    return timm_ensembles.create_model(f'{method}_{base}', num_classes=num_classes)


def _x(batch=4):
    return torch.randn(batch, 3, IMG, IMG)


def test_meal_alignment_and_distances_hand_computed():
    f = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]], [[0.0, 4.0]], [[6.0, 6.0]]]])  # [1, 4, 1, 2]
    # channel: spatial means [2, 2, 2, 6] pooled to 2 -> [2, 4]
    torch.testing.assert_close(align(f, 2, 'channel'), torch.tensor([[2.0, 4.0]]))
    # spatial: each channel's 2 positions pooled to 1 -> [2, 2, 2, 6], then the channel mean -> 3
    torch.testing.assert_close(align(f, 1, 'spatial'), torch.tensor([[3.0]]))
    s, t = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 1.0]])
    torch.testing.assert_close(block_distance(s, t, 'l1'), torch.tensor(1.5))
    torch.testing.assert_close(block_distance(s, t, 'l2'), torch.tensor(2.5))
    q = [math.exp(2) / (math.exp(2) + math.e), math.e / (math.exp(2) + math.e)]
    log_p = [1 - math.log(math.e + math.exp(3)), 3 - math.log(math.e + math.exp(3))]
    ce = -(q[0] * log_p[0] + q[1] * log_p[1])
    torch.testing.assert_close(block_distance(s, t, 'ce'), torch.tensor(ce), rtol=1e-6, atol=1e-7)
    kl = ce + (q[0] * math.log(q[0]) + q[1] * math.log(q[1]))
    torch.testing.assert_close(block_distance(s, t, 'kl'), torch.tensor(kl), rtol=1e-5, atol=1e-6)


def test_standardise_hand_computed():
    rows = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    # row 0: centred -1, 0, 1; variance 2/3, mean square 14/3; a constant row becomes zeros
    spread = math.sqrt(2 / 3 + 1e-2 * 14 / 3 + 1e-6)
    expected = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]) / spread
    torch.testing.assert_close(standardise(rows), expected)
    torch.testing.assert_close(standardise(torch.tensor([[4.0]])), torch.tensor([[0.0]]))
    # scale-free: a hundred times the row, the same pattern (but for the 1e-6)
    torch.testing.assert_close(standardise(100 * rows), expected, rtol=1e-5, atol=1e-6)
    # a row whose entries all but agree: the gradient stays of the order of 1 / (0.1 |x|), not 1 / std
    near = torch.tensor([[1.0, 1.0 + 1e-7, 1.0 - 1e-7]], requires_grad=True)
    standardise(near)[0, 0].backward()
    assert near.grad.abs().max() < 10


def _linear_discriminator(task, weight):
    """The task's one discriminator replaced by a linear map with the given weight (no bias): logit = weight . x."""
    disc = Discriminator(len(weight), [], spectral_norm=False)
    with torch.no_grad():
        disc.net[0].weight.copy_(torch.tensor([weight]))
        disc.net[0].bias.zero_()
    task.discriminators[0] = disc
    return disc


def test_the_game_trains_the_discriminator_on_fixed_outputs_and_the_student_on_the_non_saturating_loss():
    teacher = timm.create_model('test_resnet', num_classes=3)
    s0 = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [-1.0, 3.0, 0.0]])
    grads = {}
    for mode in ('game', 'joint'):
        task = timm_ensembles.create_task(_student('meal', num_classes=3), teachers=[teacher], version='v2',
                                          adversarial=mode)
        disc = _linear_discriminator(task, [1.0, 0.0, -1.0])
        s = s0.clone().requires_grad_(True)
        d_loss, g_loss, accuracy = task.adversarial_loss([s], [t])
        # logits: teacher 1, -1; student 0.5, 1. Pairs (teacher above student): 1 > 0.5, 1 = 1 (half), -1 < both
        # -> (1 + 0.5 + 0 + 0) / 4
        bce = F.binary_cross_entropy_with_logits
        real, fake = torch.tensor([1.0, -1.0]), torch.tensor([0.5, 1.0])
        torch.testing.assert_close(d_loss, bce(real, torch.ones(2)) + bce(fake, torch.zeros(2)))
        torch.testing.assert_close(accuracy[0], torch.tensor(0.375))
        (d_loss + g_loss).backward()
        grads[mode] = s.grad.clone(), disc.net[0].weight.grad.clone()
        if mode == 'game':
            # the student's term: the discriminator calling its outputs the teacher's
            torch.testing.assert_close(g_loss, bce(fake, torch.ones(2)))
        else:
            assert g_loss == 0
    # d/ds of BCE(w.s, 1) = (sigmoid(w.s) - 1) w / B: the student gets only the non-saturating term in the game
    expected = (torch.sigmoid(torch.tensor([0.5, 1.0])) - 1)[:, None] * torch.tensor([1.0, 0.0, -1.0]) / 2
    torch.testing.assert_close(grads['game'][0], expected)
    # in the references' joint form it descends the discriminator's own loss: d/ds BCE(w.s, 0) = sigmoid(w.s) w / B
    expected = torch.sigmoid(torch.tensor([0.5, 1.0]))[:, None] * torch.tensor([1.0, 0.0, -1.0]) / 2
    torch.testing.assert_close(grads['joint'][0], expected)
    # the discriminator learns from the same loss in both: the student's term leaves its weights alone
    torch.testing.assert_close(grads['game'][1], grads['joint'][1])


def test_meal_v1_picks_teachers_at_random_and_expands_ensembles():
    teachers = [timm.create_model('test_resnet', num_classes=5),
                timm.create_model('ens', base_model='test_convnext', num_members=2, num_classes=5)]
    task = timm_ensembles.create_task(_student('meal'), teachers=teachers)
    assert len(task.teachers) == 3  # the ensemble is a zoo of its 2 members
    task.on_epoch_start(0)
    picked = {int(task(_x(2), torch.zeros(2, dtype=torch.long))['stats']['teacher']) for _ in range(12)}
    assert picked == {0, 1, 2}
    groups = task.create_optimizer(lr=0.1).param_groups
    disc = {id(p) for p in task.discriminators.parameters()}
    scales = {g.get('lr_scale') for g in groups if any(id(p) in disc for p in g['params'])}
    assert scales == {1.0} and all('lr_scale' not in g for g in groups if not any(id(p) in disc for p in g['params']))
    v2 = timm_ensembles.create_task(_student('meal'), teachers=teachers, version='v2')
    assert len(v2.teachers) == 2 and v2.lengths == [5]


def test_meal_v2_averages_the_teachers_and_the_game_trains_the_discriminator_to_tell_them_apart():
    teachers = [timm.create_model('test_resnet', num_classes=5).eval(),
                timm.create_model('test_convnext', num_classes=5).eval()]
    student = _student('meal')
    task = timm_ensembles.create_task(student, teachers=teachers, version='v2')
    x, y = _x(), torch.randint(0, 5, (4,))
    with torch.no_grad():
        probs = torch.stack([t(x).softmax(-1) for t in teachers]).mean(0)
        log_p = student(x).log_softmax(-1)
    kl = (probs * (probs.log() - log_p)).sum(-1).mean()
    out = task(x, y)
    torch.testing.assert_close(out['components']['sim0'], kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out['loss'].detach(), kl + out['components']['disc'] + out['components']['adv'],
                               rtol=1e-5, atol=1e-6)
    # what the discriminator of the outputs can see: the student's predictive entropy minus the teachers'
    gap = -(log_p.exp() * log_p).sum(-1).mean() + (probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(out['stats']['entropy_gap'], gap, rtol=1e-5, atol=1e-6)
    assert set(out['mechanism']) == {'blocks', 'adv'} and out['mechanism']['adv'].requires_grad
    # a few steps of the discriminator alone, on log-probabilities: it learns teacher (1) from student (0)
    disc = task.discriminators[0]
    optimizer = torch.optim.SGD(disc.parameters(), lr=0.5)
    s, t = log_p, probs.log()
    before = disc(t).mean() - disc(s).mean()
    for _ in range(20):
        optimizer.zero_grad()
        task.adversarial_loss([s], [t])[0].backward()
        optimizer.step()
    assert disc(t).mean() - disc(s).mean() > before


def test_bad_meal_input():
    with pytest.raises(ValueError, match=r'num_blocks must be in 0\.\.5'):
        timm_ensembles.create_task(_student('meal'), teachers=[timm.create_model('test_resnet', num_classes=5)],
                                   num_blocks=9)


def test_discriminators_keep_their_own_scale_under_layer_decay():
    task = timm_ensembles.create_task(_student('meal'), teachers=[timm.create_model('test_resnet', num_classes=5)],
                                      disc_lr_scale=0.01)
    optimizer = task.create_optimizer(opt='sgd', lr=0.1, weight_decay=1e-4, layer_decay=0.5)
    scales = {id(p): g['lr_scale'] for g in optimizer.param_groups for p in g['params']}
    assert {scales[id(p)] for p in task.discriminators.parameters()} == {0.01}
    assert 0.01 not in {scales[id(p)] for p in task.model.parameters()}
