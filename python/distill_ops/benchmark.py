"""Benchmark harness for the dense KD losses: ours against the peers a user runs today.

Each case is timed as forward + backward on one set of inputs, after a warm-up, as the median
of several repetitions (CUDA events on a GPU, a monotonic clock after synchronisation on the
CPU). It also reports the peak memory the call adds on top of its inputs, the bytes that must
move (the floor: read the student and teacher logits once, write the gradient once) over
the time, and that rate as a fraction of the copy bandwidth measured here at start.

Peers: eager PyTorch (log_softmax + kl_div, or the generalised JSD written out, then
backward), `torch.compile` of that same code, and TRL's `generalized_jsd_loss` where TRL is
installed.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .dense_kd import kd_loss

LossFn = Callable[[Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------------------
# Peers. Written out plainly, the way a user would without this library.

def eager_forward_kl(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    ls = F.log_softmax(s.float() / temperature, dim=-1)
    lt = F.log_softmax(t.float() / temperature, dim=-1)
    return F.kl_div(ls, lt, reduction="batchmean", log_target=True)


def eager_jsd(s: Tensor, t: Tensor, temperature: float, beta: float = 0.5) -> Tensor:
    ls = F.log_softmax(s.float() / temperature, dim=-1)
    lt = F.log_softmax(t.float() / temperature, dim=-1)
    lm = torch.logsumexp(torch.stack([ls + torch.log1p(torch.tensor(-beta)),
                                      lt + torch.log(torch.tensor(beta))]), dim=0)
    kl_t = F.kl_div(lm, lt, reduction="none", log_target=True).sum(-1)
    kl_s = F.kl_div(lm, ls, reduction="none", log_target=True).sum(-1)
    return (beta * kl_t + (1 - beta) * kl_s).mean()


def trl_jsd() -> Callable[..., Tensor] | None:
    """TRL's GKDTrainer.generalized_jsd_loss, wherever this TRL version keeps it."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    for path in ("trl.experimental.gkd", "trl"):
        try:
            mod = __import__(path, fromlist=["GKDTrainer"])
            return mod.GKDTrainer.generalized_jsd_loss
        except (ImportError, AttributeError):
            continue
    return None


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


def _release_freed_memory() -> None:
    """Make glibc return every large block to the OS when freed (a fixed mmap threshold), so
    the resident set follows live memory instead of the allocator's cache."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB, and no dynamic adjustment
    except (OSError, AttributeError):
        pass


class _PeakRSS:
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

    def __enter__(self) -> _PeakRSS:
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


@dataclass
class Result:
    impl: str
    divergence: str
    n: int
    v: int
    dtype: str
    median_ms: float
    spread_ms: float  # max - min over the repetitions
    peak_extra_mib: float  # above the inputs; includes the returned gradient itself
    grad_mib: float  # one gradient, for scale
    floor_mib: float  # bytes that must move: read student, read teacher, write gradient
    gbps: float
    frac_copy_bw: float
    notes: str = ""
    extra: dict = field(default_factory=dict)


def time_fwd_bwd(fn: LossFn, s: Tensor, t: Tensor, reps: int, warmup: int = 1):
    """(median s, spread s, peak extra bytes) of loss = fn(s, t); grad = d loss / d s."""
    device = s.device
    leaf = s.detach().requires_grad_()
    for _ in range(warmup):
        (g,) = torch.autograd.grad(fn(leaf, t), leaf)
        del g
    times, peak = [], 0
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            (g,) = torch.autograd.grad(fn(leaf, t), leaf)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
            peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
        else:
            with _PeakRSS() as mem:
                t0 = time.perf_counter()
                (g,) = torch.autograd.grad(fn(leaf, t), leaf)
                times.append(time.perf_counter() - t0)
            peak = max(peak, mem.extra)
        del g
    return statistics.median(times), max(times) - min(times), peak


def dense_cases(divergence: str, temperature: float, include_compile: bool,
                device: torch.device | None = None) -> list[tuple[str, LossFn, str]]:
    """(name, fn, note) for ours (each backend the device runs) and every peer."""
    if divergence == "forward_kl":
        eager: LossFn = lambda s, t: eager_forward_kl(s, t, temperature)
    else:
        eager = lambda s, t: eager_jsd(s, t, temperature)
    cases: list[tuple[str, LossFn, str]] = [
        ("distill_ops", lambda s, t: kd_loss(s, t, divergence=divergence,
                                             temperature=temperature), "backend=auto"),
        ("eager", eager, ""),
    ]
    if device is not None and device.type == "cuda":
        from ._ext import has_native, native

        if has_native() and native().has_cuda:
            cases.insert(1, ("distill_ops[cuda]", lambda s, t: kd_loss(
                s, t, divergence=divergence, temperature=temperature, backend="cuda"),
                "csrc/cuda portable kernel"))
    if include_compile:
        cases.append(("torch.compile", torch.compile(eager), "compiled once, warm"))
    if divergence == "jsd":
        trl = trl_jsd()
        if trl is None:
            cases.append(("trl", None, "TRL not installed"))
        else:
            cases.append(("trl", lambda s, t: trl(s, t, beta=0.5, temperature=temperature),
                          "GKDTrainer.generalized_jsd_loss"))
    return cases


def run_dense(
    shapes: list[tuple[int, int]],
    divergences: list[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    temperature: float = 2.0,
    reps: int = 5,
    include_compile: bool = True,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Result], dict]:
    device = torch.device(device)
    if device.type == "cpu":
        _release_freed_memory()
    env = environment(device)
    bw = env["copy_bandwidth_gbps"] * 1e9
    results = []
    dtype_name = str(dtype).split(".")[-1]
    for n, v in shapes:
        gen = torch.Generator(device="cpu").manual_seed(n * 7 + v)
        s = (torch.randn(n, v, generator=gen) * 2).to(device=device, dtype=dtype)
        t = (torch.randn(n, v, generator=gen) * 2).to(device=device, dtype=dtype)
        floor = 3 * n * v * s.element_size()
        for div in divergences:
            for name, fn, note in dense_cases(div, temperature, include_compile, device):
                if progress:
                    progress(f"{div} N={n} V={v} {name}")
                if fn is None:
                    nan = float("nan")
                    results.append(Result(name, div, n, v, dtype_name, nan, nan, nan,
                                          floor / 3 / 2**20, floor / 2**20, nan, nan, note))
                    continue
                med, spread, peak = time_fwd_bwd(fn, s, t, reps)
                results.append(Result(
                    name, div, n, v, dtype_name, med * 1e3, spread * 1e3, peak / 2**20,
                    floor / 3 / 2**20, floor / 2**20, floor / med / 1e9, floor / med / bw, note,
                ))
    return results, env


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    import importlib.metadata
    import platform

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{_cpu_name()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "copy_bandwidth_gbps": copy_bandwidth(device) / 1e9,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    for peer in ("trl", "liger-kernel"):
        try:
            env[peer] = importlib.metadata.version(peer)
        except importlib.metadata.PackageNotFoundError:
            env[peer] = None
    return env


def format_table(results: list[Result], env: dict) -> str:
    """A markdown table, with a speed-up column against eager PyTorch of the same case."""
    eager = {(r.divergence, r.n, r.v): r.median_ms for r in results if r.impl == "eager"}
    lines = [
        f"device: {env['device']}; torch {env['torch']}; trl {env.get('trl')}; copy "
        f"bandwidth {env['copy_bandwidth_gbps']:.1f} GB/s",
        "",
        "| divergence | N | V | dtype | impl | fwd+bwd ms (spread) | vs eager | peak extra MiB "
        "(1 grad) | GB/s of floor | of copy BW | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = eager.get((r.divergence, r.n, r.v))
        speed = f"{base / r.median_ms:.1f}x" if base and r.median_ms == r.median_ms else "-"
        lines.append(
            f"| {r.divergence} | {r.n} | {r.v} | {r.dtype} | {r.impl} | "
            f"{r.median_ms:.1f} ({r.spread_ms:.1f}) | {speed} | {r.peak_extra_mib:.0f} "
            f"({r.grad_mib:.0f}) | "
            f"{r.gbps:.2f} | {r.frac_copy_bw:.0%} | {r.notes} |"
        )
    return "\n".join(lines)


def to_json(results: list[Result], env: dict, command: str) -> dict:
    return {"environment": env, "command": command, "results": [asdict(r) for r in results]}
