"""Loss terms against values worked out by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from timm_ensembles import EnsembleHead
from timm_ensembles.losses import (
    feature_difference,
    feature_difference_loss,
    loss_similarity,
    member_cross_entropy,
    pairwise_feature_difference,
)


def test_feature_difference_is_mean_over_every_element():
    a = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # [B=1, C=2, H=1, W=2]
    b = torch.tensor([[[[0.0, 0.0]], [[3.0, 2.0]]]])
    # squared differences 1, 4, 0, 4 -> mean 9 / 4
    assert feature_difference(a, b).item() == pytest.approx(2.25)


def test_fdl_two_members_averages_layers():
    layer0 = (torch.zeros(2, 3), torch.ones(2, 3))  # difference 1 everywhere -> 1
    layer1 = (torch.zeros(1, 4), torch.full((1, 4), 3.0))  # difference 3 -> 9
    features = [[layer0[0], layer1[0]], [layer0[1], layer1[1]]]
    assert feature_difference_loss(features).item() == pytest.approx((1 + 9) / 2)


def test_fdl_three_members_averages_pairs():
    # one layer, scalar features 0, 1, 3: pair losses 1, 9, 4 -> mean 14 / 3
    features = [[torch.tensor([[0.0]])], [torch.tensor([[1.0]])], [torch.tensor([[3.0]])]]
    assert feature_difference_loss(features).item() == pytest.approx(14 / 3)


def test_fdl_is_symmetric_and_zero_for_identical_members():
    f = [torch.randn(2, 4, 3, 3), torch.randn(2, 8)]
    g = [torch.randn(2, 4, 3, 3), torch.randn(2, 8)]
    assert feature_difference_loss([f, f]).item() == 0.0
    assert feature_difference_loss([f, g]).item() == pytest.approx(feature_difference_loss([g, f]).item())


def test_fdl_bad_input():
    with pytest.raises(ValueError, match='at least 2 members'):
        feature_difference_loss([[torch.zeros(1)]])
    with pytest.raises(ValueError, match='same, non-zero number'):
        feature_difference_loss([[torch.zeros(1)], [torch.zeros(1), torch.zeros(1)]])


def test_similarity():
    assert loss_similarity(torch.tensor(2.5), torch.tensor(1.0)).item() == pytest.approx(2.25)
    assert loss_similarity(torch.tensor(1.0), torch.tensor(2.5)).item() == pytest.approx(2.25)
    # bounded: the paper's value inside the bound, linear beyond it: 2 * 0.5 * 1.5 - 0.5^2 = 1.25
    assert loss_similarity(torch.tensor(1.2), torch.tensor(1.0), delta=0.5).item() == pytest.approx(0.04)
    a, b = torch.tensor(2.5, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    s = loss_similarity(a, b, delta=0.5)
    assert s.item() == pytest.approx(1.25)
    s.backward()
    # the gradient on each loss is bounded by 2 delta (the paper's would be 2 * 1.5 = 3)
    assert (a.grad.item(), b.grad.item()) == pytest.approx((1.0, -1.0))


def test_member_cross_entropy_hand_values():
    # member 0 puts logit log(3) on class 0 (p = 3/4 for 2 classes), member 1 uniform
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])  # [B=1, M=2, C=2]
    ce = member_cross_entropy(logits, torch.tensor([0]))
    assert ce.tolist() == pytest.approx([-math.log(0.75), math.log(2.0)])


def test_member_cross_entropy_equals_per_member_f_cross_entropy():
    logits = torch.randn(5, 3, 7)
    target = torch.randint(0, 7, (5,))
    ce = member_cross_entropy(logits, target, label_smoothing=0.1)
    for m in range(3):
        assert ce[m].item() == pytest.approx(F.cross_entropy(logits[:, m], target, label_smoothing=0.1).item())


def test_head_linear_starts_as_mean_of_logits():
    head = EnsembleHead(3, 4, 'linear')
    logits = torch.randn(2, 3, 4)
    torch.testing.assert_close(head(logits), logits.mean(1))


def test_head_linear_concatenates_member_major():
    head = EnsembleHead(2, 2, 'linear')
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[0, 2] = 1.0  # member 1, class 0
        head.fc.weight[1, 1] = 1.0  # member 0, class 1
    logits = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert head(logits).tolist() == [[3.0, 2.0]]


def test_head_mean_probs_is_log_of_mean_probability():
    head = EnsembleHead(2, 2, 'mean_probs')
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])  # probs (3/4, 1/4) and (1/2, 1/2)
    probs = head(logits).exp()
    assert probs[0].tolist() == pytest.approx([0.625, 0.375])


def test_head_mean_logits():
    head = EnsembleHead(2, 2, 'mean_logits')
    assert head(torch.tensor([[[1.0, 5.0], [3.0, 1.0]]])).tolist() == [[2.0, 3.0]]


def test_head_bad_mode():
    with pytest.raises(ValueError, match="expected one of"):
        EnsembleHead(2, 2, 'vote')


@pytest.mark.parametrize('num_members', [2, 3, 4, 5])
def test_fdl_equals_the_pairwise_form(num_members):
    import itertools
    features = [[torch.randn(3, 4, 5, 5) * (m + 1), torch.randn(3, 7)] for m in range(num_members)]
    pairwise = torch.stack([
        torch.stack([feature_difference(a, b) for a, b in zip(features[i], features[j])]).mean()
        for i, j in itertools.combinations(range(num_members), 2)]).mean()
    torch.testing.assert_close(feature_difference_loss(features), pairwise, rtol=1e-5, atol=1e-6)


def test_fdl_gradient_equals_the_pairwise_form():
    import itertools
    feats = [[torch.randn(2, 3, 4, 4, requires_grad=True)] for _ in range(3)]
    feature_difference_loss(feats).backward()
    fast = [f[0].grad.clone() for f in feats]
    for f in feats:
        f[0].grad = None
    torch.stack([feature_difference(feats[i][0], feats[j][0]) for i, j in itertools.combinations(range(3), 2)]
                ).mean().backward()
    for g, f in zip(fast, feats):
        torch.testing.assert_close(g, f[0].grad)


def test_relative_pair_distance_per_sample_hand_computed():
    # one layer, two members, two samples of two elements: sample 0 orthogonal (1), sample 1 opposite (2);
    # a second layer equal in both members (0): the mean over layers halves each
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 3.0], [-1.0, -1.0]])
    same = torch.ones(2, 3)
    pairs = pairwise_feature_difference([[a, same], [b, same]], 'relative')
    torch.testing.assert_close(pairs[:, 0, 1], torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(pairs[:, 1, 0], pairs[:, 0, 1])
    # orthogonal features stay at 1 whatever their scale (the mse form would grow a hundredfold)
    scaled = pairwise_feature_difference([[a, same], [10 * b, same]], 'relative')
    assert scaled[0, 0, 1] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="Unknown feature distance 'l1'"):
        pairwise_feature_difference([[a], [b]], 'l1')
