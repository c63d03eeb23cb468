"""How the members of an ``EnsembleModel`` run: one after another, vectorised, or fused into one grouped network.

Strategies (``EnsembleModel.set_member_strategy(name)``):

* ``loop``: each member runs on its own, one after another (the reference; works for every timm model).
* ``vmap``: one call of ``torch.func.vmap`` over the members' parameters and buffers, stacked from the members at
  every call (``torch.func.functional_call`` on member 0's modules). Gradients flow through the stacking back to each
  member's own parameters, BatchNorm running statistics are updated on the stacked buffers and copied back into
  every member's buffers after the call. Dropout and drop-path draw their masks per member
  (``randomness='different'``), from other random streams than the loop's. Works for every model vmap can trace
  (checked against the loop when it is set). It keeps a stacked copy of the weights for the backward pass (about one
  more copy of the parameters at the peak of memory), and autocast does not reach inside it (the members then
  compute in fp32; ``auto`` leaves it out under autocast).
* ``grouped``: the members fused into one network whose tensors hold the members side by side on the channel axis
  (member-major: member m owns channels ``m * C`` to ``(m + 1) * C``). Convolutions become grouped convolutions
  (``groups x N``), BatchNorm runs over ``N x C`` channels, the linear classifier becomes a batched matmul; the fused
  layers read their weights from the members at every call (concatenated), so the members stay the source of
  truth, and BatchNorm running statistics are written back into the members' buffers. Each fused convolution runs
  as one grouped convolution or as the members' convolutions on their channel slices, as its first batch of each
  shape timed them (``GroupedStrategy``). The container modules' own ``forward`` code (residual additions,
  pooling, heads) runs unchanged on the fused tensors, which is exact only when that code never mixes or splits
  channels: the strategy converts only known channel-local layers (Conv2d, BatchNorm2d and timm's BatchNormAct2d,
  Linear, DropPath, dropout, pooling, elementwise activations), refuses any other layer, and is checked numerically
  against the loop on a probe batch when it is set (outputs, stage features, a backward pass, running statistics),
  so that architectures whose code concatenates or splits channels (DenseNet, CSP and mixed convolutions) are
  refused rather than silently wrong. In practice: BatchNorm CNNs such as timm's
  ResNets / ResNeXts / SE-ResNets, EfficientNets and MobileNets.
* ``auto``: on the first call for a given input shape, dtype, device and mode, times a few forward (and, with
  gradients enabled, backward) passes of every strategy that accepts the model (checked once, as when it is set),
  interleaved, on that batch, and keeps the fastest for that kind of call (``EnsembleModel.member_strategy`` says which,
  ``member_strategy_info`` the timings and the refusals).

None of them adds a parameter or a buffer to the ensemble: its ``state_dict``, checkpoints and Hub repos keep the
plain per-member layout whatever strategy ran, and ``model_args`` do not record the strategy.

Numerics: ``vmap`` and ``grouped`` compute the same functions as the loop, but the grouped convolution kernels sum
their products in another order than separate convolutions, so results agree to float rounding (about 1e-6 relative
in fp32), not bitwise; BatchNorm statistics are per channel and come out bitwise equal where the convolutions do.
The check when a strategy is set runs in float64 on a CPU copy of the members (``verify_against_loop``): it asks
whether the strategy computes the loop's function, which fp32 rounding on a small probe cannot answer.
"""
import contextlib
import copy
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    'MEMBER_STRATEGIES', 'MemberStrategy', 'LoopStrategy', 'VmapStrategy', 'GroupedStrategy', 'AutoStrategy',
    'StrategyError', 'create_member_strategy', 'verify_against_loop',
]

MEMBER_STRATEGIES = ('loop', 'vmap', 'grouped', 'auto')

# timed runs per kernel when a fused convolution tunes, and how much faster the grouped kernel must be to be chosen
_TUNE_RUNS = 5
_TUNE_MARGIN = 0.9

# relative L2 tolerance of the check against the loop (in float64, see verify_against_loop): float64 rounding of
# reordered sums is about 1e-15; channels fused wrongly (DenseNet) give errors of 0.04 to 1
_VERIFY_RTOL = 1e-8


class StrategyError(ValueError):
    """A member strategy that does not apply to this model (or gave results other than the loop's)."""


class _LoopFailed(StrategyError):
    """The reference itself failed on the probe batch (an input the model does not take)."""


def conv_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every convolution of a model, in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            yield name, module


def tapped_convs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The convolutions whose outputs FDL's ``feature_taps='convs'`` compares, by the reference code's rule.

    The reference taps every node of the traced graph whose name contains "conv": the convolutions of the stem and of
    the residual branches, not the 1x1 shortcut (projection) convolutions, which timm and torchvision name
    ``downsample``. Where no convolution's name contains "conv" (timm's VGG: ``features.0``, ...), every convolution.
    """
    convs = list(conv_modules(model))
    named = [(n, m) for n, m in convs if 'conv' in n.lower()]
    return named or convs


@contextlib.contextmanager
def capture_conv_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the output of every tapped convolution (``tapped_convs``) run inside the context, in call order."""
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for _, m in tapped_convs(model)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


class MemberStrategy:
    """Runs the members of an ensemble; holds no parameters or buffers of its own (the members do).

    Args:
        members: The ensemble's members (``EnsembleModel.members``), structurally identical timm models.
        base_model: The base model's name, for messages.
    """
    name = ''

    def __init__(self, members: nn.ModuleList, base_model: str = ''):
        self.members = members
        self.base_model = base_model

    @property
    def num_members(self) -> int:
        return len(self.members)

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's logits, ``[B, M, C]``."""
        raise NotImplementedError

    def forward_members_with_features(
            self, x: torch.Tensor, taps: str = 'stages', indices: int | Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """Member logits ``[B, M, C]`` and ``features[m]``, the list of member m's feature tensors."""
        raise NotImplementedError

    def _check_stage_taps(self) -> None:
        if not hasattr(self.members[0], 'forward_intermediates'):
            raise ValueError(
                f"Base model '{self.base_model}' has no forward_intermediates(); use feature taps 'convs'.")

    def _no_convs(self) -> ValueError:
        return ValueError(f"Base model '{self.base_model}' has no convolutions; use feature taps 'stages'.")


class LoopStrategy(MemberStrategy):
    """The members one after another: the reference every other strategy is checked against."""
    name = 'loop'

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members], dim=1)

    def forward_members_with_features(self, x, taps='stages', indices=None):
        logits, features = [], []
        for member in self.members:
            if taps == 'stages':
                self._check_stage_taps()
                final, inter = member.forward_intermediates(x, indices=indices)
                logits.append(member.forward_head(final))
                features.append(list(inter))
            else:
                with capture_conv_outputs(member) as convs:
                    logits.append(member(x))
                if not convs:
                    raise self._no_convs()
                features.append(convs)
        return torch.stack(logits, dim=1), features


class _Runner(nn.Module):
    """What ``functional_call`` calls under vmap: one member's forward, intermediates or conv outputs.

    Kept outside the ensemble's module tree (it only wraps member 0 as a template), so it adds no state_dict keys.
    """

    def __init__(self, template: nn.Module):
        super().__init__()
        self.m = template

    def forward(self, x: torch.Tensor, mode: str = 'logits', indices: Any = None) -> Any:
        if mode == 'logits':
            return self.m(x)
        if mode == 'stages':
            final, inter = self.m.forward_intermediates(x, indices=indices)
            return self.m.forward_head(final), list(inter)
        with capture_conv_outputs(self.m) as convs:
            out = self.m(x)
        return out, list(convs)


class VmapStrategy(MemberStrategy):
    """``torch.func.vmap`` over the members' stacked parameters and buffers (see the module docstring)."""
    name = 'vmap'

    def __init__(self, members: nn.ModuleList, base_model: str = ''):
        super().__init__(members, base_model)
        ref = members[0]
        self.param_names = [n for n, _ in ref.named_parameters()]
        self.buffer_names = [n for n, _ in ref.named_buffers()]
        for i, member in enumerate(members):
            shapes = [(n, tuple(t.shape)) for n, t in (*member.named_parameters(), *member.named_buffers())]
            ref_shapes = [(n, tuple(t.shape)) for n, t in (*ref.named_parameters(), *ref.named_buffers())]
            if shapes != ref_shapes:
                raise StrategyError(f"vmap needs structurally identical members; member {i} of '{base_model}'"
                                    ' has other parameters or buffers than member 0.')
        self.runner = _Runner(ref)

    def _stacked_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        # stacked at every call, from the members' own tensors: autograd carries the gradients back through
        # torch.stack to each member's parameters, which the optimiser and the checkpoints see
        params = [dict(m.named_parameters()) for m in self.members]
        buffers = [dict(m.named_buffers()) for m in self.members]
        stacked_p = {f'm.{n}': torch.stack([p[n] for p in params]) for n in self.param_names}
        with torch.no_grad():
            stacked_b = {f'm.{n}': torch.stack([b[n] for b in buffers]) for n in self.buffer_names}
        return stacked_p, stacked_b

    def _write_back(self, stacked_b: dict[str, torch.Tensor]) -> None:
        # BatchNorm updated the stacked running statistics in place (a batched in-place update under vmap):
        # each member's slice goes back into that member's buffer
        if not stacked_b:
            return
        dst, src = [], []
        for m in self.members:
            dst.extend(b for _, b in m.named_buffers())
        for i in range(self.num_members):
            src.extend(stacked_b[f'm.{n}'][i] for n in self.buffer_names)
        with torch.no_grad():
            torch._foreach_copy_(dst, src)

    def _run(self, x: torch.Tensor, mode: str, indices: Any = None) -> Any:
        stacked_p, stacked_b = self._stacked_state()

        def call(p, b, inp):
            return torch.func.functional_call(self.runner, {**p, **b}, (inp,), dict(mode=mode, indices=indices))

        with warnings.catch_warnings():
            # kernels without a batching rule (e.g. CPU flash attention) fall back to a per-member loop inside
            # vmap, correct and merely slower; auto's timing is what judges the speed
            warnings.filterwarnings('ignore', message='There is a performance drop because we have not yet')
            out = torch.func.vmap(call, in_dims=(0, 0, None), randomness='different')(stacked_p, stacked_b, x)
        if any(m.training for m in self.members[0].modules()):
            self._write_back(stacked_b)
        return out

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, 'logits').movedim(0, 1)

    def forward_members_with_features(self, x, taps='stages', indices=None):
        if taps == 'stages':
            self._check_stage_taps()
        logits, feats = self._run(x, taps, indices)
        if not feats:
            raise self._no_convs()
        return logits.movedim(0, 1), [[f[m] for f in feats] for m in range(self.num_members)]


# ---- grouped fusion ----

def _elementwise_types() -> tuple[type, ...]:
    """Parameterless layers that act on each element (or each channel) alone, so are exact on fused tensors."""
    import timm.layers.activations as timm_act
    import timm.layers.adaptive_avgmax_pool as timm_pool
    types = [
        nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
        nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softplus, nn.Hardtanh,
        nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
        nn.Flatten,
        timm_pool.SelectAdaptivePool2d, timm_pool.AdaptiveAvgMaxPool2d, timm_pool.FastAdaptiveAvgPool,
        timm_pool.FastAdaptiveMaxPool, timm_pool.FastAdaptiveAvgMaxPool,
    ]
    types += [getattr(timm_act, n) for n in ('GELU', 'GELUTanh', 'HardMish', 'HardSigmoid', 'HardSwish', 'Mish',
                                             'QuickGELU', 'Sigmoid', 'Swish', 'Tanh') if hasattr(timm_act, n)]
    return tuple(types)


GROUPED_SUPPORT = (
    'grouped fusion supports BatchNorm CNNs built from nn.Conv2d (zero padding, any groups), nn.BatchNorm2d and'
    " timm's BatchNormAct2d (with momentum), nn.Linear, timm's DropPath, dropout, pooling and elementwise"
    " activations, whose forward code never mixes or splits channels (timm's ResNets, ResNeXts, SE-ResNets,"
    ' EfficientNets, MobileNets); use the vmap or loop strategy for other models'
)


class _Fused(nn.Module):
    """Base of the fused layers: the members' layers at one position, read at every call (never copied)."""

    def __init__(self, sources: Sequence[nn.Module]):
        super().__init__()
        # a tuple, not a ModuleList: the members' layers must not become submodules of the fused network
        self.sources = tuple(sources)

    @property
    def num_members(self) -> int:
        return len(self.sources)


class _GroupedConv2dFn(torch.autograd.Function):
    """A convolution over the members' concatenated weights that keeps only the members' own weights for the
    backward pass and concatenates them again there: autograd would otherwise hold every layer's concatenated copy
    from the forward to the backward pass, one more copy of all the weights at the peak of memory. Under autocast it
    computes in the autocast dtype, as ``F.conv2d`` would."""

    @staticmethod
    def forward(ctx, x, stride, padding, dilation, groups, num_weights, *tensors):
        weights, biases = tensors[:num_weights], tensors[num_weights:]
        device = x.device.type
        cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.conv = (stride, padding, dilation, groups, num_weights, bool(biases), cast, x.dtype)
        weight = torch.cat(weights)
        bias = torch.cat(biases) if biases else None
        if cast is not None:
            x, weight = x.to(cast), weight.to(cast)
            bias = bias.to(cast) if bias is not None else None
        ctx.save_for_backward(x, *weights)
        with torch.autocast(device, enabled=False):
            return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        stride, padding, dilation, groups, num_weights, has_bias, cast, x_dtype = ctx.conv
        x, *weights = ctx.saved_tensors
        weight = torch.cat(weights)
        if cast is not None:
            weight = weight.to(cast)
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out.to(x.dtype), x, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation,
            False, [0, 0], groups, [ctx.needs_input_grad[0], True, has_bias])
        out_per_member = weights[0].shape[0]
        param_dtype = weights[0].dtype
        grads = [*grad_w.to(param_dtype).split(out_per_member)]
        if has_bias:
            grads += [*grad_b.to(param_dtype).split(out_per_member)]
        return (None if grad_x is None else grad_x.to(x_dtype), None, None, None, None, None, *grads)


class _FusedConv2d(_Fused):
    """N convolutions over member-major channels: one grouped convolution (on the shared input of the network, one
    convolution with N x the output channels), or the members' convolutions on their channel slices, whichever
    ran faster on the first batch of each shape (see ``GroupedStrategy``)."""

    def __init__(self, sources: Sequence[nn.Conv2d]):
        super().__init__(sources)
        c = sources[0]
        self.in_channels, self.out_channels, self.groups = c.in_channels, c.out_channels, c.groups
        self.stride, self.padding, self.dilation = c.stride, c.padding, c.dilation
        self.capture: list[torch.Tensor] | None = None
        self.kernel = 'tune'
        self.tuned: dict[tuple, str] = {}

    def _grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        weights = [c.weight for c in self.sources]
        biases = [c.bias for c in self.sources] if self.sources[0].bias is not None else []
        if isinstance(self.padding, str) or not torch.is_grad_enabled():
            # string padding ('same') has no explicit form for convolution_backward; without autograd there is
            # no backward pass to save memory for
            return F.conv2d(x, torch.cat(weights), torch.cat(biases) if biases else None, self.stride, self.padding,
                            self.dilation, groups)
        return _GroupedConv2dFn.apply(x, self.stride, self.padding, self.dilation, groups, len(weights), *weights,
                                      *biases)

    def _split(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        inputs = [x] * self.num_members if groups == 1 else x.chunk(self.num_members, 1)
        return torch.cat([F.conv2d(xi, c.weight, c.bias, self.stride, self.padding, self.dilation, self.groups)
                          for xi, c in zip(inputs, self.sources)], 1)

    def _tune(self, x: torch.Tensor, groups: int) -> str:
        """Time both kernels on this input (forward, and backward when gradients are enabled), interleaved, and
        keep the grouped one only if it is clearly faster: the split one runs the members' own kernels, as the
        loop does, and single layers time noisily (measured on a CPU: a plain "faster" picked grouped kernels that
        made the whole step slower than splitting every layer)."""
        grad = torch.is_grad_enabled()
        inp = x.detach().requires_grad_(grad and x.requires_grad)
        wrt = [t for t in (inp, *(p for c in self.sources for p in c.parameters())) if t.requires_grad]
        times: dict[str, list[float]] = {'grouped': [], 'split': []}
        for _ in range(_TUNE_RUNS + 1):
            for name, fn in (('grouped', self._grouped), ('split', self._split)):
                _synchronize(x.device)
                t0 = time.perf_counter()
                out = fn(inp, groups)
                if grad and wrt:
                    torch.autograd.grad(out, wrt, torch.ones_like(out))
                _synchronize(x.device)
                times[name].append(time.perf_counter() - t0)
        grouped, split = min(times['grouped'][1:]), min(times['split'][1:])
        return 'grouped' if grouped < _TUNE_MARGIN * split else 'split'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == self.in_channels * self.num_members:
            groups = self.groups * self.num_members
        elif x.shape[1] == self.in_channels and self.groups == 1:
            groups = 1  # the network's input, shared by every member: no need to repeat it
        else:
            raise StrategyError(f'fused convolution got {x.shape[1]} channels, expected {self.in_channels} x'
                                f' {self.num_members} members')
        kernel = self.kernel
        if kernel == 'tune':
            key = (tuple(x.shape), x.dtype, x.device.type, torch.is_grad_enabled())
            kernel = self.tuned.get(key)
            if kernel is None:
                kernel = self.tuned[key] = self._tune(x, groups)
        out = self._grouped(x, groups) if kernel == 'grouped' else self._split(x, groups)
        if self.capture is not None:
            self.capture.append(out)
        return out

    def extra_repr(self) -> str:
        return f'{self.in_channels}, {self.out_channels} x {self.num_members} members, groups={self.groups}'


class _FusedBatchNorm2d(_Fused):
    """N BatchNorm2d (or timm BatchNormAct2d) as one over N x C channels; running statistics written back."""

    def __init__(self, sources: Sequence[nn.BatchNorm2d], drop: nn.Module | None = None,
                 act: nn.Module | None = None):
        super().__init__(sources)
        self.num_features = sources[0].num_features
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bns = self.sources
        ref = bns[0]
        training = self.training
        factor = ref.momentum
        track = ref.track_running_stats and ref.running_mean is not None
        if training and track:
            torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
        with torch.no_grad():
            mean = torch.cat([bn.running_mean for bn in bns]) if track else None
            var = torch.cat([bn.running_var for bn in bns]) if track else None
        weight = torch.cat([bn.weight for bn in bns]) if ref.affine else None
        bias = torch.cat([bn.bias for bn in bns]) if ref.affine else None
        x = F.batch_norm(x, mean, var, weight, bias, training or not track, factor, ref.eps)
        if training and track:
            # F.batch_norm updated the concatenated statistics in place: each member's slice goes back
            with torch.no_grad():
                torch._foreach_copy_([bn.running_mean for bn in bns] + [bn.running_var for bn in bns],
                                     [*mean.split(self.num_features), *var.split(self.num_features)])
        return self.act(self.drop(x))

    def extra_repr(self) -> str:
        return f'{self.num_features} x {self.num_members} members'


class _FusedLinear(_Fused):
    """N linear layers on the last axis of member-major features ``[..., N * F]`` as one batched matmul."""

    def __init__(self, sources: Sequence[nn.Linear]):
        super().__init__(sources)
        self.in_features, self.out_features = sources[0].in_features, sources[0].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.stack([lin.weight for lin in self.sources])  # [N, O, F]
        lead = x.shape[:-1]
        xs = x.reshape(-1, self.num_members, self.in_features).transpose(0, 1)  # [N, B', F]
        if self.sources[0].bias is not None:
            bias = torch.stack([lin.bias for lin in self.sources]).unsqueeze(1)  # [N, 1, O]
            out = torch.baddbmm(bias, xs, weight.transpose(1, 2))
        else:
            out = torch.bmm(xs, weight.transpose(1, 2))
        return out.transpose(0, 1).reshape(*lead, self.num_members * self.out_features)

    def extra_repr(self) -> str:
        return f'{self.in_features}, {self.out_features} x {self.num_members} members'


class _FusedDropPath(_Fused):
    """timm's DropPath with one keep/drop draw per sample *and member* (a plain DropPath on the fused tensor
    would drop a sample's path in every member at once)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self.sources[0]
        if src.drop_prob == 0. or not self.training:
            return x
        keep = 1 - src.drop_prob
        mask = x.new_empty((x.shape[0], self.num_members) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0 and src.scale_by_keep:
            mask.div_(keep)
        return (x.unflatten(1, (self.num_members, -1)) * mask).flatten(1, 2)


CONV_KERNELS = ('tune', 'grouped', 'split')


class GroupedStrategy(MemberStrategy):
    """The members fused into one network of grouped layers (see the module docstring).

    Each fused convolution runs either as one grouped convolution or as the members' own convolutions on their
    channel slices (then concatenated): grouped kernels beat separate ones on some shapes and lose badly on others
    (on a CPU, 3x3 convolutions on 1x1 maps run 2-3x slower grouped), so by default (``conv_kernel='tune'``) each
    layer times both, forward and backward, on the first batch of each input shape, dtype, device and grad mode,
    as ``torch.backends.cudnn.benchmark`` does for algorithms, and keeps the grouped kernel where it is at least 10 %
    faster, the members' own kernels otherwise. Both compute the same
    function; the choice only moves float rounding.

    Args:
        members: The ensemble's members.
        base_model: The base model's name, for messages.
        conv_kernel: ``'tune'``, or always ``'grouped'`` / ``'split'``.

    Raises:
        StrategyError: The base has a layer the fusion does not support (the message names it and lists what is
            supported). The numerical check against the loop is ``verify_against_loop``, which
            ``create_member_strategy`` runs.
    """
    name = 'grouped'

    def __init__(self, members: nn.ModuleList, base_model: str = '', conv_kernel: str = 'tune'):
        super().__init__(members, base_model)
        from timm.layers import BatchNormAct2d, DropPath
        self._bn_act_type = BatchNormAct2d
        self._drop_path_type = DropPath
        self._elementwise = _elementwise_types()
        ref = members[0]
        # the template: member 0's module tree without its tensors (the memo maps them to None), whose layers are
        # then replaced by fused ones; the containers' forward code is reused as is
        memo = {id(t): None for t in (*ref.parameters(), *ref.buffers())}
        template = copy.deepcopy(ref, memo)
        self.fused = self._convert(template, list(members), '')
        # every fused module with the member-0 module at its path, whose train/eval mode it follows at each call
        ref_modules = dict(ref.named_modules())
        self._mode_pairs = [(m, ref_modules[n]) for n, m in self.fused.named_modules() if n in ref_modules]
        self._convs = [m for m in self.fused.modules() if isinstance(m, _FusedConv2d)]
        # the fused tree keeps the members' module paths, so the reference's naming rule picks the same convolutions
        tapped = {n for n, _ in tapped_convs(ref)}
        self._tapped = [m for n, m in self.fused.named_modules() if n in tapped and isinstance(m, _FusedConv2d)]
        self.set_conv_kernel(conv_kernel)

    def set_conv_kernel(self, conv_kernel: str) -> None:
        """How the fused convolutions run, one of ``CONV_KERNELS`` (a new choice forgets earlier timings)."""
        if conv_kernel not in CONV_KERNELS:
            raise ValueError(f"Unknown conv_kernel '{conv_kernel}', expected one of {CONV_KERNELS}.")
        self.conv_kernel = conv_kernel
        for conv in self._convs:
            conv.kernel = conv_kernel
            conv.tuned.clear()

    def conv_kernels(self) -> dict[str, int]:
        """How many fused convolutions run each kernel, over the shapes seen (for reports)."""
        counts: dict[str, int] = {}
        for conv in self._convs:
            for kernel in (conv.tuned.values() if conv.kernel == 'tune' else [conv.kernel]):
                counts[kernel] = counts.get(kernel, 0) + 1
        return counts

    def _refuse(self, path: str, module: nn.Module, why: str) -> StrategyError:
        return StrategyError(f"'grouped' cannot fuse '{self.base_model}': {why} ({type(module).__name__} at"
                             f" '{path or '<root>'}'). {GROUPED_SUPPORT}.")

    def _convert(self, module: nn.Module, sources: list[nn.Module], path: str) -> nn.Module:
        kind = type(module)
        if kind is nn.Conv2d:
            if module.padding_mode != 'zeros':
                raise self._refuse(path, module, f"padding_mode '{module.padding_mode}' is not supported")
            return _FusedConv2d(sources)
        if kind is nn.BatchNorm2d or kind is self._bn_act_type:
            if sources[0].momentum is None:
                raise self._refuse(path, module, 'cumulative BatchNorm (momentum=None) is not supported')
            drop = act = None
            if kind is self._bn_act_type:
                drop = self._convert(module.drop, [s.drop for s in sources], f'{path}.drop')
                act = self._convert(module.act, [s.act for s in sources], f'{path}.act')
            return _FusedBatchNorm2d(sources, drop=drop, act=act)
        if kind is nn.Linear:
            return _FusedLinear(sources)
        if kind is self._drop_path_type:
            return _FusedDropPath(sources)
        # the template lost its tensors: ask member 0's layer
        own = [n for n, _ in (*sources[0].named_parameters(recurse=False), *sources[0].named_buffers(recurse=False))]
        if own:
            raise self._refuse(path, module, f"a layer with parameters or buffers ({', '.join(own)}) of a type it"
                                             ' cannot fuse')
        children = list(module.named_children())
        if not children or kind in self._elementwise:
            if kind not in self._elementwise:
                raise self._refuse(path, module, 'a layer it does not know to be channel-local')
            if children:  # e.g. SelectAdaptivePool2d: its pool and flatten must be channel-local too
                for name, child in children:
                    self._convert(child, [s.get_submodule(name) for s in sources], f'{path}.{name}'.lstrip('.'))
            return module
        for name, child in children:
            new = self._convert(child, [s.get_submodule(name) for s in sources], f'{path}.{name}'.lstrip('.'))
            if new is not child:
                setattr(module, name, new)
        return module

    def _sync_modes(self) -> None:
        for fused, src in self._mode_pairs:
            fused.training = src.training

    def _split(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Per-member views of a member-major fused tensor."""
        t = t.unflatten(1, (self.num_members, -1))
        return [t[:, m] for m in range(self.num_members)]

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        self._sync_modes()
        return self.fused(x).unflatten(1, (self.num_members, -1))

    def forward_members_with_features(self, x, taps='stages', indices=None):
        self._sync_modes()
        if taps == 'stages':
            self._check_stage_taps()
            final, inter = self.fused.forward_intermediates(x, indices=indices)
            logits = self.fused.forward_head(final)
            per_layer = [self._split(f) for f in inter]
            features = [[layer[m] for layer in per_layer] for m in range(self.num_members)]
        else:
            captured: list[torch.Tensor] = []
            for conv in self._tapped:
                conv.capture = captured
            try:
                logits = self.fused(x)
            finally:
                for conv in self._tapped:
                    conv.capture = None
            if not captured:
                raise self._no_convs()
            per_layer = [self._split(f) for f in captured]
            features = [[layer[m] for layer in per_layer] for m in range(self.num_members)]
        return logits.unflatten(1, (self.num_members, -1)), features


# ---- checking against the loop, and choosing ----

@contextlib.contextmanager
def _preserved_state(members: nn.ModuleList, device: torch.device) -> Iterator[None]:
    """Restore the members' buffers, train/eval modes and the random number generators on exit, so that checks
    and timings leave no trace in the training run."""
    modules = list(members.modules())
    modes = [m.training for m in modules]
    buffers = list(members.buffers())
    saved = [b.detach().clone() for b in buffers]
    devices = [device] if device.type == 'cuda' else []
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else 'cuda'):
            yield
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def _probe_run(strategy: MemberStrategy, x: torch.Tensor, params: list[torch.Tensor],
               with_features: bool) -> dict[str, list[torch.Tensor]]:
    """Eval outputs, then (norm layers in train mode, dropout off) outputs, features, gradients, statistics."""
    members = strategy.members
    members.eval()
    with torch.no_grad():
        eval_out = strategy.forward_members(x)
    for m in members.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.train()
    with torch.enable_grad():
        if with_features:
            logits, feats = strategy.forward_members_with_features(x, 'stages')
            outs = [logits] + [f for member in feats for f in member]
        else:
            outs = [strategy.forward_members(x)]
        gen = torch.Generator(device=x.device).manual_seed(0)
        loss = sum((o.float() * torch.randn(o.shape, generator=gen, device=o.device)).sum() for o in outs)
        grads = torch.autograd.grad(loss, params, allow_unused=True) if params else []
    buffers = [b.detach().clone() for b in members.buffers() if b.is_floating_point()]
    return dict(eval=[eval_out.detach()], train=[o.detach() for o in outs],
                grads=[torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)], buffers=buffers)


def _rel_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Relative L2 error of a group of tensors, ``||got - ref|| / ||ref||`` over all of them together.

    A norm over the group, not the largest elementwise error: where rounding moves a near tie of a max-pooling
    window, one element's gradient goes to its neighbour, which is a large elementwise but a tiny relative change;
    fusing channels of different members wrongly is of order 1 either way.
    """
    if len(got) != len(ref) or any(a.shape != b.shape for a, b in zip(got, ref)):
        return float('inf')
    diff = sum(((a.double() - b.double()) ** 2).sum().item() for a, b in zip(got, ref))
    norm = sum((b.double() ** 2).sum().item() for b in ref)
    return (diff / max(norm, 1e-30)) ** 0.5 if norm or diff else 0.0


def _float64_cpu_copy(members: nn.ModuleList) -> nn.ModuleList:
    """A float64 CPU copy of the members (through the deepcopy memo, so the originals are never copied where they
    are)."""
    memo: dict[int, Any] = {}
    for t in (*members.parameters(), *members.buffers()):
        new = t.detach().to('cpu', torch.float64 if t.is_floating_point() else t.dtype, copy=True)
        memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    return copy.deepcopy(members, memo)


def verify_against_loop(strategy: MemberStrategy, x: torch.Tensor) -> dict[str, float]:
    """Check a strategy against the loop on a probe batch, on a float64 CPU copy of the members.

    Compares eval-mode outputs, then with the norm layers in train mode (batch statistics, dropout off): outputs and
    stage features, the gradient of a random projection of them with respect to every member parameter, and the
    running statistics after that pass. In float64 because the question is whether the strategy computes the
    loop's function, and fp32 rounding cannot answer it on small probes: BatchNorm over the few values per channel
    of a small batch at 1x1 maps, and max-pooling near ties, turn rounding into gradient differences of 1 % (measured
    on resnet10t at 32 px, batch 4), where channels fused wrongly (DenseNet) differ by 4 % to 100 %. The members
    themselves are not touched.

    Returns:
        The relative (L2) error of each group.

    Raises:
        StrategyError: The strategy fails on this model, or differs from the loop beyond float64 rounding.
    """
    members = _float64_cpu_copy(strategy.members)
    x = x.detach().to('cpu', torch.float64)
    probe = _build(strategy.name, members, strategy.base_model)
    if isinstance(probe, GroupedStrategy):
        probe.set_conv_kernel('grouped')  # the fused kernels are what is in question (split runs the members' own)
    params = [p for p in members.parameters() if p.requires_grad]
    with_features = hasattr(members[0], 'forward_intermediates')
    # float64 throughout: auto checks inside the run's first forward pass, which on a CPU may be under autocast
    with _preserved_state(members, x.device), torch.autocast('cpu', enabled=False):
        try:
            ref = _probe_run(LoopStrategy(members, strategy.base_model), x, params, with_features)
        except Exception as e:
            raise _LoopFailed(f"the loop itself fails on the probe batch {tuple(x.shape)}: {type(e).__name__}: {e}"
                              ) from e
    with _preserved_state(members, x.device), torch.autocast('cpu', enabled=False):
        try:
            got = _probe_run(probe, x, params, with_features)
        except StrategyError:
            raise
        except Exception as e:  # any failure of the strategy on this architecture is a refusal, with its cause
            raise StrategyError(f"'{strategy.name}' fails on '{strategy.base_model}': {type(e).__name__}: {e}."
                                + (f' {GROUPED_SUPPORT}.' if strategy.name == 'grouped' else '')) from e
    errors = {k: _rel_error(got[k], ref[k]) for k in ref}
    bad = {k: v for k, v in errors.items() if not v <= _VERIFY_RTOL}
    if bad:
        detail = ', '.join(f'{k} {v:.2g}' for k, v in bad.items())
        raise StrategyError(
            f"'{strategy.name}' does not compute what the loop computes on '{strategy.base_model}' (relative"
            f' error {detail} in float64, tolerance {_VERIFY_RTOL:g}): its code mixes or splits channels across the'
            f" fused members (e.g. DenseNet's concatenation)."
            + (f' {GROUPED_SUPPORT}.' if strategy.name == 'grouped' else ''))
    return errors


_PROBE_SIZE = 64


def default_probe_input(members: nn.ModuleList, in_chans: int, batch_size: int = 2,
                        full_size: bool = False) -> torch.Tensor:
    """A random batch for the check against the loop, drawn from a generator of its own so that the global random
    stream is untouched: a ViT's patch-embedding size; for other models the base's input size (its pretrained
    config) capped at 64 px (``full_size=False``), as the check runs in float64 on the CPU and a CNN's structure does
    not depend on the input size."""
    from timm.data import resolve_model_data_config
    member = members[0]
    img_size = getattr(getattr(member, 'patch_embed', None), 'img_size', None)
    if img_size is not None:
        size = tuple(img_size)
    else:
        size = tuple(resolve_model_data_config(member)['input_size'][1:])
        if not full_size:
            size = tuple(min(s, _PROBE_SIZE) for s in size)
    return torch.randn((batch_size, in_chans, *size), generator=torch.Generator().manual_seed(0))


def _check(strategy: MemberStrategy, in_chans: int, example: torch.Tensor | None = None,
           fallback: torch.Tensor | None = None) -> dict[str, float]:
    """``verify_against_loop`` on ``example``, else on the default probe (reduced, then full size, then
    ``fallback``) until the loop itself takes one."""
    if example is not None:
        probes = [example]
    else:
        probes = [default_probe_input(strategy.members, in_chans),
                  default_probe_input(strategy.members, in_chans, full_size=True)]
        probes += [fallback] if fallback is not None else []
    for i, probe in enumerate(probes):
        try:
            return verify_against_loop(strategy, probe)
        except _LoopFailed:
            if i == len(probes) - 1:
                raise
    raise AssertionError('unreachable')


def _build(name: str, members: nn.ModuleList, base_model: str) -> MemberStrategy:
    cls = dict(loop=LoopStrategy, vmap=VmapStrategy, grouped=GroupedStrategy)[name]
    return cls(members, base_model)


AUTO_CANDIDATES = ('loop', 'vmap', 'grouped', 'grouped:split', 'grouped:grouped')


class AutoStrategy(MemberStrategy):
    """Times the strategies that accept the model on the actual batch and keeps the fastest.

    The choice is made on the first call of each kind (logits, stage or conv features) for each input shape, dtype,
    device and mode (train with gradients, or not), from ``rounds`` interleaved timed passes of every eligible
    strategy after one warm-up pass (forward, and backward when gradients are enabled); the members' buffers and the
    random generators are restored afterwards. Timing is machine-dependent, so two processes (DDP) may choose
    differently; every choice computes the same function.

    The grouped strategy enters three times: with its per-layer kernel choice (``grouped``) and with one kind of
    kernel throughout (``grouped:split``, ``grouped:grouped``), because timing single layers is no sure guide to
    the whole step (measured on a CPU: per-layer choices gave a step 7 % slower than splitting every layer).

    Args:
        members: The ensemble's members.
        base_model: The base model's name, for messages.
        candidates: Strategies to consider (``grouped:<kernel>``: the grouped strategy with that ``conv_kernel``).
        rounds: Timed passes per strategy.
    """
    name = 'auto'

    def __init__(self, members: nn.ModuleList, base_model: str = '', candidates: Sequence[str] = AUTO_CANDIDATES,
                 rounds: int = 3):
        super().__init__(members, base_model)
        self.candidates = tuple(candidates)
        self.rounds = rounds
        self.strategies: dict[str, MemberStrategy] = {}
        self.refused: dict[str, str] = {}
        self.choices: dict[tuple, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}
        self.last_choice: str | None = None

    def _eligible(self, x: torch.Tensor) -> dict[str, MemberStrategy]:
        for name in self.candidates:
            if name in self.strategies or name in self.refused:
                continue
            base, _, kernel = name.partition(':')
            if base == 'vmap' and torch.is_autocast_enabled(x.device.type):
                # functorch's batching rules bypass autocast: vmap would compute in fp32, not as the loop does
                self.refused[name] = 'vmap does not apply autocast (it would run the members in fp32)'
                continue
            if base in self.refused:  # a kernel variant of a refused strategy
                self.refused[name] = self.refused[base]
                continue
            try:
                strategy = _build(base, self.members, self.base_model)
                # the check is the same for every kernel variant: once per strategy
                if base != 'loop' and not any(n.partition(':')[0] == base for n in self.strategies):
                    # the default probe (small, in float64 on the CPU) unless the model takes only inputs like x
                    _check(strategy, x.shape[1], fallback=x[:2] if x.shape[0] > 2 else x)
                if kernel:
                    strategy.set_conv_kernel(kernel)
                self.strategies[name] = strategy
            except StrategyError as e:
                self.refused[name] = str(e)
        return self.strategies

    def _choose(self, key: tuple, x: torch.Tensor, call: Callable[[MemberStrategy], Any]) -> str:
        eligible = self._eligible(x)
        if len(eligible) == 1:
            self.timings[key] = {}
            return next(iter(eligible))
        params = [p for p in self.members.parameters() if p.requires_grad]
        backward = torch.is_grad_enabled() and bool(params)

        def step(strategy: MemberStrategy) -> None:
            out = call(strategy)
            tensors = [out] if isinstance(out, torch.Tensor) else [out[0]] + [f for m in out[1] for f in m]
            if backward:
                torch.autograd.grad(sum(t.float().sum() for t in tensors), params, allow_unused=True)

        times: dict[str, list[float]] = {name: [] for name in eligible}
        with _preserved_state(self.members, x.device):
            for strategy in eligible.values():
                step(strategy)
            for _ in range(self.rounds):
                for name, strategy in eligible.items():
                    _synchronize(x.device)
                    t0 = time.perf_counter()
                    step(strategy)
                    _synchronize(x.device)
                    times[name].append(time.perf_counter() - t0)
        self.timings[key] = {name: statistics.median(t) for name, t in times.items()}
        return min(self.timings[key], key=self.timings[key].get)

    def _choice(self, kind: tuple, x: torch.Tensor, call: Callable[[MemberStrategy], Any]) -> str:
        key = (*kind, tuple(x.shape), x.dtype, x.device.type, self.members[0].training and torch.is_grad_enabled())
        if key not in self.choices:
            self.choices[key] = self._choose(key, x, call)
        self.last_choice = self.choices[key]
        return self.last_choice

    def _dispatch(self, kind: tuple, x: torch.Tensor, call: Callable[[MemberStrategy], Any]) -> Any:
        return call(self.strategies[self._choice(kind, x, call)])

    def prepare(self, x: torch.Tensor) -> str:
        """Make the choice for ``forward_members`` on batches like ``x`` now (in the current mode), without
        running it; the members' state is left as it was."""
        return self._choice(('logits',), x, lambda s: s.forward_members(x))

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        return self._dispatch(('logits',), x, lambda s: s.forward_members(x))

    def forward_members_with_features(self, x, taps='stages', indices=None):
        kind = (taps, indices if not isinstance(indices, list) else tuple(indices))
        return self._dispatch(kind, x, lambda s: s.forward_members_with_features(x, taps, indices))

    def info(self) -> dict[str, Any]:
        """What auto found: the eligible strategies, the refusals and, per kind of call, the median times (s)."""
        return dict(eligible=list(self.strategies), refused=dict(self.refused),
                    choices={str(k): v for k, v in self.choices.items()},
                    timings={str(k): v for k, v in self.timings.items()})


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def create_member_strategy(
        name: str, members: nn.ModuleList, base_model: str = '', in_chans: int = 3,
        example_input: torch.Tensor | None = None,
) -> MemberStrategy:
    """Build a strategy and, for ``vmap`` and ``grouped``, check it against the loop.

    Args:
        name: One of ``MEMBER_STRATEGIES``.
        members: The ensemble's members.
        base_model: The base model's name, for messages.
        in_chans: Input channels of the default probe batch.
        example_input: The probe batch of the check (``auto``: the batch its choice is made on, instead of the
            first call's); default: ``default_probe_input``.

    Raises:
        StrategyError: The strategy does not apply to this model.
    """
    if name not in MEMBER_STRATEGIES:
        raise ValueError(f"Unknown member strategy '{name}', expected one of {MEMBER_STRATEGIES}.")
    if name == 'auto':
        strategy = AutoStrategy(members, base_model)
        if example_input is not None:
            strategy.prepare(example_input)
        return strategy
    strategy = _build(name, members, base_model)
    if name != 'loop':
        try:
            _check(strategy, in_chans, example_input)
        except _LoopFailed:
            if example_input is not None:
                raise
            # no default probe fits the model (a user's model for one input size its config does not state):
            # check on the first real batch instead
            return _CheckedOnFirstCall(strategy)
    return strategy


class _CheckedOnFirstCall(MemberStrategy):
    """A strategy whose check against the loop waits for the first batch it is given."""

    def __init__(self, strategy: MemberStrategy):
        super().__init__(strategy.members, strategy.base_model)
        self.inner = strategy
        self.name = strategy.name
        self.checked = False

    def _ensure_checked(self, x: torch.Tensor) -> None:
        if not self.checked:
            verify_against_loop(self.inner, x.detach())
            self.checked = True

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        self._ensure_checked(x)
        return self.inner.forward_members(x)

    def forward_members_with_features(self, x, taps='stages', indices=None):
        self._ensure_checked(x)
        return self.inner.forward_members_with_features(x, taps, indices)
