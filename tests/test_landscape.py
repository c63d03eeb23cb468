"""Loss landscape views (timm_ensembles.analysis.landscape): parameter vectors in the snapshots' order, BatchNorm
recompute, evaluation, the linear path and its exact endpoints, trajectories, the barrier height and the plane through
three solutions."""
import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from timm_ensembles.analysis import landscape
from timm_ensembles.analysis.landscape import (
    barrier_height,
    check_same_architecture,
    evaluate,
    linear_path,
    load_parameter_vector,
    parameter_vector,
    plane,
    recompute_batchnorm,
    trajectory_path,
)
from timm_ensembles.train.snapshots import member_parameters, read_snapshots, write_snapshot

pytestmark = pytest.mark.usefixtures('one_torch_thread')
IMG = 8
NUM_CLASSES = 3


def _loader(x, y, batch_size=4):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _empty_loader(*shape):
    return _loader(torch.empty(0, *shape), torch.empty(0, dtype=torch.long))


def _mlp(hidden=8):
    # no BatchNorm: interpolated buffers are no concern
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))


def _mlp_data(n=10):
    return _loader(torch.randn(n, 4), torch.randint(0, NUM_CLASSES, (n,)))


def _image_data(n=4):
    return _loader(torch.randn(n, 3, IMG, IMG), torch.randint(0, NUM_CLASSES, (n,)))


def _resnet(bn_data=None):
    """A tiny timm ResNet; with bn_data, running statistics of its own (not the initial 0 / 1), as a trained one."""
    model = timm.create_model('test_resnet', num_classes=NUM_CLASSES)
    if bn_data is not None:
        recompute_batchnorm(model, bn_data)
    return model.eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, state):
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def _with_state(model, combine):
    """A copy of model whose every state_dict entry is combine(name, tensor of each source)."""
    out = copy.deepcopy(model)
    out.load_state_dict({k: combine(k) for k in out.state_dict()})
    return out


def _bn_evaluate(model, bn_loader, loader):
    """The network evaluated as a point of the landscape with recomputed statistics, on a copy."""
    model = recompute_batchnorm(copy.deepcopy(model), bn_loader)
    return evaluate(model, loader)


# parameter vectors


def test_parameter_vector_is_the_snapshots_order(tmp_path):
    model = _resnet()
    vector = parameter_vector(model)
    # the independent order: sorted parameter names (a BatchNorm's bias before its weight)
    names = sorted(n for n, _ in model.named_parameters())
    assert names != [n for n, _ in model.named_parameters()]  # the registration order differs
    params = dict(model.named_parameters())
    assert torch.equal(vector, torch.cat([params[n].detach().reshape(-1) for n in names]))
    assert vector.dtype == torch.float32 and vector.numel() == sum(p.numel() for p in model.parameters())
    # a weights snapshot written by training reads back as the same vector, bit for bit
    logits = torch.zeros(2, 1, NUM_CLASSES)
    write_snapshot(tmp_path, 0, logits, torch.zeros(2), torch.arange(2), dict(model='test_resnet', dataset='x'),
                   member_params=member_parameters(model))
    snaps = read_snapshots(tmp_path, epochs=[0], weights=True)
    assert torch.equal(snaps.weights[0, 0], vector)


def test_load_parameter_vector_round_trip_and_no_aliasing():
    src, dst = _resnet(), _resnet()
    buffers = {k: v.clone() for k, v in dst.named_buffers()}
    vector = parameter_vector(src)
    assert load_parameter_vector(dst, vector) is dst
    assert torch.equal(parameter_vector(dst), vector)
    for name, p in dst.named_parameters():
        assert torch.equal(p, dict(src.named_parameters())[name]), name
    for name, b in dst.named_buffers():  # buffers are not parameters: untouched
        assert torch.equal(b, buffers[name]), name
    vector += 1  # the parameters hold copies, not views of the vector
    assert torch.equal(parameter_vector(dst), parameter_vector(src))


def test_load_parameter_vector_bad_size():
    model = _mlp()
    size = sum(p.numel() for p in model.parameters())  # 4*8 + 8 + 8*3 + 3 = 67
    assert size == 67
    with pytest.raises(ValueError, match=r'one entry per parameter of the network \(67.*got shape \(66,\)'):
        load_parameter_vector(model, torch.zeros(66))
    with pytest.raises(ValueError, match=r'1-D.*got shape \(1, 67\)'):
        load_parameter_vector(model, torch.zeros(1, 67))


# architecture check


def test_check_same_architecture():
    check_same_architecture(_mlp(), _mlp())
    check_same_architecture(_resnet(), _resnet())
    with pytest.raises(ValueError, match=r"one architecture: parameter '0.bias' has shape \(8,\) in the first network"
                                         r' and \(6,\) in the second'):
        check_same_architecture(_mlp(8), _mlp(6))
    with pytest.raises(ValueError, match=r"one architecture: parameter '.*' is in the (first|second) network only"):
        check_same_architecture(_mlp(), _resnet())
    # same parameters, different buffers: BatchNorm with and without running statistics
    with pytest.raises(ValueError, match=r"buffer '0.num_batches_tracked' is in the first network only"):
        check_same_architecture(nn.Sequential(nn.BatchNorm1d(4)),
                                nn.Sequential(nn.BatchNorm1d(4, track_running_stats=False)))


# BatchNorm recompute and evaluation


def test_recompute_batchnorm_is_the_cumulative_average_over_batches():
    x = torch.randn(8, 3, IMG, IMG)
    loader = _loader(x, torch.zeros(8, dtype=torch.long))
    model = _resnet()
    bn = model.conv1[1]  # the first BatchNorm, on the first convolution's output
    assert isinstance(bn, nn.BatchNorm2d)
    bn.running_mean.fill_(5.0)  # stale statistics: they must not leak into the estimate
    bn.running_var.fill_(7.0)
    model.eval()
    assert recompute_batchnorm(model, loader) is model
    with torch.no_grad():
        batches = [model.conv1[0](x[:4]), model.conv1[0](x[4:])]
    # momentum None: the plain average of the two (equal-size) batches' means and unbiased variances
    mean = sum(h.mean((0, 2, 3)) for h in batches) / 2
    var = sum(h.var((0, 2, 3), unbiased=True) for h in batches) / 2
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert not model.training and bn.momentum == 0.1  # mode and momentum restored
    # the first batch only
    recompute_batchnorm(model, loader, num_batches=1)
    torch.testing.assert_close(bn.running_mean, batches[0].mean((0, 2, 3)), rtol=1e-5, atol=1e-6)


def test_recompute_batchnorm_without_batchnorm_and_bad_input():
    model = _mlp()
    state = _state(model)

    class Unreadable:
        def __iter__(self):
            raise AssertionError('a network without BatchNorm must not read the loader')

    recompute_batchnorm(model, Unreadable())
    _assert_same_state(model, state)

    resnet = _resnet(_image_data())
    state = _state(resnet)
    with pytest.raises(ValueError, match='BatchNorm loader gave no batch'):
        recompute_batchnorm(resnet, _empty_loader(3, IMG, IMG))
    _assert_same_state(resnet, state)  # checked before the statistics were reset
    with pytest.raises(ValueError, match='num_batches must be a positive integer'):
        recompute_batchnorm(resnet, _image_data(), num_batches=0)


def test_evaluate_against_one_full_batch():
    x, y = torch.randn(10, 4), torch.randint(0, NUM_CLASSES, (10,))
    model = _mlp().train()
    result = evaluate(model, _loader(x, y, batch_size=4))  # batches of 4, 4 and 2
    with torch.no_grad():
        # Batch by batch as evaluate sees them: one float32 forward of all 10 rows may round differently (CI saw 1e-9).
        logits = torch.cat([model(x[i:i + 4]) for i in range(0, 10, 4)]).double()
    assert result['loss'] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-12)
    assert result['accuracy'] == pytest.approx(logits.argmax(1).eq(y).sum().item() * 100 / 10, abs=1e-12)
    assert model.training  # restored
    first = evaluate(model, _loader(x, y, batch_size=4), num_batches=1)
    assert first['loss'] == pytest.approx(F.cross_entropy(logits[:4], y[:4]).item(), rel=1e-12)


def test_evaluate_uses_eval_mode_and_keeps_statistics():
    data = _image_data()
    model = _resnet(data).train()
    state = _state(model)
    x, y = data.dataset.tensors
    with torch.no_grad():
        logits = model.eval()(x).double()
    model.train()
    result = evaluate(model, data)
    assert result['loss'] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert model.training
    _assert_same_state(model, state)  # eval mode: the running statistics were not updated


def test_evaluate_bad_input():
    with pytest.raises(ValueError, match='evaluation loader gave no batch'):
        evaluate(_mlp(), _empty_loader(4))
    with pytest.raises(ValueError, match='evaluation loader gave no batch'):
        evaluate(_mlp(), [])
    with pytest.raises(ValueError, match='num_batches must be a positive integer'):
        evaluate(_mlp(), _mlp_data(), num_batches=True)


# linear path


def test_linear_path_without_batchnorm():
    a, b = _mlp(), _mlp()
    state_a, state_b = _state(a), _state(b)
    loaders = dict(train=_mlp_data(), val=_mlp_data())
    ts = [0.0, 0.25, 1.0, -0.5]
    path = linear_path(a, b, ts, loaders)
    assert path['t'] == ts and set(path) == {'t', 'train', 'val'}
    for split, loader in loaders.items():
        own_a, own_b = evaluate(a, loader), evaluate(b, loader)
        # the endpoints are the networks themselves: bit for bit
        assert path[split]['loss'][0] == own_a['loss'] and path[split]['accuracy'][0] == own_a['accuracy']
        assert path[split]['loss'][2] == own_b['loss'] and path[split]['accuracy'][2] == own_b['accuracy']
        # t = 0.25 and the extrapolated t = -0.5: networks built by hand from the state dicts
        for i, t in ((1, 0.25), (3, -0.5)):
            point = _with_state(a, lambda k, t=t: ((1 - t) * state_a[k].double() + t * state_b[k].double()).float())
            assert path[split]['loss'][i] == pytest.approx(evaluate(point, loader)['loss'], rel=1e-6)
    _assert_same_state(a, state_a)  # the networks passed in are untouched
    _assert_same_state(b, state_b)


def test_linear_path_endpoints_exact_with_batchnorm_recompute():
    data, bn_data = _image_data(), _image_data()
    a, b = _resnet(data), _resnet(data)
    state_a = _state(a)
    path = linear_path(a, b, torch.linspace(0, 1, 3), dict(val=data), bn_loader=bn_data)
    assert path['t'] == [0.0, 0.5, 1.0]
    # the same way as the path evaluates a point: statistics recomputed on bn_data, then evaluated
    assert path['val']['loss'][0] == _bn_evaluate(a, bn_data, data)['loss']
    assert path['val']['loss'][2] == _bn_evaluate(b, bn_data, data)['loss']
    # the midpoint: the mean of the parameters, statistics recomputed (its stale buffers do not matter)
    sa, sb = _state(a), _state(b)
    mid = _with_state(a, lambda k: (sa[k] + sb[k]) / 2 if sa[k].is_floating_point() else sa[k])
    assert path['val']['loss'][1] == pytest.approx(_bn_evaluate(mid, bn_data, data)['loss'], rel=1e-5)
    _assert_same_state(a, state_a)  # a's own statistics were not recomputed


def test_linear_path_interpolates_buffers_without_bn_loader():
    data = _image_data()
    a, b = _resnet(data), _resnet(_image_data())
    path = linear_path(a, b, [0.0, 0.5, 1.0], dict(val=data))
    # without a recompute, the endpoints keep their own statistics
    assert path['val']['loss'][0] == evaluate(a, data)['loss']
    assert path['val']['loss'][2] == evaluate(b, data)['loss']
    sa, sb = _state(a), _state(b)
    # running means and variances averaged too; num_batches_tracked is a's (the nearer endpoint; a at a tie)
    mid = _with_state(a, lambda k: (sa[k] + sb[k]) / 2 if sa[k].is_floating_point() else sa[k])
    assert path['val']['loss'][1] == pytest.approx(evaluate(mid, data)['loss'], rel=1e-5)


def test_linear_path_bad_input():
    a, b, loaders = _mlp(), _mlp(), dict(val=_mlp_data())
    with pytest.raises(ValueError, match='one architecture'):
        linear_path(a, _mlp(6), [0.0, 1.0], loaders)
    with pytest.raises(ValueError, match='ts is empty'):
        linear_path(a, b, [], loaders)
    with pytest.raises(ValueError, match='ts is empty'):
        linear_path(a, b, torch.empty(0), loaders)
    with pytest.raises(ValueError, match=r'ts must be finite numbers, got \[nan\]'):
        linear_path(a, b, [0.0, math.nan], loaders)
    with pytest.raises(ValueError, match='non-empty dict of split name -> loader'):
        linear_path(a, b, [0.0], {})
    with pytest.raises(ValueError, match='non-empty dict of split name -> loader'):
        linear_path(a, b, [0.0], _mlp_data())
    with pytest.raises(ValueError, match=r"split names \['t'\] are keys of the result"):
        linear_path(a, b, [0.0], dict(t=_mlp_data()))
    with pytest.raises(ValueError, match='evaluation loader gave no batch'):
        linear_path(a, b, [0.0], dict(val=_empty_loader(4)))
    resnet = _resnet()
    with pytest.raises(ValueError, match='BatchNorm loader gave no batch'):
        linear_path(resnet, _resnet(), [0.5], dict(val=_image_data()), bn_loader=_empty_loader(3, IMG, IMG))
    with pytest.raises(ValueError, match='num_batches must be a positive integer'):
        linear_path(resnet, _resnet(), [0.5], dict(val=_image_data()), bn_loader=_image_data(), bn_batches=0)


# trajectory


def test_trajectory_path_points_are_the_vectors():
    a, b, other = _mlp(), _mlp(), _mlp()
    state = _state(other)
    data = _mlp_data()
    vectors = torch.stack([parameter_vector(a), parameter_vector(b)])  # as Snapshots.weights[:, m]
    for given in (vectors, list(vectors)):
        path = trajectory_path(other, given, dict(val=data))
        assert path['point'] == [0, 1]
        assert path['val']['loss'] == [evaluate(a, data)['loss'], evaluate(b, data)['loss']]
    _assert_same_state(other, state)


def test_trajectory_path_with_batchnorm():
    data, bn_data = _image_data(), _image_data()
    a, model = _resnet(data), _resnet(_image_data())
    path = trajectory_path(model, [parameter_vector(a)], dict(val=data), bn_loader=bn_data)
    # the model's stale statistics are replaced by ones recomputed at the point: as a's recomputed
    assert path['val']['loss'] == [_bn_evaluate(a, bn_data, data)['loss']]
    with pytest.warns(UserWarning, match='has BatchNorm and no bn_loader'):
        trajectory_path(model, [parameter_vector(a)], dict(val=data))


def test_trajectory_path_bad_input():
    model, loaders = _mlp(), dict(val=_mlp_data())
    with pytest.raises(ValueError, match='vectors is empty'):
        trajectory_path(model, [], loaders)
    with pytest.raises(ValueError, match=r'vectors must be \[E, P\].*shape \(67,\)'):
        trajectory_path(model, parameter_vector(model), loaders)
    with pytest.raises(ValueError, match=r'one entry per parameter of the network \(67'):
        trajectory_path(model, [torch.zeros(5)], loaders)


# barrier height


def test_barrier_height_hand_worked():
    # given in shuffled order, with an extrapolated point that must not count
    ts = [0.5, 0.0, 1.5, 0.25, 1.0, 0.75]
    losses = [2.1, 1.0, 99.0, 2.0, 3.0, 2.6]
    # linear reference (1 - t) * 1 + t * 3 = 1 + 2t: at t = 0.25, 0.5, 0.75: 1.5, 2.0, 2.5; rises 0.5, 0.1, 0.1
    height, t = barrier_height(ts, losses)
    assert height == pytest.approx(0.5) and t == 0.25
    # Frankle's mean reference (1 + 3) / 2 = 2: rises -1 (t=0), 0, 0.1, 0.6, 1.0 (t=1): the endpoint b
    height, t = barrier_height(ts, losses, reference='mean')
    assert height == pytest.approx(1.0) and t == 1.0
    # a convex path (no barrier): the endpoints' 0 is the maximum
    assert barrier_height(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.0, 0.5, 1.0])) == (0.0, 0.0)


def test_barrier_height_bad_input():
    with pytest.raises(ValueError, match='ts is empty'):
        barrier_height([], [])
    with pytest.raises(ValueError, match=r'differ in length \(2 and 3\)'):
        barrier_height([0.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match='ts must include 0 and 1'):
        barrier_height([0.0, 0.5], [1.0, 2.0])
    with pytest.raises(ValueError, match="reference must be 'linear' or 'mean'"):
        barrier_height([0.0, 1.0], [1.0, 2.0], reference='max')
    height, t = barrier_height([0.0, 0.5, 1.0], [1.0, math.nan, 1.0])
    assert math.isnan(height) and t == 0.5


# plane


def _linear_net(weight):
    net = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(weight))
    return net


def test_plane_hand_worked():
    # parameter vectors (w00, w01, w10, w11): b - a = (3, 4, 0, 0), c - a = (1, 2, 2, 0), exact in float32
    a = _linear_net([[0.5, -1.0], [1.0, 0.25]])
    b = _linear_net([[3.5, 3.0], [1.0, 0.25]])
    c = _linear_net([[1.5, 1.0], [3.0, 0.25]])
    state_a = _state(a)
    data = _loader(torch.randn(10, 2), torch.randint(0, 2, (10,)))
    result = plane(a, b, c, dict(val=data), grid=3, margin=0.25)
    # u = (0.6, 0.8, 0, 0); (c - a).u = 0.6 + 1.6 = 2.2; c - a - 2.2 u = (-0.32, 0.24, 2, 0), norm sqrt(4.16)
    xc, yc = 2.2, math.sqrt(4.16)
    assert result['points']['a'] == (0.0, 0.0) and result['points']['b'] == (5.0, 0.0)
    assert result['points']['c'] == pytest.approx((xc, yc), rel=1e-12)
    yc = result['points']['c'][1]
    # extent max(5 - 0, yc) = 5, margin 1.25: x: -1.25, 2.5, 6.25 and the solutions' 0, 2.2, 5
    x, y = result['x'].tolist(), result['y'].tolist()
    assert x == pytest.approx([-1.25, 0.0, xc, 2.5, 5.0, 6.25], rel=1e-12)
    assert y == pytest.approx([-1.25, 0.0, yc / 2, yc, yc + 1.25], rel=1e-12)
    assert result['val']['loss'].shape == (5, 6) and result['val']['accuracy'].shape == (5, 6)
    # the solutions' grid points are the solutions, bit for bit
    for net, (px, py) in zip((a, b, c), (result['points'][k] for k in 'abc')):
        own = evaluate(net, data)
        i, j = y.index(py), x.index(px)
        assert result['val']['loss'][i, j].item() == own['loss']
        assert result['val']['accuracy'][i, j].item() == own['accuracy']
    # another grid point: a + 2.5 u - 1.25 v, built by hand
    u = torch.tensor([0.6, 0.8, 0.0, 0.0], dtype=torch.float64)
    v = torch.tensor([-0.32, 0.24, 2.0, 0.0], dtype=torch.float64) / math.sqrt(4.16)
    w = (torch.tensor([0.5, -1.0, 1.0, 0.25], dtype=torch.float64) + 2.5 * u - 1.25 * v).float().reshape(2, 2)
    expected = evaluate(_linear_net(w.tolist()), data)['loss']
    assert result['val']['loss'][0, x.index(2.5)].item() == pytest.approx(expected, rel=1e-5)
    _assert_same_state(a, state_a)


def test_plane_with_batchnorm_recompute():
    data, bn_data = _image_data(), _image_data()
    a, b, c = _resnet(data), _resnet(data), _resnet(data)
    result = plane(a, b, c, dict(val=data), grid=2, margin=0.0, bn_loader=bn_data)
    ab = torch.linalg.vector_norm(parameter_vector(b).double() - parameter_vector(a).double()).item()
    assert result['points']['b'][0] == pytest.approx(ab, rel=1e-12)
    x, y = result['x'].tolist(), result['y'].tolist()
    for net, (px, py) in zip((a, b, c), (result['points'][k] for k in 'abc')):
        assert result['val']['loss'][y.index(py), x.index(px)].item() == _bn_evaluate(net, bn_data, data)['loss']


def test_plane_bad_input():
    a = _linear_net([[0.5, -1.0], [1.0, 0.25]])
    b = _linear_net([[3.5, 3.0], [1.0, 0.25]])
    c = _linear_net([[1.5, 1.0], [3.0, 0.25]])
    loaders = dict(val=_loader(torch.randn(4, 2), torch.randint(0, 2, (4,))))
    on_line = _linear_net([[6.5, 7.0], [1.0, 0.25]])  # a + 2 (b - a)
    with pytest.raises(ValueError, match='collinear'):
        plane(a, b, on_line, loaders)
    with pytest.raises(ValueError, match='collinear'):
        plane(a, b, copy.deepcopy(a), loaders)
    with pytest.raises(ValueError, match='a and b have the same parameters'):
        plane(a, copy.deepcopy(a), c, loaders)
    with pytest.raises(ValueError, match='one architecture'):
        plane(a, b, nn.Sequential(nn.Linear(2, 3, bias=False)), loaders)
    for grid in (1, True, 2.5, (3,)):
        with pytest.raises(ValueError, match='grid must be an integer >= 2'):
            plane(a, b, c, loaders, grid=grid)
    for margin in (-0.1, math.inf):
        with pytest.raises(ValueError, match='margin must be a finite number >= 0'):
            plane(a, b, c, loaders, margin=margin)
    with pytest.raises(ValueError, match="split names \\['x'\\]"):
        plane(a, b, c, dict(x=loaders['val']))


def test_public_api():
    assert set(landscape.__all__) == {
        'check_same_architecture', 'parameter_vector', 'load_parameter_vector', 'recompute_batchnorm', 'evaluate',
        'linear_path', 'trajectory_path', 'barrier_height', 'plane'}
