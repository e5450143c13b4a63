"""How many reads of the teacher row AKL's head-threshold search makes (the Triton dense
kernel, backends/triton/akl.py), counted by running the kernel through Triton's interpreter
on synthetic rows at V = 128256: logits ~ N(0, sigma) with a few ids raised by `peak`, at
temperatures 1, 2 and 4, head mass 1/2, bf16 and fp32 teachers. Each step is one read of the
row; the count is exact (the interpreter runs the kernel's own loop), the rows are a model
of a language model's (not a profile of one).

    TRITON_INTERPRET=1 python bench/akl_search_steps.py > bench/results/akl-steps-DATE.md
"""

from __future__ import annotations

import os
import sys

import torch

import distill_ops
from distill_ops.backends.triton import akl


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("run with TRITON_INTERPRET=1 (the count patches the interpreted kernel)",
              file=sys.stderr)
        return 2
    calls = [0]
    search_step = akl.akl_head_mass

    def counted(*args, **kwargs):
        calls[0] += 1
        return search_step.fn(*args, **kwargs)

    akl.akl_threshold.fn.__globals__["akl_head_mass"] = counted
    gen = torch.Generator().manual_seed(0)
    v = 128256
    print("| logits | top logit | T | bf16 teacher: reads | fp32 teacher: reads |")
    print("|---|---|---|---|---|")
    for sigma, peak in [(2.5, 15.0), (2.5, 25.0), (3.0, 10.0), (1.0, 5.0)]:
        x = torch.randn(1, v, generator=gen) * sigma
        x[0, torch.randint(0, v, (3,), generator=gen)] += peak
        s = torch.randn(1, v, generator=gen) * sigma
        for t in (1.0, 2.0, 4.0):
            reads = []
            for dtype in (torch.bfloat16, torch.float32):
                calls[0] = 0
                distill_ops.kd_loss(s.to(dtype), x.to(dtype), divergence="akl", temperature=t,
                                    akl_head_mass=0.5, backend="triton")
                reads.append(calls[0])
            print(f"| N(0, {sigma}), 3 ids +{peak:g} | {x.max().item():.1f} | {t:g} "
                  f"| {reads[0]} | {reads[1]} |")
    print("\nBefore the bounded search: 31 reads for every row.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
