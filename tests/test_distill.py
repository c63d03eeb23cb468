"""What the distillation methods share (models/distill.py, teachers.py): frozen teachers outside the task's state, each
fed its own preprocessing; bad teachers. The methods' own tests are in tests/methods/test_ban.py and test_meal.py."""
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import IMG

import timm_ensembles
from timm_ensembles.files.model_folder import export_folder
from timm_ensembles.models.teachers import TeacherAdapter, TeacherError


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
    from timm_ensembles.models.teachers import InputMap
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
