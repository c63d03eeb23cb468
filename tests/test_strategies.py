"""Member strategies (loop, vmap, grouped, auto) against the loop: outputs, gradients, BatchNorm statistics, features,
dropout, state_dict and reloads, refusals.

Tolerances. The loop is the reference. ``vmap`` and ``grouped`` compute the same functions, but through grouped
convolution kernels (vmap's batching rule for a convolution with batched weights is a grouped convolution too), which
sum their products in another order than separate convolutions, so fp32 results agree to rounding, not bitwise:
outputs and features to ``rtol=1e-4`` and ``atol=1e-5`` times the tensor's largest magnitude (measured: 0 to 5e-6
relative; the depthwise convolutions of test_efficientnet are the worst), gradients to 1e-4 of the largest gradient
(measured: up to 4e-5; BatchNorm's backward divides by the batch's standard deviation, which magnifies the rounding
of a batch of 4), BatchNorm statistics to ``1e-5``. Exact equality where nothing is recomputed: integer buffers
(``num_batches_tracked``), the state_dict before and after switching strategies, reloads of a saved model. Dropout
draws other random streams under vmap and grouped than under the loop (and vmap's differ from grouped's), so dropout
is tested by its effect: members with identical weights give different outputs in train mode, the same in eval mode.
"""
import copy
import itertools
import os

import pytest
import timm
import torch
from conftest import IMG, TINY_BASES, model_kwargs
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

import timm_ensembles
from timm_ensembles.files.model_folder import export_folder
from timm_ensembles.losses import feature_difference, feature_difference_loss
from timm_ensembles.models.strategies import MEMBER_STRATEGIES, StrategyError

NUM_CLASSES = 5
# bases the grouped fusion accepts; the others (LayerNorm, attention, layer scale) are refused
GROUPED_BASES = ('test_resnet', 'test_efficientnet')


def _assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Outputs and features: rounding of reordered sums, relative to the tensor's scale."""
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * max(1.0, ref.abs().max().item()))


def _x(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _target(batch: int = 4) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (batch,), generator=torch.Generator().manual_seed(2))


def _ensemble(base: str, n: int, method: str = 'ens', **kwargs) -> timm_ensembles.EnsembleModel:
    return timm.create_model(method, base_model=base, num_members=n, num_classes=NUM_CLASSES,
                             **model_kwargs(base, **kwargs))


def _strategies(base: str) -> list[str]:
    return ['vmap', 'grouped'] if base in GROUPED_BASES else ['vmap']


def _assert_grads_close(model, ref) -> None:
    grads = [(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters())]
    scale = max(q.abs().max().item() for _, q in grads if q is not None)
    for g, q in grads:
        assert (g is None) == (q is None)
        if q is not None:
            torch.testing.assert_close(g, q, rtol=1e-3, atol=1e-4 * scale)


def _assert_buffers_equal(model, ref) -> None:
    for (name, b), (_, r) in zip(model.named_buffers(), ref.named_buffers()):
        if b.is_floating_point():
            torch.testing.assert_close(b, r, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(b, r), name


@pytest.mark.parametrize('n', (2, 3))
@pytest.mark.parametrize('base', TINY_BASES)
def test_strategies_equal_the_loop(base, n):
    ref = _ensemble(base, n).train()
    x, y = _x(), _target()
    for name in _strategies(base):
        loop = copy.deepcopy(ref)
        model = copy.deepcopy(ref)
        model.set_member_strategy(name, example_input=x)
        assert model.member_strategy == name and loop.member_strategy == 'loop'
        # a few training passes, on other batches: outputs and every member parameter's gradient at each, the
        # running statistics at the end (no optimiser step: it would only compound the rounding differences)
        for step in range(3):
            outs = []
            for m in (model, loop):
                out = m.forward_members(_x(seed=step))
                torch.nn.functional.cross_entropy(out.flatten(0, 1), y.repeat_interleave(n)).backward()
                outs.append(out)
            _assert_close(outs[0], outs[1])
            _assert_grads_close(model, loop)
            model.zero_grad()
            loop.zero_grad()
        _assert_buffers_equal(model, loop)
        # features, every kind of taps, in train mode, and the gradients of FDL's term through them (then the
        # statistics again: they were updated once more)
        for taps in ('preact', 'stages', 'convs') if base != 'test_vit' else ('preact', 'stages'):
            logits, feats = model.forward_members_with_features(x, taps)
            ref_logits, ref_feats = loop.forward_members_with_features(x, taps)
            _assert_close(logits, ref_logits)
            assert len(feats) == n and [len(f) for f in feats] == [len(f) for f in ref_feats]
            for f, r in zip(itertools.chain(*feats), itertools.chain(*ref_feats)):
                _assert_close(f, r)
            feature_difference_loss(feats).backward()
            feature_difference_loss(ref_feats).backward()
            _assert_grads_close(model, loop)
            model.zero_grad()
            loop.zero_grad()
        _assert_buffers_equal(model, loop)
        model.eval()
        loop.eval()
        with torch.no_grad():
            _assert_close(model.forward_members(x), loop.forward_members(x))
            _assert_close(model(x), loop(x))


def test_grouped_kernels_each_equal_the_loop():
    # 'tune' (the default) picks per layer by timing; each fixed choice must equal the loop on its own
    ref = _ensemble('test_resnet', 2).train()
    x, y = _x(), _target()
    out = ref.forward_members(x)
    torch.nn.functional.cross_entropy(out.flatten(0, 1), y.repeat_interleave(2)).backward()
    for kernel in ('grouped', 'split'):
        model = copy.deepcopy(ref)
        model.zero_grad()
        model.set_member_strategy('grouped', example_input=x)
        model._member_strategy.set_conv_kernel(kernel)
        got = model.forward_members(x)
        torch.nn.functional.cross_entropy(got.flatten(0, 1), y.repeat_interleave(2)).backward()
        assert model._member_strategy.conv_kernels() == {kernel: len(model._member_strategy._convs)}
        _assert_close(got, out)
        _assert_grads_close(model, ref)
    with pytest.raises(ValueError, match='Unknown conv_kernel'):
        model._member_strategy.set_conv_kernel('fft')


@pytest.mark.parametrize('base', TINY_BASES)
def test_dropout_is_drawn_per_member(base):
    # identical members: any difference between their outputs in train mode comes from their dropout masks
    kwargs = dict(drop_rate=0.5) if base == 'test_resnet' else dict(drop_rate=0.3, drop_path_rate=0.5)
    x = _x()
    for name in _strategies(base):
        for drop in (True, False):
            model = _ensemble(base, 2, **(kwargs if drop else {}))
            model.members[1].load_state_dict(model.members[0].state_dict())
            model.set_member_strategy(name, example_input=x)
            model.train()
            out = model.forward_members(x)
            assert not torch.allclose(out[:, 0], out[:, 1]) if drop else torch.allclose(out[:, 0], out[:, 1]), name
            model.eval()
            with torch.no_grad():
                out = model.forward_members(x)
            _assert_close(out[:, 0], out[:, 1])


def test_strategy_leaves_state_dict_model_args_and_reloads_alone(tmp_path):
    torch.manual_seed(0)
    model = _ensemble('test_resnet', 2, member_strategy='grouped')
    assert model.member_strategy == 'grouped'
    assert 'member_strategy' not in model.model_args
    keys = list(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in MEMBER_STRATEGIES:
        model.set_member_strategy(name)
        state = model.state_dict()
        assert list(state) == keys
        assert all(torch.equal(state[k], before[k]) for k in keys)
    x, y = _x(), _target()
    for name in ('loop', 'vmap', 'grouped'):
        trained = copy.deepcopy(model)
        trained.set_member_strategy(name)
        task = timm_ensembles.create_task(trained).train()
        opt = task.create_optimizer(opt='sgd', lr=0.1, momentum=0.9)
        task(x, y)['loss'].backward()
        opt.step()
        export_folder(trained, tmp_path / name)
        reloaded = timm.create_model(f'local-dir:{tmp_path / name}', pretrained=True)
        assert reloaded.member_strategy == 'loop'
        state, ref = reloaded.state_dict(), trained.state_dict()
        assert list(state) == keys and all(torch.equal(state[k], ref[k]) for k in keys)


def test_deepcopy_and_reset_classifier_keep_strategies_on_their_own_members():
    model = _ensemble('test_resnet', 2).train()
    model.set_member_strategy('grouped', example_input=_x())
    twin = copy.deepcopy(model)  # as an EMA copy is made
    before = [b.clone() for b in model.buffers()]
    twin.forward_members(_x())
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before))
    assert not all(torch.equal(a, b) for a, b in zip(twin.buffers(), before))
    model.reset_classifier(3)
    assert model.member_strategy == 'grouped' and model.forward_members(_x()).shape == (4, 2, 3)


def test_refusals_are_clear():
    x = _x(2)
    for base in ('test_vit', 'test_convnext'):
        model = _ensemble(base, 2)
        with pytest.raises(StrategyError, match=f"'grouped' cannot fuse '{base}'.*supports BatchNorm CNNs"):
            model.set_member_strategy('grouped', example_input=x)
        assert model.member_strategy == 'loop'
    # DenseNet's layers are all fusable; its channel concatenation is not, which only the check against the loop sees
    model = timm.create_model('ens', base_model='densenet121', growth_rate=8, block_config=(1, 1),
                              num_classes=NUM_CLASSES)
    with pytest.raises(StrategyError, match="does not compute what the loop computes on 'densenet121'"):
        model.set_member_strategy('grouped', example_input=x)
    model.set_member_strategy('vmap', example_input=x)  # vmap is exact there
    with pytest.raises(ValueError, match='Unknown member strategy'):
        model.set_member_strategy('threads')
    assert issubclass(StrategyError, ValueError)


@pytest.mark.parametrize('base', ('test_resnet', 'test_vit'))
def test_auto_picks_an_eligible_strategy_and_leaves_no_trace(base):
    ref = _ensemble(base, 2).train()
    model = copy.deepcopy(ref)
    model.set_member_strategy('auto')
    assert model.member_strategy == 'auto'
    x, y = _x(), _target()
    out = model.forward_members(x)
    info = model.member_strategy_info
    grouped = ['grouped', 'grouped:split', 'grouped:grouped']  # its kernel choice per layer, and each kind throughout
    eligible = ['loop', 'vmap', *(grouped if base in GROUPED_BASES else [])]
    assert model.member_strategy in info['eligible'] == eligible
    assert set(info['refused']) == {'vmap', *grouped} - set(eligible)
    # auto's checks and timings restore the statistics: after its one call they are those of one call
    ref_out = ref.forward_members(x)
    _assert_close(out, ref_out)
    _assert_buffers_equal(model, ref)
    torch.nn.functional.cross_entropy(out.flatten(0, 1), y.repeat_interleave(2)).backward()
    torch.nn.functional.cross_entropy(ref_out.flatten(0, 1), y.repeat_interleave(2)).backward()
    _assert_grads_close(model, ref)


def test_auto_under_cpu_autocast_keeps_the_grouped_strategy():
    """auto checks the strategies inside the first forward pass, which on a CPU bf16 run is under autocast; the check
    is in float64 and must not be autocast (the grouped convolution would be, and the float64 check would fail)."""
    model = _ensemble('test_resnet', 2).train()
    model.set_member_strategy('auto')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model.forward_members(_x())
    info = model.member_strategy_info
    assert out.dtype == torch.bfloat16
    assert info['eligible'] == ['loop', 'grouped', 'grouped:split', 'grouped:grouped'] and list(info['refused']) == [
        'vmap']


@pytest.mark.parametrize('method', ('fdl', 'ens'))
def test_tasks_train_under_every_strategy(method):
    x, y = _x(), _target()
    ref = _ensemble('test_resnet', 3, method)
    results = {}
    for name in ('loop', 'vmap', 'grouped', 'auto'):
        model = copy.deepcopy(ref)
        model.set_member_strategy(name)
        taps = ('stages', 'convs') if method == 'fdl' else ('stages',)
        for tap in taps:
            torch.manual_seed(0)  # FDLTask draws the seed of its S pairs from the global generator
            task = timm_ensembles.create_task(model, **(dict(feature_taps=tap) if method == 'fdl' else {})).train()
            task.on_epoch_start(1)  # FDL's joint phase: features, S and -L_FDL
            task.create_optimizer(opt='sgd', lr=0.1, momentum=0.9)
            out = task(x, y)
            out['loss'].backward()
            results[name, tap] = (out['loss'].detach(), [p.grad.clone() for p in model.parameters()])
            model.zero_grad()
    for (_, tap), (loss, grads) in results.items():
        ref_loss, ref_grads = results['loop', tap]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        scale = max(g.abs().max().item() for g in ref_grads)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize('num_members', (4, 5))
def test_centred_fdl_gradient_equals_the_pairwise_form(num_members):
    # from 4 members feature_difference_loss takes the O(N) centred form; its value is tested in test_losses.py
    feats = [[torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 6, requires_grad=True)]
             for _ in range(num_members)]
    feature_difference_loss(feats).backward()
    fast = [[f.grad.clone() for f in member] for member in feats]
    for member in feats:
        for f in member:
            f.grad = None
    torch.stack([torch.stack([feature_difference(a, b) for a, b in zip(feats[i], feats[j])]).mean()
                 for i, j in itertools.combinations(range(num_members), 2)]).mean().backward()
    for member, fast_member in zip(feats, fast):
        for f, g in zip(member, fast_member):
            torch.testing.assert_close(g, f.grad, rtol=1e-5, atol=1e-7)


def test_train_py_member_strategy_flag(tmp_path):
    # the flag changes how the members run, not what is trained or saved
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from safetensors.torch import load_file
    root = Path(__file__).resolve().parents[1]
    saved = {}
    for name in ('loop', 'grouped'):
        out = tmp_path / name
        subprocess.run([sys.executable, str(root / 'train.py'), '--model', 'fdl_test_resnetx2', '--epochs', '2',
                        '--train-subset', '32', '--val-subset', '16', '--batch-size', '16', '--workers', '0',
                        '--no-progress', '--member-strategy', name, '--output', str(out)],
                       check=True, capture_output=True, cwd=root, env=dict(os.environ, OMP_NUM_THREADS='1'))
        args = yaml.safe_load((out / 'args.yaml').read_text())
        assert args['member_strategy'] == name and args['channels_last'] is False and args['fused_opt'] is False
        saved[name] = load_file(out / 'model.safetensors')
    assert list(saved['grouped']) == list(saved['loop'])
    # one step's gradients agree to rounding (test_strategies_equal_the_loop); over the run's
    # steps the grouped kernels' rounding (1e-7) grows through -L_FDL's push apart to about 2e-5 in a few weights
    for key, value in saved['loop'].items():
        torch.testing.assert_close(saved['grouped'][key], value, rtol=1e-3, atol=1e-4)


class _Flat28(torch.nn.Module):
    """A user's model that takes 28x28 input only (a flattening classifier), registered with a config that states
    timm's default 224 px."""

    def __init__(self, num_classes=10, in_chans=1, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 4 * 14 * 14
        self.conv = torch.nn.Conv2d(in_chans, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 14 * 14, num_classes)

    def forward(self, x):
        return self.fc(torch.nn.functional.max_pool2d(self.bn(self.conv(x)).relu(), 2).flatten(1))

    def reset_classifier(self, num_classes, global_pool=None):
        self.fc = torch.nn.Linear(4 * 14 * 14, num_classes)


default_cfgs = generate_default_cfgs({'te_flat28': dict(input_size=(1, 224, 224), num_classes=10)})


@register_model
def te_flat28(pretrained=False, **kwargs):
    return build_model_with_cfg(_Flat28, 'te_flat28', pretrained, **kwargs)


@pytest.mark.parametrize('strategy', ['vmap', 'grouped'])
def test_a_model_the_default_probe_cannot_feed_is_checked_on_its_first_batch(strategy):
    model = timm.create_model('ens', base_model='te_flat28', num_members=2, in_chans=1, member_strategy=strategy)
    assert model.member_strategy == strategy
    x = torch.randn(4, 1, 28, 28)
    loop = timm.create_model('ens', base_model='te_flat28', num_members=2, in_chans=1)
    loop.load_state_dict(model.state_dict())
    model.eval()
    loop.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_members(x), loop.forward_members(x), rtol=1e-4, atol=1e-5)
    # with a probe the model cannot take, setting the strategy is still refused, and says why
    with pytest.raises(ValueError, match=r'the loop itself fails on the probe batch \(2, 1, 32, 32\)'):
        model.set_member_strategy(strategy, example_input=torch.randn(2, 1, 32, 32))
