"""Tensor-parallel LM heads x data parallelism, end to end: a vocab-parallel teacher writes its
top-k into a target store, and a student with a vocab-parallel head trains on it under DDP.

The ranks form a grid of `tp` tensor-parallel ranks (each holds a contiguous, possibly uneven
slice of both LM heads' rows) by `world / tp` data-parallel replicas (each takes its own
sequences). Nothing gathers logits:

1. Teacher side: `fused_linear_topk(..., process_group=tp_group)` merges the tp ranks' local
   top-k; the first tp rank of each replica appends the result to a `TopKWriter` whose
   writers are those ranks (`process_group=writers`), one shard set per replica.
2. Student side: every rank reads its replica's targets back, and
   `fused_linear_kd_loss(..., process_group=tp_group)` computes the sparse loss from the
   student's hidden states and its head slice; the gradient of the hidden states comes back
   all-reduced over tp, and DDP (over the replica's data-parallel group) averages the rest.
   `global_num_items` counts the tokens of every replica, so the update is the
   single-process gradient of the mean over all of them.

On CPUs with gloo (NCCL on GPUs):
    torchrun --nproc_per_node 4 examples/vocab_parallel_distill.py --tp 2 --out /tmp/vp_store
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import distill_ops
from distill_ops.distributed import global_num_items
from distill_ops.store import TopKReader, TopKWriter


def slices(vocab: int, tp: int) -> list[slice]:
    """Uneven contiguous slices: the last rank takes the remainder."""
    w = [vocab // tp] * tp
    w[-1] += vocab - sum(w)
    starts = [sum(w[:i]) for i in range(tp)]
    return [slice(a, a + n) for a, n in zip(starts, w, strict=True)]


class Body(torch.nn.Module):
    """A stand-in for a transformer: embedding and one tanh layer (hidden states out)."""

    def __init__(self, vocab: int, hidden: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g) * 0.5)
        self.mix = torch.nn.Parameter(torch.randn(hidden, hidden, generator=g) / hidden**0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.emb[tokens] @ self.mix)


class Student(torch.nn.Module):
    """Body and this rank's slice of the LM head; forward returns the distillation loss
    (so that DDP's gradient hooks see every parameter used)."""

    def __init__(self, vocab: int, hidden: int, head_rows: slice) -> None:
        super().__init__()
        self.body = Body(vocab, hidden, seed=1)
        g = torch.Generator().manual_seed(2)
        full = torch.randn(vocab, hidden, generator=g) / hidden**0.5
        self.head = torch.nn.Parameter(full[head_rows].clone())

    def forward(self, tokens: torch.Tensor, **loss_options) -> torch.Tensor:
        return distill_ops.fused_linear_kd_loss(self.body(tokens), self.head, **loss_options)


def grid(tp: int) -> tuple[int, int, object, object, object | None]:
    """(tp rank, dp rank, tp group, dp group, writers group or None): ranks r = dp * tp + t.
    Every rank creates every group, in the same order, as torch.distributed requires."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp:
        raise ValueError(f"--tp {tp} must divide the world size {world}")
    dp = world // tp
    tp_group = dp_group = None
    for d in range(dp):
        g = dist.new_group(list(range(d * tp, d * tp + tp)))
        if rank // tp == d:
            tp_group = g
    for t in range(tp):
        g = dist.new_group(list(range(t, world, tp)))
        if rank % tp == t:
            dp_group = g
    writers = dp_group if rank % tp == 0 else None
    return rank % tp, rank // tp, tp_group, dp_group, writers


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=301)
    ap.add_argument("--hidden", type=int, nargs=2, default=(24, 32), metavar=("HS", "HT"))
    ap.add_argument("--sequences", type=int, default=8, help="per data-parallel replica")
    ap.add_argument("--seq-len", type=int, default=12)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=20.0)
    ap.add_argument("--out", default="vp_store")
    args = ap.parse_args(argv)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    tp_rank, dp_rank, tp_group, dp_group, writers = grid(args.tp)
    dp = dist.get_world_size() // args.tp
    mine = slices(args.vocab, args.tp)[tp_rank]
    out = Path(args.out)
    if dist.get_rank() == 0 and out.exists():
        shutil.rmtree(out)
    dist.barrier()

    # The data: replica d takes sequences d, d + dp, d + 2 dp, ...
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab, (args.sequences * dp, args.seq_len + 1), generator=g)
    seq_ids = list(range(dp_rank, len(data), dp))

    # 1. Teacher side: vocab-parallel top-k from hidden states, into the store.
    teacher = Body(args.vocab, args.hidden[1], seed=3).to(device)
    w_t = (torch.randn(args.vocab, args.hidden[1], generator=torch.Generator().manual_seed(4))
           * 2 / args.hidden[1]**0.5)[mine].to(device)
    writer = None
    if writers is not None:
        writer = TopKWriter(out, vocab_size=args.vocab, k=args.k, temperature=1.0,
                            value_encoding="fp16", process_group=writers)
    with torch.no_grad():
        for i in seq_ids:
            h_t = teacher(data[i, :-1].to(device))
            top = distill_ops.fused_linear_topk(h_t, w_t, args.k, process_group=tp_group)
            if writer is not None:
                writer.append(i, top.indices.cpu(), top.logprobs.cpu())
    if writer is not None:
        writer.close()
    dist.barrier()

    # 2. Student side: DDP over the replicas, the head vocab-parallel over tp.
    reader = TopKReader(out)
    student = Student(args.vocab, args.hidden[0], mine).to(device)
    model = DDP(student, process_group=dp_group)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    tokens = torch.stack([data[i, :-1] for i in seq_ids]).to(device)
    labels = torch.stack([data[i, 1:] for i in seq_ids]).to(device)
    targets = [reader.get(i) for i in seq_ids]
    idx = torch.stack([t[0] for t in targets]).to(device)
    lp = torch.stack([t[1] for t in targets]).to(device)
    n_items = global_num_items(labels, process_group=dp_group)
    losses = []
    for _ in range(args.steps):
        loss = model(tokens, teacher_indices=idx, teacher_logprobs=lp, tail="bucket",
                     temperature=1.0, labels=labels, hard_weight=0.1,
                     num_items_in_batch=n_items, process_group=tp_group)
        opt.zero_grad()
        (loss * dp).backward()  # DDP averages over the replicas: the sum is what we want
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total, group=dp_group)
        losses.append(total.item())  # host-sync-ok: printed
    if dist.get_rank() == 0:
        print(" ".join(f"{x:.4f}" for x in losses))
    return {"losses": losses, "sequences": len(reader), "store_k": reader.manifest["k"]}


if __name__ == "__main__":
    main()
    dist.destroy_process_group()
