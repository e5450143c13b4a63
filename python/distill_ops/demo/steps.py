"""One student training step, and the demo's tokens/s: steps of every trained student timed
in interleaved rounds.

A student's tokens/s is one step's tokens over its median step time. Timed while each
student trains (one after the other), a slowdown of the machine lasting a few seconds
lands on one row and moves its median (identical quick runs on the 2-core VM: one row 33%
apart, 2026-12-03). Here every round times one step of each student, in an order rotated
from round to round, on copies of the trained students and their optimizers (the results
are left alone): a slowdown then falls on every row alike and on a few of each row's
steps, which the median ignores.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def train_step(student: torch.nn.Module, opt: torch.optim.Optimizer,
               loss_fn: Callable[[Any, Tensor, Tensor], Tensor], ids: Tensor,
               windows: Tensor) -> Tensor:
    """One optimizer step on `windows` (ids: their indices in the transfer set); returns
    the loss (not synchronised)."""
    loss = loss_fn(student, ids, windows)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    return loss


def interleaved_tokens_per_s(students: dict[str, torch.nn.Module],
                             loss_fns: dict[str, Callable[[Any, Tensor, Tensor], Tensor]],
                             seen: Tensor, train: Tensor, batch: int, context: int,
                             lr: float, rounds: int, device: torch.device,
                             block: int = 4) -> dict[str, float]:
    """{run: tokens/s} of each student: batch * context over the median step time. Every
    round each student takes `block` steps in a row, in an order rotated from round to
    round; the first step of each block is not timed (its caches are cold after the other
    students' steps: timing single interleaved steps measured 10-20% fewer tokens/s than
    training does, and drifted more). Then a warm-up round. On copies (the students passed
    in are not changed)."""
    runs = list(students)
    copies = {}
    for run in runs:
        m = copy.deepcopy(students[run])
        copies[run] = (m, torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01))
    times: dict[str, list[float]] = {run: [] for run in runs}
    n_batches = max(1, len(seen) // batch)
    for r in range(rounds + 1):
        for run in runs[r % len(runs):] + runs[:r % len(runs)]:
            m, opt = copies[run]
            for b in range(block):
                i = (r * block + b) % n_batches
                ids = seen[i * batch:(i + 1) * batch]
                windows = train[ids]
                t0 = time.perf_counter()
                train_step(m, opt, loss_fns[run], ids, windows)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if r and b:  # round 0 warms the optimizers' state and the allocators
                    times[run].append(time.perf_counter() - t0)
    return {run: batch * context / statistics.median(times[run]) for run in runs}
