"""Born-again and MEAL students: frozen teachers, the losses on hand-computed cases, the adversarial game, BANE."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import IMG
from torch import nn

import timm_ensembles
from timm_ensembles._checkpoint import export_folder
from timm_ensembles._teachers import TeacherAdapter, TeacherError
from timm_ensembles.methods.ban import permute_dark_knowledge, soft_cross_entropy
from timm_ensembles.methods.meal import align, block_distance


class FixedTeacher(nn.Module):
    """A 'teacher' that returns given logits whatever the input (no timm config: it sees the student's batches)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))
        self.num_classes = self.logits.shape[-1]

    def forward(self, x):
        return self.logits[: x.shape[0]]


def _student(method, num_classes=5, base='test_resnet'):
    return timm_ensembles.create_model(f'{method}_{base}', num_classes=num_classes)


def _x(batch=4):
    return torch.randn(batch, 3, IMG, IMG)


@pytest.mark.parametrize('method,kwargs', [('ban', {}), ('meal', {}), ('meal', dict(version='v2'))])
def test_teacher_is_frozen_in_eval_mode_and_outside_the_state(method, kwargs):
    teacher = timm.create_model('test_resnet', num_classes=5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    task = timm_ensembles.create_task(_student(method), teachers=[teacher], **kwargs)
    optimizer = task.create_optimizer(lr=0.1)
    task.train()
    for _ in range(2):
        out = task(_x(), torch.randint(0, 5, (4,)))
        out['loss'].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # BatchNorm statistics too
    assert not any('teacher' in k for k in task.state_dict())
    assert set(task.export_model().state_dict()) == set(timm.create_model('test_resnet').state_dict())
    assert not any(p is q for p in task.parameters() for q in teacher.parameters())


def test_soft_cross_entropy_hand_computed():
    # student [0, 0] -> log-probabilities ln(1/2); target [1/4, 3/4] -> H = ln 2, at any T (times T^2)
    logits, target = torch.zeros(1, 2), torch.tensor([[0.25, 0.75]])
    torch.testing.assert_close(soft_cross_entropy(logits, target), torch.tensor(math.log(2)))
    torch.testing.assert_close(soft_cross_entropy(logits, target, 2.0), torch.tensor(4 * math.log(2)))


def test_ban_loss_is_cross_entropy_against_the_teacher_without_temperature():
    student = _student('ban', num_classes=2)
    teacher = FixedTeacher([[math.log(3.0), 0.0], [0.0, 0.0]])  # probabilities [3/4, 1/4] and [1/2, 1/2]
    task = timm_ensembles.create_task(student, teachers=[teacher])
    x = _x(2)
    out = task(x, torch.tensor([0, 1]))
    log_p = F.log_softmax(student(x), -1).detach()
    expected = -(0.75 * log_p[0, 0] + 0.25 * log_p[0, 1] + 0.5 * log_p[1, 0] + 0.5 * log_p[1, 1]) / 2
    torch.testing.assert_close(out['loss'].detach(), expected, rtol=1e-5, atol=1e-6)
    # BAN+L adds the labels' cross-entropy with its weight
    task_l = timm_ensembles.create_task(student, teachers=[teacher], label_weight=0.5)
    ce = F.cross_entropy(student(x), torch.tensor([0, 1])).detach()
    torch.testing.assert_close(task_l(x, torch.tensor([0, 1]))['loss'].detach(), expected + 0.5 * ce,
                               rtol=1e-5, atol=1e-6)


def test_cwtm_weights_the_labels_cross_entropy_by_teacher_confidence():
    student = _student('ban', num_classes=2)
    teacher = FixedTeacher([[math.log(9.0), 0.0], [0.0, math.log(1.5)]])  # max probabilities 0.9 and 0.6
    task = timm_ensembles.create_task(student, teachers=[teacher], variant='cwtm')
    x, y = _x(2), torch.tensor([0, 1])
    ce = F.cross_entropy(student(x), y, reduction='none').detach()
    expected = 0.6 * ce[0] + 0.4 * ce[1]  # weights 0.9 / 1.5 and 0.6 / 1.5
    torch.testing.assert_close(task(x, y)['loss'].detach(), expected, rtol=1e-5, atol=1e-6)


def test_dkpp_permutes_only_the_non_argmax_probabilities():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        p = permute_dark_knowledge(probs, g)
        # the argmax keeps its probability; the others are the same values, in some order
        assert p[0, 1] == probs[0, 1] and p[1, 0] == probs[1, 0]
        assert torch.equal(p.sort(-1).values, probs.sort(-1).values)
        seen.add(tuple(round(v, 3) for v in p[0].tolist()))
    assert seen == {(0.1, 0.7, 0.2), (0.2, 0.7, 0.1)}


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


def test_discriminators_and_student_have_opposite_signs_on_the_adversarial_term():
    teacher = timm.create_model('test_resnet', num_classes=5)
    grads = {}
    for mode in ('game', 'joint'):
        torch.manual_seed(0)
        task = timm_ensembles.create_task(_student('meal'), teachers=[teacher], version='v2', adversarial=mode)
        s = torch.randn(4, 5, requires_grad=True)
        t = torch.softmax(torch.randn(4, 5), -1)
        task.adversarial_loss([s], [t]).backward()
        grads[mode] = (s.grad.clone(), [p.grad.clone() for p in task.discriminators.parameters()])
    # the student ascends what the discriminator descends; the discriminator's own gradient is the same
    assert torch.count_nonzero(grads['game'][0]) > 0
    torch.testing.assert_close(grads['game'][0], -grads['joint'][0])
    for a, b in zip(grads['game'][1], grads['joint'][1]):
        torch.testing.assert_close(a, b)


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
    assert scales == {0.01} and all('lr_scale' not in g for g in groups if not any(id(p) in disc for p in g['params']))
    v2 = timm_ensembles.create_task(_student('meal'), teachers=teachers, version='v2')
    assert len(v2.teachers) == 2 and v2.lengths == [5]


def test_teacher_with_other_preprocessing_sees_its_own():
    teacher = timm.create_model('test_resnet', num_classes=5,
                                pretrained_cfg_overlay=dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                                            input_size=(3, 48, 48))).eval()
    student_cfg = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=(3, IMG, IMG))
    adapter = TeacherAdapter(teacher, student_cfg, timm.data.resolve_data_config(model=teacher))
    x = _x(2)
    raw = x * torch.tensor(student_cfg['std']).view(1, 3, 1, 1) + torch.tensor(student_cfg['mean']).view(1, 3, 1, 1)
    expected = teacher(F.interpolate((raw - 0.5) / 0.25, size=(48, 48), mode='bilinear', align_corners=False))
    torch.testing.assert_close(adapter(x), expected, rtol=1e-4, atol=1e-5)
    adapter.train()
    assert not adapter.training and not teacher.training


def test_input_map_between_gray_and_colour_models():
    from timm_ensembles._teachers import InputMap
    colour = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=(3, 8, 8))
    gray = dict(mean=(0.5,), std=(0.25,), input_size=(1, 8, 8))
    x = _x(2)[:, :, :8, :8]
    pixels = x * torch.tensor(colour['std']).view(1, 3, 1, 1) + torch.tensor(colour['mean']).view(1, 3, 1, 1)
    # a gray model sees the pixels' channel mean, normalised its way
    torch.testing.assert_close(InputMap(colour, gray)(x), (pixels.mean(1, keepdim=True) - 0.5) / 0.25)
    # a colour model fed gray input sees the gray pixels in every channel
    g = torch.randn(2, 1, 8, 8)
    expected = (g * 0.25 + 0.5 - torch.tensor(colour['mean']).view(1, 3, 1, 1)) / torch.tensor(
        colour['std']).view(1, 3, 1, 1)
    torch.testing.assert_close(InputMap(gray, colour)(g), expected)
    with pytest.raises(ValueError, match='Cannot map 2-channel input'):
        InputMap(dict(gray, input_size=(2, 8, 8), mean=(0.5, 0.5), std=(0.2, 0.2)), colour)


def test_bane_is_the_mean_of_its_generations(tmp_path):
    folders = []
    data_config = dict(input_size=(3, IMG, IMG), mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0,
                       interpolation='bilinear')
    for k in range(3):
        m = timm.create_model('test_resnet', num_classes=5)
        folders.append(export_folder(m, tmp_path / f'gen{k}', data_config=data_config))
    bane = timm_ensembles.create_bane(folders)
    same = timm.create_model('bane', generations=[str(f) for f in folders], num_classes=5)
    # the generations' preprocessing, not the base architecture's default
    cfg = timm.data.resolve_data_config(model=bane)
    assert tuple(cfg['input_size']) == (3, IMG, IMG) and tuple(cfg['std']) == (0.25,) * 3
    x = _x()
    with torch.no_grad():
        probs = torch.stack([timm.create_model(f'local-dir:{f}', pretrained=True).eval()(x).softmax(-1)
                             for f in folders]).mean(0)
        torch.testing.assert_close(bane(x).softmax(-1), probs, rtol=1e-5, atol=1e-6)
        assert torch.equal(same(x), bane(x))
    export_folder(bane, tmp_path / 'bane')
    reloaded = timm.create_model(f'local-dir:{tmp_path / "bane"}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), bane(x))


def test_bad_teachers(tmp_path):
    student = _student('ban')
    with pytest.raises(TeacherError, match='needs at least one teacher'):
        timm_ensembles.create_task(student, teachers=[])
    with pytest.raises(TeacherError, match='needs at least one teacher'):
        timm_ensembles.create_task(student)
    with pytest.raises(TeacherError, match=r"cannot load teacher '.*nowhere'"):
        timm_ensembles.create_task(student, teachers=[str(tmp_path / 'nowhere')])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(TeacherError, match='folder without config.json'):
        timm_ensembles.create_task(student, teachers=[str(tmp_path / 'empty')])
    with pytest.raises(TeacherError, match="cannot load teacher 'resnet_of_dreams'"):
        timm_ensembles.create_task(student, teachers=['resnet_of_dreams'])
    with pytest.raises(TeacherError, match='predicts 7 classes, the student 5'):
        timm_ensembles.create_task(student, teachers=[timm.create_model('test_resnet', num_classes=7)])
    with pytest.raises(ValueError, match='at least 2 generation folders'):
        timm_ensembles.create_bane([tmp_path])
    with pytest.raises(ValueError, match="Unknown born-again variant 'kd'"):
        timm_ensembles.create_task(student, teachers=[FixedTeacher([[0.0] * 5])], variant='kd')
    with pytest.raises(ValueError, match=r'num_blocks must be in 0\.\.5'):
        timm_ensembles.create_task(_student('meal'), teachers=[timm.create_model('test_resnet', num_classes=5)],
                                   num_blocks=9)


def test_teachers_from_folders_take_their_saved_preprocessing_and_modules_the_students(tmp_path):
    folder = export_folder(timm.create_model('test_resnet', num_classes=5), tmp_path / 'teacher',
                           data_config=dict(input_size=(3, 48, 48), mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0))
    module = timm.create_model('test_resnet', num_classes=5)  # an ImageNet cfg it was not trained with
    task = timm_ensembles.create_task(_student('ban'), teachers=[str(folder), module])
    task.set_data_config(dict(input_size=(3, IMG, IMG), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
    from_folder, given = task.teachers
    assert (from_folder.input_map.same_norm, from_folder.input_map.size) == (False, (48, 48))
    assert (given.input_map.same_norm, given.input_map.same_size) == (True, True)
    assert not from_folder.training and not given.training


def test_ban_variants_through_the_task():
    teacher = timm.create_model('test_resnet', num_classes=5).eval()
    student = _student('ban')
    x, y = _x(), torch.randint(0, 5, (4,))
    with torch.no_grad():
        t_logits = teacher(x)
    task = timm_ensembles.create_task(student, teachers=[teacher], temperature=4.0)
    expected = soft_cross_entropy(student(x), F.softmax(t_logits / 4.0, -1), 4.0)
    torch.testing.assert_close(task(x, y)['loss'], expected, rtol=1e-5, atol=1e-6)
    dkpp = timm_ensembles.create_task(student, teachers=[teacher], variant='dkpp')
    dkpp.on_epoch_start(0)
    first = dkpp(x, y)['loss']
    dkpp.on_epoch_start(0)  # reseeded: the same permutations again
    torch.testing.assert_close(dkpp(x, y)['loss'], first)
    assert not torch.allclose(first, soft_cross_entropy(student(x), F.softmax(t_logits, -1)))


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
    torch.testing.assert_close(out['loss'].detach(), kl + out['components']['disc'], rtol=1e-5, atol=1e-6)
    # a few steps of the discriminator alone: it learns teacher (1) from student (0)
    disc = task.discriminators[0]
    optimizer = torch.optim.SGD(disc.parameters(), lr=0.5)
    s, t = F.softmax(student(x).detach(), -1), probs
    before = disc(t).mean() - disc(s).mean()
    for _ in range(20):
        optimizer.zero_grad()
        task.adversarial_loss([s], [t]).backward()
        optimizer.step()
    assert disc(t).mean() - disc(s).mean() > before
