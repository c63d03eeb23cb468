import os

import pytest
import torch

# tests never reach a network; fail fast instead of hanging on a download
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# one torch thread per pytest-xdist worker: more threads than free cores makes CPU steps many times slower
torch.set_num_threads(1 if os.environ.get('PYTEST_XDIST_WORKER') else min(2, os.cpu_count() or 1))

TINY_BASES = ('test_resnet', 'test_vit', 'test_efficientnet', 'test_convnext')
METHODS = ('fdl', 'ens')
IMG = 32


def model_kwargs(base: str, **kwargs):
    """Arguments that build a tiny base for 32 px input (ViTs are built for their input size)."""
    if base.startswith('test_vit'):
        kwargs.setdefault('img_size', IMG)
    return kwargs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A user's own model, registered with timm as a user would: one convolution layer and a linear classifier, no
# normalisation layer (the FDL paper's MNIST network), with no forward_intermediates.
class _PlainConvNet(torch.nn.Module):
    def __init__(self, num_classes=10, in_chans=3, num_filters=8, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = num_filters * 16
        self.conv = torch.nn.Conv2d(in_chans, num_filters, 5, padding=2)
        self.fc = torch.nn.Linear(self.num_features, num_classes)

    def forward_features(self, x):
        return torch.nn.functional.adaptive_max_pool2d(self.conv(x).relu(), 4)

    def forward_head(self, x, pre_logits=False):
        x = x.flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.fc

    def reset_classifier(self, num_classes, global_pool=None):
        self.num_classes = num_classes
        self.fc = torch.nn.Linear(self.num_features, num_classes)


def _register_plain_net():
    import sys

    from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
    module = sys.modules[__name__]
    module.default_cfgs = generate_default_cfgs({'te_plain_net': dict(
        num_classes=10, mean=(0.5,), std=(0.5,), input_size=(1, 28, 28), first_conv='conv', classifier='fc')})

    def te_plain_net(pretrained=False, **kwargs):
        return build_model_with_cfg(_PlainConvNet, 'te_plain_net', pretrained, **kwargs)
    te_plain_net.__module__ = __name__
    register_model(te_plain_net)


_register_plain_net()
