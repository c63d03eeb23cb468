"""``grouped``: the members fused into one network whose tensors hold them side by side on the channel axis.

Convolutions become grouped convolutions, BatchNorm runs over ``N x C`` channels, the linear classifier a batched
matmul; the fused layers read their weights from the members at every call, so the members stay the source of truth.
"""
import copy
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import DEFAULT_FEATURE_TAPS, MemberStrategy, StrategyError, _synchronize, stage_features, tapped_convs

__all__ = ['GroupedStrategy']

# timed runs per kernel when a fused convolution tunes, and how much faster the grouped kernel must be to be chosen
_TUNE_RUNS = 5
_TUNE_MARGIN = 0.9


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

    def forward_members_with_features(self, x, taps=DEFAULT_FEATURE_TAPS, indices=None):
        self._sync_modes()
        if taps in ('stages', 'preact'):
            self._check_stage_taps()
            logits, inter = stage_features(self.fused, x, taps, indices)
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
