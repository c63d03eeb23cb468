"""Subspace samplers (random, dropout, diagonal and low-rank Gaussian), the predictions of sampled networks and the
diversity-accuracy plane, on tiny models and hand-made trajectories."""
import math

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from timm_ensembles.analysis.samplers import (
    diagonal_gaussian_samples,
    dropout_predictions,
    low_rank_gaussian_samples,
    normalized_disagreement,
    predict_samples,
    random_samples,
)
from timm_ensembles.train.snapshots import member_parameters, read_snapshots, write_snapshot

# a mean or variance estimated from K draws is off by more than this many standard errors with probability < 1e-6
SIGMAS = 5.0


def _flat(model):
    """Every parameter flattened in sorted-name order, written out here rather than taken from landscape.py."""
    return torch.cat([p.detach().reshape(-1) for _, p in sorted(model.named_parameters(), key=lambda i: i[0])])


def _batches(x, y, batch_size):
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def _tiny_resnet(**kwargs):
    return timm.create_model('test_resnet', num_classes=3, **kwargs)


# -- random subspace --

def test_random_samples_are_filter_normalised_and_seeded():
    model = _tiny_resnet()
    theta0 = _flat(model)
    state = torch.get_rng_state()
    samples = random_samples(model, num_samples=3, scale=0.1, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # a generator of its own
    assert samples.shape == (3, theta0.numel()) and samples.dtype == theta0.dtype
    assert torch.equal(samples, random_samples(model, 3, 0.1, seed=7))
    assert not torch.equal(samples, random_samples(model, 3, 0.1, seed=8))
    for i in range(3):
        assert not torch.equal(samples[i], theta0)
        for j in range(i):
            assert not torch.equal(samples[i], samples[j])
    # every filter (slice along dim 0 of a tensor of >= 2 dims, else the whole tensor) moved by 0.1 x its norm
    noise, offset, zero_tensors = samples.double() - theta0.double(), 0, 0
    for _, p in sorted(model.named_parameters(), key=lambda i: i[0]):
        rows = p.shape[0] if p.ndim >= 2 else 1
        w = theta0[offset:offset + p.numel()].double().reshape(rows, -1)
        d = noise[:, offset:offset + p.numel()].reshape(3, rows, -1)
        torch.testing.assert_close(d.norm(dim=2), 0.1 * w.norm(dim=1).expand(3, rows), rtol=1e-4, atol=1e-6)
        if not w.any():  # timm zero-initialises the last BatchNorm weight of a block: no norm to be relative to
            zero_tensors += 1
            assert not d.any()
        offset += p.numel()
    assert offset == theta0.numel() and zero_tensors > 0
    # the whole vector moved by 0.1 x its norm too (the filters are disjoint)
    torch.testing.assert_close(noise.norm(dim=1), 0.1 * theta0.double().norm().expand(3), rtol=1e-4, atol=0)


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_samples=0), 'num_samples must be a positive integer'),
    (dict(num_samples=True), 'num_samples must be a positive integer'),
    (dict(scale=0.0), 'scale must be a positive finite number'),
    (dict(scale=-0.1), 'scale must be a positive finite number'),
    (dict(scale=math.nan), 'scale must be a positive finite number'),
    (dict(seed=1.5), 'seed must be an integer'),
])
def test_random_samples_bad_input(kwargs, match):
    args = dict(num_samples=2, scale=0.1, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        random_samples(nn.Linear(2, 2), **args)


# -- diagonal Gaussian subspace --

# 4 snapshots of 3 coordinates: means 2, 0, 5; variances (divisor E = 4) (1 + 1 + 0 + 0) / 4 = 0.5,
# (0 + 0 + 9 + 9) / 4 = 4.5 and 0 (the last coordinate never moved)
TRAJECTORY = torch.tensor([[1.0, 0.0, 5.0], [3.0, 0.0, 5.0], [2.0, 3.0, 5.0], [2.0, -3.0, 5.0]])
TRAJ_MEAN, TRAJ_VAR = torch.tensor([2.0, 0.0, 5.0]), torch.tensor([0.5, 4.5, 0.0])


def test_diagonal_gaussian_matches_the_trajectory_moments():
    num = 20000
    samples = diagonal_gaussian_samples(TRAJECTORY.double(), num, seed=0)
    assert samples.shape == (num, 3) and samples.dtype == torch.float64
    assert torch.equal(samples[:, 2], torch.full((num,), 5.0))  # zero variance: exactly the mean
    mean, var = samples.mean(0)[:2], samples.var(0)[:2]
    # standard errors of the mean, sqrt(var / K), and of the (unbiased) sample variance of a Gaussian,
    # var * sqrt(2 / (K - 1))
    assert ((mean - TRAJ_MEAN[:2]).abs() <= SIGMAS * (TRAJ_VAR[:2] / num).sqrt()).all(), mean
    assert ((var - TRAJ_VAR[:2]).abs() <= SIGMAS * TRAJ_VAR[:2] * math.sqrt(2 / (num - 1))).all(), var
    # scale multiplies the standard deviation: the same draws, twice as far from the mean
    doubled = diagonal_gaussian_samples(TRAJECTORY.double(), num, seed=0, scale=2.0)
    torch.testing.assert_close(doubled - TRAJ_MEAN.double(), 2 * (samples - TRAJ_MEAN.double()))


def test_diagonal_gaussian_is_seeded_and_keeps_dtype():
    state = torch.get_rng_state()
    samples = diagonal_gaussian_samples(TRAJECTORY, 4, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert samples.shape == (4, 3) and samples.dtype == torch.float32
    assert torch.equal(samples, diagonal_gaussian_samples(TRAJECTORY, 4, seed=3))
    assert not torch.equal(samples, diagonal_gaussian_samples(TRAJECTORY, 4, seed=4))
    assert len({tuple(s.tolist()) for s in samples}) == 4 and not (samples == TRAJ_MEAN).all(1).any()


@pytest.mark.parametrize('trajectory, match', [
    (TRAJECTORY[:1], r'at least 2 snapshots \(E >= 2\)'),
    (TRAJECTORY[None].expand(2, 4, 3), r'weights\[:, m\]'),
    (TRAJECTORY.long(), 'floating-point'),
    (torch.tensor([[1.0, math.nan], [2.0, 3.0]]), 'NaN or infinite'),
])
def test_gaussian_samplers_bad_trajectory(trajectory, match):
    with pytest.raises(ValueError, match=match):
        diagonal_gaussian_samples(trajectory, 2, seed=0)
    with pytest.raises(ValueError, match=match):
        low_rank_gaussian_samples(trajectory, 1, 2, seed=0)


# -- low-rank Gaussian subspace --

def _planar_trajectory():
    """4 snapshots mean + a_e u1 + b_e u2, u1 and u2 orthonormal, a and b of zero mean and orthogonal: the principal
    components are u1 and u2, with variances sum(a^2) / (E - 1) = 16 / 3 and sum(b^2) / (E - 1) = 4 / 3."""
    mean = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    u1 = torch.tensor([0.6, 0.8, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    u2 = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    a = torch.tensor([2.0, -2.0, 2.0, -2.0], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    return mean + a[:, None] * u1 + b[:, None] * u2, mean, u1, u2


def test_low_rank_samples_lie_on_the_top_components():
    trajectory, mean, u1, u2 = _planar_trajectory()
    num = 20000
    samples = low_rank_gaussian_samples(trajectory, rank=1, num_samples=num, seed=0)
    assert samples.shape == (num, 6) and samples.dtype == torch.float64
    t = (samples - mean) @ u1
    torch.testing.assert_close(samples, mean + t[:, None] * u1, rtol=0, atol=1e-12)  # on the line, exactly
    assert abs(t.mean()) <= SIGMAS * math.sqrt(16 / 3 / num)
    assert abs(t.var() - 16 / 3) <= SIGMAS * 16 / 3 * math.sqrt(2 / (num - 1))

    samples = low_rank_gaussian_samples(trajectory, rank=2, num_samples=num, seed=0)
    t1, t2 = (samples - mean) @ u1, (samples - mean) @ u2
    torch.testing.assert_close(samples, mean + t1[:, None] * u1 + t2[:, None] * u2, rtol=0, atol=1e-12)
    assert abs(t2.var() - 4 / 3) <= SIGMAS * 4 / 3 * math.sqrt(2 / (num - 1))
    # independent along the two components: the correlation of K independent draws has standard error 1 / sqrt(K)
    assert abs(torch.corrcoef(torch.stack([t1, t2]))[0, 1]) <= SIGMAS / math.sqrt(num)


def test_low_rank_full_rank_spans_the_deviations():
    torch.manual_seed(1)
    trajectory = torch.randn(5, 40, dtype=torch.float64)
    deviations = trajectory - trajectory.mean(0)
    samples = low_rank_gaussian_samples(trajectory, rank=4, num_samples=6, seed=2)
    # least squares of every sample's offset on the 5 deviations (which span 4 dimensions) leaves no residual
    offsets = samples - trajectory.mean(0)
    coefficients = torch.linalg.lstsq(deviations.T, offsets.T).solution
    torch.testing.assert_close(deviations.T @ coefficients, offsets.T, rtol=0, atol=1e-10)
    assert offsets.norm(dim=1).min() > 0
    assert torch.equal(samples, low_rank_gaussian_samples(trajectory, 4, 6, seed=2))
    assert not torch.equal(samples, low_rank_gaussian_samples(trajectory, 4, 6, seed=3))


@pytest.mark.parametrize('rank, match', [(4, r'at most E - 1 = 3'), (0, 'rank must be a positive integer')])
def test_low_rank_bad_rank(rank, match):
    with pytest.raises(ValueError, match=match):
        low_rank_gaussian_samples(_planar_trajectory()[0], rank, 2, seed=0)


# -- dropout subspace --

def test_dropout_refuses_a_model_without_dropout():
    for model in (_tiny_resnet(), nn.Sequential(nn.Linear(3, 2), nn.Dropout(p=0.0))):
        with pytest.raises(ValueError, match=r'has no dropout .*timm\.create_model\(\.\.\., drop_rate=0\.1\)'):
            dropout_predictions(model, [(torch.randn(2, 3), torch.zeros(2))], 2, seed=0)


def test_dropout_predictions_differ_and_are_seeded():
    model = _tiny_resnet(drop_rate=0.5)
    model.train()
    model.layer1.eval()  # a mixed mode, to be restored as it was
    modes = {name: m.training for name, m in model.named_modules()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, module.training)
        return hook
    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules()
             if isinstance(m, nn.BatchNorm2d) or name == '']
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    loader = _batches(x, y, 3)
    state = torch.get_rng_state()
    logits, targets = dropout_predictions(model, loader, num_samples=3, seed=0)
    for h in hooks:
        h.remove()
    assert torch.equal(torch.get_rng_state(), state)
    assert logits.shape == (6, 3, 3) and logits.dtype == torch.float32 and torch.equal(targets, y)
    for i in range(3):
        for j in range(i):
            assert not torch.equal(logits[:, i], logits[:, j])
    # the model itself in train mode (timm's functional head dropout reads it), every BatchNorm in eval mode
    assert seen.pop('') is True and seen and not any(seen.values())
    assert {name: m.training for name, m in model.named_modules()} == modes
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name  # train-mode BatchNorm would have updated its statistics
    assert torch.equal(logits, dropout_predictions(model, loader, 3, seed=0)[0])
    assert not torch.equal(logits, dropout_predictions(model, loader, 3, seed=1)[0])


def test_dropout_normalises_with_the_running_statistics():
    bn = nn.BatchNorm1d(4)
    bn.running_mean.fill_(10.0)  # running_var 1, weight 1, bias 0
    model = nn.Sequential(bn, nn.Dropout(p=0.5)).eval()
    x = torch.randn(8, 4)
    logits, _ = dropout_predictions(model, [(x, torch.zeros(8, dtype=torch.long))], num_samples=5, seed=0)
    # eval-mode BatchNorm: (x - 10) / sqrt(1 + eps); dropout keeps it scaled by 1 / (1 - p) = 2, or zeroes it
    kept = 2 * (x[:, None].expand(8, 5, 4) - 10) / math.sqrt(1 + bn.eps)
    dropped = logits == 0
    assert dropped.any() and not dropped.all()
    torch.testing.assert_close(logits[~dropped], kept[~dropped])
    assert not model.training and not bn.training


# -- predictions of sampled networks --

def test_predict_samples_loads_every_vector():
    model = nn.Linear(3, 8)
    before = _flat(model).clone()
    vectors = torch.randn(3, before.numel())
    x, y = torch.randn(5, 3), torch.arange(5)
    logits, targets = predict_samples(model, vectors, _batches(x, y, 2))
    assert logits.shape == (5, 3, 8) and torch.equal(targets, y)
    for k, v in enumerate(vectors):
        bias, weight = v[:8], v[8:].reshape(8, 3)  # sorted names: 'bias' before 'weight'
        torch.testing.assert_close(logits[:, k], x @ weight.T + bias)
    assert torch.equal(_flat(model), before)  # a copy was sampled, not the model
    with pytest.raises(ValueError, match='The vectors hold 31 parameters, the model 32'):
        predict_samples(model, vectors[:, 1:], _batches(x, y, 2))


def test_predict_samples_recomputes_batchnorm():
    model = nn.Sequential(nn.BatchNorm1d(2))
    x, y = torch.randn(4, 2), torch.zeros(4, dtype=torch.long)
    xb = torch.randn(8, 2) * 3 + 1
    vectors = torch.tensor([[0.5, -1.0, 2.0, 3.0]])  # sorted names: '0.bias' (2 values), then '0.weight'
    logits, _ = predict_samples(model, vectors, [(x, y)], bn_loader=[(xb, torch.zeros(8))])
    # the statistics of the one BatchNorm batch (update_bn's cumulative average): its mean and unbiased variance
    expected = (x - xb.mean(0)) / (xb.var(0) + model[0].eps).sqrt() * torch.tensor([2.0, 3.0]) + torch.tensor(
        [0.5, -1.0])
    torch.testing.assert_close(logits[:, 0], expected)
    assert torch.equal(model[0].running_mean, torch.zeros(2))
    with pytest.warns(UserWarning, match='pass bn_loader'):
        logits, _ = predict_samples(model, vectors, [(x, y)])
    # the stored statistics (mean 0, variance 1) kept
    torch.testing.assert_close(logits[:, 0], x / math.sqrt(1 + model[0].eps) * torch.tensor([2.0, 3.0]) +
                               torch.tensor([0.5, -1.0]))


def test_predict_samples_refuses_a_shuffling_loader():
    model = nn.Linear(3, 8)
    data = TensorDataset(torch.randn(8, 3), torch.arange(8))
    loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match='shuffle=False'):
        predict_samples(model, torch.randn(2, 32), loader)


def test_snapshot_trajectory_round_trip(tmp_path):
    """Snapshot weights, samples of them and the networks they load into share one layout."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3))
    x, y = torch.randn(6, 4), torch.arange(6) % 3
    expected = []
    for epoch in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
            expected.append(model(x))
        write_snapshot(tmp_path, epoch, expected[-1][:, None], y, torch.arange(6), dict(model='m', dataset='d'),
                       member_params=member_parameters(model))
    trajectory = read_snapshots(tmp_path, epochs=[0, 1, 2], weights=True).weights[:, 0]
    logits, _ = predict_samples(model, trajectory, [(x, y)])
    torch.testing.assert_close(logits, torch.stack(expected, 1))
    samples = low_rank_gaussian_samples(trajectory, rank=2, num_samples=4, seed=0)
    assert predict_samples(model, samples, [(x, y)])[0].shape == (6, 4, 3)


# -- diversity-accuracy plane --

def test_normalized_disagreement_hand_worked():
    targets = torch.tensor([0, 1, 2, 0])
    eye = torch.eye(3)
    reference = eye[[0, 1, 2, 1]]  # 75% accurate
    samples = torch.stack([
        eye[[0, 1, 1, 1]],  # right on points 0 and 1: 50%; differs from the reference on point 2: 1 / 4
        eye[[0, 2, 2, 0]],  # right on points 0, 2, 3: 75%; differs on points 1 and 3: 2 / 4
        eye[[0, 1, 2, 1]],  # the reference itself
    ], 1)
    out = normalized_disagreement(samples, reference, targets)
    assert out['accuracy'].tolist() == [50.0, 75.0, 75.0]
    assert out['disagreement'].tolist() == [0.25, 0.5, 0.0]
    # d / (1 - a): 0.25 / 0.5 and 0.5 / 0.25
    assert out['normalized_disagreement'].tolist() == [0.5, 2.0, 0.0]
    assert out['normalized_disagreement'].dtype == torch.float64
    for key, value in normalized_disagreement(samples, reference[:, None], targets).items():
        assert torch.equal(value, out[key])
    # never wrong: undefined, NaN where it also agrees with the reference, inf where not
    perfect = eye[targets]
    out = normalized_disagreement(torch.stack([perfect, perfect], 1), perfect, targets)
    assert out['normalized_disagreement'].isnan().all()
    assert normalized_disagreement(perfect[:, None], reference, targets)['normalized_disagreement'].isinf().all()


@pytest.mark.parametrize('reference, targets, match', [
    (torch.zeros(4, 2, 3), torch.zeros(4, dtype=torch.long), r'reference_logits must be \[N, C\] = \[4, 3\]'),
    (torch.zeros(3, 3), torch.zeros(4, dtype=torch.long), r'reference_logits must be \[N, C\] = \[4, 3\]'),
    (torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), r'targets must be \[N\] = \[4\]'),
    (torch.zeros(4, 3), torch.full((4,), 3), r'targets must lie in \[0, 2\]'),
])
def test_normalized_disagreement_bad_input(reference, targets, match):
    with pytest.raises(ValueError, match=match):
        normalized_disagreement(torch.zeros(4, 2, 3), reference, targets)
