"""Runs timm's own tests/test_models.py (from the timm source distribution that matches the installed timm, fetched
by .ci/timm-model-tests) against this package's registered model names.

TE_MODELS (comma-separated fnmatch patterns) picks the names; the default is one named variant of every family and
the catalog's tags, which CI runs. `TE_MODELS='*'` runs every registered name (about a hundred, with ResNet-50,
ViT and ConvNeXt bases at 224 px: hours on a CPU).

The tests that cannot apply to a model of its kind are listed in EXCEPTIONS below, the one place they are written
down, each with the reason; they are expected to fail (strict xfail), so an exception that stops being one is noticed.
"""
import fnmatch
import os

import pytest

import timm_ensembles  # noqa: F401  (registers the package's models before timm's tests list them)

DEFAULT = ('fdl_resnet18x2', 'ens_resnet18x2', 'collab_resnet18x2', 'collab_resnet18x4', 'ban_resnet18',
           'meal_resnet18', 'bane', 'ensemble', 'fdl', 'ens', 'collab', 'ban', 'meal', '*.fmnist')
PATTERNS = tuple(os.environ['TE_MODELS'].split(',')) if os.environ.get('TE_MODELS') else DEFAULT
OURS = {'fdl', 'ens', 'collab', 'ban', 'meal', 'bane', 'ensemble'}  # the package's methods, the prefixes of its names

# (test, model patterns, reason): expected failures, decided per kind of model
EXCEPTIONS = [
    ('test_model_forward_torchscript', ('fdl*', 'ens*', 'collab*', 'bane*'),
     'not scriptable: an ensemble runs its members through a Python member strategy (loop, vmap, grouped fusion), a'
     ' collaborative net dispatches its segments between heads in Python; students script as their base does'),
    ('test_model_backward', ('collab*',),
     "forward() is the designated head, the network that ships (export_head): the other heads' branches get no"
     ' gradient from it; they learn through forward_members() in the collaborative task'),
    ('test_model_backward_fx', ('collab*',), 'as test_model_backward'),
    ('test_model_load_pretrained', ('*.fmnist',),
     "downloads a published catalog tag's weights from the Hub, which CI cannot reach (timm collects only published"
     " tags: list_models(pretrained=True) lists no unpublished one; hub/README.md)"),
    ('test_model_features_pretrained', ('*.fmnist',), 'as test_model_load_pretrained'),
]
# names timm's tests cannot create: their arguments have no default
UNBUILDABLE = {
    'bane': 'a BAN ensemble is made of trained generations (timm_ensembles.create_bane(folders), or generations=...)',
    'ensemble': 'an ensemble of trained models is made of them (members=[folders, hf-hub:, timm names])',
    **{m: f"the generic '{m}' entrypoint needs base_model=<timm name> (the named variants are tested)"
       for m in ('fdl', 'ens', 'collab', 'ban', 'meal')},
}


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, 'callspec', None)
        name = callspec.params.get('model_name') if callspec else None
        if not isinstance(name, str) or not any(fnmatch.fnmatch(name, p) for p in PATTERNS):
            drop.append(item)
            continue
        arch = name.split('.')[0]
        if arch.split('_')[0] not in OURS and arch not in OURS:
            drop.append(item)  # a timm model the patterns happen to match
            continue
        if arch in UNBUILDABLE:
            item.add_marker(pytest.mark.skip(reason=UNBUILDABLE[arch]))
        test = item.originalname
        for exc_test, models, reason in EXCEPTIONS:
            if test == exc_test and any(fnmatch.fnmatch(name, m) for m in models):
                item.add_marker(pytest.mark.xfail(strict=True, reason=reason))
        keep.append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
