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

A collaborative network is no unit of its own: its parameters are sharded with the task's (the root), whose
``forward`` gathers them. Its heads reach the low layers they share through views of the owning head's modules made
at each call, which would keep holding the shards where the network's own hooks gathered the owner's.

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

__all__ = ['FORWARD_METHODS', 'SHARDABLE_STRATEGIES', 'check_shardable', 'shard_units', 'shard_task',
           'full_state_dict', 'load_full_state_dict', 'full_optimizer_state_dict', 'load_full_optimizer_state_dict']

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


def shard_task(task: nn.Module, **fully_shard_kwargs: Any) -> nn.Module:
    """Shard ``task`` in place with ``fully_shard`` on the plan of the module docstring and return it; build the
    optimizer afterwards, on the sharded parameters (``task.create_optimizer``), so that its parameter groups hold
    them. Needs an initialised process group; ``fully_shard_kwargs`` go to every ``fully_shard`` call (``mesh``,
    ``reshard_after_forward``, ``mp_policy``, ``offload_policy``)."""
    from torch.distributed.fsdp import fully_shard
    model = task.model
    check_shardable(model)
    units = shard_units(model)
    if not _shares_modules(model):
        units.append(model)
    for unit in units:
        fully_shard(unit, **fully_shard_kwargs)
    fully_shard(task, **fully_shard_kwargs)
    _register_forward_methods(units)
    return task


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
