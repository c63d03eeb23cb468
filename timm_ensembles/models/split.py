"""Cutting a timm model at its stage boundaries: the layouts behind multi-head networks that share low layers.

A layout describes a model's ``forward`` as a sequence of segments: the stem, the stages (blocks for ViTs), and the
tail (the end of ``forward_features`` followed by ``forward_head``). Running the segments in order gives exactly
``model(x)``; a network that shares its first k stages runs the stem and stages 1..k once and the rest per branch.

timm has no "forward from stage k" API, so a layout is written per model family, against its ``forward_features``.
Families with a layout: ResNet (and wide ResNets, ResNeXts), EfficientNet, MobileNetV3, ConvNeXt, VisionTransformer,
VGG, DenseNet. Another family gets one with ``@register_split_layout(ModelClass)``.
"""
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ['SplitLayout', 'register_split_layout', 'get_split_layout', 'grad_rescale']


@dataclass
class SplitLayout:
    """Where a model can be cut.

    Attributes:
        stages: Module paths of each stage, in order (a stage may be several modules run one after another).
        tail: Module paths run, in order, after the last stage to finish ``forward_features``.
        head_paths: Module or parameter paths that ``forward_head`` uses (the tail owns them with ``tail``).
        stem: Module or parameter paths of the stem, run in order before the first stage unless ``stem_fn`` is
            given.
        stem_fn: ``stem_fn(model, x)`` for stems that are more than modules in a row (a ViT's embeddings).

    Every parameter and buffer of the model must lie under one of the paths (``check``), so that no weight is
    shared or dropped by mistake when a model this layout does not foresee is cut.
    """
    stages: list[list[str]]
    tail: list[str] = field(default_factory=list)
    head_paths: list[str] = field(default_factory=list)
    stem: list[str] = field(default_factory=list)
    stem_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_segments(self) -> int:
        """Stem, stages, tail: segment 0 is the stem, 1..n the stages, n + 1 the tail."""
        return self.num_stages + 2

    def run(self, model: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
        """Run segment ``index`` of ``model`` (the tail ends with ``forward_features``; see ``run_head``)."""
        if index == 0:
            return self.stem_fn(model, x) if self.stem_fn is not None else _run_paths(model, self.stem, x)
        if index <= self.num_stages:
            return _run_paths(model, self.stages[index - 1], x)
        return _run_paths(model, self.tail, x)

    def segment_of(self, name: str) -> int:
        """The segment that owns a parameter or buffer name of the model."""
        for i, paths in enumerate(self.stages):
            if _under(name, paths):
                return i + 1
        if _under(name, self.tail) or _under(name, self.head_paths):
            return self.num_stages + 1
        if _under(name, self.stem):
            return 0
        raise ValueError(f"'{name}' lies in no segment of the split layout.")

    def check(self, model: nn.Module, model_name: str) -> None:
        """Raise if a parameter or buffer of ``model`` lies outside every path of the layout."""
        for name in model.state_dict():
            try:
                self.segment_of(name)
            except ValueError:
                raise ValueError(
                    f"The split layout of {type(model).__name__} does not place '{name}' of '{model_name}' (a"
                    f' configuration it does not foresee). Register a layout that does with'
                    f' timm_ensembles.register_split_layout.'
                ) from None



def _under(name: str, paths: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + '.') for p in paths)


def _run_paths(model: nn.Module, paths: Sequence[str], x: torch.Tensor) -> torch.Tensor:
    for path in paths:
        x = model.get_submodule(path)(x)
    return x


_layouts: dict[type, Callable[[nn.Module], SplitLayout]] = {}


def register_split_layout(model_cls: type) -> Callable:
    """Decorator: ``fn(model) -> SplitLayout`` describes models of ``model_cls`` (and subclasses)."""
    def _register(fn: Callable[[nn.Module], SplitLayout]) -> Callable[[nn.Module], SplitLayout]:
        _layouts[model_cls] = fn
        return fn
    return _register


def get_split_layout(model: nn.Module, model_name: str = '') -> SplitLayout:
    """The layout of a timm model, found through its class hierarchy; a clear error for families without one."""
    for cls in type(model).__mro__:
        if cls in _layouts:
            layout = _layouts[cls](model)
            if layout.num_stages < 1:
                raise ValueError(f"Model '{model_name or type(model).__name__}' has no stages to split.")
            layout.check(model, model_name or type(model).__name__)
            return layout
    families = sorted(c.__name__ for c in _layouts)
    raise ValueError(
        f"Cannot split '{model_name or type(model).__name__}' ({type(model).__name__}) into a shared trunk and heads:"
        f' layouts exist for {families}. Register one for {type(model).__name__} with'
        f' timm_ensembles.register_split_layout (see timm_ensembles/models/split.py).'
    )


def _existing(model: nn.Module, paths: Iterable[str]) -> list[str]:
    out = []
    for p in paths:
        parent, _, name = p.rpartition('.')
        owner = model.get_submodule(parent) if parent else model
        if getattr(owner, name, None) is not None:
            out.append(p)
    return out


class _GradRescale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def grad_rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the gradient is multiplied by ``scale`` backward (backpropagation rescaling)."""
    return _GradRescale.apply(x, scale)


# ---- layouts of timm's families ----
# Each mirrors the family's forward_features in timm (checked by the export-equality tests over the test models).

def _register_builtin() -> None:
    from timm.models.convnext import ConvNeXt
    from timm.models.densenet import DenseNet
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.resnet import ResNet
    from timm.models.vgg import VGG
    from timm.models.vision_transformer import VisionTransformer

    @register_split_layout(ResNet)
    def _resnet(model: nn.Module) -> SplitLayout:
        return SplitLayout(stem=['conv1', 'bn1', 'act1', 'maxpool'],
                           stages=[[f'layer{i}'] for i in range(1, 5) if hasattr(model, f'layer{i}')],
                           head_paths=_existing(model, ['global_pool', 'fc']))

    @register_split_layout(EfficientNet)
    def _efficientnet(model: nn.Module) -> SplitLayout:
        return SplitLayout(stem=['conv_stem', 'bn1'], stages=[[f'blocks.{i}'] for i in range(len(model.blocks))],
                           tail=['conv_head', 'bn2'], head_paths=_existing(model, ['global_pool', 'classifier']))

    @register_split_layout(MobileNetV3)
    def _mobilenetv3(model: nn.Module) -> SplitLayout:
        # conv_head runs after pooling here, inside forward_head
        return SplitLayout(stem=['conv_stem', 'bn1'], stages=[[f'blocks.{i}'] for i in range(len(model.blocks))],
                           head_paths=_existing(model, ['global_pool', 'conv_head', 'norm_head', 'act2', 'classifier']))

    @register_split_layout(ConvNeXt)
    def _convnext(model: nn.Module) -> SplitLayout:
        return SplitLayout(stem=['stem'], stages=[[f'stages.{i}'] for i in range(len(model.stages))],
                           tail=['norm_pre'], head_paths=['head'])

    @register_split_layout(VisionTransformer)
    def _vit(model: nn.Module) -> SplitLayout:
        if getattr(model, 'distilled_training', False):
            raise ValueError('A distilled ViT in distilled training returns two outputs; it cannot be split.')

        def stem_fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            x = m.patch_embed(x)
            x = m._pos_embed(x)
            x = m.patch_drop(x)
            return m.norm_pre(x)
        stem = ['patch_embed', 'cls_token', 'reg_token', 'dist_token', 'pos_embed', 'pos_drop', 'patch_drop',
                'norm_pre']
        head = ['attn_pool', 'fc_norm', 'head_drop', 'head', 'head_dist']
        return SplitLayout(stem=_existing(model, stem), stem_fn=stem_fn,
                           stages=[[f'blocks.{i}'] for i in range(len(model.blocks))],
                           tail=['norm'], head_paths=_existing(model, head))

    @register_split_layout(VGG)
    def _vgg(model: nn.Module) -> SplitLayout:
        # a stage ends at each max-pool of `features`
        stages, current = [], []
        for name, module in model.features.named_children():
            current.append(f'features.{name}')
            if isinstance(module, nn.MaxPool2d):
                stages.append(current)
                current = []
        if current:
            stages.append(current)
        return SplitLayout(stages=stages, head_paths=['pre_logits', 'head'])

    @register_split_layout(DenseNet)
    def _densenet(model: nn.Module) -> SplitLayout:
        # stem up to the first dense block; a stage is a dense block and the transition after it
        stem, stages, tail = [], [], []
        for name, _ in model.features.named_children():
            path = f'features.{name}'
            if name.startswith('denseblock'):
                stages.append([path])
            elif name.startswith('transition') and stages:
                stages[-1].append(path)
            elif stages:
                tail.append(path)
            else:
                stem.append(path)
        return SplitLayout(stem=stem, stages=stages, tail=tail,
                           head_paths=_existing(model, ['global_pool', 'head_drop', 'classifier']))


_register_builtin()
