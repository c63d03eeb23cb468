"""Uncertainty decomposition, temperature scaling, OOD detection and selective classification against values worked
out by hand or by independent formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from timm_ensembles import metrics
from timm_ensembles.analysis import uncertainty


def _h(*p: float) -> float:
    """Entropy in nats, written out."""
    return -sum(x * math.log(x) for x in p if x > 0)


# --- decomposition

# 3 samples x 2 members x 2 classes, as probabilities; logits are their logs (softmax gives them back)
MEMBER_PROBS = [
    [[0.9, 0.1], [0.1, 0.9]],  # the members disagree: mean [0.5, 0.5]
    [[0.8, 0.2], [0.8, 0.2]],  # they agree: mutual information 0
    [[0.5, 0.5], [1.0, 0.0]],  # mean [0.75, 0.25]; a probability of 0 (logit -inf) has 0 ln 0 = 0
]


def _member_logits() -> torch.Tensor:
    return torch.tensor(MEMBER_PROBS, dtype=torch.float64).log()  # [N=3, M=2, C=2]


def test_predictive_entropy_hand_worked():
    probs = torch.tensor([[1, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0, 0], [0.5, 0.25, 0.25, 0]])
    entropy = uncertainty.predictive_entropy(probs)
    assert entropy.dtype == torch.float64 and entropy.shape == (4,)
    # 0; ln 4; ln 2; 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2
    assert entropy[0].item() == 0.0  # 1 ln 1 = 0 and 0 ln 0 = 0 exactly, no nan
    assert entropy.tolist() == pytest.approx([0.0, math.log(4), math.log(2), 1.5 * math.log(2)], abs=1e-15)


def test_decomposition_hand_worked():
    scores = uncertainty.uncertainty_scores(_member_logits())
    assert set(scores) == {'max_prob', 'entropy', 'expected_entropy', 'mutual_information'}
    assert all(v.dtype == torch.float64 and v.shape == (3,) for v in scores.values())
    h9, h8 = _h(0.9, 0.1), _h(0.8, 0.2)
    assert scores['max_prob'].tolist() == pytest.approx([0.5, 0.8, 0.75], abs=1e-15)
    assert scores['entropy'].tolist() == pytest.approx([math.log(2), h8, _h(0.75, 0.25)], abs=1e-15)
    assert scores['expected_entropy'].tolist() == pytest.approx([h9, h8, math.log(2) / 2], abs=1e-15)
    expected_mi = [math.log(2) - h9, 0.0, _h(0.75, 0.25) - math.log(2) / 2]
    assert scores['mutual_information'].tolist() == pytest.approx(expected_mi, abs=1e-15)
    assert scores['mutual_information'].min() >= 0
    # the functions one by one give the same
    logits = _member_logits()
    torch.testing.assert_close(uncertainty.expected_entropy(logits), scores['expected_entropy'], rtol=0, atol=0)
    torch.testing.assert_close(uncertainty.mutual_information(logits), scores['mutual_information'], rtol=0, atol=0)


def test_entropy_is_that_of_ensemble_probs_and_splits_into_its_parts():
    logits = torch.randn(20, 4, 5, dtype=torch.float64) * 3
    scores = uncertainty.uncertainty_scores(logits)
    assert torch.equal(scores['entropy'], uncertainty.predictive_entropy(metrics.ensemble_probs(logits)))
    assert torch.equal(scores['max_prob'], metrics.ensemble_probs(logits).max(1).values)
    torch.testing.assert_close(scores['expected_entropy'] + scores['mutual_information'], scores['entropy'])
    # 0 <= MI <= ln M, the entropy of a uniform choice among the M members
    assert scores['mutual_information'].min() >= 0 and scores['mutual_information'].max() <= math.log(4)


def test_mutual_information_of_one_member_or_identical_members_is_zero():
    logits = torch.randn(6, 1, 4)
    assert torch.equal(uncertainty.mutual_information(logits), torch.zeros(6, dtype=torch.float64))
    scores = uncertainty.uncertainty_scores(logits)
    assert torch.equal(scores['entropy'], scores['expected_entropy'])
    # three copies: the mean of three equal numbers need not round back to the number, hence the clamp (never < 0)
    mi = uncertainty.mutual_information(logits.expand(6, 3, 4))
    assert mi.min() >= 0 and mi.max() < 1e-15


def test_ood_scores_are_higher_for_more_uncertain():
    logits = _member_logits()
    scores, ood = uncertainty.uncertainty_scores(logits), uncertainty.ood_scores(logits)
    assert set(ood) == {'neg_max_prob', 'entropy', 'expected_entropy', 'mutual_information'}
    assert torch.equal(ood['neg_max_prob'], -scores['max_prob'])
    for name in ('entropy', 'expected_entropy', 'mutual_information'):
        assert torch.equal(ood[name], scores[name])


# --- temperature scaling


def _nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    return -(logits / temperature).log_softmax(1).gather(1, targets[:, None]).mean().item()


@pytest.mark.parametrize('a, num_correct', [(2.0, 8), (0.5, 9), (5.0, 6)])
def test_fit_temperature_binary_closed_form(a, num_correct):
    # logits [a, -a] on all 10 samples, target 0 on a fraction p of them: NLL(T) = -p ln s(2a/T) - (1-p) ln s(-2a/T)
    # with s the sigmoid; its derivative vanishes where s(2a/T) = p, i.e. T = 2a / ln(p / (1 - p))
    logits = torch.tensor([[a, -a]] * 10)
    targets = torch.tensor([0] * num_correct + [1] * (10 - num_correct))
    p = num_correct / 10
    temperature = uncertainty.fit_temperature(logits, targets)
    assert temperature == pytest.approx(2 * a / math.log(p / (1 - p)), rel=1e-7)


def test_fit_temperature_minimises_nll():
    num, classes = 60, 5
    targets = torch.arange(num) % classes
    # overconfident: a margin of 4 for the target on 2/3 of the samples, for a wrong class on the others
    predicted = torch.where(torch.arange(num) % 3 == 0, (targets + 1) % classes, targets)
    logits = 4 * F.one_hot(predicted, classes).double() + torch.randn(num, classes, dtype=torch.float64)
    temperature = uncertainty.fit_temperature(logits, targets)
    assert temperature > 1  # overconfident logits are softened
    best = _nll(logits, targets, temperature)
    assert best <= _nll(logits, targets, temperature * 1.1) and best <= _nll(logits, targets, temperature / 1.1)
    assert best < _nll(logits, targets, 1.0)
    # scaling the logits scales the temperature; a constant per sample changes nothing
    assert uncertainty.fit_temperature(3 * logits, targets) == pytest.approx(3 * temperature, rel=1e-6)
    shifted = logits + torch.randn(num, 1, dtype=torch.float64)
    assert uncertainty.fit_temperature(shifted, targets) == pytest.approx(temperature, rel=1e-6)


def test_fit_temperature_of_averaged_probabilities():
    member_logits = torch.randn(40, 3, 4, dtype=torch.float64) * 3
    targets = member_logits.mean(1).argmax(1)
    targets[::4] = (targets[::4] + 1) % 4  # a quarter wrong
    log_probs = metrics.ensemble_probs(member_logits).log()
    temperature = uncertainty.fit_temperature(log_probs, targets)
    best = _nll(log_probs, targets, temperature)
    assert best <= _nll(log_probs, targets, temperature * 1.1) and best <= _nll(log_probs, targets, temperature / 1.1)


@pytest.mark.parametrize('context', [torch.no_grad, torch.inference_mode])
def test_fit_temperature_under_no_grad_and_inference_mode(context):
    # where evaluation code calls it, with logits made there; T = 2a / ln(p / (1 - p)) as above
    with context():
        logits, targets = torch.tensor([[2.0, -2.0]] * 10), torch.tensor([0] * 8 + [1] * 2)
        assert uncertainty.fit_temperature(logits, targets) == pytest.approx(4 / math.log(4), rel=1e-7)


@pytest.mark.parametrize('num_correct, match', [(5, 'T -> inf'), (3, 'T -> inf'), (10, 'T -> 0')])
def test_fit_temperature_without_finite_minimum(num_correct, match):
    # p = 0.5: the NLL falls towards ln 2 as T -> inf; p < 0.5: the best T > 0 is infinite too; p = 1: T -> 0
    logits = torch.tensor([[2.0, -2.0]] * 10)
    targets = torch.tensor([0] * num_correct + [1] * (10 - num_correct))
    with pytest.raises(ValueError, match=match):
        uncertainty.fit_temperature(logits, targets)


# --- OOD detection


def test_ood_detection_hand_worked():
    # in [0.1, 0.2, 0.3, 0.5], out [0.4, 0.6, 0.7, 0.8]: one overlap, in's 0.5 above out's 0.4.
    # AUROC: 15 of the 16 (out, in) pairs have out > in -> 15/16.
    # AP: descending 0.8 O, 0.7 O, 0.6 O, 0.5 I, 0.4 O, ...; precision at each OOD sample 1, 1, 1, 4/5; each adds
    #     1/4 recall -> (3 + 0.8) / 4 = 0.95.
    # FPR95: ceil(0.95 * 4) = 4 OOD samples must be detected -> threshold 0.4; in >= 0.4: only 0.5 -> 1/4.
    result = uncertainty.ood_detection(torch.tensor([0.1, 0.2, 0.3, 0.5]), torch.tensor([0.4, 0.6, 0.7, 0.8]))
    # torchmetrics computes AUROC and AP in float32
    assert result == pytest.approx({'auroc': 15 / 16, 'aupr': 0.95, 'fpr95': 0.25}, abs=1e-7)


def test_ood_detection_ties():
    # in [0.1, 0.2, 0.3, 0.4], out [0.4, 0.6, 0.7, 0.8]: in's 0.4 ties out's 0.4.
    # AUROC: 15 pairs out > in, one tie counted 1/2 -> 15.5/16.
    # AP: thresholds 0.8, 0.7, 0.6 have precision 1 (recall 1/4 each); at 0.4 both tied samples enter: 4 OOD of 5,
    #     recall 1 -> 3/4 + 1/4 * 4/5 = 0.95.
    # FPR95: threshold 0.4, in "at or above": the tied 0.4 -> 1/4.
    result = uncertainty.ood_detection(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.4, 0.6, 0.7, 0.8]))
    assert result == pytest.approx({'auroc': 15.5 / 16, 'aupr': 0.95, 'fpr95': 0.25}, abs=1e-7)


def test_ood_detection_large_scores_keep_their_order():
    # torchmetrics would squash these with a sigmoid to exactly 1.0 in float64 and find them all tied (AUROC 0.5)
    result = uncertainty.ood_detection(torch.tensor([40.0, 41.0, -50.0]), torch.tensor([42.0, 43.0]))
    assert result == {'auroc': 1.0, 'aupr': 1.0, 'fpr95': 0.0}


def test_ood_detection_fpr95_counts_exactly():
    # 20 OOD scores 0..19: 95 % is exactly 19 of them, reached down to threshold 1 (not 0, as 0.95 * 20 rounded up
    # past 19 would give); in >= 1: 1, 5 and 30 of [0.5, 1, 5, 30] -> 3/4
    out = torch.arange(20, dtype=torch.float64)
    assert uncertainty.ood_detection(torch.tensor([0.5, 1.0, 5.0, 30.0]), out)['fpr95'] == 0.75
    # 21 OOD scores 0..20: 95 % is 19.95 -> 20 of them, down to threshold 1 again; with in scores 0.5, 1 -> 1/2
    out = torch.arange(21, dtype=torch.float64)
    assert uncertainty.ood_detection(torch.tensor([0.5, 1.0]), out)['fpr95'] == 0.5


def test_ood_detection_against_sklearn_and_brute_force():
    from sklearn.metrics import average_precision_score, roc_auc_score

    # scores rounded to one decimal so that many are tied, within and across the two sets
    scores_in = (torch.randn(50, dtype=torch.float64) * 10).round() / 10
    scores_out = (torch.randn(30, dtype=torch.float64) * 10 + 8).round() / 10
    result = uncertainty.ood_detection(scores_in, scores_out)
    labels = [0] * 50 + [1] * 30
    scores = torch.cat([scores_in, scores_out]).numpy()
    assert result['auroc'] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)  # float32 in torchmetrics
    assert result['aupr'] == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
    # FPR95 by its definition: the least FPR over the thresholds that at least 95 % of the OOD samples reach
    fprs = [(scores_in >= t).double().mean().item() for t in scores_out if (scores_out >= t).sum() * 100 >= 95 * 30]
    assert result['fpr95'] == min(fprs)


def test_mutual_information_detects_disagreement():
    # in-distribution: all 3 members confident in the same class; OOD: each member confident in a different class
    in_logits = 5 * F.one_hot(torch.tensor([[0, 0, 0], [1, 1, 1], [2, 2, 2]]), 4).double()
    out_logits = 5 * F.one_hot(torch.tensor([[0, 1, 2], [1, 2, 3], [3, 0, 1]]), 4).double()
    scores_in, scores_out = uncertainty.ood_scores(in_logits), uncertainty.ood_scores(out_logits)
    for name in ('neg_max_prob', 'entropy', 'mutual_information'):
        assert uncertainty.ood_detection(scores_in[name], scores_out[name])['auroc'] == 1.0, name
    # each member alone is as confident on OOD as in distribution: the aleatoric part sees nothing (up to the order
    # of float64 sums, which differs with the position of the top class)
    expected = torch.cat([scores_in['expected_entropy'], scores_out['expected_entropy']])
    torch.testing.assert_close(expected, expected[:1].expand(6), rtol=0, atol=1e-15)


# --- selective classification

# 5 samples, 2 classes:    conf  top  target  correct
RC_PROBS = [[0.9, 0.1],   # 0.9   0    0       yes
            [0.2, 0.8],   # 0.8   1    0       no
            [0.3, 0.7],   # 0.7   1    1       yes
            [0.6, 0.4],   # 0.6   0    1       no
            [0.45, 0.55]]  # 0.55 1    1       yes
RC_TARGETS = [0, 0, 1, 1, 1]
# most confident first: yes no yes no yes -> risks 0, 1/2, 1/3, 2/4, 2/5
RC_RISK = [0.0, 1 / 2, 1 / 3, 2 / 4, 2 / 5]
# mean: (0 + 15 + 10 + 15 + 12) / 30 / 5 = 26/75
RC_AURC = 26 / 75


def test_risk_coverage_hand_worked():
    curve = uncertainty.risk_coverage(torch.tensor(RC_PROBS), torch.tensor(RC_TARGETS))
    assert curve['coverage'].dtype == torch.float64 and curve['risk'].dtype == torch.float64
    assert curve['coverage'].tolist() == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert curve['risk'].tolist() == RC_RISK  # k errors / n, one correctly rounded division each
    assert uncertainty.aurc(torch.tensor(RC_PROBS), torch.tensor(RC_TARGETS)) == pytest.approx(RC_AURC, abs=1e-15)
    # the order of the samples does not matter without ties
    perm = torch.tensor([3, 0, 4, 2, 1])
    curve = uncertainty.risk_coverage(torch.tensor(RC_PROBS)[perm], torch.tensor(RC_TARGETS)[perm])
    assert curve['risk'].tolist() == RC_RISK


def test_risk_coverage_with_given_confidence():
    # an oracle confidence, 1 for the correct samples 0, 2, 4 and 0 for the wrong 1, 3: yes yes yes no no ->
    # risks 0, 0, 0, 1/4, 2/5; AURC (1/4 + 2/5) / 5 = 0.13, the least for 2 errors in 5
    probs, targets = torch.tensor(RC_PROBS), torch.tensor(RC_TARGETS)
    oracle = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    assert uncertainty.risk_coverage(probs, targets, oracle)['risk'].tolist() == [0, 0, 0, 1 / 4, 2 / 5]
    assert uncertainty.aurc(probs, targets, oracle) == pytest.approx(0.13, abs=1e-15)


def test_risk_coverage_ties_keep_data_order():
    # all three top probabilities are 0.6: sample 0 wrong, samples 1 and 2 correct
    probs = torch.tensor([[0.6, 0.4], [0.4, 0.6], [0.6, 0.4]])
    targets = torch.tensor([1, 1, 0])
    # data order: no yes yes -> 1, 1/2, 1/3
    assert uncertainty.risk_coverage(probs, targets)['risk'].tolist() == [1, 1 / 2, 1 / 3]
    # reversed: yes yes no -> 0, 0, 1/3; the risk where the tied group ends is the same
    assert uncertainty.risk_coverage(probs.flip(0), targets.flip(0))['risk'].tolist() == [0, 0, 1 / 3]


# --- bad input


@pytest.mark.parametrize('fn, args, match', [
    (uncertainty.predictive_entropy, (torch.rand(2, 3, 4),), r'\[N, C\]'),
    (uncertainty.predictive_entropy, (torch.zeros(0, 3),), r'\[N, C\]'),
    (uncertainty.predictive_entropy, (torch.tensor([[2.0, -1.0]]),), 'probabilities'),
    (uncertainty.predictive_entropy, (torch.tensor([[1, 0]]),), 'floating-point'),
    (uncertainty.expected_entropy, (torch.randn(4, 3),), r'\[N, M, C\]'),
    (uncertainty.mutual_information, (torch.randn(0, 2, 3),), 'at least one sample'),
    (uncertainty.uncertainty_scores, (torch.ones(2, 2, 3, dtype=torch.long),), 'floating-point'),
    (uncertainty.ood_scores, (torch.randn(4, 3),), r'\[N, M, C\]'),
])
def test_scores_bad_input(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


@pytest.mark.parametrize('logits, targets, kwargs, match', [
    (torch.randn(4, 2, 3), torch.zeros(4, dtype=torch.long), {}, r'ensemble_probs\(logits\)\.log\(\)'),
    (torch.randn(4), torch.zeros(4, dtype=torch.long), {}, r'\[N, C\]'),
    (torch.randn(0, 3), torch.zeros(0, dtype=torch.long), {}, 'at least 1 sample and 2 classes'),
    (torch.randn(4, 1), torch.zeros(4, dtype=torch.long), {}, 'at least 1 sample and 2 classes'),
    (torch.tensor([[0.0, -math.inf], [1.0, 0.0]]), torch.tensor([0, 1]), {}, 'finite'),
    (torch.tensor([[0.0, math.nan], [1.0, 0.0]]), torch.tensor([0, 1]), {}, 'finite'),
    (torch.tensor([[1, 0], [0, 1]]), torch.tensor([0, 1]), {}, 'floating-point'),
    (torch.randn(4, 3), torch.zeros(3, dtype=torch.long), {}, r'\[N\] = \[4\]'),
    (torch.randn(4, 3), torch.full((4,), 3), {}, r'\[0, 2\]'),
    (torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), {'max_iter': 0}, 'max_iter'),
])
def test_fit_temperature_bad_input(logits, targets, kwargs, match):
    with pytest.raises(ValueError, match=match):
        uncertainty.fit_temperature(logits, targets, **kwargs)


@pytest.mark.parametrize('scores_in, scores_out, match', [
    (torch.zeros(0), torch.ones(3), 'scores_in must be a non-empty'),
    (torch.zeros(3), torch.ones(0), 'scores_out must be a non-empty'),
    (torch.zeros(3, 1), torch.ones(3), r'scores_in .*\[N\]'),
    (torch.zeros(3), torch.tensor([1, 2]), 'scores_out must be a floating-point'),
    (torch.tensor([0.0, math.nan]), torch.ones(3), 'NaN'),
])
def test_ood_detection_bad_input(scores_in, scores_out, match):
    with pytest.raises(ValueError, match=match):
        uncertainty.ood_detection(scores_in, scores_out)


@pytest.mark.parametrize('probs, targets, confidence, match', [
    (torch.tensor(RC_PROBS), torch.tensor(RC_TARGETS[:4]), None, r'targets must be \[N\] = \[5\]'),
    (torch.tensor(RC_PROBS), torch.tensor(RC_TARGETS), torch.rand(4), r'confidence must be \[N\] = \[5\]'),
    (torch.tensor(RC_PROBS), torch.tensor(RC_TARGETS), torch.rand(5, 1), r'confidence must be a non-empty \[N\]'),
    (torch.tensor(RC_PROBS), torch.tensor(RC_TARGETS), torch.ones(5, dtype=torch.long), 'floating-point'),
    (torch.tensor(RC_PROBS), torch.tensor(RC_TARGETS), torch.full((5,), math.nan), 'NaN'),
    (torch.tensor(RC_PROBS).log(), torch.tensor(RC_TARGETS), None, 'not logits'),
    (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), None, r'\[N, C\]'),
    (torch.tensor(RC_PROBS)[None], torch.tensor(RC_TARGETS), None, r'\[N, C\]'),
])
def test_risk_coverage_bad_input(probs, targets, confidence, match):
    for fn in (uncertainty.risk_coverage, uncertainty.aurc):
        with pytest.raises(ValueError, match=match):
            fn(probs, targets, confidence)


def test_calibrate_sets_the_temperature_fitted_on_the_models_own_prediction():
    import timm
    from torch.utils.data import DataLoader, TensorDataset

    from timm_ensembles.analysis.uncertainty import calibrate

    torch.manual_seed(0)
    model = timm.create_model('ens', base_model='test_resnet', num_members=2, num_classes=3).eval()
    x, y = torch.randn(24, 3, 32, 32), torch.arange(24) % 3
    model.set_temperature(3.0)  # calibrate fits on the uncalibrated prediction, whatever was set before
    with torch.no_grad():
        # batch by batch as calibrate's loader gives them: one forward of all 24 rows may round otherwise
        raw = torch.cat([model.combine(model.forward_members(x[i:i + 10])) for i in range(0, 24, 10)]).double()
    result = calibrate(model, DataLoader(TensorDataset(x, y), batch_size=10))
    expected = uncertainty.fit_temperature(raw, y)
    assert result['temperature'] == pytest.approx(expected, rel=1e-5) and model.temperature == result['temperature']
    assert result['nll_before'] == pytest.approx(F.cross_entropy(raw, y).item(), rel=1e-6)
    assert result['nll_after'] <= result['nll_before']
    with pytest.raises(ValueError, match='ensemble_of'):
        calibrate(timm.create_model('test_resnet', num_classes=3), DataLoader(TensorDataset(x, y), batch_size=10))
