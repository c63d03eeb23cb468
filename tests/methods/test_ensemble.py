"""Ensembles of models you already have (methods/ensemble.py): members of different architectures from folders, each
fed its own preprocessing, combined four ways, saved and reloaded as one model; bad input."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_ensembles
from timm_ensembles.files.model_folder import export_folder

CFG_A = dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0, interpolation='bilinear')
CFG_B = dict(input_size=(3, 48, 48), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=1.0,
             interpolation='bicubic')


@pytest.fixture
def folders(tmp_path):
    a = timm.create_model('test_resnet', num_classes=4)
    b = timm.create_model('test_efficientnet', num_classes=4)
    export_folder(a, tmp_path / 'a', data_config=CFG_A)
    export_folder(b, tmp_path / 'b', data_config=CFG_B)
    return a.eval(), b.eval(), str(tmp_path / 'a'), str(tmp_path / 'b')


def test_each_member_sees_its_own_preprocessing(folders):
    a, b, fa, fb = folders
    model = timm_ensembles.ensemble_of([fa, fb]).eval()
    assert timm.data.resolve_data_config(model=model)['input_size'] == (3, 32, 32)  # the first member's
    x = torch.randn(2, 3, 32, 32)  # preprocessed as the ensemble's data config says
    with torch.no_grad():
        members = model.forward_members(x)
        torch.testing.assert_close(members[:, 0], a(x))
        # the same images, normalised as b expects and resized to its 48 px
        pixels = x * 0.5 + 0.5
        for_b = (pixels - torch.tensor(CFG_B['mean']).view(1, 3, 1, 1)) / torch.tensor(CFG_B['std']).view(1, 3, 1, 1)
        for_b = F.interpolate(for_b, size=(48, 48), mode='bilinear', align_corners=False)
        torch.testing.assert_close(members[:, 1], b(for_b), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x), torch.log(members.softmax(-1).mean(1)))


def test_vote_by_hand():
    spec = dict(architecture='test_resnet', args=dict(num_classes=4), data_config=CFG_A)  # as model_args records it
    model = timm.create_model('ensemble', members=[spec] * 3, combine='vote')
    # three members on two samples: [class 1, class 1, class 2] and a three-way tie [0, 1, 2]
    logits = torch.full((2, 3, 4), -10.0)
    logits[0, 0, 1] = logits[0, 1, 1] = logits[0, 2, 2] = 10.0
    logits[1, 0, 0] = 10.0
    logits[1, 1, 1], logits[1, 1, 0] = 1.0, 0.5  # votes 1, its second choice 0
    logits[1, 2, 2] = 10.0
    probs = logits.softmax(-1)
    out = model.combine(logits).exp()
    assert out.sum(-1).tolist() == pytest.approx([1.0, 1.0])
    assert out[0].argmax() == 1 and out[0, 1] > out[0, 2] > out[0, 0]
    # a three-way tie of votes goes to the highest averaged probability: class 0, the second member's second choice
    assert out[1].argmax() == 0 and out[1, 0] > out[1, 2] > out[1, 1]
    votes = torch.tensor([0.0, 2 / 3, 1 / 3, 0.0]) + probs[0].mean(0) / 4
    torch.testing.assert_close(out[0], votes / votes.sum(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('combine', ['mean_probs', 'mean_logits', 'vote', 'linear'])
def test_saves_and_reloads_as_one_model(folders, tmp_path, combine):
    *_, fa, fb = folders
    model = timm_ensembles.ensemble_of([fa, fb], combine=combine).eval()
    export_folder(model, tmp_path / 'ens')
    config = json.loads((tmp_path / 'ens' / 'config.json').read_text())
    assert [m['architecture'] for m in config['model_args']['members']] == ['test_resnet', 'test_efficientnet']
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'ens'}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    assert reloaded.input_maps[1].size == (48, 48)  # the members' own preprocessing came back with them


def test_a_trained_head_learns_while_the_members_stay_frozen(folders):
    *_, fa, fb = folders
    model = timm_ensembles.ensemble_of([fa, fb], combine='linear')
    task = timm_ensembles.create_task(model)
    optimizer = task.create_optimizer(opt='sgd', lr=0.5, momentum=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = task(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    out['loss'].backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {'head.fc.weight', 'head.fc.bias'}
    with pytest.raises(ValueError, match="Nothing to train: combine='mean_probs'"):
        timm_ensembles.create_task(timm_ensembles.ensemble_of([fa, fb]))
    # members fine-tuned too: each on its own cross-entropy
    task = timm_ensembles.create_task(timm_ensembles.ensemble_of([fa, fb]), train_members=True)
    assert set(task(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))['components']) == {'ce'}


def test_bad_members(folders, tmp_path):
    *_, fa, fb = folders
    export_folder(timm.create_model('test_resnet', num_classes=7), tmp_path / 'seven', data_config=CFG_A)
    with pytest.raises(ValueError, match=r'different numbers of classes: member 0 \(test_resnet\) 4.*member 2 .* 7'):
        timm_ensembles.ensemble_of([fa, fb, str(tmp_path / 'seven')])
    named = timm.create_model('test_resnet', num_classes=4)
    export_folder(named, tmp_path / 'named', data_config=CFG_A, model_config=dict(label_names=['a', 'b', 'c', 'd']))
    export_folder(named, tmp_path / 'other', data_config=CFG_A, model_config=dict(label_names=['w', 'x', 'y', 'z']))
    with pytest.raises(ValueError, match=r'name their classes differently: member 0 .*member 1'):
        timm_ensembles.ensemble_of([str(tmp_path / 'named'), str(tmp_path / 'other')])
    with pytest.raises(ValueError, match='two or more members'):
        timm_ensembles.ensemble_of([fa])
    with pytest.raises(ValueError, match=r"member 1: cannot load teacher '/no/such'"):
        timm_ensembles.ensemble_of([fa, '/no/such'])
    with pytest.raises(ValueError, match="Unknown combine 'median'"):
        timm_ensembles.ensemble_of([fa, fb], combine='median')
    with pytest.raises(ValueError, match='predict 4 classes; num_classes=3'):
        timm_ensembles.ensemble_of([fa, fb], num_classes=3)
