"""Diversity and calibration metrics against values worked out by hand."""
import json
import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

import timm_ensembles  # noqa: F401  (registers 'ens' and 'collab' with timm)
from timm_ensembles import metrics
from timm_ensembles.losses import feature_difference_loss

# The hand-worked case: 3 members x 4 samples x 3 classes, given as probabilities. The logits are their logs, so
# that each member's softmax gives back exactly these numbers (up to float64 rounding).
#              sample 0           sample 1           sample 2           sample 3
MEMBER_PROBS = [
    [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3], [0.1, 0.8, 0.1]],  # member 0: predicts 0 1 0 1
    [[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.4, 0.5, 0.1]],  # member 1: predicts 0 0 2 1
    [[0.1, 0.6, 0.3], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]],  # member 2: predicts 1 1 2 0
]
TARGETS = torch.tensor([0, 1, 2, 0])
# correct: member 0 [y y n n] -> 50 %, member 1 [y n y n] -> 50 %, member 2 [n y y y] -> 75 %
# mean probs: s0 [0.5, 1/3, 1/6] -> 0 (y), s1 [0.3, 0.6, 0.1] -> 1 (y), s2 [7/30, 1/6, 0.6] -> 2 (y),
#             s3 [0.4, 0.5, 0.1] -> 1 (n): ensemble 75 %
ENSEMBLE_PROBS = [[0.5, 1 / 3, 1 / 6], [0.3, 0.6, 0.1], [7 / 30, 1 / 6, 0.6], [0.4, 0.5, 0.1]]
# Brier of the mean probs per sample: s0 0.25 + 1/9 + 1/36 = 7/18, s1 0.09 + 0.16 + 0.01 = 0.26,
# s2 (49 + 25 + 144) / 900 = 218/900, s3 0.36 + 0.25 + 0.01 = 0.62; mean (350 + 234 + 218 + 558) / 3600 = 17/45
ENSEMBLE_BRIER = 17 / 45


def member_logits() -> torch.Tensor:
    return torch.tensor(MEMBER_PROBS, dtype=torch.float64).log().permute(1, 0, 2)  # [N=4, M=3, C=3]


# --- function space


def test_member_and_ensemble_accuracy_in_percent():
    assert metrics.member_accuracy(member_logits(), TARGETS).tolist() == pytest.approx([50.0, 50.0, 75.0])
    assert metrics.ensemble_accuracy(member_logits(), TARGETS) == pytest.approx(75.0)


def test_ensemble_probs_is_mean_of_member_softmax():
    probs = metrics.ensemble_probs(member_logits())
    assert probs.shape == (4, 3) and probs.dtype == torch.float64
    torch.testing.assert_close(probs, torch.tensor(ENSEMBLE_PROBS, dtype=torch.float64))
    # not the softmax of the mean logits: s0 would be softmax(mean log p) ~ [0.59, 0.30, 0.11]
    mean_logit_probs = member_logits().mean(1).softmax(-1)
    assert not torch.allclose(probs, mean_logit_probs, atol=1e-2)


def test_low_precision_inputs_are_computed_in_float64():
    probs = metrics.ensemble_probs(member_logits().half())
    assert probs.dtype == torch.float64
    torch.testing.assert_close(probs, torch.tensor(ENSEMBLE_PROBS, dtype=torch.float64), atol=2e-3, rtol=0)


def test_pairwise_disagreement_hand_worked():
    # predictions: m0 [0 1 0 1], m1 [0 0 2 1], m2 [1 1 2 0]
    # (0, 1) differ on s1, s2 -> 2/4; (0, 2) differ on s0, s2, s3 -> 3/4; (1, 2) differ on s0, s1, s3 -> 3/4
    expected = torch.tensor([[0.0, 0.5, 0.75], [0.5, 0.0, 0.75], [0.75, 0.75, 0.0]], dtype=torch.float64)
    d = metrics.pairwise_disagreement(member_logits())
    torch.testing.assert_close(d, expected, rtol=0, atol=0)
    assert metrics.mean_offdiag(d) == pytest.approx(2 / 3)


def test_identical_members_never_disagree():
    logits = torch.randn(50, 1, 5).expand(50, 4, 5)
    assert torch.equal(metrics.pairwise_disagreement(logits), torch.zeros(4, 4, dtype=torch.float64))


def test_disagreement_of_one_model_is_zero_matrix():
    assert metrics.pairwise_disagreement(torch.randn(7, 1, 3)).tolist() == [[0.0]]


def test_mean_offdiag_reads_only_pairs_above_the_diagonal():
    m = torch.tensor([[100.0, 1.0, 2.0], [1.0, 100.0, 6.0], [2.0, 6.0, 100.0]])
    assert metrics.mean_offdiag(m) == pytest.approx(3.0)  # (1 + 2 + 6) / 3, the diagonal ignored


def test_mean_offdiag_needs_two_models():
    with pytest.raises(ValueError, match='needs at least 2 members/models: a single model has no pair'):
        metrics.mean_offdiag(torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r'square \[M, M\] matrix, got shape \(2, 3\)'):
        metrics.mean_offdiag(torch.zeros(2, 3))


# --- weight space


def tiny_bn_net() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
        net[0].bias.fill_(3.0)
        net[1].weight.fill_(4.0)
        net[1].bias.fill_(5.0)
        net[1].running_mean.fill_(6.0)
        net[1].running_var.fill_(7.0)
        net[1].num_batches_tracked.fill_(8)
    return net


def test_flatten_weights_order_and_buffer_switch():
    net = tiny_bn_net()
    w = metrics.flatten_weights(net)
    assert w.dtype == torch.float64
    # Linear weight, Linear bias, BN weight, BN bias; no running statistics
    assert w.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    # then running_mean and running_var, never the integer num_batches_tracked (8)
    assert metrics.flatten_weights(net, include_buffers=True).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]


@pytest.fixture(scope='module')
def ens_model():
    torch.manual_seed(0)
    return timm.create_model('ens', base_model='test_resnet', num_members=3, num_classes=4)


def test_member_weights_of_an_ensemble(ens_model):
    num_params = sum(p.numel() for p in ens_model.members[0].parameters())
    w = metrics.member_weights(ens_model)
    assert w.shape == (3, num_params) and w.dtype == torch.float64
    for m, member in enumerate(ens_model.members):
        assert torch.equal(w[m], metrics.flatten_weights(member))
    num_float_buffers = sum(b.numel() for b in ens_model.members[0].buffers() if b.is_floating_point())
    assert num_float_buffers > 0
    assert metrics.member_weights(ens_model, include_buffers=True).shape == (3, num_params + num_float_buffers)


def test_identical_members_have_cosine_exactly_one(ens_model):
    ens_model.members[1].load_state_dict(ens_model.members[0].state_dict())
    sim = metrics.cosine_similarity_matrix(metrics.member_weights(ens_model))
    assert sim.shape == (3, 3)
    assert sim[0, 1].item() == 1.0 and sim[1, 0].item() == 1.0
    # member 2 kept its own initialisation
    assert sim[0, 2].item() < 0.999
    assert torch.equal(sim, sim.T) and torch.equal(sim.diagonal(), torch.ones(3, dtype=torch.float64))


def test_member_weights_of_a_plain_model():
    assert metrics.member_weights(tiny_bn_net()).tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0]]


def test_member_weights_refuses_shared_weight_members():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(2, 2)

        def forward_members(self, x):
            return torch.stack([self.trunk(x)] * 2, 1)

    with pytest.raises(ValueError, match='Heads has forward_members but no .members: its members share weights'):
        metrics.member_weights(Heads())


def test_member_weights_refuses_a_collaborative_net():
    model = timm.create_model('collab', base_model='test_resnet', num_heads=2, num_classes=4)
    with pytest.raises(ValueError, match='per-member weight vectors are not defined'):
        metrics.member_weights(model)


def test_cosine_of_known_vectors():
    vectors = [
        torch.tensor([1.0, 0.0, 0.0]),   # a
        torch.tensor([0.0, 1.0, 0.0]),   # orthogonal to a: 0
        torch.tensor([-1.0, 0.0, 0.0]),  # opposite to a: -1
        torch.tensor([1.0, 1.0, 0.0]),   # 45 degrees from a and b: 1 / sqrt(2)
        torch.tensor([2.0, 0.0, 0.0]),   # a scaled: 1
    ]
    sim = metrics.cosine_similarity_matrix(vectors)
    r = 1 / math.sqrt(2)
    expected = torch.tensor([
        [1, 0, -1, r, 1],
        [0, 1, 0, r, 0],
        [-1, 0, 1, -r, -1],
        [r, r, -r, 1, r],
        [1, 0, -1, r, 1],
    ], dtype=torch.float64)
    assert sim.dtype == torch.float64
    torch.testing.assert_close(sim, expected)
    assert sim[0, 2].item() == -1.0 and sim[0, 1].item() == 0.0


def test_cosine_of_repeated_random_vectors_is_exactly_one():
    v = torch.randn(1000, dtype=torch.float64) * 1e-3
    sim = metrics.cosine_similarity_matrix(torch.stack([v, torch.randn(1000, dtype=torch.float64), v, -v]))
    assert sim[0, 2].item() == 1.0 and sim[0, 3].item() == -1.0 and sim[2, 3].item() == -1.0
    assert abs(sim[0, 1].item()) < 0.2


def test_cosine_rejects_zero_vector():
    with pytest.raises(ValueError, match=r'vector\(s\) \[1\] are zero'):
        metrics.cosine_similarity_matrix(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))


# --- feature space


def test_feature_distance_hand_worked():
    # one layer of scalar features 0, 1, 3: pairs (0, 1) 1, (0, 2) 9, (1, 2) 4; a second layer of [1, 2] features
    # 0, 0 / 0, 2 / 0, 2: pairs 2, 2, 0 (mean of (0, 4)); the matrix averages the two layers
    features = [
        [torch.tensor([[0.0]]), torch.tensor([[0.0, 0.0]])],
        [torch.tensor([[1.0]]), torch.tensor([[0.0, 2.0]])],
        [torch.tensor([[3.0]]), torch.tensor([[0.0, 2.0]])],
    ]
    expected = torch.tensor([[0, 1.5, 5.5], [1.5, 0, 2], [5.5, 2, 0]], dtype=torch.float64)
    d = metrics.feature_distance_matrix(features)
    torch.testing.assert_close(d, expected, rtol=0, atol=0)
    assert metrics.mean_offdiag(d) == pytest.approx(feature_difference_loss(features).item())


@pytest.mark.parametrize('num_members', [2, 3, 5])  # 5: the loss takes its centred O(N) path
def test_feature_distance_mean_is_the_fdl_loss(num_members):
    features = [[torch.randn(2, 3, 4, 4), torch.randn(2, 5)] for _ in range(num_members)]
    d = metrics.feature_distance_matrix(features)
    assert d.shape == (num_members, num_members) and torch.equal(d, d.T) and d.diagonal().eq(0).all()
    assert metrics.mean_offdiag(d) == pytest.approx(feature_difference_loss(features).item(), rel=1e-5)


def test_identical_features_have_distance_zero():
    f = [torch.randn(2, 3, 4, 4), torch.randn(2, 8)]
    assert torch.equal(metrics.feature_distance_matrix([f, f, f]), torch.zeros(3, 3, dtype=torch.float64))


def test_feature_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r'Layer 0 has different shapes across members: \[\(2, 3\), \(2, 1\)\]'):
        metrics.feature_distance_matrix([[torch.zeros(2, 3)], [torch.zeros(2, 1)]])
    with pytest.raises(ValueError, match=r'same, non-zero number of feature layers, got \[2, 1\]'):
        metrics.feature_distance_matrix([[torch.zeros(1), torch.zeros(1)], [torch.zeros(1)]])


# --- calibration


def test_brier_hand_worked():
    assert metrics.brier_score(torch.tensor(ENSEMBLE_PROBS), TARGETS) == pytest.approx(ENSEMBLE_BRIER)
    # the range is [0, 2]: confident and right 0, confident and wrong 2 (not divided by C)
    assert metrics.brier_score(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0])) == 0.0
    assert metrics.brier_score(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([2])) == pytest.approx(2.0)


def test_nll_hand_worked():
    # true-class probabilities 0.5, 0.6, 0.6, 0.4
    expected = -(math.log(0.5) + 2 * math.log(0.6) + math.log(0.4)) / 4  # 0.65777
    assert metrics.nll(torch.tensor(ENSEMBLE_PROBS), TARGETS) == pytest.approx(expected)
    # a zero probability of the true class costs -log(1e-12), not infinity
    assert metrics.nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == pytest.approx(-math.log(1e-12))


# 6 samples, 3 classes, 4 bins [0, .25) [.25, .5) [.5, .75) [.75, 1]:
ECE_PROBS = torch.tensor([
    [0.4, 0.35, 0.25],  # conf 0.4, bin 1, correct (target 0)
    [0.3, 0.45, 0.25],  # conf 0.45, bin 1, wrong (target 0)
    [0.5, 0.3, 0.2],    # conf 0.5 exactly on an edge: bin 2 (bins are closed on the left), wrong (target 1)
    [0.2, 0.7, 0.1],    # conf 0.7, bin 2, correct (target 1)
    [0.1, 0.1, 0.8],    # conf 0.8, bin 3, correct (target 2)
    [1.0, 0.0, 0.0],    # conf 1 exactly: the last bin, wrong (target 1)
])
ECE_TARGETS = torch.tensor([0, 0, 1, 1, 2, 1])
# bin 0 empty; bin 1 conf 0.425 acc 0.5 gap 0.075; bin 2 conf 0.6 acc 0.5 gap 0.1; bin 3 conf 0.9 acc 0.5 gap 0.4;
# two samples each: ECE = (0.15 + 0.2 + 0.8) / 6 = 1.15 / 6. (Right-closed bins would put 0.5 in bin 1: 1.45 / 6;
# a bin of its own for conf 1, as torchmetrics alone does: 1.55 / 6.)
ECE_EXPECTED = 1.15 / 6


def test_ece_hand_worked_binning():
    assert metrics.expected_calibration_error(ECE_PROBS, ECE_TARGETS, n_bins=4) == pytest.approx(ECE_EXPECTED)


def test_reliability_diagram_hand_worked():
    diagram = metrics.reliability_diagram(ECE_PROBS, ECE_TARGETS, n_bins=4)
    assert diagram['bin_edges'].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert diagram['count'].tolist() == [0, 2, 2, 2]
    assert math.isnan(diagram['confidence'][0]) and math.isnan(diagram['accuracy'][0])
    assert diagram['confidence'][1:].tolist() == pytest.approx([0.425, 0.6, 0.9])
    assert diagram['accuracy'][1:].tolist() == pytest.approx([0.5, 0.5, 0.5])


def weighted_gap(diagram) -> float:
    count = diagram['count'].double()
    gap = (diagram['accuracy'] - diagram['confidence']).abs().nan_to_num(0.0)
    return ((count * gap).sum() / count.sum()).item()


@pytest.mark.parametrize('scale', [1.0, 30.0])  # 30: many confidences saturate to 1 in float32
def test_reliability_diagram_weighted_gap_is_the_ece(scale):
    probs = (torch.randn(500, 10) * scale).softmax(-1)
    targets = torch.randint(0, 10, (500,))
    diagram = metrics.reliability_diagram(probs, targets)
    assert diagram['count'].sum().item() == 500 and diagram['count'].shape == (15,)
    ece = metrics.expected_calibration_error(probs, targets)
    assert ece > 0.05
    assert weighted_gap(diagram) == pytest.approx(ece, abs=1e-6)


def test_calibration_dict():
    cal = metrics.calibration(ECE_PROBS, ECE_TARGETS, n_bins=4)
    assert cal == {
        'nll': pytest.approx(-(math.log(0.4) + math.log(0.3) + math.log(0.3) + math.log(0.7) + math.log(0.8)
                               + math.log(1e-12)) / 6),
        'brier': pytest.approx(metrics.brier_score(ECE_PROBS, ECE_TARGETS)),
        'ece': pytest.approx(ECE_EXPECTED),
    }


def test_calibration_rejects_logits():
    with pytest.raises(ValueError, match='not logits'):
        metrics.calibration(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))


# --- ensemble size


def test_size_curve_hand_worked():
    curve = metrics.ensemble_size_curve(member_logits(), TARGETS)
    assert [(c['k'], c['num_subsets']) for c in curve] == [(1, 3), (2, 3), (3, 1)]
    # k = 1: accuracies 50, 50, 75 -> mean 175/3, population std sqrt(((25/3)^2 * 2 + (50/3)^2) / 3) = 11.785
    #   (the sample std would be 14.43); Brier m0 (0.26 + 0.14 + 0.78 + 1.46) / 4 = 0.66, m1 0.42, m2 0.38
    #   -> mean 1.46/3, std sqrt((52^2 + 20^2 + 32^2) / 3) / 300
    k1 = curve[0]
    assert k1['acc_mean'] == pytest.approx(175 / 3)
    assert k1['acc_std'] == pytest.approx(math.sqrt(3750 / 27))
    assert k1['brier_mean'] == pytest.approx(1.46 / 3)
    assert k1['brier_std'] == pytest.approx(math.sqrt(4128 / 3) / 300)
    # k = 2: {0,1} s0 [.7 .2 .1] y, s1 [.4 .5 .1] y, s2 [.3 .2 .5] y, s3 [.25 .65 .1] n -> 75, Brier 1.935/4
    #        {0,2} s0 [.35 .45 .2] n, s1 [.15 .75 .1] y, s2 [.3 .15 .55] y, s3 [.4 .5 .1] n -> 50, Brier 1.695/4
    #        {1,2} s0 [.45 .35 .2] y, s1 [.35 .55 .1] y, s2 [.1 .15 .75] y, s3 [.55 .35 .1] y -> 100, Brier 1.23/4
    k2 = curve[1]
    briers = [1.935 / 4, 1.695 / 4, 1.23 / 4]
    assert k2['acc_mean'] == pytest.approx(75.0)
    assert k2['acc_std'] == pytest.approx(math.sqrt(1250 / 3))
    assert k2['brier_mean'] == pytest.approx(0.405)
    assert k2['brier_std'] == pytest.approx(float(np.std(briers)))
    assert k2['brier_std'] == pytest.approx(0.0731651, abs=1e-6)
    # k = 3: the whole ensemble, one subset, std 0
    assert curve[2] == {'k': 3, 'num_subsets': 1, 'acc_mean': pytest.approx(75.0), 'acc_std': 0.0,
                        'brier_mean': pytest.approx(ENSEMBLE_BRIER), 'brier_std': 0.0}


def test_size_curve_sampling_is_deterministic_per_seed():
    logits = torch.randn(40, 6, 5)
    targets = torch.randint(0, 5, (40,))
    curve = metrics.ensemble_size_curve(logits, targets, max_subsets=4, seed=3)
    # C(6, k) = 6 15 20 15 6 1: every k but the last is sampled
    assert [c['num_subsets'] for c in curve] == [4, 4, 4, 4, 4, 1]
    assert metrics.ensemble_size_curve(logits, targets, max_subsets=4, seed=3) == curve
    other = metrics.ensemble_size_curve(logits, targets, max_subsets=4, seed=4)
    assert [c['brier_mean'] for c in other] != [c['brier_mean'] for c in curve]
    # a cap no k exceeds lists every subset
    assert metrics.ensemble_size_curve(logits, targets, max_subsets=20) == metrics.ensemble_size_curve(logits, targets)


@pytest.mark.parametrize('listed', [True, False])  # False: too many subsets to list, drawn one at a time
def test_subset_sample_is_distinct_and_seeded(monkeypatch, listed):
    if not listed:
        monkeypatch.setattr(metrics, '_MAX_LISTED_SUBSETS', 0)
    import random
    subsets = metrics._subsets(10, 4, 50, random.Random(0))
    assert len(subsets) == 50 == len(set(subsets))
    assert all(len(s) == 4 and list(s) == sorted(s) and 0 <= s[0] and s[-1] < 10 for s in subsets)
    assert metrics._subsets(10, 4, 50, random.Random(0)) == subsets
    assert metrics._subsets(10, 4, 50, random.Random(1)) != subsets


# --- t-SNE


def test_tsne_shape_determinism_and_clusters():
    # two clusters of 6 points, 20 apart in 6 dimensions: they stay apart in the embedding
    points = torch.cat([torch.randn(6, 6), torch.randn(6, 6) + 20])
    a = metrics.tsne_embedding(points, seed=0)
    assert isinstance(a, np.ndarray) and a.shape == (12, 2)
    np.testing.assert_array_equal(a, metrics.tsne_embedding(points.numpy(), seed=0))
    dist = np.linalg.norm(a[:, None] - a[None], axis=-1)
    assert max(dist[:6, :6].max(), dist[6:, 6:].max()) < dist[:6, 6:].min()
    # the smallest set: 3 points, perplexity clamped to 1
    assert metrics.tsne_embedding(np.eye(3)).shape == (3, 2)


def test_tsne_rejects_too_few_points_and_bad_perplexity():
    with pytest.raises(ValueError, match='at least 3 points, got 2'):
        metrics.tsne_embedding(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r'perplexity must be in \(0, K = 5\), got 5'):
        metrics.tsne_embedding(np.random.rand(5, 3), perplexity=5)


# --- summary


def test_summarize_hand_worked_and_json():
    s = metrics.summarize(member_logits(), TARGETS)
    assert json.loads(json.dumps(s)) == s  # plain Python types only
    assert s['member_acc'] == pytest.approx([50.0, 50.0, 75.0])
    assert s['ensemble_acc'] == pytest.approx(75.0)
    assert s['disagreement'] == pytest.approx(2 / 3)
    assert s['ensemble_calibration']['brier'] == pytest.approx(ENSEMBLE_BRIER)
    assert [c['brier'] for c in s['member_calibration']] == pytest.approx([0.66, 0.42, 0.38])
    assert [c['k'] for c in s['size_curve']] == [1, 2, 3]
    assert (s['num_samples'], s['num_members'], s['num_classes']) == (4, 3, 3)


def test_summarize_one_model_has_no_disagreement():
    s = metrics.summarize(member_logits()[:, :1], TARGETS)
    assert s['disagreement'] is None and s['disagreement_matrix'] == [[0.0]]
    assert s['member_acc'] == pytest.approx([50.0]) and s['ensemble_acc'] == pytest.approx(50.0)
    assert len(s['size_curve']) == 1


# --- input validation


def test_bad_inputs_raise_with_the_expected_shape():
    logits = member_logits()
    with pytest.raises(ValueError, match=r'logits must be \[N, M, C\].*got shape \(4, 3\)'):
        metrics.member_accuracy(logits[:, 0], TARGETS)
    with pytest.raises(ValueError, match=r'targets must be \[N\] = \[4\] class indices.*got shape \(3,\)'):
        metrics.ensemble_accuracy(logits, TARGETS[:3])
    with pytest.raises(ValueError, match=r'targets must lie in \[0, 2\] \(3 classes\), got values from 0 to 3'):
        metrics.ensemble_size_curve(logits, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r'targets must lie in \[0, 2\]'):
        metrics.brier_score(torch.tensor(ENSEMBLE_PROBS), torch.tensor([0, -1, 2, 0]))
    with pytest.raises(ValueError, match='targets must be integer class indices'):
        metrics.nll(torch.tensor(ENSEMBLE_PROBS), TARGETS.float())
    with pytest.raises(ValueError, match=r'probs must be \[N, C\]'):
        metrics.expected_calibration_error(logits.softmax(-1), TARGETS)
    with pytest.raises(ValueError, match='logits must be a floating-point tensor'):
        metrics.pairwise_disagreement(torch.zeros(4, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match='n_bins must be a positive integer, got 0'):
        metrics.reliability_diagram(torch.tensor(ENSEMBLE_PROBS), TARGETS, n_bins=0)
    with pytest.raises(ValueError, match='max_subsets must be None or a positive integer, got 0'):
        metrics.ensemble_size_curve(logits, TARGETS, max_subsets=0)
