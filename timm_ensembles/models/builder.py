"""Shared construction of the ensemble models: timm's builder, the base model's data config, named variants."""
import contextlib
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import timm
from timm.models import (
    PretrainedCfg,
    build_model_with_cfg,
    generate_default_cfgs,
    get_pretrained_cfg,
    load_pretrained,
    register_model,
    resolve_pretrained_cfg,
)
from torch import nn

from ..files.model_folder import check_weights
from ..files.run_folder import RunFolder
from ..utils.checks import check_whole
from ..utils.extras import INSTALL_FROM_SOURCE
from ..utils.timm_compat import FeatureGetterNet
from ..version import __version__
from .catalog import catalog_cfgs, check_published
from .hub import _hub_name, _require_safetensors, check_timm_source, hub_download_errors
from .registry import register_ensemble_method, register_student_method

__all__ = [
    'adaptable_layers', 'create_ensemble', 'ensemble_cfg', 'register_ensemble_variants', 'register_student_variants',
    'register_models',
    'DEFAULT_BASES', 'DEFAULT_SIZES',
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
    check_whole('num_classes', kwargs.get('num_classes'), 'a whole number >= 0 (0: no classifier)', ge=0,
                optional=True)
    base_model = kwargs.get('base_model')
    base_free = getattr(model_cls, 'base_free', False)  # built from its members' configs, not one base model's
    if base_model is None and not base_free:
        raise ValueError(f"'{variant}' needs base_model=<timm model name>, e.g. timm.create_model('{variant}',"
                         f" base_model='resnet18', num_members=2).")
    pretrained_cfg = kwargs.pop('pretrained_cfg', None)
    if not isinstance(pretrained_cfg, (dict, PretrainedCfg)):
        # a registry cfg (by tag or default) describes the ensemble's weights; its data config is the base's
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg).to_dict()
        base_cfg = get_pretrained_cfg(base_model) if base_model and ':' not in base_model else None
        base_cfg = base_cfg.to_dict() if base_cfg is not None else PretrainedCfg().to_dict()
        if not cfg.get('tag') and not any(cfg.get(k) for k in _SOURCE_KEYS):
            # the untagged default takes the base's data config; a catalog tag's cfg (hub/README.md), published or
            # not, and weights of another source keep their own
            cfg.update({k: base_cfg[k] for k in BASE_CFG_KEYS if base_cfg.get(k) is not None})
        cfg['pool_size'] = _pool_size(base_cfg, cfg.get('input_size'))
        if base_free:
            # no defaults to pass on: the class count and input come from the members (filled in after the build)
            cfg.update(num_classes=-1, input_size=None)
        pretrained_cfg = cfg
    cfg_dict = pretrained_cfg.to_dict() if isinstance(pretrained_cfg, PretrainedCfg) else pretrained_cfg
    if pretrained:
        if cfg_dict.get('tag'):
            check_published(f"{variant}.{cfg_dict['tag']}")  # a catalog entry whose weights are not uploaded yet
        if not any(cfg_dict.get(k) for k in _SOURCE_KEYS):
            raise ValueError(
                f"'{variant}' has no published weights of its own (pretrained=True loads the ensemble's weights)."
                f" Use pretrained_base=True to initialise every member from timm's weights of '{base_model}'."
            )
        # the ensemble's own weights replace every member's, so the base weights need not be fetched
        if not base_free:
            kwargs['pretrained_base'] = False
    try:
        features_only = kwargs.pop('features_only', False)
        out_indices = kwargs.pop('out_indices', None)
        feature_cls = kwargs.pop('feature_cls', 'getter')

        # with pretrained_base the members (heads, student) fetch timm's weights of the base as they are built
        with hub_download_errors(base_model) if isinstance(base_model, str) else contextlib.nullcontext():
            model = build_model_with_cfg(model_cls, variant, pretrained=False, pretrained_cfg=pretrained_cfg, **kwargs)
    except TypeError as e:
        unknown = re.findall(r"unexpected keyword argument '(\w+)'", str(e))
        if not unknown:
            raise
        # timm passes config.json's model_args here on a reload: a newer version may have written arguments this one
        # does not know
        raise TypeError(
            f"'{variant}' does not take the argument(s) {unknown} (timm-ensembles {__version__}, timm"
            f" {timm.__version__}). If they come from a config.json written by a newer timm-ensembles, install that"
            f" one {INSTALL_FROM_SOURCE}; otherwise drop them. ({e})"
        ) from e
    # the layers timm adapts when weights are loaded for another class count or channel count (it re-initialises the
    # classifiers and converts the first convolutions): found on the instance, so that folders written before these
    # entries were recorded adapt too; recorded in the config the model is exported with
    if base_free:
        # the data config the model was built with (its members' or the one given)
        model.pretrained_cfg.update({k: tuple(v) if isinstance(v, list) else v
                                     for k, v in model.data_config.items()}, num_classes=model.num_classes)
    first_convs, classifiers = adaptable_layers(model)
    model.pretrained_cfg.update(first_conv=first_convs or None, classifier=classifiers or None)
    # timm's load_pretrained reads the input stems from the model's own traits first (timm keeps a model's
    # declaration there, and fills it from the registry's cfg, which knows no instance's members)
    model._traits = dict(getattr(model, '_traits', {}), first_conv=tuple(first_convs) or None)
    if pretrained:
        _load(model, variant, cfg_dict, classifiers, kwargs)
    if features_only:
        model = _features(model, variant, out_indices, feature_cls)
    return model


def _pool_size(base_cfg: dict, input_size) -> tuple[int, int] | None:
    """The unpooled feature map's size at ``input_size``: the base's ``pool_size`` at its own input size, scaled."""
    pool, base_size = base_cfg.get('pool_size'), base_cfg.get('input_size')
    if not pool or not base_size or not input_size:
        return tuple(pool) if pool else None
    return tuple(max(1, math.ceil(s * p / b)) for s, p, b in zip(input_size[1:], pool, base_size[1:]))


def _features(model: nn.Module, variant: str, out_indices, feature_cls: str) -> nn.Module:
    """``features_only=True``: timm's getter wrapper around ``forward_intermediates`` (the hook-based default needs
    one sequential module tree, which members, heads or a student wrapper are not)."""
    if feature_cls != 'getter':
        raise ValueError(f"'{variant}' gives its feature maps through forward_intermediates: feature_cls='getter'"
                         f" (the default here), not {feature_cls!r}.")
    if not hasattr(model, 'forward_intermediates'):
        raise ValueError(f"'{variant}' has no feature maps to give (features_only=True): its base model has no"
                         f" forward_intermediates().")
    if out_indices is None:
        out_indices = tuple(range(min(5, len(model.feature_info))))  # timm's default: the first five levels
    pretrained_cfg = dict(model.pretrained_cfg)
    model = FeatureGetterNet(model, out_indices=out_indices)
    for key in ('num_classes', 'classifier', 'global_pool'):  # as timm's pretrained_cfg_for_features
        pretrained_cfg.pop(key, None)
    model.pretrained_cfg = model.default_cfg = pretrained_cfg
    return model


def _load(model: nn.Module, variant: str, cfg_dict: dict, classifiers: list[str], kwargs: dict) -> None:
    """The model's own weights, adapted as timm adapts its models' (see ``adaptable_layers``)."""
    load_cfg = dict(model.pretrained_cfg)
    num_classes = getattr(model, 'num_classes', load_cfg.get('num_classes'))
    in_chans = getattr(model, 'in_chans', kwargs.get('in_chans', 3))

    # timm loads a repo's weights from the repo whatever else its config says (``check_sources`` refuses the rest)
    hub_id = load_cfg.get('hf_hub_id') if load_cfg.get('source') == 'hf-hub' or not (
        load_cfg.get('file') or load_cfg.get('state_dict')) else None
    # the name the user gave, for the messages: a catalog tag, or the hf-hub: repo
    tag = load_cfg.get('tag') if load_cfg.get('source') != 'hf-hub' else None
    name = f'{variant}.{tag}' if tag else f'hf-hub:{hub_id}'
    if hub_id:
        # timm.create_model('hf-hub:...') falls back to pytorch_model.bin: refuse the pickle before it is fetched
        _require_safetensors(*_hub_name(hub_id), hub_id, weights_of=name)
    _check_recorded_weights(load_cfg)
    try:
        with hub_download_errors(name, repo_id=hub_id) if hub_id else contextlib.nullcontext():
            load_pretrained(model, pretrained_cfg=load_cfg, num_classes=num_classes, in_chans=in_chans)
    except RuntimeError as e:
        if not any(s in str(e) for s in ('size mismatch', 'Missing key', 'Unexpected key')):
            raise
        source = cfg_dict.get('hf_hub_id') or cfg_dict.get('file') or cfg_dict.get('url') or variant
        detail = '; '.join(line.strip() for line in str(e).splitlines()[1:4])
        mismatched = re.findall(r'size mismatch for ([\w.]+)\.(?:weight|bias)', str(e))
        if mismatched and all(name in classifiers for name in mismatched):
            raise RuntimeError(
                f"The classifiers of '{source}' ({', '.join(sorted(set(mismatched)))}) do not fit this model's"
                f" {num_classes} classes while its config.json says the weights have as many: pass num_classes=<the"
                f" class count you want> to fine-tune (the classifiers are then re-initialised), or fix config.json."
            ) from e
        raise RuntimeError(
            f"The weights of '{source}' do not fit the '{variant}' model its config describes ({detail} ...): its"
            f" model.safetensors and config.json come from different models, or one of them was edited. Export the"
            f" model again (train.py, timm_ensembles.push_to_hub) so that both describe the same model."
        ) from e


def _check_recorded_weights(load_cfg: dict) -> None:
    """A local folder's or Hub repo's weights, against the sha256 its config.json records (``export_folder``)."""

    if load_cfg.get('source') == 'local-dir' and load_cfg.get('file'):
        folder = Path(load_cfg['file'])
        config_path, weights = folder / RunFolder.CONFIG, folder / RunFolder.WEIGHTS
        source = f'local-dir:{folder}'
    elif load_cfg.get('source') == 'hf-hub' and load_cfg.get('hf_hub_id'):
        from huggingface_hub import hf_hub_download


        source = load_cfg['hf_hub_id']
        repo_id, revision = _hub_name(source)
        try:  # both come from the cache when timm has fetched them; timm's own download reports what fails
            config_path = Path(hf_hub_download(repo_id, RunFolder.CONFIG, revision=revision))
            weights = Path(hf_hub_download(repo_id, RunFolder.WEIGHTS, revision=revision))
        except Exception:
            return
    else:
        return
    if config_path.is_file() and weights.is_file():
        check_weights(json.loads(config_path.read_text()), weights, source)


def adaptable_layers(model: nn.Module) -> tuple[list[str], list[str]]:
    """The first convolutions and classifiers of a model of this package, as timm's ``pretrained_cfg`` names them
    (``first_conv``, ``classifier``): those of every timm model inside it (members, heads, a student, generations),
    prefixed with their path, and the layers the wrapper itself declares (``extra_classifiers``, e.g. an ensemble
    head). timm's ``load_pretrained`` re-initialises the classifiers when the class count differs from the weights'
    and adapts the first convolutions to another channel count, as it does for its own models.
    """
    state = set(model.state_dict())
    first_convs: list[str] = []
    classifiers: list[str] = []
    for path, module in model.named_modules():
        cfg = getattr(module, 'pretrained_cfg', None)
        if module is model or not cfg:
            continue
        for key, found in (('first_conv', first_convs), ('classifier', classifiers)):
            names = cfg.get(key) or ()
            for name in ((names,) if isinstance(names, str) else names):
                if f'{path}.{name}.weight' in state:
                    found.append(f'{path}.{name}')
    classifiers += [n for n in getattr(model, 'extra_classifiers', ()) if f'{n}.weight' in state]
    return first_convs, classifiers


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


def register_models(module_name: str, names: Iterable[str], create_fn: Callable[..., nn.Module], description: str,
                    **cfg: Any) -> None:
    """Register entrypoints ``names`` (no fixed arguments) with timm, on behalf of a method module; see
    ``register_ensemble_variants``."""
    _register(module_name, {name: {} for name in names}, create_fn, description, None, cfg)


def _register(module_name: str, variants: dict[str, dict[str, Any]], create_fn: Callable, description: str,
              size_arg: str | None, cfg: dict[str, Any]) -> None:
    module = sys.modules[module_name]
    # timm makes the first tag with weights an architecture's default; a '*' tag listed after the catalog's tags
    # takes that place back, so that the untagged name keeps building a fresh model with the base's data config
    entries = {k: ensemble_cfg(**{**cfg, **v}) for k, v in catalog_cfgs(variants).items()}
    entries.update({f'{name}.*': ensemble_cfg(**cfg) for name in variants})
    cfgs = generate_default_cfgs(entries)
    if not hasattr(module, 'default_cfgs'):
        module.default_cfgs = {}
    module.default_cfgs.update(cfgs)
    for name, fixed in variants.items():
        fn = _make_entrypoint(name, fixed, create_fn, description, size_arg)
        fn.__module__ = module_name
        setattr(module, name, register_model(fn))


def _checked_sources(kwargs: dict[str, Any]) -> contextlib.AbstractContextManager:
    """For a model built from a config that timm read from a Hub repo or a folder: ``hub.check_timm_source`` (refuse
    what would fetch anything but its own weights, and mark the build). Pops the caller's ``trust_member_repos``
    (the opt-in to members elsewhere), which is no argument of any model."""

    trust = kwargs.pop('trust_member_repos', None)
    return check_timm_source(kwargs.get('pretrained_cfg'), kwargs.get('pretrained_model_args'), trust,
                             kwargs.get('cache_dir'))


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
        # a calibration of the built model (ModelArgsMixin.set_temperature), not an argument of its constructor
        temperature = kwargs.pop('temperature', None)
        with _checked_sources(kwargs):
            model = create_fn(name, pretrained=pretrained, **kwargs)
        if temperature is not None:
            if not hasattr(model, 'set_temperature'):
                raise ValueError(f"temperature={temperature!r} applies to the classifier's logits; '{name}' was built"
                                 f' without one (features_only), so it cannot take it.')
            model.set_temperature(temperature)
        return model

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
