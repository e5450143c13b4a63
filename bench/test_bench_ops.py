"""pytest-benchmark over every op and its peers (`make bench`), at the sizes of
`distill-ops bench`: canonical sizes on a GPU, CPU-sized ones elsewhere (DISTILL_OPS_BENCH_QUICK=1
for the quick ones). Benchmarks are not tests: nothing here asserts a speed.

Each benchmark is the op's full job (forward + backward for the losses), with the byte floor
of `distill_ops.bench.bytes_floor` in `extra_info`.
"""

from __future__ import annotations

import os

import pytest
import torch

from distill_ops import bench as bm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPES = (bm.QUICK if os.environ.get("DISTILL_OPS_BENCH_QUICK") else
          bm.CANONICAL if DEVICE.type == "cuda" else bm.CPU_FULL)
TEMPERATURE = 2.0


def _params():
    out = []
    for op in bm.OPS:
        for s in SHAPES[op]:
            # torch.compile wraps lazily: nothing compiles at collection.
            for variant, cases in bm.groups(op, s, TEMPERATURE, DEVICE, include_compile=True):
                for c in cases:
                    name = f"{op}-{variant}-{s.label()}-{c.impl}".replace(" ", "_")
                    out.append(pytest.param(op, s, variant, c.impl, id=name))
    return out


_INPUTS: dict = {}


@pytest.mark.parametrize(("op", "shape", "variant", "impl"), _params())
def test_op(benchmark, op, shape, variant, impl):
    include_compile = impl == "torch.compile"
    cases = dict(bm.groups(op, shape, TEMPERATURE, DEVICE, include_compile))[variant]
    case = next(c for c in cases if c.impl == impl)
    if case.fn is None:
        pytest.skip(f"{impl}: {case.note}")
    key = (op, shape)
    if key not in _INPUTS:
        _INPUTS.clear()
        _INPUTS[key] = bm.make_inputs(op, shape, DTYPE, DEVICE, TEMPERATURE)
    inputs = _INPUTS[key]
    if case.grads:
        inputs = (*(x.detach().requires_grad_() for x in inputs[:case.grads]),
                  *inputs[case.grads:])

    def step():
        out = case.fn(*inputs)
        if case.grads:
            out = torch.autograd.grad(out, inputs[:case.grads])
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"{op} {variant} {shape.label()}"
    benchmark.extra_info["bytes_floor"] = bm.bytes_floor(op, shape, DTYPE.itemsize)[0]
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
