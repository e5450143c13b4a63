"""Run a function on N gloo processes (forked: no re-import, a second or two per test) and
collect what each rank returns; a rank's exception comes back as its traceback text."""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import traceback


def _worker(rank, world, init_file, fn, args, queue, gpu=False):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if gpu and torch.cuda.is_available():  # every rank on the one GPU (gloo: via the host)
            torch.cuda.set_device(0)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
        try:
            queue.put((rank, "ok", fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report every failure to the parent, whatever it is
        queue.put((rank, "error", traceback.format_exc()))


def mean_loss_and_full_grads(loss, module) -> tuple[float, dict]:
    """Backward of this rank's loss, then (the ranks' mean loss, every parameter's gradient
    of `module` as lists, an FSDP2 shard gathered whole)."""
    import torch

    loss.backward()
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    grads = {}
    for name, p in module.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = g.tolist()
    return (total / torch.distributed.get_world_size()).item(), grads


def run_ranks(fn, world: int, *args, timeout: float = 120.0, spawn: bool = False) -> list:
    """[fn(rank, world, *args) for each rank], run in `world` forked gloo processes (spawned
    with `spawn`: a parent that has initialised CUDA cannot fork a process that uses it; `fn`
    must then be importable). Raises AssertionError with every failing rank's traceback; a
    hang past `timeout` fails too."""
    ctx = mp.get_context("spawn" if spawn else "fork")
    queue = ctx.Queue()
    fd, init_file = tempfile.mkstemp(prefix="distill_ops_gloo_")
    os.close(fd)
    os.unlink(init_file)
    procs = [ctx.Process(target=_worker, args=(r, world, init_file, fn, args, queue, spawn))
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, object]] = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            results[rank] = (status, value)
    except Exception as exc:
        raise AssertionError(f"ranks {sorted(set(range(world)) - set(results))} gave no "
                             f"result within {timeout} s (a hang?)") from exc
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        if os.path.exists(init_file):
            os.unlink(init_file)
    errors = {r: v for r, (s, v) in results.items() if s == "error"}
    if errors:
        raise AssertionError("\n".join(f"rank {r}:\n{tb}" for r, tb in sorted(errors.items())))
    return [results[r][1] for r in range(world)]
