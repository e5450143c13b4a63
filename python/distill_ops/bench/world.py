"""`distill-ops bench --world N`: the vocab-parallel ops on N processes (gloo on CPUs, NCCL
with one GPU per rank, gloo when the ranks share fewer GPUs), against the same op unsharded
on one process of the same run.

Each rank holds V / N of the vocabulary of every row. Reported per case: the median forward
and forward + backward time of the slowest rank, the bytes each rank contributes to the
collectives per row (counted by distill_ops.distributed, so V-independence shows directly),
the single-process time of the same op at the full V, and (dense and sparse) the fused
kernel's time on each rank's slice alone, every rank at once: what the vocab-parallel path
should cost (sparse: the targets the slice owns, as its own columns, the others padding). The
two alternate rep by rep (the machine's speed drifts between runs: ±25% on a shared VM), and
"vs slice" is the median of the per-rep ratios of the slowest rank.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time
from typing import Any

import torch

CASES = ("dense", "sparse", "topk")


def _time_once(call, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _timed(call, device: torch.device, reps: int) -> float:
    call()  # warm-up
    return statistics.median(_time_once(call, device) for _ in range(reps))


def _timed_pair(a, b, device: torch.device, reps: int) -> tuple[float, float, float]:
    """(median time of a, median time of b, median of the per-rep ratios a / b), a and b
    alternating rep by rep so that both see the same machine."""
    a()
    b()
    ta, tb = [], []
    for _ in range(reps):
        ta.append(_time_once(a, device))
        tb.append(_time_once(b, device))
    ratio = statistics.median(x / y for x, y in zip(ta, tb, strict=True))
    return statistics.median(ta), statistics.median(tb), ratio


def _case_calls(case: str, x_s, x_t, top, k: int, temperature: float, divergence: str,
                group) -> tuple[Any, Any]:
    """(forward, forward + backward) closures of one case on one rank."""
    import distill_ops

    def fwd():
        if case == "dense":
            return distill_ops.kd_loss(x_s, x_t, divergence=divergence,
                                       temperature=temperature, process_group=group)
        if case == "sparse":
            return distill_ops.sparse_kd_loss(x_s, top.indices, top.logprobs, tail="bucket",
                                              temperature=temperature, process_group=group)
        return distill_ops.topk_logprobs(x_t, k, temperature=temperature, process_group=group)

    def both():
        out = fwd()
        if case != "topk":
            torch.autograd.grad(out, x_s)
        return out

    return fwd, both


def _rank(rank: int, world: int, init: str, n: int, v: int, k: int, dtype_name: str,
          temperature: float, divergences: list[str], reps: int, queue) -> None:
    import torch.distributed as dist

    from .. import distributed as dd

    try:
        cuda = torch.cuda.is_available()
        # A GPU a rank: NCCL. Fewer GPUs than ranks: the ranks share them over gloo (which
        # copies through the host: the collectives' time is not NCCL's, the kernels' is).
        nccl = cuda and torch.cuda.device_count() >= world
        device = (torch.device("cuda", rank % torch.cuda.device_count()) if cuda
                  else torch.device("cpu"))
        if cuda:
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("nccl" if nccl else "gloo", init_method=f"file://{init}",
                                rank=rank, world_size=world)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
        g = torch.Generator().manual_seed(0)
        full_s = (torch.randn(n, v, generator=g) * 2).to(dtype)
        full_t = (torch.randn(n, v, generator=g) * 2).to(dtype)
        width = v // world + (v % world if rank == world - 1 else 0)
        off = (v // world) * rank
        x_s = full_s[:, off:off + width].to(device).requires_grad_()
        x_t = full_t[:, off:off + width].to(device)
        group = dist.group.WORLD
        import distill_ops

        top = distill_ops.topk_logprobs(full_t.to(device), k, temperature=temperature)
        rows = []
        for case in CASES:
            for div in (divergences if case == "dense" else [divergences[0]]):
                fwd, both = _case_calls(case, x_s, x_t, top, k, temperature, div, group)
                dd.reset_comm_stats()
                fwd()
                sent = dd.comm_stats()
                t_fwd = _timed(fwd, device, reps)
                # The fused kernel on this rank's slice alone (no group: its own softmax),
                # every rank at once as in the vocab-parallel run: the bar to meet.
                t_slice = ratio = 0.0
                if case != "topk":
                    # Sparse: the targets this slice owns, as its own columns (-1 pads the
                    # rest): the same kernel work on the slice, no group.
                    own = top
                    if case == "sparse":
                        local = top.indices - off
                        mine = (local >= 0) & (local < width)
                        own = top._replace(indices=torch.where(mine, local, -1))
                    _, alone = _case_calls(case, x_s, x_t, own, k, temperature, div, None)
                    t_both, t_slice, ratio = _timed_pair(both, alone, device, reps)
                else:
                    t_both = _timed(both, device, reps)
                worst = torch.tensor([t_fwd, t_both, t_slice, ratio], dtype=torch.float64)
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                single = None
                if rank == 0:
                    fs = full_s.to(device).requires_grad_()
                    f1, b1 = _case_calls(case, fs, full_t.to(device), top, k, temperature, div,
                                         None)
                    single = _timed(b1 if case != "topk" else f1, device, reps)
                fwd_s, fwd_bwd_s, slice_s, ratio = worst.tolist()  # host-sync-ok: after the run
                rows.append({"op": case, "variant": div if case == "dense" else
                             (f"tail=bucket k={k}" if case == "sparse" else f"k={k}"),
                             "world": world, "N": n, "V": v, "dtype": dtype_name,
                             "fwd_ms": fwd_s * 1e3, "fwd_bwd_ms": fwd_bwd_s * 1e3,
                             "single_ms": None if single is None else single * 1e3,
                             "slice_ms": slice_s * 1e3 if slice_s else None,
                             "vs_slice": ratio if slice_s else None,
                             "collectives": sent["calls"],
                             "bytes_per_row": sent["bytes"] / n})
        queue.put((rank, "ok", {"rows": rows, "device": str(device),
                                "backend": dist.get_backend()}))
        dist.destroy_process_group()
    except BaseException as exc:  # every failure reaches the parent
        import traceback

        queue.put((rank, "error", f"{exc!r}\n{traceback.format_exc()}"))


def run_world(world: int, n: int, v: int, k: int = 64, dtype: str = "fp32",
              temperature: float = 2.0, divergences: list[str] | None = None,
              reps: int = 5, timeout: float = 900.0) -> dict[str, Any]:
    """Spawn `world` ranks and return {"rows": [...], "device", "backend"} from rank 0."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    fd, init = tempfile.mkstemp(prefix="distill_ops_world_")
    os.close(fd)
    os.unlink(init)
    args = (world, init, n, v, k, dtype, temperature, divergences or ["forward_kl", "jsd"],
            reps, queue)
    procs = [ctx.Process(target=_rank, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed: {value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        if os.path.exists(init):
            os.unlink(init)
    return out[0]


def format_world_table(result: dict[str, Any]) -> str:
    head = ("| op | variant | world | N | V | dtype | fwd ms | fwd+bwd ms | 1 process ms | "
            "slice alone ms | vs slice | collectives | bytes/row sent |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in result["rows"]:
        single = "-" if r["single_ms"] is None else f"{r['single_ms']:.2f}"
        alone = r.get("slice_ms")
        ratio = r.get("vs_slice") or (alone and r["fwd_bwd_ms"] / alone)
        vs = "-" if not alone else f"{ratio:.2f}x"
        lines.append(f"| {r['op']} | {r['variant']} | {r['world']} | {r['N']} | {r['V']} | "
                     f"{r['dtype']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {single} | "
                     f"{'-' if not alone else f'{alone:.2f}'} | {vs} | "
                     f"{r['collectives']} | {r['bytes_per_row']:.1f} |")
    return "\n".join(lines)
