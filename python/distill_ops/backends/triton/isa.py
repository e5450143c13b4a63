"""Instruction counts of the Triton kernels' compiled loops, and the time they imply.

A row kernel is at its bandwidth floor only if its instructions issue faster than its bytes
arrive. This module compiles a kernel spec (triton/aot.py) for a GPU target without a GPU,
disassembles the cubin with the nvdisasm that ships with Triton, finds each loop (a branch
back to an earlier label) and counts its instructions per logit: all of them, the special
function unit's (MUFU: ex2, lg2, rcp), loads and stores. With the H200's rates that gives
three lower bounds on a kernel's time at a shape:

- memory: bytes moved / copy bandwidth (4.27 TB/s measured);
- issue: warp instructions / (4 per clock per SM x 132 SMs x 1.98 GHz);
- MUFU: MUFU warp instructions / (0.5 per clock per SM: 16 lanes per clock).

A kernel whose issue or MUFU bound exceeds its memory bound cannot reach the floor however it
is scheduled: it has to do less work per logit. These are static counts (each loop's body
once; predicated-off instructions still issue), a check that runs on the CPU, not a
measurement: the GPU's profile (ncu) is the judge.

    python -m distill_ops.backends.triton.isa                # the dense, sparse and top-k kernels
    python -m distill_ops.backends.triton.isa --spec 'dense_kd[div=2,bf16,opts=0]' --cc 80
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass

# The H200 (sm_90): SMs, boost clock, measured copy bandwidth (bench/results/h200-2026-11-28).
SMS = 132
CLOCK_HZ = 1.98e9
BANDWIDTH = 4.27e12
ISSUE_PER_CLK = 4.0  # warp instructions per clock per SM (4 schedulers)
MUFU_PER_CLK = 0.5  # warp instructions per clock per SM (16 lanes)

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


@dataclass
class Loop:
    """One loop of a kernel: its instruction range and its opcode counts (one iteration)."""

    start: int
    end: int
    ops: Counter

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def count(self, prefix: str) -> int:
        return sum(n for op, n in self.ops.items() if op.startswith(prefix))


def nvdisasm_path() -> str:
    """The nvdisasm shipped in Triton's NVIDIA backend (or on PATH)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "nvdisasm")
    return path if os.path.exists(path) else "nvdisasm"


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([nvdisasm_path(), "-c", f.name], capture_output=True, text=True,
                             check=True)
    return out.stdout


def loops(sass: str) -> list[Loop]:
    """The loops of a disassembly, in program order: each backward branch to a label closes
    one; its body is every instruction from the label to the branch."""
    labels: dict[str, int] = {}
    instrs: list[tuple[int, str]] = []
    pending: list[str] = []
    branches: list[tuple[int, str]] = []
    for line in sass.splitlines():
        lab = _LABEL.match(line.strip())
        if lab:
            pending.append(lab.group(1))
            continue
        m = _INSTR.search(line)
        if not m:
            continue
        addr, op = int(m.group(1), 16), m.group(3)
        for name in pending:
            labels[name] = addr
        pending = []
        instrs.append((addr, op))
        br = _BRANCH.search(line)
        if br:
            branches.append((addr, br.group(1)))
    found = []
    for addr, target in branches:
        start = labels.get(target)
        if start is not None and start < addr:
            ops = Counter(op for a, op in instrs if start <= a <= addr)
            found.append(Loop(start, addr, ops))
    return sorted(found, key=lambda lp: lp.start)


@dataclass
class LoopReport:
    """Per-logit counts of one loop; `per_iter` logits per thread per iteration."""

    per_iter: float
    instructions: float
    mufu: float
    loads: float
    stores: float
    wide_loads: bool  # every global load of the loop is a 16-byte vector load


def load_bytes(op: str) -> int:
    """Bytes per thread of an LDG opcode (LDG.E.128: 16, LDG.E.64: 8, LDG.E: 4, ...)."""
    for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1),
                         (".S8", 1)):
        if suffix in op:
            return size
    return 4


def report(spec, cc: int = 90, read_bytes: tuple[float, ...] = ()) -> list[LoopReport]:
    """Compile `spec` (an aot.KernelSpec) and count each loop's instructions per logit.

    A loop's logits per thread and iteration are its loaded bytes over `read_bytes[i]` (the
    bytes per logit loop i reads: 4 for a bf16 student and teacher), so a loop the compiler
    unrolled is counted right; without it, BLOCK (or KP) over the thread count."""
    from . import aot

    kernel = aot.compile_spec(spec, cc)
    threads = 32 * spec.num_warps
    width = spec.constexprs.get("BLOCK", spec.constexprs.get("KP", threads))
    sass = disassemble(kernel.asm["cubin"])
    found = loops(sass)
    if not found:  # a kernel without a loop (one block per program): its whole body
        ops = Counter(m.group(3) for m in _INSTR.finditer(sass))
        found = [Loop(0, 0, ops)]
    out = []
    for i, lp in enumerate(found):
        per_iter = max(1.0, width / threads)
        loaded = sum(load_bytes(op) * n for op, n in lp.ops.items() if op.startswith("LDG"))
        if i < len(read_bytes) and read_bytes[i] and loaded:
            per_iter = loaded / read_bytes[i]
        wide = all(".128" in op for op in lp.ops if op.startswith("LDG"))
        out.append(LoopReport(per_iter, lp.total / per_iter, lp.count("MUFU") / per_iter,
                              lp.count("LDG") / per_iter, lp.count("STG") / per_iter, wide))
    return out


def bounds(instr_per_logit: float, mufu_per_logit: float, bytes_moved: float,
           logits: float) -> dict[str, float]:
    """Lower bounds in seconds on the H200 for `logits` logit-steps of a loop body with these
    per-logit counts (each thread-logit costs 1/32 of a warp instruction)."""
    warp_instr = instr_per_logit * logits / 32
    warp_mufu = mufu_per_logit * logits / 32
    return {
        "memory": bytes_moved / BANDWIDTH,
        "issue": warp_instr / (ISSUE_PER_CLK * SMS * CLOCK_HZ),
        "mufu": warp_mufu / (MUFU_PER_CLK * SMS * CLOCK_HZ),
    }


# The issue's shape: N = 8192 rows of V = 128256 bf16 logits.
_SHAPE_LOGITS = 8192 * 128256

# The benchmark's case: bf16, gradient on (the mean's weight folded in), no softcap, hard
# term or row mask.
_PLAIN = {"HAS_CAP_S": False, "HAS_CAP_T": False, "HAS_INTERP": False, "HAS_VALID": False,
          "HAS_HARD": False, "COMPUTE_GRAD": True, "HAS_ROW_SCALE": True}
# (spec name, constexprs changed, what it is, (read, written) bytes per logit of each loop)
DEFAULT_SPECS = (
    ("dense_kd[div=0,bf16,opts=1][aligned]", _PLAIN, "dense forward KL + grad",
     ((4, 0), (4, 2))),
    ("dense_kd[div=1,bf16,opts=1][aligned]", _PLAIN, "dense reverse KL + grad",
     ((4, 0), (4, 2))),
    ("dense_kd[div=2,bf16,opts=1][aligned]", _PLAIN, "dense JSD + grad",
     ((4, 0), (4, 0), (4, 2))),
    ("dense_kd[div=3,bf16,opts=1][aligned]", _PLAIN, "dense TVD + grad",
     ((4, 0), (4, 0), (4, 2))),
    ("dense_kd[div=4,bf16,opts=1][aligned]", _PLAIN, "dense skew KL + grad",
     ((4, 0), (4, 0), (4, 2))),
    ("dense_kd[div=5,bf16,opts=1][aligned]", _PLAIN, "dense skew reverse KL + grad",
     ((4, 0), (4, 0), (4, 2))),
    ("dense_kd[div=6,bf16,opts=1][aligned]", _PLAIN, "dense AB + grad",
     ((4, 0), (4, 0), (4, 2))),
    # AKL: statistics, the threshold search's inner loop (the teacher row, once per each of
    # its 31 steps), both KLs, gradient.
    ("dense_kd[div=7,bf16,opts=1][aligned]", _PLAIN, "dense AKL + grad",
     ((4, 0), (2, 0), (2, 0), (4, 0), (4, 2))),
    ("dense_kd[div=0,bf16,opts=1][aligned]", {**_PLAIN, "HAS_INTERP": True},
     "dense forward KL, TAID + grad", ((4, 0), (4, 2))),
    ("scale_rows[bf16][aligned]", {}, "backward scale (factor != 1)", ((2, 2),)),
    ("sparse_kd[div=0,tail=0,bf16,opts=1][aligned]", _PLAIN, "sparse forward KL + grad",
     ((2, 0), (2, 0), (2, 2))),
)


def spec_named(name: str, **constexprs: object):
    """The aot spec `name` with those of `constexprs` it has changed (the others ignored)."""
    import dataclasses

    from . import aot

    spec = {s.name: s for s in aot.all_specs()}[name]
    changed = {k: v for k, v in constexprs.items() if k in spec.constexprs}
    return dataclasses.replace(spec, constexprs={**spec.constexprs, **changed})


def measure(cc: int = 90, names: list[str] | None = None) -> list[dict]:
    """One record per loop of each kernel: what, loop (1-based), per-logit counts and the H200
    bounds in ms at N = 8192, V = 128256 (bytes per logit: what the loop reads and writes)."""
    out = []
    wanted = DEFAULT_SPECS if names is None else [(n, {}, n, ()) for n in names]
    for name, const, what, loop_bytes in wanted:
        spec = spec_named(name, **const)
        reads = tuple(r for r, _ in loop_bytes)
        for i, lr in enumerate(report(spec, cc, reads)):
            b = sum(loop_bytes[i]) if i < len(loop_bytes) else 0
            bd = bounds(lr.instructions, lr.mufu, b * _SHAPE_LOGITS, _SHAPE_LOGITS)
            out.append({"kernel": what, "spec": name, "loop": i + 1, "per_iter": lr.per_iter,
                        "instr": lr.instructions, "mufu": lr.mufu, "ldg": lr.loads,
                        "stg": lr.stores, "wide_loads": lr.wide_loads, "bytes": b,
                        **{f"{k}_ms": 1e3 * v for k, v in bd.items()}})
    return out


def table(records: list[dict]) -> str:
    """The records as a markdown table."""
    rows = [("| kernel | loop | logits/thread/iter | instr/logit | MUFU/logit | LDG | STG "
             "| memory ms | issue ms | MUFU ms |"), "|" + "---|" * 10]
    for r in records:
        rows.append(f"| {r['kernel']} | {r['loop']} | {r['per_iter']:g} | {r['instr']:.1f} | "
                    f"{r['mufu']:.2f} | {r['ldg']:.2f} | {r['stg']:.2f} | "
                    f"{r['memory_ms']:.2f} | {r['issue_ms']:.2f} | {r['mufu_ms']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", type=int, default=90)
    ap.add_argument("--spec", action="append", help="an aot spec name (default: a set)")
    ap.add_argument("--json", action="store_true", help="JSON records instead of a table")
    args = ap.parse_args(argv)
    records = measure(args.cc, args.spec)
    if args.json:
        import json

        print(json.dumps(records))
    else:
        import triton

        print(f"Triton {triton.__version__}, sm_{args.cc}\n")
        print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
