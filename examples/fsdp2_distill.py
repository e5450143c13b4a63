"""Distillation with the student (and teacher) sharded by FSDP2 or replicated by DDP.

Each rank takes its own sequences. The student's body runs through its wrapper as usual;
`fused_linear_kd_loss` then reads the LM head directly. Under FSDP2 (`fully_shard`) that head
is a sharded DTensor outside the module's forward: the op gathers it once per call
(`full_tensor()`) and its backward hands every rank its shard of the ranks' mean gradient,
as FSDP's own reduce-scatter would; under DDP it is a plain parameter and DDP averages its
gradient. Either way each step equals one process's step on all the ranks' sequences.

On CPUs with gloo (NCCL on GPUs):
    torchrun --nproc_per_node 2 examples/fsdp2_distill.py --wrap fsdp2
    torchrun --nproc_per_node 2 examples/fsdp2_distill.py --wrap ddp
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import distill_ops

VOCAB, HIDDEN, TEACHER_HIDDEN, CONTEXT = 300, 32, 64, 12


class LM(torch.nn.Module):
    """A token embedding, one mixing layer and an LM head: enough to distil something."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, hidden)
        self.mix = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final hidden states (the head is applied by the loss)."""
        return torch.tanh(self.mix(self.emb(tokens)))


def wrap(model: LM, how: str) -> torch.nn.Module:
    if how == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.head)
        fully_shard(model)
        return model
    if how == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    return model


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wrap", choices=("fsdp2", "ddp", "none"), default="fsdp2")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--divergence", default="forward_kl")
    args = ap.parse_args(argv)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # every rank builds the same models
    teacher = LM(TEACHER_HIDDEN).requires_grad_(False)
    student = LM(HIDDEN)
    model = wrap(student, args.wrap)
    teacher = wrap(teacher, "fsdp2") if args.wrap == "fsdp2" else teacher
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(args.steps):
        batch = torch.randint(0, VOCAB, (4 * world, CONTEXT), generator=g)
        tokens = batch[rank::world]  # this rank's sequences
        with torch.no_grad():
            h_t = teacher(tokens)
        h_s = model(tokens)
        head = student.head  # the module under the wrapper (FSDP2 wraps in place)
        loss = distill_ops.fused_linear_kd_loss(h_s, head.weight, h_t,
                                                teacher.head.weight.detach(),
                                                divergence=args.divergence, temperature=2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append((mean / world).item())
    if rank == 0:
        print(f"{args.wrap}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps")
    return {"losses": losses}


if __name__ == "__main__":
    main()
    dist.destroy_process_group()
