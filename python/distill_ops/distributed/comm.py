"""torch.distributed plumbing of the vocab-parallel ops, and the data-parallel token count.

Every collective of the vocab-parallel ops goes through :func:`all_reduce` /
:func:`all_gather` here, which count the bytes each rank sends (``comm_stats()``; the tests
and ``distill-ops bench --world`` read them). Shapes are agreed collectively first
(:func:`vocab_shard`): every rank gathers every rank's facts and reaches the same verdict, so
a bad slice raises the same ``ValueError`` on every rank instead of leaving the others
waiting in a collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["VocabShard", "comm_stats", "global_num_items", "reset_comm_stats", "vocab_shard"]

_STATS = {"calls": 0, "bytes": 0}


def comm_stats() -> dict[str, int]:
    """Collectives issued and bytes this rank contributed to them since the last reset."""
    return dict(_STATS)


def reset_comm_stats() -> None:
    _STATS["calls"] = 0
    _STATS["bytes"] = 0


def _count(t: Tensor) -> None:
    _STATS["calls"] += 1
    _STATS["bytes"] += t.numel() * t.element_size()


def all_reduce(t: Tensor, op: dist.ReduceOp.RedOpType, group: object) -> Tensor:
    """In-place all-reduce of a contiguous tensor over `group` (counted)."""
    _count(t)
    dist.all_reduce(t, op=op, group=group)
    return t


def all_gather(t: Tensor, group: object) -> Tensor:
    """[world, *t.shape]: every rank's `t`, in rank order (counted)."""
    _count(t)
    world = dist.get_world_size(group)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


def _check_group(group: object) -> object:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised: "
                         "call torch.distributed.init_process_group first")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("this rank is not a member of process_group")
    return group


@dataclass(frozen=True)
class VocabShard:
    """This rank's contiguous slice [offset, offset + local) of a vocabulary of `total` ids,
    split over `world` ranks of `group` (slices in rank order, possibly uneven)."""

    group: object
    rank: int
    world: int
    offset: int
    local: int
    total: int


def vocab_shard(group: object, local: int, facts: Sequence[tuple[str, int]] = (),
                checks: Sequence[tuple[str, bool]] = (),
                device: torch.device | str = "cpu") -> VocabShard:
    """Agree on the vocabulary split over `group` with one all-gather of this rank's slice
    width, `facts` ((name, int) that must be equal on every rank, e.g. the number of rows)
    and `checks` ((message, passed) of local conditions). Every rank reaches the same verdict
    and raises the same ValueError, naming the ranks and values at fault."""
    group = _check_group(group)
    row = [local, *[v for _, v in facts], *[int(bool(ok)) for _, ok in checks]]
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    table = all_gather(mine, group).cpu().tolist()  # host-sync-ok: shapes, once per call
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    problems = []
    for c, (name, _) in enumerate(facts, start=1):
        values = [r[c] for r in table]
        if len(set(values)) > 1:
            problems.append(f"{name} differs across ranks: {values}")
    for c, (message, _) in enumerate(checks, start=1 + len(facts)):
        bad = [r for r, vals in enumerate(table) if not vals[c]]
        if bad:
            problems.append(f"{message} (on rank{'s' if len(bad) > 1 else ''} "
                            f"{', '.join(map(str, bad))})")
    if problems:
        raise ValueError("vocab-parallel arguments disagree across process_group (every rank "
                         "raises this): " + "; ".join(problems))
    widths = [r[0] for r in table]
    return VocabShard(group, rank, world, sum(widths[:rank]), local, sum(widths))


def global_num_items(labels: Tensor, ignore_index: int = -100, mask: Tensor | None = None,
                     process_group: object | None = None) -> Tensor:
    """The number of tokens that count (label != ignore_index, mask True) summed over the
    data-parallel `process_group` (default: the whole world; this rank alone without
    torch.distributed): a device tensor, no host sync.

    Pass it as ``num_items_in_batch`` to every loss of an optimizer step (every micro-batch
    of gradient accumulation, every data-parallel rank) and multiply the loss by the number
    of data-parallel ranks when the wrapper averages gradients (DDP and FSDP do): the update
    then equals the single-process gradient of the mean over all those tokens.

    Example:
        >>> n = global_num_items(torch.cat([mb["labels"] for mb in micro_batches]))
        >>> for mb in micro_batches:
        ...     loss = kd_loss(s, t, labels=mb["labels"], num_items_in_batch=n)
        ...     (loss * dist.get_world_size()).backward()
    """
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & mask
    count = valid.sum().to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        group = process_group if process_group is not None else dist.group.WORLD
        all_reduce(count, dist.ReduceOp.SUM, group)
    return count.reshape(())
