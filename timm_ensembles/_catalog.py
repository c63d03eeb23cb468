"""The published models of this package: pretrained tags of the registered names and their Hub repos.

Each entry becomes the pretrained cfg of ``<name>.<tag>`` in the default cfgs of the name's method module, so
``timm.create_model('fdl_resnet18x2.fmnist', pretrained=True)`` fetches ``hf_hub_id`` (after
``import timm_ensembles``). Students and exported heads are plain timm models: they are listed in ``hub/README.md``
and loaded by their ``hf-hub:`` name, without a tag here. The training command and the results of every entry are in
``hub/README.md``; keep the two in step.
"""
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ['PUBLISHED', 'HUB_ORG', 'published_cfgs']

HUB_ORG = 'timm-ensembles'

FASHION_MNIST_LABELS = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')

# the preprocessing train.py evaluated the Fashion-MNIST studies with (resolve_data_config of the base with the
# dataset's 32 px and no crop): 28 px images resized to 32 with the base's interpolation and (ImageNet)
# normalisation, grayscale repeated to 3 channels
_FMNIST = dict(
    num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD, label_names=FASHION_MNIST_LABELS,
)

# '<registered name>.<tag>' -> its pretrained cfg; seed 0 of each Fashion-MNIST study (README, "Results")
PUBLISHED: dict[str, dict[str, Any]] = {
    f'{name}.fmnist': dict(hf_hub_id=f'{HUB_ORG}/{name}.fmnist', **_FMNIST)
    for name in ('ens_resnet18x2', 'fdl_resnet18x2', 'collab_resnet18x2', 'collab_resnet18x4')
}


def published_cfgs(names) -> dict[str, dict[str, Any]]:
    """The entries of ``PUBLISHED`` whose architecture is one of ``names``."""
    names = set(names)
    return {k: dict(v) for k, v in PUBLISHED.items() if k.split('.')[0] in names}
