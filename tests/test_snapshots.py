"""Snapshot files (writer, reader, subset) and the evaluation pass's member diversity, without training runs
(the end-to-end runs are in test_train.py)."""
import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open
from torch import nn

import timm_ensembles
from timm_ensembles import data as te_data
from timm_ensembles import metrics
from timm_ensembles.losses import feature_difference_loss, pairwise_feature_difference
from timm_ensembles.train.engine import evaluate, format_metrics
from timm_ensembles.train.snapshots import (
    member_parameters,
    predict_members,
    read_snapshots,
    remove_snapshots_from,
    snapshot_indices,
    write_snapshot,
)

META = dict(model='ens_x', dataset='digits')


def _write(run, epochs, num_samples=5, num_members=2, num_classes=3, weights=False, indices=None):
    """Snapshots whose logits encode their epoch, so that a test can tell which epochs were read."""
    indices = torch.arange(num_samples) * 2 if indices is None else indices
    targets = torch.arange(num_samples) % 3
    for e in epochs:
        logits = torch.full((num_samples, num_members, num_classes), float(e))
        params = None
        if weights:
            params = [dict(b=torch.full((2,), 10.0 * e + m), a=torch.full((1, 3), -(10.0 * e + m)))
                      for m in range(num_members)]
        write_snapshot(run, e, logits, targets, indices, META, member_params=params)


def test_write_and_read_back(tmp_path):
    _write(tmp_path, [0, 1, 2], weights=True)
    names = sorted(p.name for p in (tmp_path / 'snapshots').iterdir())
    assert names == [f'epoch_{e:03d}{kind}.safetensors' for e in range(3) for kind in ('', '.weights')]
    with safe_open(str(tmp_path / 'snapshots' / 'epoch_001.safetensors'), framework='pt') as f:
        assert f.metadata() == dict(epoch='1', model='ens_x', dataset='digits', num_classes='3', num_members='2',
                                    format='1')
        assert f.get_tensor('logits').dtype == torch.float32 and f.get_tensor('indices').dtype == torch.int64
    snaps = read_snapshots(tmp_path, weights=True)
    assert snaps.epochs == [0, 1, 2]
    assert snaps.logits.shape == (3, 5, 2, 3) and snaps.logits[:, 0, 0, 0].tolist() == [0, 1, 2]
    assert snaps.targets.tolist() == [0, 1, 2, 0, 1] and snaps.indices.tolist() == [0, 2, 4, 6, 8]
    assert snaps.meta == dict(model='ens_x', dataset='digits', num_classes='3', num_members='2', format='1')
    # flattened in sorted-name order: a (3 values) before b (2 values)
    assert snaps.weights.shape == (3, 2, 5) and snaps.weights.dtype == torch.float32
    assert snaps.weights[2, 1].tolist() == [-21.0] * 3 + [21.0] * 2
    assert read_snapshots(tmp_path).weights is None
    assert read_snapshots(tmp_path / 'snapshots', epochs=[2, 0]).epochs == [0, 2]
    assert not [p for p in (tmp_path / 'snapshots').iterdir() if p.name.startswith('.')]  # no temporary files


def test_missing_epochs_are_named_and_allow_missing_reads_the_others(tmp_path):
    _write(tmp_path, [0, 2, 4])
    with pytest.raises(ValueError, match=r'epoch\(s\) \[1, 3\]'):
        read_snapshots(tmp_path)
    with pytest.warns(UserWarning, match=r'\[1, 3\]'):
        snaps = read_snapshots(tmp_path, allow_missing=True)
    assert snaps.epochs == [0, 2, 4] and snaps.logits[:, 0, 0, 0].tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match=r'epoch\(s\) \[3\]'):
        read_snapshots(tmp_path, epochs=[2, 3])


def test_epochs_logged_in_metrics_but_not_snapshotted_are_missing(tmp_path):
    _write(tmp_path, [0, 1])
    (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(dict(epoch=e)) + '\n' for e in range(4)) + '{"ep')
    with pytest.raises(ValueError, match=r'epoch\(s\) \[2, 3\]'):
        read_snapshots(tmp_path)


def test_no_snapshots_and_no_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='--snapshot-subset N'):
        read_snapshots(tmp_path)
    (tmp_path / 'snapshots').mkdir()
    with pytest.raises(FileNotFoundError, match='--snapshot-subset N'):
        read_snapshots(tmp_path)
    _write(tmp_path, [0, 1])
    with pytest.raises(FileNotFoundError, match='--snapshot-weights'):
        read_snapshots(tmp_path, weights=True)
    (tmp_path / 'snapshots' / 'epoch_001.safetensors').unlink()
    _write(tmp_path, [1], weights=True)
    with pytest.raises(ValueError, match=r'epoch\(s\) \[0\]'):
        read_snapshots(tmp_path, weights=True)


@pytest.mark.parametrize('change,message', [
    (dict(indices=torch.arange(5) * 3), 'different indices'),
    (dict(num_samples=4, indices=torch.arange(4) * 2), 'different targets'),
    (dict(num_classes=4), 'logits of shape'),
])
def test_epochs_that_disagree_are_refused(tmp_path, change, message):
    _write(tmp_path, [0])
    _write(tmp_path, [1], **change)
    with pytest.raises(ValueError, match=message):
        read_snapshots(tmp_path)


def test_initialisation_snapshot_is_epoch_minus_one_and_read_first(tmp_path):
    _write(tmp_path, [-1, 0, 1], weights=True)
    assert sorted(p.name for p in (tmp_path / 'snapshots').iterdir())[-2:] == [
        'epoch_init.safetensors', 'epoch_init.weights.safetensors']
    snaps = read_snapshots(tmp_path, weights=True)
    assert snaps.epochs == [-1, 0, 1] and snaps.logits[:, 0, 0, 0].tolist() == [-1, 0, 1]
    assert snaps.weights[0, 1].tolist() == [9.0] * 3 + [-9.0] * 2  # 10 * -1 + 1, sorted names a, b
    assert read_snapshots(tmp_path, epochs=[1, -1]).epochs == [-1, 1]
    # a resumed run redoes epochs from start_epoch: the initialisation is kept
    remove_snapshots_from(tmp_path, 0)
    assert read_snapshots(tmp_path).epochs == [-1]
    with pytest.raises(ValueError, match='>= 0 or -1'):
        _write(tmp_path, [-2])


def test_remove_snapshots_from(tmp_path):
    _write(tmp_path, [0, 1, 2], weights=True)
    remove_snapshots_from(tmp_path, 1)
    assert sorted(p.name for p in (tmp_path / 'snapshots').iterdir()) == [
        'epoch_000.safetensors', 'epoch_000.weights.safetensors']
    remove_snapshots_from(tmp_path / 'nowhere', 0)


def test_snapshot_subset_is_fixed_stratified_and_bounded():
    _, val_ds, _ = te_data.create_datasets('digits')
    indices = snapshot_indices(val_ds, 50)
    assert indices.dtype == np.int64 and len(indices) == 50 and len(set(indices.tolist())) == 50
    torch.manual_seed(123)
    np.random.seed(123)
    assert np.array_equal(indices, snapshot_indices(val_ds, 50))  # whatever the global seeds
    counts = np.bincount(np.asarray(val_ds.targets)[indices], minlength=10)
    assert counts.min() >= 4 and counts.max() <= 6  # stratified: 5 a class
    assert np.array_equal(snapshot_indices(val_ds, len(val_ds)), np.arange(len(val_ds)))
    with pytest.raises(ValueError, match=f'larger than the validation set \\({len(val_ds)} samples'):
        snapshot_indices(val_ds, len(val_ds) + 1)


class _SharedLayers(nn.Module):
    """Members that share a trunk (as collaborative heads): no ``members`` list."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(2, 2)

    def forward_members(self, x):
        return torch.stack([self.trunk(x), self.trunk(x)], 1)


def test_member_parameters():
    ens = timm_ensembles.create_model('ens_test_resnetx2', num_classes=3)
    params = member_parameters(ens)
    assert len(params) == 2 and params[1].keys() == dict(ens.members[1].named_parameters()).keys()
    assert params[1]['fc.weight'] is ens.members[1].fc.weight
    plain = nn.Linear(2, 3)
    assert member_parameters(plain) == [dict(weight=plain.weight, bias=plain.bias)]
    with pytest.raises(ValueError, match='share layers'):
        member_parameters(_SharedLayers())


def test_predict_members_of_a_plain_model_and_an_ensemble():
    ens = timm_ensembles.create_model('ens_test_resnetx2', num_classes=3)
    x = torch.randn(5, 3, 32, 32)
    loader = [(x[:3], torch.tensor([0, 1, 2])), (x[3:], torch.tensor([2, 1]))]
    logits, targets = predict_members(ens, loader, Accelerator(cpu=True))
    assert ens.training  # mode restored
    with torch.no_grad():
        assert torch.allclose(logits, ens.eval().forward_members(x), atol=1e-6)
    assert targets.tolist() == [0, 1, 2, 2, 1]
    plain = nn.Linear(4, 3)
    logits, _ = predict_members(plain, [(torch.randn(2, 4), torch.tensor([0, 1]))])
    assert logits.shape == (2, 1, 3)


class _FixedMembers(nn.Module):
    """An 'ensemble' whose member logits are its input: ``forward_members(x) = x``, ``[B, M, C]``."""

    def forward_members(self, x):
        return x

    def combine(self, members):
        return members.mean(1)

    def forward(self, x):
        return self.combine(x)


def _one_hot_members(preds, num_classes=4):
    """Member logits ``[B, M, C]`` whose argmax are ``preds`` ``[B][M]``."""
    return torch.nn.functional.one_hot(torch.tensor(preds), num_classes).float()


def test_disagreement_of_known_member_predictions():
    # members 0, 1, 2; pairs (0,1) differ on 2 of 4 samples, (0,2) on 3, (1,2) on 1: mean (2 + 3 + 1) / 3 / 4 = 0.5
    preds = [[0, 0, 1], [1, 2, 2], [3, 3, 3], [0, 1, 1]]
    x = _one_hot_members(preds)
    target = torch.tensor([0, 2, 3, 1])
    accelerator = Accelerator(cpu=True)
    # in two batches: the pair counts add up
    metrics = evaluate(_FixedMembers(), [(x[:3], target[:3]), (x[3:], target[3:])], accelerator)
    assert metrics['disagreement'] == pytest.approx(0.5)
    assert metrics['member_acc'] == [50.0, 100.0, 75.0]
    assert 'feature_distance' not in metrics  # no forward_members_with_features
    same = _one_hot_members([[p[0]] * 3 for p in preds])
    assert evaluate(_FixedMembers(), [(same, target)], accelerator)['disagreement'] == 0.0


def test_top5_of_known_rankings():
    # six classes; the label's rank among the logits: 1st, 6th, 2nd, 5th -> top-1 25 %, top-5 75 %
    logits = torch.tensor([[9., 1, 2, 3, 4, 5], [6., 5, 4, 3, 2, 1], [1., 2, 8, 3, 9, 0], [6., 5, 4, 2, 3, 1]])
    target = torch.tensor([0, 5, 2, 3])
    metrics = evaluate(nn.Identity(), [(logits[:2], target[:2]), (logits[2:], target[2:])], Accelerator(cpu=True))
    assert (metrics['acc'], metrics['top5']) == (25.0, 75.0)
    # fewer than five classes: every label is among the top five
    three = evaluate(nn.Identity(), [(logits[:, :3], torch.tensor([0, 1, 2, 2]))], Accelerator(cpu=True))
    assert three['top5'] == 100.0 and three['acc'] == 50.0


def test_plain_model_has_no_diversity():
    metrics = evaluate(nn.Linear(4, 3), [(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))], Accelerator(cpu=True))
    assert 'disagreement' not in metrics and 'feature_distance' not in metrics


def test_feature_distance_is_the_fdl_papers_loss():
    ens = timm_ensembles.create_model('ens_test_resnetx2', num_classes=3).eval()
    x, target = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        _, features = ens.forward_members_with_features(x)
        expected = float(feature_difference_loss(features))
    metrics = evaluate(ens, [(x, target)], Accelerator(cpu=True))
    assert metrics['feature_distance'] == pytest.approx(expected, rel=1e-5)
    assert 0.0 <= metrics['disagreement'] <= 1.0
    # the members' logits come from the features' forward pass: the accuracies are those of forward_members
    with torch.no_grad():
        hits = (ens.forward_members(x).argmax(-1) == target[:, None]).float().mean(0) * 100
    assert metrics['member_acc'] == pytest.approx(hits.tolist())


def test_pairwise_feature_difference_by_hand():
    # one layer of two features: sample 0 differs by (1, 1) -> 1, sample 1 by (0, 2) -> 2; a second, equal layer
    # halves both
    f0, f1 = torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 1.0], [1.0, 3.0]])
    pairs = pairwise_feature_difference([[f0, f0], [f1, f0]])
    assert torch.equal(pairs, torch.tensor([[[0.0, 0.5], [0.5, 0.0]], [[0.0, 1.0], [1.0, 0.0]]]))


@pytest.mark.parametrize('num_members', [2, 3, 4, 5, 6])
def test_pairwise_feature_difference_averages_to_the_batch_loss(num_members):
    features = [[torch.randn(7, 3, 4, 4), torch.randn(7, 5)] for _ in range(num_members)]
    pairs = pairwise_feature_difference(features)
    assert pairs.shape == (7, num_members, num_members)
    assert torch.equal(pairs, pairs.transpose(1, 2)) and not pairs.diagonal(dim1=1, dim2=2).any()
    i, j = torch.triu_indices(num_members, num_members, offset=1)
    assert float(pairs[:, i, j].mean()) == pytest.approx(float(feature_difference_loss(features)), rel=1e-5)
    one = [[f[2:3] for f in member] for member in features[:2]]
    assert float(pairs[2, 0, 1]) == pytest.approx(float(feature_difference_loss(one)), rel=1e-6)
    # the pair matrix of the analysis is its mean over samples
    assert torch.allclose(metrics.feature_distance_matrix(features), pairs.double().mean(0))


class _TrimmingAccelerator:
    """One process's view of a two-process evaluation: ``gather_for_metrics`` of the last batch drops the samples
    that the distributed sampler repeated to even out the processes (here: all but the first ``keep``)."""

    def __init__(self, num_batches, keep):
        self.num_batches, self.keep, self.calls = num_batches, keep, 0

    def autocast(self):
        return torch.autocast('cpu', enabled=False)

    def gather_for_metrics(self, tensors):
        self.calls += 1
        if self.calls == self.num_batches:
            return tuple(t[:self.keep] for t in tensors)
        return tensors


def test_feature_distance_counts_every_sample_once():
    ens = timm_ensembles.create_model('ens_test_resnetx2', num_classes=3).eval()
    x = torch.randn(7, 3, 32, 32)
    target = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    padded = torch.cat([x[4:], x[:2]])  # the last batch, padded with the first samples
    metrics = evaluate(ens, [(x[:4], target[:4]), (padded, target[[4, 5, 6, 0, 1]])], _TrimmingAccelerator(2, 3))
    with torch.no_grad():
        _, features = ens.forward_members_with_features(x)
    assert metrics['num_samples'] == 7
    assert metrics['feature_distance'] == pytest.approx(float(feature_difference_loss(features)), rel=1e-5)


def test_format_metrics_prints_the_diversity():
    val = dict(acc=90.0, loss=0.3, member_acc=[88.0, 89.0], mean_probs_acc=90.5, disagreement=0.1234,
               feature_distance=0.045612)
    line = format_metrics(3, dict(loss=0.5), val, 0.01, 12.0)
    assert 'mean-probs 90.50 | disagree 0.123 | feat-dist 0.0456 | val acc 90.00' in line
    assert 'disagree' not in format_metrics(3, {}, dict(acc=1.0, loss=2.0), 0.01, 1.0)
