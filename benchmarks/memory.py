"""Peak training memory of an N-member ensemble under each member strategy, against N x one member's.

What is measured (CPU): torch's CPU allocations are invisible to ``tracemalloc`` and torch keeps no CPU allocator
statistics, so each configuration runs in a **fresh subprocess** and its resident set is measured by the kernel.
The subprocess first runs the same configuration at batch 2 for two steps and deletes it, so that the code pages
and one-off buffers of every kernel it uses (oneDNN, functorch) are resident before measuring; then it takes its
resident set (``VmRSS``), builds the configuration (with its strategy's check against the loop), resets the
kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) and trains ``--steps`` steps; the peak is the
high-water mark (``VmHWM``) minus the resident set before the build.
The difference holds
everything training adds: parameters, gradients, the optimizer's momentum buffers, activations kept for the
backward pass and the strategies' transient copies (stacked or concatenated weights), at their highest point. The
subprocess runs with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every tensor above 64 KiB with its own
mapping and unmaps it when freed, so the resident set follows live tensors instead of what the allocator keeps
cached (its default threshold adapts upwards as large blocks are freed); small tensors still come from the heap,
whose fragmentation inflates the figure for tiny models. Beside it, a tensor-level figure that no allocator
affects: ``torch.profiler`` with ``profile_memory=True`` over one step (after a first step has allocated the
gradients and momentum buffers), the bytes of the tensors alive before the step (parameters, buffers, optimizer
state) plus the highest running sum of the allocations and frees it records during the step. On a GPU
(``--device cuda``) the child reports ``torch.cuda.max_memory_allocated`` instead of the resident set.

Configurations as in ``strategies.py``: ``single`` (the base with its task) and ``<strategy> xN`` (the ``ens``
ensemble with its task, members run by that strategy); one full step is the task's forward, backward, SGD step
(momentum 0.9) and ``zero_grad(set_to_none=True)``. Target: ``<strategy> xN / (N x single)`` <= 1.1.

Usage::

    python benchmarks/memory.py --base resnet18 --img-size 32 --batch-size 64 --members 2 4 --threads 1
"""
import argparse
import gc
import json
import os
import subprocess
import sys

import timm
import torch
from _common import (
    NUM_CLASSES,
    OPTIMIZER_ARGS,
    add_device_args,
    add_model_args,
    check_args,
    fixed_batch,
    make_train_step,
    model_setup,
    print_header,
    setup_device,
)
from torch.profiler import ProfilerActivity, profile

import timm_ensembles

STRATEGIES = ('loop', 'vmap', 'grouped')


def _status_bytes(key: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f'no {key} in /proc/self/status')


def _profiled_peak(model, step, device) -> int:
    """Tensor-level peak of one training step (after a first one has made the gradients and momentum buffers): the
    bytes alive before it (parameters, buffers, optimizer state) plus the highest running sum of the profiler's
    allocations and frees (``profile_memory=True``) during the step, allocator-independent."""
    step()
    step.optimizer.zero_grad(set_to_none=True)
    state = [t for s in step.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    before = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers(), *state))
    activities = [ProfilerActivity.CUDA] if device.type == 'cuda' else [ProfilerActivity.CPU]
    with profile(activities=activities, profile_memory=True) as prof:
        step()
    attr = 'self_device_memory_usage' if device.type == 'cuda' else 'self_cpu_memory_usage'
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += getattr(event, attr)
        peak = max(peak, live)
    return before + peak


def child(cfg: dict) -> dict:
    """Run in the fresh subprocess: build one configuration, train ``steps`` steps, report its peak."""
    torch.set_num_threads(cfg['threads'])
    device = torch.device(cfg['device'])

    def build(batch_size):
        x, target = fixed_batch(batch_size, cfg['img_size'], device)
        if cfg['strategy'] is None:
            model = timm.create_model(cfg['base'], num_classes=NUM_CLASSES)
        else:
            model = timm.create_model('ens', base_model=cfg['base'], num_members=cfg['members'],
                                      num_classes=NUM_CLASSES)
            # the check against the loop on a slice of the batch (the default probe is at the base's input size)
            model.set_member_strategy(cfg['strategy'], example_input=x[:4])
        task = timm_ensembles.create_task(model.to(device)).train()
        optimizer = task.create_optimizer(**OPTIMIZER_ARGS)
        step = make_train_step(task, optimizer, x, target)
        step.optimizer = optimizer
        return model, step

    # the same configuration, small, once: loads every kernel's code and one-off buffers before the measurement
    model, step = build(2)
    for _ in range(2):
        step()
    del model, step
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.synchronize()
        base_mem = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base_mem = _status_bytes('VmRSS')
    model, step = build(cfg['batch_size'])
    # the peak from here on: the strategy's check against the loop at construction is not training memory (the
    # model's parameters, allocated before, stay counted through base_mem)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    else:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets the kernel's high-water mark (VmHWM) to the current resident set
    for _ in range(cfg['steps']):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base_mem
    else:
        peak = _status_bytes('VmHWM') - base_mem
    # after the resident-set measurement: the profiler's own records take memory
    tensor_peak = _profiled_peak(model, step, device)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(peak=peak, params=params, tensor_peak=tensor_peak)


def run_child(args: argparse.Namespace, strategy: str | None, members: int) -> dict:
    cfg = dict(base=args.base, img_size=args.img_size, batch_size=args.batch_size, steps=args.steps,
               threads=args.threads, device=args.device, strategy=strategy, members=members)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run([sys.executable, __file__, '--child', json.dumps(cfg)], env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        return dict(error=out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f'exit {out.returncode}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    add_model_args(parser, members=[2, 4])
    parser.add_argument('--strategies', nargs='+', default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument('--steps', type=int, default=3, help='training steps per configuration (the first'
                        ' allocates the gradients and momentum buffers)')
    parser.add_argument('--repeats', type=int, default=2, help='fresh subprocesses per configuration (the minimum'
                        ' is reported)')
    add_device_args(parser, threads=1)
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    setup_device(args)
    method = ('torch.cuda.max_memory_allocated' if args.device == 'cuda' else
              'VmHWM of a fresh, warmed-up subprocess (high-water mark reset) minus its VmRSS before the model is'
              ' built, MALLOC_MMAP_THRESHOLD_=65536')
    print_header('Peak training memory by member strategy', argv, args.device,
                 f'{model_setup(args)}, members {args.members}, {args.steps} steps per configuration, min of'
                 f' {args.repeats} subprocesses; measure: {method}')

    def measure(strategy, n):
        runs = [run_child(args, strategy, n) for _ in range(args.repeats)]
        errors = [r['error'] for r in runs if 'error' in r]
        if errors:
            return dict(error=errors[0])
        return dict(peak=min(r['peak'] for r in runs), params=runs[0]['params'],
                    tensor_peak=min(r['tensor_peak'] for r in runs))

    mib = 2 ** 20
    single = measure(None, 1)
    if 'error' in single:
        raise SystemExit(f'single failed: {single["error"]}')
    print('\n| configuration | parameters (MiB) | RSS peak (MiB) | RSS peak / (N x single) | tensor peak (MiB) |'
          ' tensor peak / (N x single) |')
    print('|---|---:|---:|---:|---:|---:|')
    print(f'| single | {single["params"] / mib:.1f} | {single["peak"] / mib:.1f} | |'
          f' {single["tensor_peak"] / mib:.1f} | |')
    for n in args.members:
        for strategy in args.strategies:
            r = measure(strategy, n)
            if 'error' in r:
                print(f'| {strategy} x{n} | refused or failed: {r["error"][:150]} | | | | |')
                continue
            print(f'| {strategy} x{n} | {r["params"] / mib:.1f} | {r["peak"] / mib:.1f} |'
                  f' {r["peak"] / (n * single["peak"]):.3f} | {r["tensor_peak"] / mib:.1f} |'
                  f' {r["tensor_peak"] / (n * single["tensor_peak"]):.3f} |', flush=True)


if __name__ == '__main__':
    main()
