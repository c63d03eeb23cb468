"""Registries of this package: training tasks by model class, ensemble methods by generic name.

timm keeps the model registry (``timm.create_model`` finds every name registered here once
``import timm_ensembles`` has run). This module adds what timm has no place for:

* the task of each model class, so that a training script asks for the objective of a model
  without naming its method;
* the generic ensemble methods (``fdl``, ``ens``, ...), so that ``fdl_<any timm model>x<N>`` can be
  built for bases that have no pre-registered variant.
"""
import difflib
import inspect
import re
from collections.abc import Callable
from typing import Any

import timm
from timm.models import parse_model_name, split_model_name_tag
from torch import nn

from ..task import CrossEntropyTask
from .hub import hub_download_errors, load_from_hub

__all__ = [
    'register_task', 'get_task_cls', 'create_task', 'register_ensemble_method', 'list_ensemble_methods',
    'create_model', 'check_model_name', 'check_base_model',
]

_task_by_model_cls: dict[type, type] = {}
_ensemble_methods: dict[str, str] = {}  # generic entrypoint name -> one-line description
_student_methods: dict[str, str] = {}  # generic entrypoint name -> description, for <name>_<base> students
_size_args: dict[str, str] = {}  # generic entrypoint name -> the argument that x<N> sets
_variant_args: dict[str, dict[int, dict[str, Any]]] = {}  # generic name -> N -> further arguments of x<N> names

# <method>_<base>x<N>; greedy base so that bases holding an 'x' (resnext50_32x4d) still parse
_DYNAMIC_NAME = re.compile(r'^(?P<method>[a-z]+)_(?P<base>.+)x(?P<num>\d+)$')


def register_task(model_cls: type) -> Callable[[type], type]:
    """Class decorator: the decorated task trains models of ``model_cls`` (and its subclasses)."""
    def _register(task_cls: type) -> type:
        _task_by_model_cls[model_cls] = task_cls
        return task_cls
    return _register


def get_task_cls(model: nn.Module | type) -> type:
    """Task class for a model (or model class), found through the class hierarchy.

    A plain timm model (no registered class in its hierarchy) gets the cross-entropy task, so that a
    single network is trained by the same script as the ensembles it is compared with.
    """
    model_cls = model if isinstance(model, type) else type(model)
    for cls in model_cls.__mro__:
        if cls in _task_by_model_cls:
            return _task_by_model_cls[cls]
    return CrossEntropyTask


def create_task(model: nn.Module, **task_args: Any) -> nn.Module:
    """Build the training objective of ``model``.

    Args:
        model: A model built by ``timm.create_model`` (an ensemble of this package or any timm model).
        **task_args: Options of that task (see the task class's docstring); unknown options raise.
    """
    task_cls = get_task_cls(model)
    params = inspect.signature(task_cls).parameters
    valid = [n for n, p in params.items() if n != 'model' and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(task_args) - set(valid))
    if unknown:
        raise ValueError(f'Unknown option(s) {unknown} for {task_cls.__name__}, the task of {type(model).__name__};'
                         f' valid options: {valid}.')
    return task_cls(model, **task_args)


def register_ensemble_method(
        name: str, description: str, size_arg: str = 'num_members', size_args: dict[int, dict[str, Any]] | None = None,
) -> None:
    """Declare ``name`` as a generic entrypoint taking ``base_model`` and ``size_arg`` (what x<N> sets); ``size_args``
    gives the further arguments that ``<name>_<base>x<N>`` means for some N, for every base."""
    _ensemble_methods[name] = description
    _size_args[name] = size_arg
    _variant_args[name] = dict(size_args or {})


def register_student_method(name: str, description: str) -> None:
    """Declare ``name`` as a generic entrypoint taking ``base_model``, so that ``<name>_<any timm model>`` builds."""
    _student_methods[name] = description


def list_ensemble_methods() -> dict[str, str]:
    return dict(_ensemble_methods)


def _close_matches(name: str, candidates) -> str:
    matches = difflib.get_close_matches(name, list(candidates), n=5, cutoff=0.6)
    return f" Close matches: {', '.join(matches)}." if matches else ''


def check_base_model(base_model: Any, what: str = 'base model') -> None:
    """Raise a ValueError unless ``base_model`` is the name of a timm model (see ``check_model_name``)."""
    if not isinstance(base_model, str) or not base_model:
        raise ValueError(f'{what} must be a timm model name, got {base_model!r}.')
    check_model_name(base_model, what=what)


def check_model_name(model_name: str, what: str = 'model') -> None:
    """Raise a ValueError naming close matches when ``model_name`` is not in timm's registry.

    Names with a source prefix (``hf-hub:``, ``local-dir:``) are left to timm, which checks them when
    it reads their config.
    """
    source, model_id = parse_model_name(model_name)
    if source is not None:
        return
    arch, _ = split_model_name_tag(model_id)
    if not timm.is_model(arch):
        raise ValueError(
            f"Unknown {what} '{model_name}': timm has no model of that name.{_close_matches(arch, timm.list_models())}"
            f" `timm.list_models('*pattern*')` lists the valid names; a model of your own must be registered"
            f" with timm's @register_model (and its module imported) before it is used here."
        )


def parse_dynamic_name(model_name: str) -> dict[str, Any] | None:
    """Split ``<method>_<base>x<N>`` (ensembles) or ``<method>_<base>`` (students) into the generic method and its
    kwargs, or None if it is neither."""
    m = _DYNAMIC_NAME.match(model_name)
    if m is None or m.group('method') not in _ensemble_methods:
        method, _, base = model_name.partition('_')
        if method in _student_methods and base and timm.is_model(split_model_name_tag(base)[0]):
            return {'method': method, 'base_model': base}
        return None
    method, num = m.group('method'), int(m.group('num'))
    return {'method': method, 'base_model': m.group('base'), _size_args[method]: num,
            **_variant_args[method].get(num, {})}


def registered_sizes(model_name: str) -> tuple[str, int, list[int]] | None:
    """For a ``<method>_<base>x<N>`` name: the argument ``x<N>`` sets (``num_members``, ``num_heads``), N, and the
    sizes the method registers named variants of (2, 3, 4); None for any other name. A size outside them is legal
    (``fdl_resnet18x22`` builds 22 members) and may be a typo."""
    parsed = parse_dynamic_name(split_model_name_tag(model_name)[0])
    if parsed is None or parsed['method'] not in _size_args:
        return None
    method, size_arg = parsed['method'], _size_args[parsed['method']]
    sizes = set()
    for name in timm.list_models(f'{method}_*'):
        variant = parse_dynamic_name(name)
        if variant is not None and variant['method'] == method:
            sizes.add(variant[size_arg])
    return size_arg, parsed[size_arg], sorted(sizes)


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` that also builds ``<method>_<any timm model>x<N>`` names.

    Pre-registered variants (``fdl_resnet50x2``) and every other timm name go straight to timm; ``hf-hub:`` and
    ``local-dir:`` sources with ``pretrained=True`` through ``hub.load_from_hub`` (safetensors only, checked). A name
    of the form ``<method>_<base>x<N>`` whose base has no pre-registered variant is built by the generic entrypoint of
    the method
    (``timm.create_model('<method>', base_model=<base>, num_members=N)``, ``num_heads=N`` for ``collab``), so its
    saved config names the generic architecture and reloads anywhere this package is installed.

    Args:
        model_name: Model name, as for ``timm.create_model``.
        pretrained: Load the model's own published weights (for an ensemble: the ensemble's, not the base's;
            see ``pretrained_base``).
        **kwargs: Passed on to ``timm.create_model``.
    """
    source, model_id = parse_model_name(model_name)
    if source is None:
        arch, tag = split_model_name_tag(model_id)
        if not timm.is_model(arch):
            dyn = parse_dynamic_name(arch)
            if dyn is None:
                raise ValueError(
                    f"Unknown model '{model_name}'.{_close_matches(arch, timm.list_models())}"
                    f" Ensembles of any timm model are named <method>_<base>x<N> with <method> one of"
                    f" {sorted(_ensemble_methods)} (x<N> is the number of members or heads, e.g. fdl_resnet18x2);"
                    f" students <method>_<base> with <method> one of {sorted(_student_methods)}."
                )
            if tag:
                raise ValueError(
                    f"'{model_name}' has a pretrained tag, but '{arch}' is not a registered model with published"
                    f" weights. Drop the tag, or use pretrained_base=True for timm's weights of the base."
                )
            model_name = dyn.pop('method')
            for key, value in dyn.items():
                given = kwargs.get(key, value)
                # a config.json round trip turns tuples into lists
                if (list(given) if isinstance(given, tuple) else given) != value:
                    raise ValueError(f"'{arch}' means {key}={value!r}, but {key}={given!r} was passed. Build the"
                                     f" generic '{model_name}' model (base_model=...) to choose {key}.")
            kwargs.update(dyn)

    if source is not None and pretrained:
        # a repo's or folder's weights: its own safetensors only, checked against the sha256 its config records,
        # whatever the config says (timm alone would follow its entries, or fall back to pytorch_model.bin)
        return load_from_hub(model_name, pretrained=True, **kwargs)
    # a plain timm model's weights (an ensemble's own and its base's are explained as they load, in _builder)
    with hub_download_errors(model_name):
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)

