"""Ahead-of-time compilation of every Triton kernel for real GPU targets.

The interpreter accepts code that the GPU compiler rejects (and the reverse), so the test
suite compiles each kernel here for sm_80 and sm_90 without a GPU:

    python -m distill_ops.backends.triton.aot --cc 80 --cc 90

Run it in a process without TRITON_INTERPRET=1 (the interpreter replaces `triton.jit`).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import dense_kd, dense_vp, sample, sparse_kd, sparse_vp, topk, tuning

DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class KernelSpec:
    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int = 4
    options: dict[str, object] = field(default_factory=dict)
    # Arguments compiled as multiples of 16 (pointers: 16-byte aligned), as Triton's launcher
    # specialises them at run time when they are: a vocabulary of 128256 and its strides,
    # torch's allocations. The unaligned build is the fallback for odd widths.
    aligned: tuple[str, ...] = ()

    def with_alignment(self) -> KernelSpec:
        """This spec with every pointer and every stride/width argument aligned."""
        names = tuple(k for k, v in self.signature.items()
                      if v.startswith("*") or k.endswith(("stride", "vocab", "cols", "width")))
        return KernelSpec(self.name + "[aligned]", self.fn, self.signature, self.constexprs,
                          self.num_warps, self.options, names)


def _dense_kd_specs() -> Iterator[KernelSpec]:
    floats = ("temperature", "beta", "scale_s", "cap_s", "scale_t", "cap_t", "hard_weight",
              "soft_coef", "param2", "interp")
    block, warps = dense_kd.launch_config(128256)
    # Every divergence in every dtype with every option on, and with every option off.
    for div, dt, flags in itertools.product(range(8), DTYPES, (True, False)):
        if not flags and dt != "fp32":
            continue
        sig = {
            "s_ptr": f"*{dt}", "t_ptr": f"*{dt}", "valid_ptr": "*u8", "labels_ptr": "*i64",
            "loss_ptr": "*fp32", "grad_ptr": f"*{dt}", "row_scale_ptr": "*fp32",
            "s_stride": "i64", "t_stride": "i64", "g_stride": "i64",
            "vocab": "i32", "grad_cols": "i32",
            **dict.fromkeys(floats, "fp32"),
        }
        const = {
            "DIVERGENCE": div, "HAS_CAP_S": flags, "HAS_CAP_T": flags, "HAS_INTERP": flags,
            "HAS_VALID": flags,
            "HAS_HARD": flags, "COMPUTE_GRAD": flags, "HAS_ROW_SCALE": flags, "BLOCK": block,
        }
        yield KernelSpec(f"dense_kd[div={div},{dt},opts={int(flags)}]", dense_kd.dense_kd_kernel,
                         sig, const, warps)
    for dt in DTYPES:
        sig = {"g_ptr": f"*{dt}", "scale_ptr": "*fp32", "scale_stride": "i64", "n_cols": "i32"}
        yield KernelSpec(f"scale_rows[{dt}]", dense_kd.scale_rows_kernel, sig, {"BLOCK": 4096})


def _sparse_kd_specs() -> Iterator[KernelSpec]:
    block, kp, warps = sparse_kd.launch_config(128256, 64)
    floats = ("temperature", "ratio", "beta", "param2", "interp", "hard_weight", "soft_coef")
    # Every divergence x tail in bf16 with every option on; fp32 and fp16 with options off.
    for div, tail, dt in itertools.product(range(8), range(4), DTYPES):
        flags = dt == "bf16"
        if not flags and (div, tail) != (0, 0):
            continue
        sig = {
            "s_ptr": f"*{dt}", "idx_ptr": "*i64", "tlp_ptr": "*fp32", "valid_ptr": "*u8",
            "labels_ptr": "*i64", "loss_ptr": "*fp32", "grad_ptr": f"*{dt}",
            "row_scale_ptr": "*fp32", "s_stride": "i64", "vocab": "i32", "k": "i32",
            **dict.fromkeys(floats, "fp32"),
        }
        const = {"DIVERGENCE": div, "TAIL": tail, "HAS_INTERP": flags, "HAS_VALID": flags,
                 "HAS_HARD": flags,
                 "COMPUTE_GRAD": True, "HAS_ROW_SCALE": flags, "BLOCK": block, "KP": kp}
        yield KernelSpec(f"sparse_kd[div={div},tail={tail},{dt},opts={int(flags)}]",
                         sparse_kd.sparse_kd_kernel, sig, const, warps,
                         {"enable_fp_fusion": False})


def _vocab_parallel_specs() -> Iterator[KernelSpec]:
    """The vocab-parallel phases: dense phase 0 (the KLs' cross term, or none), phase 1
    (divergences with a sums pass), phase 2 (every divergence), AKL's 3 and 4 in bf16 with every
    option on, forward KL and JSD in fp32 / fp16 with options off; sparse phases 0 and 1."""
    floats = ("temperature", "beta", "scale_s", "cap_s", "scale_t", "cap_t", "hard_weight",
              "soft_coef", "param2", "interp")
    block, warps = dense_kd.launch_config(64128)
    phases = {0: (0, 1, 2), 1: (2, 3, 4, 5, 6), 2: tuple(range(8)), 3: (7,), 4: (7,)}
    cases = [(p, d, "bf16", True) for p, divs in phases.items() for d in divs]
    cases += [(p, d, dt, False) for dt in ("fp32", "fp16") for d in (0, 2) for p in (0, 1, 2)
              if d in phases[p]]
    for phase, div, dt, flags in cases:
        sig = {
            "s_ptr": f"*{dt}", "t_ptr": f"*{dt}", "valid_ptr": "*u8", "labels_ptr": "*i64",
            "rec_ptr": "*fp64", "grad_ptr": f"*{dt}", "s_stride": "i64", "t_stride": "i64",
            "g_stride": "i64", "width": "i32", **dict.fromkeys(floats, "fp32"),
        }
        const = {"PHASE": phase, "DIVERGENCE": div, "HAS_CAP_S": flags, "HAS_CAP_T": flags,
                 "HAS_INTERP": flags, "HAS_VALID": flags, "HAS_HARD": flags, "BLOCK": block}
        yield KernelSpec(f"dense_vp[phase={phase},div={div},{dt},opts={int(flags)}]",
                         dense_vp.dense_vp_kernel, sig, const, warps)
    block, kp, warps = sparse_vp.launch_config(64128, 64)
    for phase, dt, flags in itertools.product((0, 1), DTYPES, (True, False)):
        if flags != (dt == "bf16"):
            continue
        sig = {
            "s_ptr": f"*{dt}", "idx_ptr": "*i64", "valid_ptr": "*u8", "labels_ptr": "*i64",
            "rec_ptr": "*fp64", "zsup_ptr": "*fp64", "sup_ptr": "*fp64", "grad_ptr": f"*{dt}",
            "s_stride": "i64", "width": "i32", "k": "i32", "offset": "i64",
            "temperature": "fp32", "hard_weight": "fp32",
        }
        const = {"PHASE": phase, "HAS_VALID": flags, "HAS_HARD": flags, "BLOCK": block,
                 "KP": kp}
        yield KernelSpec(f"sparse_vp[phase={phase},{dt},opts={int(flags)}]",
                         sparse_vp.sparse_vp_kernel, sig, const, warps,
                         {"enable_fp_fusion": False})


def _tuning_specs() -> Iterator[KernelSpec]:
    """Every autotuning config (triton/tuning.py) of the dense and sparse kernels, on
    forward KL and JSD in bf16 with every option on: the configs a GPU may pick."""
    dense = {s.name: s for s in _dense_kd_specs()}
    sparse = {s.name: s for s in _sparse_kd_specs()}
    bases = [dense["dense_kd[div=0,bf16,opts=1]"], dense["dense_kd[div=2,bf16,opts=1]"],
             sparse["sparse_kd[div=0,tail=0,bf16,opts=1]"],
             sparse["sparse_kd[div=2,tail=0,bf16,opts=1]"]]
    for base in bases:
        for block, warps, stages in tuning.ROW_CONFIGS:
            yield KernelSpec(f"{base.name}[tuned BLOCK={block},w={warps},s={stages}]", base.fn,
                             base.signature, {**base.constexprs, "BLOCK": block}, warps,
                             {**base.options, "num_stages": stages})


def _topk_specs() -> Iterator[KernelSpec]:
    for dt, k, cap in (("bf16", 64, True), ("fp32", 100, False), ("fp16", 1, False)):
        kp, steps, warps = topk.launch_config(k)
        sig = {"x_ptr": f"*{dt}", "idx_ptr": "*i32", "lp_ptr": "*fp32", "x_stride": "i64",
               "vocab": "i32", "k": "i32", "scale": "fp32", "cap": "fp32",
               "temperature": "fp32"}
        yield KernelSpec(f"topk[{dt},k={k},cap={int(cap)}]", topk.topk_kernel, sig,
                         {"HAS_CAP": cap, "KP": kp, "S": steps}, warps)


def _sample_specs() -> Iterator[KernelSpec]:
    for dt, draws in (("bf16", 64), ("fp32", 13), ("fp16", 1024)):
        block, sp = sample.launch_config(draws)
        sig = {"x_ptr": f"*{dt}", "u_ptr": "*fp64", "draws_ptr": "*i64", "total_ptr": "*fp64",
               "x_stride": "i64", "vocab": "i32", "n_draws": "i32", "inv_t": "fp32"}
        yield KernelSpec(f"sample_cdf[{dt},draws={draws}]", sample.sample_cdf_kernel, sig,
                         {"BLOCK": block, "SP": sp}, 4)


def _aligned_specs() -> Iterator[KernelSpec]:
    """The bf16 specs again as they compile for aligned rows (the common case on a GPU)."""
    for spec in [*_dense_kd_specs(), *_sparse_kd_specs(), *_topk_specs(), *_sample_specs()]:
        if "bf16" in spec.name and (spec.name.startswith(("dense_kd", "scale_rows", "topk",
                                                          "sample"))
                                    or spec.name.startswith("sparse_kd[div=0,tail=0")):
            yield spec.with_alignment()


def all_specs() -> list[KernelSpec]:
    return [*_dense_kd_specs(), *_sparse_kd_specs(), *_tuning_specs(), *_topk_specs(),
            *_sample_specs(), *_vocab_parallel_specs(), *_aligned_specs()]


def compile_spec(spec: KernelSpec, cc: int):
    attrs = {(spec.fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name in spec.aligned}
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": spec.num_warps, **spec.options})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", type=int, action="append", help="compute capability, e.g. 80, 90")
    args = ap.parse_args(argv)
    if not hasattr(dense_kd.dense_kd_kernel, "cache_key"):
        print("TRITON_INTERPRET=1 is set: unset it to compile for a GPU", file=sys.stderr)
        return 2
    failures = 0
    for cc in args.cc or [80, 90]:
        for spec in all_specs():
            try:
                k = compile_spec(spec, cc)
            except Exception as exc:  # report every failing kernel, not just the first
                failures += 1
                print(f"FAIL sm_{cc} {spec.name}: {type(exc).__name__}: {exc}", flush=True)
                continue
            print(f"ok   sm_{cc} {spec.name}: {len(k.asm['cubin'])} B cubin, "
                  f"{k.metadata.shared} B shared memory", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
