"""Shared construction of the ensemble models: timm's builder, the base model's data config, named variants."""
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._pretrained import PretrainedCfg
from timm.models._registry import get_pretrained_cfg
from torch import nn

from ._catalog import published_cfgs
from ._registry import register_ensemble_method, register_student_method

__all__ = [
    'create_ensemble', 'ensemble_cfg', 'register_ensemble_variants', 'register_student_variants', 'DEFAULT_BASES',
    'DEFAULT_SIZES',
]

# the bases and member counts that get pre-registered names (<method>_<base>x<N>); any other timm model works
# through the generic entrypoint and timm_ensembles.create_model
DEFAULT_BASES = (
    'resnet18', 'resnet34', 'resnet50', 'vgg16_bn', 'densenet121', 'wide_resnet50_2', 'efficientnet_b0',
    'convnext_tiny', 'vit_small_patch16_224',
)
DEFAULT_SIZES = (2, 3, 4)

# preprocessing and input entries an ensemble takes from its base model's config, so that
# timm.data.resolve_data_config(model=ensemble) gives what the base model would
BASE_CFG_KEYS = (
    'input_size', 'test_input_size', 'min_input_size', 'fixed_input_size', 'interpolation', 'test_interpolation',
    'crop_pct', 'test_crop_pct', 'crop_mode', 'mean', 'std', 'num_classes', 'label_names', 'label_descriptions',
)
_SOURCE_KEYS = ('url', 'file', 'state_dict', 'hf_hub_id')


def ensemble_cfg(**kwargs: Any) -> dict[str, Any]:
    """Default pretrained cfg of an ensemble entry; the base model's data config is added at creation."""
    return dict(license='apache-2.0', **kwargs)


def create_ensemble(model_cls: type[nn.Module], variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build an ensemble through timm's ``build_model_with_cfg``.

    Args:
        model_cls: The ensemble class.
        variant: Registered name the model is built under.
        pretrained: Load the ensemble's own published weights (from its pretrained cfg).
        **kwargs: Ensemble arguments (``base_model``, ``num_members``, ...) and the kwargs timm injects.
    """
    base_model = kwargs.get('base_model')
    if base_model is None:
        raise ValueError(f"'{variant}' needs base_model=<timm model name>, e.g. timm.create_model('{variant}',"
                         f" base_model='resnet18', num_members=2).")
    pretrained_cfg = kwargs.pop('pretrained_cfg', None)
    if not isinstance(pretrained_cfg, (dict, PretrainedCfg)):
        # a registry cfg (by tag or default) describes the ensemble's weights; its data config is the base's
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg).to_dict()
        if not any(cfg.get(k) for k in _SOURCE_KEYS):
            # a published tag's cfg (hub/README.md) describes its own weights and keeps its own data config
            base_cfg = get_pretrained_cfg(base_model) if ':' not in base_model else None
            base_cfg = base_cfg.to_dict() if base_cfg is not None else PretrainedCfg().to_dict()
            cfg.update({k: base_cfg[k] for k in BASE_CFG_KEYS if base_cfg.get(k) is not None})
        pretrained_cfg = cfg
    cfg_dict = pretrained_cfg.to_dict() if isinstance(pretrained_cfg, PretrainedCfg) else pretrained_cfg
    if pretrained:
        if not any(cfg_dict.get(k) for k in _SOURCE_KEYS):
            raise ValueError(
                f"'{variant}' has no published weights of its own (pretrained=True loads the ensemble's weights)."
                f" Use pretrained_base=True to initialise every member from timm's weights of '{base_model}'."
            )
        # the ensemble's own weights replace every member's, so the base weights need not be fetched
        kwargs['pretrained_base'] = False
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_cfg=pretrained_cfg, **kwargs)
    except TypeError as e:
        unknown = re.findall(r"unexpected keyword argument '(\w+)'", str(e))
        if not unknown:
            raise
        from . import __version__
        # timm passes config.json's model_args here on a reload: a newer version may have written arguments this one
        # does not know
        raise TypeError(
            f"'{variant}' does not take the argument(s) {unknown} (timm-ensembles {__version__}, timm"
            f" {timm.__version__}). If they come from a config.json written by a newer timm-ensembles, upgrade it"
            f" (pip install -U timm-ensembles); otherwise drop them. ({e})"
        ) from e
    except RuntimeError as e:
        if not pretrained or not any(s in str(e) for s in ('size mismatch', 'Missing key', 'Unexpected key')):
            raise
        source = cfg_dict.get('hf_hub_id') or cfg_dict.get('file') or cfg_dict.get('url') or variant
        detail = '; '.join(line.strip() for line in str(e).splitlines()[1:4])
        raise RuntimeError(
            f"The weights of '{source}' do not fit the '{variant}' model its config describes ({detail} ...): its"
            f" model.safetensors and config.json come from different models, or one of them was edited. Export the"
            f" model again (train.py, timm_ensembles.hub.push_to_hub) so that both describe the same model."
        ) from e


def register_ensemble_variants(
        module_name: str,
        method: str,
        create_fn: Callable[..., nn.Module],
        description: str,
        bases: Iterable[str] = DEFAULT_BASES,
        sizes: Iterable[int] = DEFAULT_SIZES,
        size_arg: str = 'num_members',
        size_args: dict[int, dict[str, Any]] | None = None,
        **cfg: Any,
) -> None:
    """Register ``<method>`` (generic) and ``<method>_<base>x<N>`` with timm, on behalf of a method module.

    timm's ``register_model`` reads ``default_cfgs`` from the module that defines an entrypoint, so the
    entrypoints made here are given that module's name and its ``default_cfgs`` is filled first.

    Args:
        module_name: ``__name__`` of the method module (it must define ``default_cfgs`` or get one here).
        method: Generic entrypoint name, e.g. 'fdl'.
        create_fn: ``create_fn(variant, pretrained=False, **kwargs)`` builds the model.
        description: One line, e.g. 'FDL ensemble', used in the entrypoints' docstrings.
        bases: Base models that get named variants.
        sizes: Member (or head) counts that get named variants.
        size_arg: The argument that the ``x<N>`` of a name sets.
        size_args: Further fixed arguments of the variants of a size, e.g. ``{4: dict(hierarchy=[2, 2])}``.
        **cfg: Pretrained-cfg entries common to the method (``paper_ids``, ``paper_name``).
    """
    variants = {method: {}}
    size_args = size_args or {}
    variants.update({
        f'{method}_{b}x{n}': {'base_model': b, size_arg: n, **size_args.get(n, {})} for b in bases for n in sizes
    })
    register_ensemble_method(method, description, size_arg, size_args)
    _register(module_name, variants, create_fn, description, size_arg, cfg)


def register_student_variants(
        module_name: str,
        method: str,
        create_fn: Callable[..., nn.Module],
        description: str,
        bases: Iterable[str] = DEFAULT_BASES,
        **cfg: Any,
) -> None:
    """Register ``<method>`` (generic, ``base_model=``) and ``<method>_<base>`` with timm, for a method whose model
    is one network of the base's architecture (a distillation student). See ``register_ensemble_variants``."""
    variants = {method: {}}
    variants.update({f'{method}_{b}': {'base_model': b} for b in bases})
    register_student_method(method, description)
    _register(module_name, variants, create_fn, description, None, cfg)


def _register(module_name: str, variants: dict[str, dict[str, Any]], create_fn: Callable, description: str,
              size_arg: str | None, cfg: dict[str, Any]) -> None:
    module = sys.modules[module_name]
    # timm makes the first tag with weights an architecture's default; a '*' tag listed after the published tags
    # takes that place back, so that the untagged name keeps building a fresh model with the base's data config
    entries = {k: ensemble_cfg(**{**cfg, **v}) for k, v in published_cfgs(variants).items()}
    entries.update({f'{name}.*': ensemble_cfg(**cfg) for name in variants})
    cfgs = generate_default_cfgs(entries)
    if not hasattr(module, 'default_cfgs'):
        module.default_cfgs = {}
    module.default_cfgs.update(cfgs)
    for name, fixed in variants.items():
        fn = _make_entrypoint(name, fixed, create_fn, description, size_arg)
        fn.__module__ = module_name
        setattr(module, name, register_model(fn))


def _make_entrypoint(
        name: str, fixed: dict[str, Any], create_fn: Callable, description: str, size_arg: str | None,
) -> Callable:
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        for key, value in fixed.items():
            given = kwargs.setdefault(key, value)
            # a config.json round trip turns tuples into lists
            if (list(given) if isinstance(given, tuple) else given) != value:
                raise ValueError(f"'{name}' is built with {key}={value!r}; got {key}={kwargs[key]!r}. Use the"
                                 f" generic '{name.split('_')[0]}' model to choose it.")
        return create_fn(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    if fixed and size_arg is None:
        entrypoint.__doc__ = f"{description}: {fixed['base_model']}."
    elif fixed:
        entrypoint.__doc__ = f"{description}: {fixed[size_arg]} x {fixed['base_model']}."
    elif size_arg is None:
        entrypoint.__doc__ = f"{description} of any timm model: base_model=<timm name>."
    else:
        entrypoint.__doc__ = f"{description} of any timm model: base_model=<timm name>, {size_arg}=N (>= 2)."
    return entrypoint
