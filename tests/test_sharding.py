"""FSDP2 on the CPU (models/sharding.py): each family's task trains sharded over two gloo processes with torch's own
``fully_shard``, and its losses, gathered weights, checkpoint and resume equal one process's."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import create_method_model, create_method_task

from timm_ensembles.models.sharding import (
    check_shardable,
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    shard_task,
    shard_units,
)

FAMILIES = ('fdl', 'collab', 'meal')  # each trained from epoch 1 (FDL's joint phase, where every term acts)
STEPS = 3  # the checkpoint is taken after STEPS - 1 of them, at the end of epoch 1 (the trainer resumes at epochs)


def _build(method: str, tmp: str):
    torch.manual_seed(0)
    model = create_method_model(method, folder=tmp)
    task = create_method_task(model)
    task.on_epoch_start(1)
    return task


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(STEPS)]


def _step(task, optimizer, batch) -> float:
    torch.manual_seed(2)  # the tasks' own draws (MEAL's teacher of the step) alike in every process
    out = task(*batch)
    out['loss'].backward()
    optimizer.step()
    optimizer.zero_grad()
    return out['loss'].item()


def _optimizer(task):
    # FDL's head group and MEAL's discriminator rate are groups of their own: built on the sharded parameters
    return task.create_optimizer('sgd', lr=0.1, weight_decay=1e-4, momentum=0.9)


def _worker(rank: int, world: int, port: int, method: str, tmp: str, out: str):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        batches = _batches()  # every process the whole batch: the averaged gradient is one process's
        task = shard_task(_build(method, tmp))
        optimizer = _optimizer(task)
        groups = [len(g['params']) for g in optimizer.param_groups]
        losses = [_step(task, optimizer, b) for b in batches[:-1]]
        checkpoint = full_state_dict(task), full_optimizer_state_dict(task, optimizer)
        # gathered to the main process only, as a checkpoint is written (rank 0 broadcasts it back on loading)
        assert bool(checkpoint[0]) == (rank == 0) and bool(checkpoint[1]) == (rank == 0)
        task.on_epoch_start(2)
        losses.append(_step(task, optimizer, batches[-1]))
        final = full_state_dict(task)
        # resume: a fresh sharded task and optimizer, loaded from the gathered checkpoint, takes the last step again
        resumed = shard_task(_build(method, tmp))
        resumed_opt = _optimizer(resumed)
        load_full_state_dict(resumed, checkpoint[0])
        load_full_optimizer_state_dict(resumed, resumed_opt, checkpoint[1])
        resumed.on_epoch_start(2)  # what a resumed run does first: MEAL reseeds its draws for the epoch
        resumed_loss = _step(resumed, resumed_opt, batches[-1])
        resumed_final = full_state_dict(resumed)
        if rank == 0:
            torch.save(dict(groups=groups, losses=losses, final=final, resumed_loss=resumed_loss,
                            resumed_final=resumed_final), out)
        dist.barrier()  # neither process tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _assert_states_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, equal_nan=True, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.parametrize('method', FAMILIES)
def test_two_sharded_processes_train_checkpoint_resume_and_export_as_one(method, tmp_path):
    single = _build(method, str(tmp_path))
    optimizer = _optimizer(single)
    groups = [len(g['params']) for g in optimizer.param_groups]
    batches = _batches()
    losses = [_step(single, optimizer, b) for b in batches[:-1]]
    single.on_epoch_start(2)
    losses.append(_step(single, optimizer, batches[-1]))
    out = tmp_path / 'sharded.pt'
    mp.spawn(_worker, args=(2, _free_port(), method, str(tmp_path), str(out)), nprocs=2, join=True)
    sharded = torch.load(out, weights_only=False)
    assert sharded['groups'] == groups  # the parameter groups survive sharding, group for group
    assert sharded['losses'] == pytest.approx(losses, rel=1e-5)
    _assert_states_equal(sharded['final'], single.state_dict())
    assert sharded['resumed_loss'] == pytest.approx(losses[-1], rel=1e-5)
    _assert_states_equal(sharded['resumed_final'], single.state_dict())
    # the export: the gathered weights load into a plain, unsharded model of the same name, which predicts as one
    # process's trained model does
    plain = create_method_model(method, folder=str(tmp_path)).eval()
    plain.load_state_dict({k[len('model.'):]: v for k, v in sharded['final'].items() if k.startswith('model.')})
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), single.model.eval()(x), rtol=1e-5, atol=1e-6)


def test_the_shard_units_are_the_members_or_the_students_blocks():
    ens = create_method_model('fdl')
    assert shard_units(ens) == [*ens.members, ens.head]  # FDL's trained head: the task calls it directly
    plain_average = create_method_model('ens')
    assert shard_units(plain_average) == list(plain_average.members)  # a head without parameters is no unit
    vit_student = create_method_model('meal', base='test_vit')
    assert shard_units(vit_student) == [*vit_student.student.blocks, vit_student.student]
    student = create_method_model('ban')
    assert shard_units(student) == [student.student]  # test_resnet has no block list
    collab = create_method_model('collab')
    assert shard_units(collab) == []  # its heads share their low layers


def test_a_strategy_that_reads_stacked_weights_is_refused_under_sharding():
    model = create_method_model('fdl')
    check_shardable(model)  # loop: fine
    model.set_member_strategy('vmap')
    with pytest.raises(ValueError, match=r"^member strategy 'vmap' reads the members' weights stacked.*"
                                         r"use member_strategy='loop' under FSDP"):
        check_shardable(model)
