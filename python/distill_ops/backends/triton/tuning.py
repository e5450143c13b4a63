"""Autotuning of the row kernels (dense and sparse KD) on a GPU.

One space of (BLOCK, num_warps, num_stages) configs; `triton.autotune` times the ones that fit
a row's vocabulary at the first call for each (vocab, divergence, dtype) and keeps the
fastest. Every config is compiled ahead of time for sm_80 and sm_90 under both Tritons in the
test suite (triton/aot.py), so none can fail on a GPU for the first time. Tuning is off under
the interpreter and with ``DISTILL_OPS_AUTOTUNE=0`` (then launch_config's fixed choice).
"""

from __future__ import annotations

import os

import torch
import triton

from .. import triton_interpreted

# (BLOCK, num_warps, num_stages): blocks of 1k to 8k columns per loop step, 4 to 16 warps,
# and two-stage software pipelining of the loads for the larger blocks.
ROW_CONFIGS = ((1024, 4, 1), (2048, 8, 1), (4096, 8, 1), (4096, 16, 1), (8192, 16, 1),
               (2048, 8, 2), (4096, 16, 2))


def configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK": b}, num_warps=w, num_stages=s) for b, w, s in ROW_CONFIGS]


def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Blocks no wider than the row (rounded up to a power of two); the smallest if none."""
    width = max(128, triton.next_power_of_2(int(named_args["vocab"])))
    keep = [c for c in configs if c.kwargs["BLOCK"] <= width]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK"])]


def tuned(kernel, key: list[str]):
    """`kernel` behind triton.autotune over ROW_CONFIGS, re-tuned per value of `key` (and per
    tensor dtype)."""
    return triton.autotune(configs(), key=key, prune_configs_by={"early_config_prune": prune})(
        kernel)


def enabled(t: torch.Tensor) -> bool:
    return (t.is_cuda and not triton_interpreted()
            and os.environ.get("DISTILL_OPS_AUTOTUNE", "1") != "0")
