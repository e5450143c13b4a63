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
    python -m distill_ops.backends.triton.isa --cuda        # the CUDA C++ kernels' SASS

The CUDA C++ kernels (csrc/cuda) are read from the built extension's cubins (cuobjdump, then
nvdisasm): each instantiation's innermost loops that load logits, per logit by their loaded
bytes (cuda_loops).
"""

from __future__ import annotations

import argparse
import functools
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
    rare: bool = False  # on a path few rows take (RARE): reported, not held to the floor


# In a spec's per-loop bytes, RARE once stands for the loops of a path few rows take (the
# sparse kernels' rest summed again at its own maximum: a confident student's rows), as
# many as the compiler makes, between the hot loops listed before and after it.
RARE = "rare"


def per_loop(entries: tuple, n_loops: int) -> list:
    """`entries` (one per loop, RARE once for any number of rare loops) spread over the
    n_loops found: each loop's entry, RARE for the rare ones, None past the list."""
    if RARE not in entries:
        return [entries[i] if i < len(entries) else None for i in range(n_loops)]
    j = entries.index(RARE)
    before, after = list(entries[:j]), list(entries[j + 1:])
    return before + [RARE] * (n_loops - len(before) - len(after)) + after


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
    for lp, rb in zip(found, per_loop(tuple(read_bytes), len(found)), strict=True):
        per_iter = max(1.0, width / threads)
        loaded = sum(load_bytes(op) * n for op, n in lp.ops.items() if op.startswith("LDG"))
        if rb not in (None, RARE) and rb and loaded:
            per_iter = loaded / rb
        wide = all(".128" in op for op in lp.ops if op.startswith("LDG"))
        out.append(LoopReport(per_iter, lp.total / per_iter, lp.count("MUFU") / per_iter,
                              lp.count("LDG") / per_iter, lp.count("STG") / per_iter, wide,
                              rb == RARE))
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
    # AB: statistics, the loss pass's two forms (elementwise.ab_fast picks one a row: the
    # one-series form, then the form for parameters far apart), gradient.
    ("dense_kd[div=6,bf16,opts=1][aligned]", _PLAIN, "dense AB + grad",
     ((4, 0), (4, 0), (4, 0), (4, 2))),
    # AKL: statistics, the threshold search's inner loop (the teacher row, once per step:
    # at most 16 for this bf16 teacher, akl.py), both KLs, gradient.
    ("dense_kd[div=7,bf16,opts=1][aligned]", _PLAIN, "dense AKL + grad",
     ((4, 0), (2, 0), (2, 0), (4, 0), (4, 2))),
    ("dense_kd[div=0,bf16,opts=1][aligned]", {**_PLAIN, "HAS_INTERP": True},
     "dense forward KL, TAID + grad", ((4, 0), (4, 2))),
    ("scale_rows[bf16][aligned]", {}, "backward scale (factor != 1)", ((2, 2),)),
    # Sparse: maximum, sum, (the rest at its own maximum, RARE), gradient.
    ("sparse_kd[div=0,tail=0,bf16,opts=1][aligned]", _PLAIN, "sparse forward KL + grad",
     ((2, 0), (2, 0), RARE, (2, 2))),
)


# ---------------------------------------------------------------------------------------
# The CUDA C++ kernels (csrc/cuda), from the SASS of the built extension.

_SECTION = re.compile(r"^\s*\.section\s+\.text\.(\S+?),")
_DTYPE_TAGS = {"F32": 4, "BF16": 2, "F16": 2}


def cuobjdump_path() -> str:
    """The cuobjdump shipped beside nvdisasm (or on PATH)."""
    path = os.path.join(os.path.dirname(nvdisasm_path()), "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def cubins(binary: str, cc: int) -> list[bytes]:
    """The sm_`cc` cubins embedded in a shared library or object file."""
    with tempfile.TemporaryDirectory() as d:
        listing = subprocess.run([cuobjdump_path(), "-lelf", binary], capture_output=True,
                                 text=True, check=False).stdout
        names = [ln.split(":", 1)[1].strip() for ln in listing.splitlines()
                 if ln.startswith("ELF file") and f".sm_{cc}." in ln]
        out = []
        for name in names:
            subprocess.run([cuobjdump_path(), "-xelf", name, binary], cwd=d, check=True,
                           capture_output=True)
            with open(os.path.join(d, name), "rb") as f:
                out.append(f.read())
    return out


def functions(sass: str) -> dict[str, str]:
    """{mangled name: its disassembly} of an nvdisasm listing of several functions."""
    out: dict[str, list[str]] = {}
    current = None
    for line in sass.splitlines():
        m = _SECTION.match(line)
        if m:
            current = m.group(1)
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return {name: "\n".join(lines) for name, lines in out.items()}


def cuda_template_args(mangled: str) -> tuple[str, ...]:
    """The storage-type tags (F32, BF16, F16) of a kernel instantiation, in order, and its
    integer and boolean template arguments: ('BF16', 'BF16', '0', 'false') for
    dense_kd_kernel<BF16, BF16, 0, false>."""
    args = []
    for m in re.finditer(r"NS0_(\d+)(F32|BF16|F16)E|S3_|Li(\d+)E|Lb([01])E", mangled):
        if m.group(2):
            args.append(m.group(2))
        elif m.group(0) == "S3_":  # the Itanium ABI's back-reference to the first tag
            args.append(args[0] if args else "?")
        elif m.group(3) is not None:
            args.append(m.group(3))
        else:
            args.append("true" if m.group(4) == "1" else "false")
    return tuple(args)


@dataclass
class CudaLoop:
    """A streaming loop of a CUDA kernel: per-logit counts from its loaded bytes."""

    kernel: str
    args: tuple[str, ...]
    index: int  # among the kernel's streaming loops, in program order
    logits: float  # per thread per iteration
    instructions: float
    mufu: float
    loads: float
    stores: float
    wide: bool  # every load and store of its stream (global, else shared) is 128-bit


@functools.lru_cache(maxsize=8)
def _cuda_functions(binary: str, cc: int) -> tuple[tuple[str, str], ...]:
    """(mangled name, disassembly) of every function in the binary's sm_`cc` cubins (the
    disassembly of a build's ~300 instantiations takes a while: once per process)."""
    return tuple(item for cubin in cubins(binary, cc)
                 for item in functions(disassemble(cubin)).items())


def cuda_loops(binary: str, kernel: str, cc: int = 90) -> list[CudaLoop]:
    """The streaming loops (those that load logits) of every instantiation of `kernel` in a
    built extension. A loop's logits per thread and iteration are its loaded bytes over the
    bytes a logit of the instantiation's dtypes takes (student plus teacher, or the student
    alone for a kernel with one tag); loops that load through 128-bit vectors and their
    scalar row tails are told apart by `wide`."""
    out = []
    for name, body in _cuda_functions(binary, cc):
        if kernel not in name:
            continue
        args = cuda_template_args(name)
        tags = [a for a in args if a in _DTYPE_TAGS]
        per_logit = sum(_DTYPE_TAGS[t] for t in tags) or 4
        index = 0
        found = loops(body)
        for lp in found:
            # Streaming loops only: innermost (no loop inside: an outer span would count
            # its inner loops' bodies once), no warp shuffle (the block reductions).
            if any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in found):
                continue
            if lp.count("SHFL") or lp.count("BAR"):
                continue
            # The stream is global memory where the loop reads any (a shared-memory word
            # beside it, like the sparse kernel's support bitmap, is side data), else shared
            # memory (the cluster kernel's slices). LDGDEPBAR waits for cp.async copies: a
            # barrier, not a load.
            glob = [op for op in lp.ops
                    if op.startswith(("LDG", "STG", "LD.", "ST.")) and op != "LDGDEPBAR"]
            stream = glob or [op for op in lp.ops if op.startswith(("LDS", "STS"))]
            loaded = sum(load_bytes(op) * lp.ops[op] for op in stream
                         if op.startswith(("LDG", "LDS", "LD.")))
            if not loaded:
                continue
            logits = loaded / per_logit
            mem = stream
            index += 1
            out.append(CudaLoop(kernel, args, index, logits, lp.total / logits,
                                lp.count("MUFU") / logits,
                                (lp.count("LDG") + lp.count("LDS")) / logits,
                                (lp.count("STG") + lp.count("STS")) / logits,
                                all(".128" in op for op in mem)))
    return out


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
        reads = tuple(RARE if lb == RARE else lb[0] for lb in loop_bytes)
        found = report(spec, cc, reads)
        for i, (lr, lb) in enumerate(zip(found, per_loop(tuple(loop_bytes), len(found)),
                                         strict=True)):
            b = sum(lb) if lb not in (None, RARE) else 0
            bd = bounds(lr.instructions, lr.mufu, b * _SHAPE_LOGITS, _SHAPE_LOGITS)
            out.append({"kernel": what, "spec": name, "loop": i + 1, "per_iter": lr.per_iter,
                        "instr": lr.instructions, "mufu": lr.mufu, "ldg": lr.loads,
                        "stg": lr.stores, "wide_loads": lr.wide_loads, "bytes": b,
                        "rare": lr.rare, **{f"{k}_ms": 1e3 * v for k, v in bd.items()}})
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


def cuda_model(binary: str, kernel: str, div: int, cc: int = 90, dtype: str = "BF16",
               rows: int = 8192, vocab: int = 128256) -> dict[str, float]:
    """The static model of one dense CUDA kernel (plain path, both sides `dtype`, forward and
    gradient) at a shape, in ms on the H200: memory (the kernel's transfers: every pass of
    the portable kernel reads both rows, the gradient pass writes one; the cluster kernel
    reads each logit once), issue and MUFU (the sum over its streaming loops), the
    prediction (the largest: the model assumes they overlap), and the 3-transfer floor. AKL
    is left out (its search reads the teacher row up to 16 more times; its number of steps
    depends on the row)."""
    if div == 7:
        raise ValueError("cuda_model: AKL's threshold search is outside the model")
    wide = [lp for lp in cuda_loops(binary, kernel, cc)
            if lp.args == (dtype, dtype, str(div), "false") and lp.wide]
    if not wide:
        raise ValueError(f"cuda_model: no streaming loops of {kernel}<{dtype}, {div}>")
    b = _DTYPE_TAGS[dtype]
    logits = rows * vocab
    if kernel == "dense_kd_cluster_kernel":
        per_logit = 3 * b
    else:
        per_logit = 2 * b * len(wide) + b
    # Every streaming loop counts, the cluster kernel's cp.async copy loop with them.
    instr = sum(lp.instructions for lp in wide)
    mufu = sum(lp.mufu for lp in wide)
    bd = bounds(instr, mufu, per_logit * logits, logits)
    out = {f"{k}_ms": 1e3 * v for k, v in bd.items()}
    out["predicted_ms"] = max(out.values())
    out["floor_ms"] = 1e3 * 3 * b * logits / BANDWIDTH
    out["vs_floor"] = out["predicted_ms"] / out["floor_ms"]
    out["instr"], out["mufu"] = instr, mufu
    return out


def cuda_table(binary: str, cc: int = 90, dtype: str = "BF16") -> str:
    """The CUDA dense kernels' streaming loops (plain path, both sides `dtype`) as markdown:
    per logit instructions, MUFU, loads and stores, and whether they are all 128-bit."""
    names = ["forward KL", "reverse KL", "JSD", "TVD", "skew KL", "skew reverse KL", "AB",
             "AKL"]
    rows = ["| kernel | divergence | loop | logits/thread/iter | instr/logit | MUFU/logit | "
            "LD | ST | 128-bit |", "|" + "---|" * 9]
    for kernel in ("dense_kd_kernel", "dense_kd_cluster_kernel"):
        for lp in cuda_loops(binary, kernel, cc):
            if lp.args[:2] != (dtype, dtype) or lp.args[3] != "false":
                continue
            rows.append(f"| {kernel} | {names[int(lp.args[2])]} | {lp.index} | {lp.logits:g} | "
                        f"{lp.instructions:.1f} | {lp.mufu:.2f} | {lp.loads:.2f} | "
                        f"{lp.stores:.2f} | {'yes' if lp.wide else 'no (tail)'} |")
    return "\n".join(rows)


# The vocab-parallel phases (dense_vp.py, sparse_vp.py) against the one-device kernels'
# loops they repeat: (phase spec, its loops' read bytes a logit, one-device spec, which of its
# loops, each loop of the phase in order, what).
VP_PAIRS = (
    ("dense_vp[phase=0,div=0,bf16,opts=1]", (4,), "dense_kd[div=0,bf16,opts=1][aligned]",
     (1,), "forward KL statistics"),
    ("dense_vp[phase=2,div=0,bf16,opts=1]", (4,), "dense_kd[div=0,bf16,opts=1][aligned]",
     (2,), "forward KL gradient"),
    ("dense_vp[phase=1,div=2,bf16,opts=1]", (4,), "dense_kd[div=2,bf16,opts=1][aligned]",
     (2,), "JSD sums"),
    ("dense_vp[phase=2,div=2,bf16,opts=1]", (4,), "dense_kd[div=2,bf16,opts=1][aligned]",
     (3,), "JSD gradient"),
    ("dense_vp[phase=3,div=7,bf16,opts=1]", (2,), "dense_kd[div=7,bf16,opts=1][aligned]",
     (3,), "AKL threshold step"),
    ("dense_vp[phase=4,div=7,bf16,opts=1]", (4,), "dense_kd[div=7,bf16,opts=1][aligned]",
     (4,), "AKL sums"),
    ("sparse_vp[phase=0,bf16,opts=1]", (2, 2, RARE),
     "sparse_kd[div=0,tail=0,bf16,opts=1][aligned]", (1, 2), "sparse maximum, sums"),
    ("sparse_vp[phase=1,bf16,opts=1]", (2,), "sparse_kd[div=0,tail=0,bf16,opts=1][aligned]",
     (3,), "sparse gradient"),
)
_ONE_DEVICE_READS = {"dense_kd[div=0,bf16,opts=1][aligned]": (4, 4),
                     "dense_kd[div=2,bf16,opts=1][aligned]": (4, 4, 4),
                     "dense_kd[div=7,bf16,opts=1][aligned]": (4, 2, 2, 4, 4),
                     "sparse_kd[div=0,tail=0,bf16,opts=1][aligned]": (2, 2, RARE, 2)}


def vocab_parallel_records(cc: int = 90) -> list[dict]:
    """Per loop of each vocab-parallel phase (compiled for aligned rows, as a GPU
    specialises them at run time): its per-logit instructions, MUFU and 16-byte loads, and
    the one-device kernel's same loop."""
    one = {name: [lr for lr in report(spec_named(name, **_PLAIN), cc, reads) if not lr.rare]
           for name, reads in _ONE_DEVICE_READS.items()}
    out = []
    for name, reads, ref, ref_loops, what in VP_PAIRS:
        hot = [lr for lr in report(spec_named(name, **_PLAIN).with_alignment(), cc, reads)
               if not lr.rare]  # loops numbered without the rare path's
        for i, lr in enumerate(hot):
            base = one[ref][ref_loops[i] - 1]
            out.append({"what": what, "phase": name, "loop": i + 1,
                        "instr": lr.instructions, "mufu": lr.mufu, "wide_loads": lr.wide_loads,
                        "one_device_instr": base.instructions, "one_device_mufu": base.mufu})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", type=int, default=90)
    ap.add_argument("--spec", action="append", help="an aot spec name (default: a set)")
    ap.add_argument("--json", action="store_true", help="JSON records instead of a table")
    ap.add_argument("--cuda", nargs="?", const="", metavar="LIB",
                    help="the CUDA C++ kernels' loops instead, from the built extension (or LIB)")
    ap.add_argument("--vocab-parallel", action="store_true",
                    help="the vocab-parallel phases' loops beside the one-device kernels'")
    args = ap.parse_args(argv)
    if args.vocab_parallel:
        import json

        print(json.dumps(vocab_parallel_records(args.cc)))
        return 0
    if args.cuda is not None:
        from ..extension import native

        print(cuda_table(args.cuda or native().__file__, args.cc))
        return 0
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
