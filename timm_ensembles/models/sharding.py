"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for the models of this package and
their tasks: which modules become shard units, the entry points besides ``forward`` that must gather parameters, and
the full state dicts a checkpoint or an export needs.

The plan, for a task whose ``model`` is one of this package's models (what ``shard_task`` applies, and what a
``fully_shard`` auto-wrap should reproduce):

* one shard unit per **member** of an ensemble (``EnsembleModel.members``): a member is the unit the methods compute
  with, and N members of a large base are what does not fit one device; and its trained head, which the tasks call
  directly;
* one unit per **block** of a student's timm network (its ``blocks``, ``stages`` or ``layers``), as timm's own FSDP
  recipes wrap it, and the network itself;
* the **model** itself, then the **task** as the root (the task's own parameters: MEAL's discriminators and frozen
  teachers).

A collaborative network has no units inside it: its heads reach the low layers they share through the owning head's
modules, so the network is one unit, which stays gathered from its forward to its backward (its entry points call one
another, and an inner one's resharding would leave the outer one the shards).

FSDP2 gathers a unit's parameters in its ``forward`` hooks only. The tasks and the evaluation reach the models through
other methods (``forward_members``, ``forward_members_with_features``, ``forward_features``,
``forward_intermediates``, ``forward_head``): those are registered with ``register_fsdp_forward_method`` on every unit
that has them. The fused member strategies (``vmap``, ``grouped``, and ``auto``, which may choose them) read the
members' weights stacked or concatenated, which sharding splits across ranks: they are refused; ``loop`` runs every
member through its own ``__call__``.

A full state dict under FSDP is a collective: every rank must call ``full_state_dict``; the main process (rank 0) gets
the gathered, unsharded tensors on the CPU and alone writes them, the other ranks get an empty dict. Loading one is
a collective too: rank 0 passes the dict it read, which is broadcast to the others (they may pass an empty dict).
"""
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ['FORWARD_METHODS', 'SHARDABLE_STRATEGIES', 'check_shardable', 'shard_units', 'shard_model', 'shard_task',
           'fully_shard_unit', 'full_state_dict', 'load_full_state_dict', 'full_optimizer_state_dict',
           'load_full_optimizer_state_dict']

# the entry points besides ``forward`` through which the tasks, the evaluation and the export reach a model
FORWARD_METHODS = ('forward_members', 'forward_members_with_features', 'forward_members_features', 'forward_features',
                   'forward_intermediates', 'forward_head')
# the member strategies that call every member through its own ``__call__`` (the others read stacked weights)
SHARDABLE_STRATEGIES = ('loop',)
# the attributes of a timm network that hold its repeated blocks, in the order they are tried
_BLOCK_LISTS = ('blocks', 'stages', 'layers')


def check_shardable(model: nn.Module) -> None:
    """Raise ``ValueError`` (one line) when ``model`` cannot be sharded as it is: an ensemble whose member strategy
    reads the members' weights stacked."""
    strategy = getattr(model, 'member_strategy', None)
    if strategy is not None and strategy not in SHARDABLE_STRATEGIES:
        raise ValueError(f"member strategy '{strategy}' reads the members' weights stacked, which FSDP splits across "
                         f"processes: use member_strategy='loop' under FSDP (--member-strategy loop).")


def _blocks(net: nn.Module) -> list[nn.Module]:
    for name in _BLOCK_LISTS:
        blocks = getattr(net, name, None)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 1:
            return list(blocks)
    return []


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that become shard units below the model itself (innermost first): its members (and
    its head, where it has parameters), or its student network's blocks; none for a collaborative network or a plain
    timm model without a block list."""
    members = getattr(model, 'members', None)
    if isinstance(members, nn.ModuleList):
        # the head too: the tasks call it directly (FDL trains it on the members' detached logits)
        head = getattr(model, 'head', None)
        has_head = isinstance(head, nn.Module) and any(True for _ in head.parameters())
        return list(members) + ([head] if has_head else [])
    student = getattr(model, 'student', None)
    if isinstance(student, nn.Module):
        # the network too: the tasks call its forward_intermediates directly
        return [*_blocks(student), student]
    if _shares_modules(model):
        return []  # collaborative heads share their low layers (see the module docstring)
    return _blocks(model)


def _shares_modules(model: nn.Module) -> bool:
    # a model whose parts reach shared layers through views made at each call says so (CollaborativeNet)
    return getattr(model, 'shares_modules_by_views', False)


def _register_forward_methods(modules: Iterable[nn.Module]) -> None:
    from torch.distributed.fsdp import register_fsdp_forward_method
    for module in modules:
        for name in FORWARD_METHODS:
            if callable(getattr(module, name, None)):
                register_fsdp_forward_method(module, name)


def shard_model(model: nn.Module, extra_units: Iterable[nn.Module] = (), **fully_shard_kwargs: Any) -> nn.Module:
    """Shard ``model`` in place with ``fully_shard`` on the plan of the module docstring, ``model`` itself the root
    (a collaborative network too: as a root its ``forward`` and registered entry points gather all it holds), and
    return it. ``extra_units``: more units inside it (an Accelerate config's wrap policy), sharded first; none may be
    inside a model that shares modules through views."""
    _shard(model, extra_units, fully_shard_kwargs, as_root=True)
    return model


def shard_task(task: nn.Module, extra_units: Iterable[nn.Module] = (), **fully_shard_kwargs: Any) -> nn.Module:
    """Shard ``task`` in place with ``fully_shard`` on the plan of the module docstring (its model's units, the model
    unless it shares modules through views, the task the root) and return it; build the optimizer afterwards, on the
    sharded parameters (``task.create_optimizer``), so that its parameter groups hold them. Needs an initialised
    process group; ``fully_shard_kwargs`` go to every ``fully_shard`` call (``mesh``, ``reshard_after_forward``,
    ``mp_policy``, ``offload_policy``)."""
    _shard(task.model, extra_units, fully_shard_kwargs, as_root=False)
    fully_shard_unit(task, **{**fully_shard_kwargs, 'reshard_after_forward': None})  # the root (see ``_shard``)
    return task


def _shard(model: nn.Module, extra_units: Iterable[nn.Module], kwargs: dict, as_root: bool) -> None:
    check_shardable(model)
    units = _plan(model, extra_units)
    for unit in units:
        fully_shard_unit(unit, **kwargs)
    if as_root:
        # as Accelerate shards a root: torch's default keeps a root's parameters gathered after its forward, which
        # its backward would gather again at once
        fully_shard_unit(model, **{**kwargs, 'reshard_after_forward': None})
    elif _shares_modules(model):
        # its entry points call one another (forward_members runs forward_members_features): resharding when an
        # inner one returns would leave the outer one the shards
        fully_shard_unit(model, **{**kwargs, 'reshard_after_forward': False})
    else:
        fully_shard_unit(model, **kwargs)
    _register_forward_methods([*units, model])


def fully_shard_unit(module: nn.Module, **fully_shard_kwargs: Any) -> None:
    """``fully_shard(module)``, the ``None`` values of the keywords left to its defaults (an Accelerate plugin's
    unset options)."""
    from torch.distributed.fsdp import fully_shard
    fully_shard(module, **{k: v for k, v in fully_shard_kwargs.items() if v is not None})


def _plan(model: nn.Module, extra_units: Iterable[nn.Module]) -> list[nn.Module]:
    planned = shard_units(model)
    # a ModuleList or ModuleDict is never called, so its forward hooks would never gather what it holds
    extra = [m for m in extra_units if m is not model and not isinstance(m, (nn.ModuleList, nn.ModuleDict))
             and not any(m is p for p in planned)]
    if extra and _shares_modules(model):
        raise ValueError(f'{type(model).__name__} shares its low layers between heads through views, so no module'
                         f' inside it can be a shard unit of its own: drop the wrap policy (fsdp_auto_wrap_policy:'
                         f' NO_WRAP), the whole network is sharded as one unit.')
    # innermost first: a unit's parameters are those no unit inside it took
    inside = [m for m in extra if any(m is d for p in planned for d in p.modules())]
    return inside + planned + [m for m in extra if not any(m is i for i in inside)]


def _snapshot(state):
    """``state`` with every tensor cloned (through nested dicts, lists and tuples)."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return type(state)((k, _snapshot(v)) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        return type(state)(_snapshot(v) for v in state)
    return state


def _options(load: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # gathered to rank 0's CPU (the others get {}); loaded from rank 0's copy, broadcast
    return StateDictOptions(full_state_dict=True, cpu_offload=not load, broadcast_from_rank0=load)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a sharded ``module``, on rank 0's CPU (a collective: every rank calls it; the others
    get an empty dict). A snapshot: on the CPU the gathered dict would alias the live buffers (BatchNorm's running
    statistics), which the next step changes."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return _snapshot(get_model_state_dict(module, options=_options()))


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict into a sharded ``module``: every rank calls it, rank 0 with the dict (broadcast to
    the others, which may pass an empty one)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(module, state, options=_options(load=True))


def full_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state unsharded (keyed by parameter name), on rank 0's CPU (a collective, as
    ``full_state_dict``)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return _snapshot(get_optimizer_state_dict(module, optimizer, options=_options()))


def load_full_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an unsharded optimizer state (from ``full_optimizer_state_dict``) into the optimizer of a sharded
    ``module`` (a collective, as ``load_full_state_dict``)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(module, optimizer, state, options=_options(load=True))
