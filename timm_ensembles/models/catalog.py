"""The catalog of this package's models: pretrained tags of the registered names, published on the Hub or not yet.

Each entry becomes the pretrained cfg of ``<name>.<tag>`` in the default cfgs of the name's method module, so
``timm.create_model('fdl_resnet18x2.fmnist')`` builds the model with the tag's preprocessing and class count, and,
once the entry is published, ``pretrained=True`` fetches its weights from ``HUB_ORG/<name>.<tag>`` (after
``import timm_ensembles``). Only a published entry gets a weights source (``hf_hub_id``) in its cfg, so timm's
``list_pretrained()`` and ``list_models(pretrained=True)`` list it and no other: an unpublished tag is listed as a tag
(``list_models(include_tags=True)``), never as weights. Students and exported heads are plain timm models: they are
listed in ``hub/README.md`` and loaded by their ``hf-hub:`` name, without a tag here. The training command and the
results of every entry are in ``hub/README.md``; keep the two in step.
"""
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ['CATALOG', 'HUB_ORG', 'catalog_cfgs', 'check_published', 'hub_repo', 'published_tags', 'unpublished_entry']

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
# the train.py flags of seed 0 of each Fashion-MNIST study (docs/results.md; hub/README.md, "Catalog")
_FMNIST_TRAIN = '--dataset fashion-mnist --train-subset 10000 --epochs 5 --seed 0'

# '<registered name>.<tag>' -> the tag's pretrained cfg, and two entries of the catalog's own: ``published``, whether
# its weights are on the Hub as hub_repo(<name>.<tag>) (set it to True once `python hub/push.py` has uploaded them:
# timm lists the tag from then on), and ``train``, the train.py flags that make it
CATALOG: dict[str, dict[str, Any]] = {
    'ens_resnet18x2.fmnist': dict(published=False, train=_FMNIST_TRAIN, **_FMNIST),
    'fdl_resnet18x2.fmnist': dict(published=False, train=_FMNIST_TRAIN, **_FMNIST),
    'collab_resnet18x2.fmnist': dict(published=False, train=_FMNIST_TRAIN, **_FMNIST),
    'collab_resnet18x4.fmnist': dict(published=False, train=_FMNIST_TRAIN, **_FMNIST),
}
_OWN_KEYS = ('published', 'train')


def hub_repo(name_tag: str) -> str:
    """The Hub repo of a catalog entry: ``HUB_ORG/<name>.<tag>``."""
    return f'{HUB_ORG}/{name_tag}'


def unpublished_entry(repo_id: str) -> str | None:
    """The catalog entry (``<name>.<tag>``) whose Hub repo is ``repo_id`` and that is still marked unpublished."""
    return next((k for k, v in CATALOG.items() if hub_repo(k) == repo_id and not v['published']), None)


def published_tags() -> list[str]:
    """The catalog's entries whose weights are on the Hub."""
    return [k for k, v in CATALOG.items() if v['published']]


def catalog_cfgs(names) -> dict[str, dict[str, Any]]:
    """Pretrained cfgs of the catalog's entries whose architecture is one of ``names``: a published entry's names its
    Hub repo; an unpublished entry's has no weights source, so that timm registers the tag without listing weights."""
    names = set(names)
    cfgs = {}
    for name_tag, entry in CATALOG.items():
        if name_tag.split('.')[0] in names:
            cfgs[name_tag] = {k: v for k, v in entry.items() if k not in _OWN_KEYS}
            if entry['published']:
                cfgs[name_tag]['hf_hub_id'] = hub_repo(name_tag)
    return cfgs


def check_published(name_tag: str) -> None:
    """Raise a ValueError saying what exists and how to train it when ``name_tag`` is an unpublished catalog entry."""
    entry = CATALOG.get(name_tag)
    if entry is None or entry['published']:
        return
    published = ', '.join(published_tags()) or 'none'
    arch = name_tag.split('.')[0]
    raise ValueError(
        f"'{name_tag}' is not published: its weights are on no Hub yet (hub/README.md, \"Catalog\"; published tags:"
        f" {published}). Train it as hub/README.md does, `accelerate launch train.py --model {arch} {entry['train']}"
        f" --output <folder>` (`-m timm_ensembles.train` outside a checkout), then load the folder with"
        f" timm.create_model('local-dir:<folder>', pretrained=True); '{name_tag}' without pretrained=True builds"
        f" the untrained model with the tag's preprocessing."
    )
