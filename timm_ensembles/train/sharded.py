"""FSDP2 under the trainer: ``accelerate launch --use_fsdp --fsdp_version 2`` (or a config's ``distributed_type:
FSDP`` with ``fsdp_version: 2``) on two processes or more shards the task on this package's plan
(``models/sharding.py``: one unit per member, per block of a student, the model, the task) before its optimizer is
built, so that the optimizer's parameter groups (layer decay, FDL's head, MEAL's discriminators) hold the sharded
parameters as they are.

On GPUs Accelerate's FSDP2 preparation leaves a task that is already sharded as it is and maps the optimizer's
parameters one by one (the groups kept). On CPUs Accelerate ignores FSDP (its processes are gloo processes with
DDP), so the trainer shards over them itself and keeps the task out of Accelerate's DDP wrapping; everything else
is the same code path, which is how the CPU tests exercise it.

A full state dict is a collective under FSDP: at every save every process gathers the task (and the EMA) to the main
process's CPU (``gather``), which loads them into its unsharded copies, built before sharding, and writes its files
from them as an unsharded run does: the checkpoint keeps the unsharded format (the optimizer's state indexed as
``Optimizer.state_dict`` indexes it), so a run resumes sharded or not whichever way it was written.
"""
import copy
import dataclasses
import os
from typing import Any

from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env
from timm.utils import ModelEmaV3
from torch import nn

from ..models.sharding import (
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    shard_model,
    shard_task,
)

__all__ = ['Sharding', 'SavedModels', 'fsdp_requested', 'check_fsdp_launch', 'shard_run', 'gather',
           'load_sharded_state']


def fsdp_requested() -> bool:
    """Whether ``accelerate launch`` was told to shard (``--use_fsdp``, or a config's ``distributed_type: FSDP``)."""
    return parse_flag_from_env('ACCELERATE_USE_FSDP')


def check_fsdp_launch() -> None:
    """Raise ``ValueError`` (one line) for an FSDP launch of a version this trainer does not run, read from the
    variable `accelerate launch` sets (FSDP_VERSION, 1 when unset, as Accelerate reads it): before the Accelerator,
    which fails on FSDP1's options on a CPU."""
    version = os.environ.get('FSDP_VERSION', '1')
    if fsdp_requested() and version != '2':
        raise ValueError(f'fsdp_version {version}: this trainer shards with FSDP2 (fully_shard), which keeps the'
                         f" parameter groups and the models' own entry points; set fsdp_version: 2 (accelerate"
                         f' launch --use_fsdp --fsdp_version 2).')


@dataclasses.dataclass
class Sharding:
    """A sharded run's parts besides the task.

    Attributes:
        by_accelerate: Accelerate's FSDP (GPUs) prepares the task; else it stays out of ``accelerator.prepare``.
        plain_task: The main process's unsharded copy of the task, which its files are written from (None on the
            others).
        ema: The EMA of the exported model, sharded as the model is (``--model-ema``).
        plain_ema: The main process's unsharded copy of ``ema``.
    """
    by_accelerate: bool
    plain_task: nn.Module | None = None
    ema: ModelEmaV3 | None = None
    plain_ema: ModelEmaV3 | None = None


@dataclasses.dataclass
class SavedModels:
    """What the main process writes a run's files from: the live objects, or under FSDP their unsharded copies
    refreshed from the shards (``gather``)."""
    task: nn.Module
    export_model: nn.Module
    optimizer: Any  # an optimizer, or its state dict
    ema: ModelEmaV3 | None


def _plugin(accelerator) -> FullyShardedDataParallelPlugin:
    if accelerator.distributed_type == DistributedType.FSDP:
        return accelerator.state.fsdp_plugin
    return FullyShardedDataParallelPlugin()  # what `accelerate launch` set, read from its variables as Accelerate does


def _policy_units(plugin: FullyShardedDataParallelPlugin, model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` a config's wrap policy names (innermost first): the classes of
    ``fsdp_transformer_layer_cls_to_wrap``, or with ``SIZE_BASED_WRAP`` those over ``fsdp_min_num_params``
    parameters."""
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy
    policy = getattr(plugin.auto_wrap_policy, 'func', plugin.auto_wrap_policy)
    modules = list(model.modules())[::-1]  # children before their parents
    if policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap:
        names = set(plugin.transformer_cls_names_to_wrap)
        missing = names - {type(m).__name__ for m in modules}
        if missing:
            raise ValueError(f'fsdp_transformer_layer_cls_to_wrap names {sorted(missing)}, which'
                             f' {type(model).__name__} has no module of: name classes it has (a'
                             f" member's blocks, 'Block' of a ViT, say), or leave it unset (one unit per member, or"
                             f' per block of a student).')
        return [m for m in modules if type(m).__name__ in names]
    if policy is size_based_auto_wrap_policy and plugin.min_num_params > 0:
        return [m for m in modules if sum(p.numel() for p in m.parameters()) > plugin.min_num_params]
    return []


def shard_run(accelerator, task: nn.Module, ema_kwargs: dict | None, log) -> Sharding:
    """Check the FSDP config, copy the task (and build the EMA, ``ema_kwargs`` given) unsharded on the main process,
    then shard the task (and the EMA) on every process. Raises ``ValueError`` (one line) for a config this trainer
    cannot run."""
    plugin = _plugin(accelerator)
    if plugin.activation_checkpointing:
        raise ValueError('fsdp_activation_checkpointing: Accelerate applies it only to a model it shards itself;'
                         ' set it false (this trainer shards the task on its own plan).')
    extra = _policy_units(plugin, task.model)
    kwargs = dict(reshard_after_forward=plugin.reshard_after_forward, mp_policy=plugin.mixed_precision_policy,
                  offload_policy=plugin.cpu_offload)
    main = accelerator.is_main_process
    plain_task = copy.deepcopy(task) if main else None
    ema = plain_ema = None
    if ema_kwargs is not None:
        # built before sharding: a sharded module cannot be copied; per tensor (foreach mixes the buffers, plain
        # tensors, with the parameters' shards)
        ema = ModelEmaV3(task.export_model(), foreach=False, **ema_kwargs)
        plain_ema = copy.deepcopy(ema) if main else None
    shard_task(task, extra, **kwargs)
    if ema is not None:
        shard_model(ema.module, _policy_units(plugin, ema.module), **kwargs)
    state_dict_type = str(plugin.state_dict_type).rsplit('.', 1)[-1]
    policy = ', and the modules the wrap policy names' if extra else ''
    unused = '' if state_dict_type == 'FULL_STATE_DICT' else f' ({state_dict_type} not used: an export is one file)'
    log(f'FSDP2: the task sharded over {accelerator.num_processes} processes (one unit per member, or per block of a'
        f' student{policy}); checkpoints and exports are full state dicts gathered to the main process{unused}; the'
        f" mechanism's gradient shares (share_*) are not measured (the forward uses gathered copies of the"
        f' parameters)')
    return Sharding(by_accelerate=accelerator.distributed_type == DistributedType.FSDP, plain_task=plain_task,
                    ema=ema, plain_ema=plain_ema)


def _inner(optimizer):
    return getattr(optimizer, 'optimizer', optimizer)  # Accelerate's AcceleratedOptimizer wraps torch's


def _names(task: nn.Module, optimizer) -> list[str]:
    """The names of the optimizer's parameters, in the order ``Optimizer.state_dict`` indexes them."""
    names = {p: n for n, p in task.named_parameters()}
    return [names[p] for group in _inner(optimizer).param_groups for p in group['params']]


def _by_index(state: dict, names: list[str]) -> dict:
    index = {n: i for i, n in enumerate(names)}
    return dict(state={index[n]: v for n, v in state['state'].items()},
                param_groups=[{**g, 'params': [index[n] for n in g['params']]} for g in state['param_groups']])


def _by_name(state: dict, names: list[str]) -> dict:
    return dict(state={names[i]: v for i, v in state['state'].items()},
                param_groups=[{**g, 'params': [names[i] for i in g['params']]} for g in state['param_groups']])


def gather(task: nn.Module, optimizer, sharding: Sharding, with_optimizer: bool = True) -> SavedModels | None:
    """Gather the sharded task (its optimizer's state too, ``with_optimizer``) and EMA into the main process's
    unsharded copies (a collective: every process calls it). Returns them on the main process, None elsewhere."""
    task_state = full_state_dict(task)
    optimizer_state = full_optimizer_state_dict(task, _inner(optimizer)) if with_optimizer else None
    ema_state = full_state_dict(sharding.ema.module) if sharding.ema is not None else None
    if sharding.plain_task is None:
        return None
    sharding.plain_task.load_state_dict(task_state)
    if ema_state is not None:
        sharding.plain_ema.module.load_state_dict(ema_state)
    if optimizer_state is not None:
        optimizer_state = _by_index(optimizer_state, _names(task, optimizer))
    return SavedModels(task=sharding.plain_task, export_model=sharding.plain_task.export_model(),
                       optimizer=optimizer_state, ema=sharding.plain_ema)


def load_sharded_state(task: nn.Module, optimizer, sharding: Sharding, checkpoint: dict) -> None:
    """Load a checkpoint (of a sharded run or not) into the sharded task, its optimizer and EMA (a collective)."""
    load_full_state_dict(task, checkpoint['task'])
    load_full_optimizer_state_dict(task, _inner(optimizer), _by_name(checkpoint['optimizer'], _names(task, optimizer)))
    if sharding.ema is not None:
        load_full_state_dict(sharding.ema.module, {k.removeprefix('module.'): v for k, v in checkpoint['ema'].items()})
