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
