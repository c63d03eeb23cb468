"""The FDL paper's MNIST network, registered with timm: one convolution layer of M filters and a linear classifier.

``convnet1`` (``num_filters=M``): a 5x5 convolution with M filters (padding 2), ReLU, 2x2 max pooling, and a linear
classifier over the flattened maps; no normalisation layer. Import it where a run names it:
``python train.py --import convnet --model fdl_convnet1x2 ...`` with this folder on ``PYTHONPATH`` (the study scripts
set it).
"""
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn


class _OneLayerNet(nn.Module):
    """What the two networks share: the flattened maps of their one layer into a linear classifier (``fc``)."""

    def _set_classifier(self, num_features: int, num_classes: int) -> None:
        self.num_features = num_features
        self.num_classes = num_classes
        self.fc = nn.Linear(num_features, num_classes) if num_classes else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        self._set_classifier(self.num_features, num_classes)


class ConvNet1(_OneLayerNet):
    """One convolution layer and a linear classifier.

    Args:
        num_classes: Number of classes (0: no classifier, ``forward`` gives the flattened maps).
        in_chans: Input channels.
        num_filters: Filters of the convolution (the paper's M).
        img_size: Input side; the classifier's width follows from it.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, num_filters: int = 16, img_size: int = 28, **kwargs):
        super().__init__()
        self.num_filters = num_filters
        self.conv = nn.Conv2d(in_chans, num_filters, 5, padding=2)
        self._set_classifier(num_filters * (img_size // 2) ** 2, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.max_pool2d(self.conv(x).relu(), 2)


default_cfgs = generate_default_cfgs({'convnet1': dict(
    num_classes=10, input_size=(1, 28, 28), mean=(0.1307,), std=(0.3081,), crop_pct=1.0, interpolation='bilinear',
    first_conv='conv', classifier='fc')})


@register_model
def convnet1(pretrained: bool = False, **kwargs) -> ConvNet1:
    return build_model_with_cfg(ConvNet1, 'convnet1', pretrained, **kwargs)


class ConvNet1BN(_OneLayerNet):
    """The FDL reference's BatchNorm MNIST network (``basic_mnist.py``): a 3x3 convolution of M filters at stride 2,
    BatchNorm, ReLU, 2x2 max pooling, and a linear classifier over the flattened 7x7 maps.

    ``forward_intermediates`` gives the one stage the reference's -MSE step compares: the pooled maps after BatchNorm
    and ReLU. The ReLU is a function, not a module, so FDL's default taps ('preact') find no activation to take the
    maps before, and take them as ``feature_taps='stages'`` does.

    Args:
        num_classes: Number of classes (0: no classifier).
        in_chans: Input channels.
        num_filters: Filters of the convolution (M).
        img_size: Input side; the classifier's width follows from it.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, num_filters: int = 16, img_size: int = 28, **kwargs):
        super().__init__()
        self.num_filters = num_filters
        self.conv = nn.Conv2d(in_chans, num_filters, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(num_filters)
        self._set_classifier(num_filters * (img_size // 4) ** 2, num_classes)
        self.feature_info = [dict(num_chs=num_filters, reduction=4, module='bn')]
        # the reference's initialisation of the convolution: He normal over the fan-out, zero bias
        nn.init.normal_(self.conv.weight, 0, (2.0 / (9 * num_filters)) ** 0.5)
        nn.init.zeros_(self.conv.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.max_pool2d(self.bn(self.conv(x)).relu(), 2)

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = 'NCHW', intermediates_only: bool = False):
        """timm's contract for a network of one stage: ``(final features, [pooled maps])``, the two the same here."""
        features = self.forward_features(x)
        return [features] if intermediates_only else (features, [features])



default_cfgs.update(generate_default_cfgs({'convnet1bn': dict(
    num_classes=10, input_size=(1, 28, 28), mean=(0.1307,), std=(0.3081,), crop_pct=1.0, interpolation='bilinear',
    first_conv='conv', classifier='fc')}))


@register_model
def convnet1bn(pretrained: bool = False, **kwargs) -> ConvNet1BN:
    return build_model_with_cfg(ConvNet1BN, 'convnet1bn', pretrained, **kwargs)
