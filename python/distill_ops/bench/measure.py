"""Measurement: time (median and spread of repetitions, forward alone and forward +
backward), peak memory above the inputs, the copy bandwidth, the environment, and the run of
every case of every group.

On a GPU: device events and the allocator's peak. On the CPU: a monotonic clock after
synchronisation and the resident set sampled every millisecond (glibc told to return freed
blocks at once, so the resident set follows live memory).
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..topk import topk_logprobs
from .cases import _version, groups, make_inputs
from .floors import bytes_floor, matmul_flops
from .shapes import DIVERGENCES, TAILS, Shape

# ----------------------------------------------------------------------------------------
# Measurement.

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28, reps: int = 5) -> float:
    """Measured copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times)


def glibc():
    """The C library (ctypes); OSError where there is none to load, AttributeError from its
    glibc-only functions elsewhere: callers treat both as "not glibc"."""
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c"))


def release_freed_memory() -> None:
    """Make glibc return every large block to the OS when freed (a fixed mmap threshold), so
    the resident set follows live memory instead of the allocator's cache."""
    try:
        glibc().mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB, and no dynamic adjustment
    except (OSError, AttributeError):
        pass


def steady_allocator() -> None:
    """Keep freed memory in glibc's heap for reuse (a fixed 32 MiB mmap threshold, no trim
    on free), so that a training step's tensors are not page-faulted in afresh every step:
    step times then follow the work, not the allocator's history (glibc's default threshold
    adapts to earlier frees, which moved the demo's tokens/s by up to 30% between identical
    runs). `malloc_trim(0)` still hands the heap back explicitly."""
    try:
        libc = glibc()
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (its maximum on 64-bit)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Samples this process's resident set every millisecond; the peak above the start."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self.start = self.peak = self._rss()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra(self) -> int:
        return self.peak - self.start


class HighWaterRSS:
    """This process's peak resident set above the start of a `with` block, from the kernel's
    own high-water mark (VmHWM, reset on entry by writing 5 to /proc/self/clear_refs): exact
    and free, no sampling thread competing with the code it measures. Where the reset is
    not allowed (not Linux, a restricted /proc) it falls back to `PeakRSS`'s sampling."""

    def __init__(self) -> None:
        self._fallback: PeakRSS | None = None
        self.start = self.peak = 0

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"no {field} in /proc/self/status")

    def __enter__(self) -> HighWaterRSS:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = self.peak = self._status("VmRSS")
        except OSError:
            self._fallback = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fallback is not None:
            self._fallback.__exit__(*exc)
            self.start, self.peak = self._fallback.start, self._fallback.peak
        else:
            self.peak = self._status("VmHWM")

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.start)


@dataclass
class Timing:
    median: float
    spread: float


def _time(call: Callable[[], Any], device: torch.device, reps: int,
          track_memory: bool) -> tuple[Timing, int]:
    times, peak = [], 0
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = call()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
            peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
        elif track_memory:
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                out = call()
                times.append(time.perf_counter() - t0)
            peak = max(peak, mem.extra)
        else:
            t0 = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - t0)
        del out
    return Timing(statistics.median(times), max(times) - min(times)), peak


def measure(fn: Callable[..., Any], inputs: tuple, reps: int, grads: int,
            warmup: int = 1) -> tuple[Timing, Timing, int]:
    """(forward, forward + backward, peak extra bytes of forward + backward) of fn(*inputs),
    the backward being d out / d inputs[:grads] (those inputs are made leaves that require
    grad). With grads=0 the two timings are the same measurement."""
    device = inputs[0].device
    if grads:
        inputs = (*(x.detach().requires_grad_() for x in inputs[:grads]), *inputs[grads:])

    def forward() -> Any:
        return fn(*inputs)

    def full() -> Any:
        out = fn(*inputs)
        return torch.autograd.grad(out, inputs[:grads]) if grads else out

    for _ in range(warmup):
        full()
    if not grads:
        t, peak = _time(full, device, reps, track_memory=True)
        return t, t, peak
    fwd, _ = _time(forward, device, reps, track_memory=False)
    both, peak = _time(full, device, reps, track_memory=True)
    return fwd, both, peak


@dataclass
class Result:
    op: str
    variant: str
    impl: str
    n: int
    v: int
    k: int
    hs: int
    ht: int
    dtype: str
    status: str  # "ok", "missing" (not installed / not runnable here: see notes), "error"
    fwd_ms: float | None = None
    fwd_spread_ms: float | None = None
    total_ms: float | None = None  # forward + backward (forward only for non-losses)
    total_spread_ms: float | None = None
    peak_extra_mib: float | None = None  # above the inputs; includes the outputs
    out_mib: float = 0.0  # the output that must exist (gradient or targets), for scale
    floor_mib: float = 0.0  # bytes that must move (bytes_floor)
    gbps: float | None = None
    frac_copy_bw: float | None = None
    frac_matmul: float | None = None  # matmul-only time / this time (LM-head ops)
    tflops: float | None = None  # matmul_flops / forward + backward time (LM-head ops)
    notes: str = ""

    @property
    def shape(self) -> Shape:
        return Shape(self.n, self.v, self.k, self.hs, self.ht)


def _mib(x: float | None) -> float | None:
    return None if x is None else x / 2**20


def run(
    ops: Sequence[str],
    shapes: dict[str, list[Shape]],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    temperature: float = 2.0,
    reps: int = 5,
    include_compile: bool = True,
    divergences: Sequence[str] = DIVERGENCES,
    tails: Sequence[str] = TAILS,
    progress: Callable[[str], None] | None = None,
    budget_s: float | None = None,
) -> tuple[list[Result], dict[str, Any]]:
    """Every op x shape x variant, ours and each peer one after the other on the same inputs.
    `progress(label)` is called before each case. Past `budget_s` seconds no new case starts
    (the rest are rows that say so), so a time-boxed run still writes its results."""
    deadline = None if budget_s is None else time.monotonic() + budget_s
    device = torch.device(device)
    if device.type == "cpu":
        release_freed_memory()
    env = environment(device)
    bw = env["copy_bandwidth_gbps"] * 1e9
    dtype_name = str(dtype).split(".")[-1]
    results: list[Result] = []
    for op in ops:
        for s in shapes[op]:
            inputs = make_inputs(op, s, dtype, device, temperature)
            floor, out_bytes = bytes_floor(op, s, inputs[0].element_size())
            flops = matmul_flops(op, s)
            for variant, cases in groups(op, s, temperature, device, include_compile,
                                         divergences, tails):
                rows: list[Result] = []
                for case in cases:
                    if progress:
                        progress(f"{op} {variant} {s.label()} {case.impl}")
                    r = Result(op, variant, case.impl, s.n, s.v, s.k, s.hs, s.ht, dtype_name,
                               "missing", out_mib=out_bytes / 2**20, floor_mib=floor / 2**20,
                               notes=case.note)
                    if case.fn is not None and deadline is not None and \
                            time.monotonic() > deadline:
                        r.notes = f"not run: the --budget of {budget_s:g} s was spent"
                    elif case.fn is not None:
                        try:
                            fwd, both, peak = measure(case.fn, inputs, reps, case.grads)
                        except Exception as exc:  # a peer that breaks is a row, not a crash
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                            r.status = "error"
                            r.notes = f"{case.note}; {type(exc).__name__}: {str(exc)[:120]}"
                        else:
                            r.status = "ok"
                            r.fwd_ms, r.fwd_spread_ms = fwd.median * 1e3, fwd.spread * 1e3
                            r.total_ms, r.total_spread_ms = both.median * 1e3, both.spread * 1e3
                            r.peak_extra_mib = _mib(peak)
                            r.gbps = floor / both.median / 1e9
                            r.frac_copy_bw = floor / both.median / bw
                            if flops:
                                r.tflops = flops / both.median / 1e12
                    rows.append(r)
                matmul = next((r.total_ms for r in rows
                               if r.impl == "matmuls only" and r.status == "ok"), None)
                if matmul:
                    for r in rows:
                        if r.status == "ok" and r.impl != "matmuls only":
                            r.frac_matmul = matmul / r.total_ms
                results += rows
            del inputs
    return results, env


# ----------------------------------------------------------------------------------------
# The target store's reader (not a kernel: tokens per second decoded into tensors).

def store_throughput(k: int = 64, vocab: int = 151936, tokens: int = 1 << 16,
                     seq_len: int = 512, encodings: Iterable[str] = ("compact", "fp16"),
                     reps: int = 3) -> list[dict[str, Any]]:
    """Writes `tokens` top-k targets (of random teacher logits) per encoding into a temporary
    store, then times reading them all back (CRC checks and decoding into tensors)."""
    import tempfile

    from ..store import TopKReader, TopKWriter

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(seq_len, vocab, generator=gen) * 2
    top = topk_logprobs(logits, k)
    out = []
    for enc in encodings:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            with TopKWriter(tmp, vocab_size=vocab, k=k, temperature=1.0,
                            value_encoding=enc) as w:
                for s in range(tokens // seq_len):
                    w.append(s, top.indices, top.logprobs)
            write_s = time.perf_counter() - t0
            reader = TopKReader(tmp)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                for i in range(len(reader)):
                    reader[i]
                times.append(time.perf_counter() - t0)
            n_tok = reader.num_tokens
            out.append({"encoding": enc, "k": k, "vocab": vocab, "tokens": n_tok,
                        "bytes_per_token": reader.manifest["payload_bytes"] / n_tok,
                        "read_tokens_per_s": n_tok / statistics.median(times),
                        "write_tokens_per_s": n_tok / write_s})
    return out


# ----------------------------------------------------------------------------------------
# Environment and output.

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{_cpu_name()}, {torch.get_num_threads()} threads",
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "copy_bandwidth_gbps": copy_bandwidth(device) / 1e9,
        "distill_ops": _version("distill_ops"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["peers"] = {p: _version(p) for p in ("trl", "liger-kernel", "torchtune")}
    return env


def device_slug(env: dict[str, Any]) -> str:
    """`cpu`, or the GPU's name in lower case with dashes: the results files' prefix."""
    if env.get("device_type") != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")


__all__ = ["Result", "Timing", "copy_bandwidth", "device_slug", "environment", "measure", "run",
           "store_throughput"]
