"""How close a result is to the hardware: the bytes each op must move (the one byte model
of the harness) and the matmul flops of the LM-head ops.

A memory-bound op's floor is its bytes over the measured copy bandwidth; the harness reports
bytes / time as GB/s and that over the copy bandwidth as the fraction of the floor reached.
The LM-head ops are compute-bound: their rows also give the fraction of the matmul-only time.
"""

from __future__ import annotations

from .shapes import OPS, Shape


def bytes_floor(op: str, s: Shape, elt: int) -> tuple[int, int]:
    """(bytes that must move, bytes of the output) of one call, forward + backward for the
    losses: the one byte model of every op. `elt` is the logits' (or hidden states') element
    size; ids and fp32 log-probabilities of targets are 4 + 4 bytes.

    - dense: read student and teacher logits, write the gradient: 3 N V elt.
    - sparse: read the student logits and k targets, write the gradient: 2 N V elt + 8 N k.
    - topk, sample: read the logits, write k (id, value) pairs: N V elt + 8 N k.
    - fused_linear (dense teacher): read both hidden states and heads, write the gradients of
      the student's: (N Hs + V Hs) 2 elt + (N Ht + V Ht) elt.
    - fused_linear_sparse: read the student's hidden states, head and k targets, write their
      gradients: (N Hs + V Hs) 2 elt + 8 N k.
    - fused_linear_topk: read hidden states and head, write k pairs: (N Ht + V Ht) elt + 8 N k.
    """
    n, v, k = s.n, s.v, s.k
    if op == "dense":
        return 3 * n * v * elt, n * v * elt
    if op == "sparse":
        return 2 * n * v * elt + 8 * n * k, n * v * elt
    if op in ("topk", "sample"):
        return n * v * elt + 8 * n * k, 8 * n * k
    student = (n * s.hs + v * s.hs) * elt
    if op == "fused_linear":
        return 2 * student + (n * s.ht + v * s.ht) * elt, student
    if op == "fused_linear_sparse":
        return 2 * student + 8 * n * k, student
    if op == "fused_linear_topk":
        return (n * s.ht + v * s.ht) * elt + 8 * n * k, 8 * n * k
    raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")


def matmul_flops(op: str, s: Shape) -> int:
    """Multiply-add flops (2 per multiply-add) of the projections an LM-head op cannot avoid,
    forward + backward: the student's logits and their two gradients (3 matmuls of N x H x V)
    and the teacher's logits (1), or the teacher's alone for top-k; 0 for the other ops."""
    n, v = s.n, s.v
    if op == "fused_linear":
        return 2 * n * v * (3 * s.hs + s.ht)
    if op == "fused_linear_sparse":
        return 2 * n * v * 3 * s.hs
    if op == "fused_linear_topk":
        return 2 * n * v * s.ht
    if op in OPS:
        return 0
    raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")


__all__ = ["bytes_floor", "matmul_flops"]
