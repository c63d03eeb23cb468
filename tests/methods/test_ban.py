"""Born-again networks (methods/ban.py): the losses of the BAN, BAN+L, CWTM and DKPP variants on hand-computed cases,
through the task; BAN ensembles of generations; bad input."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import IMG
from torch import nn

import timm_ensembles
from timm_ensembles.files.model_folder import export_folder
from timm_ensembles.methods.ban import permute_dark_knowledge, soft_cross_entropy


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


def test_bad_born_again_input(tmp_path):
    student = _student('ban')
    with pytest.raises(ValueError, match='at least 2 generation folders'):
        timm_ensembles.create_bane([tmp_path])
    with pytest.raises(ValueError, match="Unknown born-again variant 'kd'"):
        timm_ensembles.create_task(student, teachers=[FixedTeacher([[0.0] * 5])], variant='kd')
