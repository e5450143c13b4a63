"""Benchmark harness: ours against the peers a user runs today, on the same inputs.

Each case (dense KD, sparse KD, top-k) is timed after a warm-up as the median of several
repetitions (CUDA events on a GPU, a monotonic clock after synchronisation on the CPU), the
losses as forward + backward. It also reports the peak memory the call adds on top of its
inputs, the bytes that must move (`bytes_floor`, the one byte model) over the time, and that
rate as a fraction of the copy bandwidth measured here at start.

Peers: eager PyTorch (written out plainly), `torch.compile` of that same code, and TRL's
`generalized_jsd_loss` where TRL is installed.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .dense_kd import kd_loss
from .fused_linear import fused_linear_kd_loss
from .sparse_kd import sparse_kd_loss
from .topk import topk_logprobs

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
    op: str  # dense | sparse | topk
    variant: str  # the divergence, tail or k that the row measures
    impl: str
    n: int
    v: int
    k: int
    dtype: str
    median_ms: float
    spread_ms: float  # max - min over the repetitions
    peak_extra_mib: float  # above the inputs; includes the outputs (gradient, top-k)
    out_mib: float  # the output that must exist (gradient or top-k), for scale
    floor_mib: float  # bytes that must move (see bytes_floor)
    gbps: float
    frac_copy_bw: float
    notes: str = ""


def bytes_floor(op: str, n: int, v: int, k: int, elt: int) -> tuple[int, int]:
    """(bytes that must move, bytes of the output) of one call: the one byte model.

    dense: read student and teacher logits, write the gradient: 3 N V elt.
    sparse: read the student logits, write the gradient, read k targets (int32 id + fp32
    log-probability): 2 N V elt + 8 N k.
    topk: read the logits, write k (int32 id, fp32 log-probability) pairs: N V elt + 8 N k.
    """
    if op == "dense":
        return 3 * n * v * elt, n * v * elt
    if op == "sparse":
        return 2 * n * v * elt + 8 * n * k, n * v * elt
    if op == "topk":
        return n * v * elt + 8 * n * k, 8 * n * k
    if op == "fused_linear":
        # k stands for the hidden width H here: read both hidden states and heads, write the
        # student's hidden and head gradients. (Compute-bound: see the matmul-only row.)
        return 2 * (n * k + v * k) * elt + (n * k + v * k) * elt, (n * k + v * k) * elt
    raise ValueError(f"unknown op {op!r}")


def measure(fn: Callable[..., object], inputs: tuple, reps: int, backward: bool,
            warmup: int = 1, n_grads: int = 1) -> tuple[float, float, int]:
    """(median s, spread s, peak extra bytes) of fn(*inputs), with d out / d inputs[:n_grads]
    when `backward` (those inputs are then made leaves that require grad)."""
    device = inputs[0].device
    if backward:
        inputs = (*(x.detach().requires_grad_() for x in inputs[:n_grads]), *inputs[n_grads:])

    def call():
        out = fn(*inputs)
        if backward:
            out = torch.autograd.grad(out, inputs[:n_grads])
        return out

    for _ in range(warmup):
        del_out = call()
        del del_out
    times, peak = [], 0
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = call()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
            peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
        else:
            with _PeakRSS() as mem:
                t0 = time.perf_counter()
                out = call()
                times.append(time.perf_counter() - t0)
            peak = max(peak, mem.extra)
        del out
    return statistics.median(times), max(times) - min(times), peak


Case = tuple[str, Callable[..., object] | None, str]  # (impl, fn or None if missing, note)


def dense_cases(divergence: str, temperature: float, include_compile: bool,
                device: torch.device | None = None) -> list[Case]:
    """(impl, fn(student, teacher), note) for ours (each backend the device runs) and every
    peer of one divergence."""
    if divergence == "forward_kl":
        eager: LossFn = lambda s, t: eager_forward_kl(s, t, temperature)
    else:
        eager = lambda s, t: eager_jsd(s, t, temperature)
    cases: list[Case] = [
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


def eager_sparse_bucket(s: Tensor, idx: Tensor, tlp: Tensor, temperature: float) -> Tensor:
    """The path a TRL user runs for top-k targets with a tail bucket: full log-softmax,
    gather, tail = log(1 - sum p) on both sides (as TRL's server distillation does), KL."""
    ls = F.log_softmax(s.float() / temperature, dim=-1)
    lq = ls.gather(-1, idx.long())

    def add_tail(lp: Tensor) -> Tensor:
        covered = torch.logsumexp(lp, dim=-1, keepdim=True).clamp(max=-1e-7)
        return torch.cat([lp, torch.log(-torch.expm1(covered))], dim=-1)

    lq, lp = add_tail(lq), add_tail(tlp.float())
    return (lp.exp() * (lp - lq)).sum(-1).mean()


def sparse_cases(temperature: float, include_compile: bool) -> list[Case]:
    eager = lambda s, i, t: eager_sparse_bucket(s, i, t, temperature)
    cases: list[Case] = [
        ("distill_ops", lambda s, i, t: sparse_kd_loss(s, i, t, tail="bucket",
                                                       temperature=temperature),
         "tail=bucket"),
        ("eager", eager, "log_softmax + gather + tail + KL"),
    ]
    if include_compile:
        cases.append(("torch.compile", torch.compile(eager), "compiled once, warm"))
    return cases


def topk_cases(k: int, temperature: float, include_compile: bool) -> list[Case]:
    eager = lambda x: torch.topk(torch.log_softmax(x.float() / temperature, dim=-1), k)
    cases: list[Case] = [
        ("distill_ops", lambda x: topk_logprobs(x, k, temperature=temperature), ""),
        ("eager", eager, "topk(log_softmax(x / T))"),
    ]
    if include_compile:
        cases.append(("torch.compile", torch.compile(eager), "compiled once, warm"))
    return cases


def trl_chunked_divergence() -> Callable[..., tuple] | None:
    """TRL's DistillationTrainer chunked LM-head divergence, where TRL is installed."""
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except ImportError:
        return None
    return _chunked_divergence_loss


def fused_linear_cases(temperature: float) -> list[Case]:
    """Forward KL from hidden states and heads: ours, the materialised eager path, TRL."""
    def ours(hs, ws, ht, wt):
        return fused_linear_kd_loss(hs, ws, ht, wt, temperature=temperature)

    def eager(hs, ws, ht, wt):
        return eager_forward_kl(hs @ ws.t(), ht @ wt.t(), temperature)

    def matmuls_only(hs, ws, ht, wt):
        # The floor of any fused LM-head loss: the three projections' worth of matmuls.
        return (hs @ ws.t()).sum() + (ht @ wt.t()).sum() * 0

    cases: list[Case] = [("distill_ops", ours, "chunked, default chunk"),
                         ("eager", eager, "materialised logits"),
                         ("matmuls only", matmuls_only, "h W^T fwd + its two grads")]
    trl = trl_chunked_divergence()
    if trl is None:
        cases.append(("trl", None, "TRL not installed"))
    else:
        mask = None

        def trl_fn(hs, ws, ht, wt):
            nonlocal mask
            if mask is None or mask.shape[0] != hs.shape[0]:
                mask = torch.ones(hs.shape[0], dtype=torch.long, device=hs.device)
            return trl(hs, ht, ws, wt, mask, beta=0.0, temperature=temperature)[0]

        cases.append(("trl", trl_fn, "_chunked_divergence_loss, beta=0"))
    return cases


def _inputs(op: str, n: int, v: int, k: int, dtype: torch.dtype, device: torch.device,
            temperature: float) -> tuple:
    gen = torch.Generator(device="cpu").manual_seed(n * 7 + v)
    if op == "fused_linear":  # k is the hidden width
        def rand(*shape: int, scale: float = 1.0) -> Tensor:
            return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

        return (rand(n, k), rand(v, k, scale=k**-0.5 * 2), rand(n, k),
                rand(v, k, scale=k**-0.5 * 2))
    s = (torch.randn(n, v, generator=gen) * 2).to(device=device, dtype=dtype)
    t = (torch.randn(n, v, generator=gen) * 2).to(device=device, dtype=dtype)
    if op == "dense":
        return (s, t)
    if op == "topk":
        return (t,)
    top = topk_logprobs(t, k, temperature=temperature)
    return (s, top.indices, top.logprobs)


def run(
    ops: list[str],
    shapes: list[tuple[int, int]],
    divergences: list[str],
    k: int = 64,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    temperature: float = 2.0,
    reps: int = 5,
    include_compile: bool = True,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Result], dict]:
    """Every op x shape x variant, ours and each peer interleaved on the same inputs."""
    device = torch.device(device)
    if device.type == "cpu":
        _release_freed_memory()
    env = environment(device)
    bw = env["copy_bandwidth_gbps"] * 1e9
    dtype_name = str(dtype).split(".")[-1]
    results = []
    for op in ops:
        for n, v in shapes:
            kk = k if op == "fused_linear" else min(k, v)
            inputs = _inputs(op, n, v, kk, dtype, device, temperature)
            floor, out_bytes = bytes_floor(op, n, v, kk, inputs[0].element_size())
            if op == "dense":
                groups = [(div, dense_cases(div, temperature, include_compile, device))
                          for div in divergences]
            elif op == "fused_linear":
                groups = [(f"forward_kl H={kk}", fused_linear_cases(temperature))]
            elif op == "sparse":
                groups = [("forward_kl", sparse_cases(temperature, include_compile))]
            else:
                groups = [(f"k={kk}", topk_cases(kk, temperature, include_compile))]
            for variant, cases in groups:
                for impl, fn, note in cases:
                    if progress:
                        progress(f"{op} {variant} N={n} V={v} {impl}")
                    nan = float("nan")
                    med, spread, peak = (nan, nan, nan) if fn is None else measure(
                        fn, inputs, reps, backward=op != "topk",
                        n_grads=2 if op == "fused_linear" else 1)
                    results.append(Result(
                        op, variant, impl, n, v, kk, dtype_name, med * 1e3, spread * 1e3,
                        peak / 2**20, out_bytes / 2**20, floor / 2**20, floor / med / 1e9,
                        floor / med / bw, note,
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
    key = lambda r: (r.op, r.variant, r.n, r.v)
    eager = {key(r): r.median_ms for r in results if r.impl == "eager"}
    lines = [
        f"device: {env['device']}; torch {env['torch']}; trl {env.get('trl')}; copy "
        f"bandwidth {env['copy_bandwidth_gbps']:.1f} GB/s",
        "",
        "| op | variant | N | V | k | dtype | impl | ms (spread) | vs eager | peak extra MiB "
        "(output) | GB/s of floor | of copy BW | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = eager.get(key(r))
        speed = f"{base / r.median_ms:.1f}x" if base and r.median_ms == r.median_ms else "-"
        k = r.k if r.op != "dense" else "-"
        if r.median_ms != r.median_ms:  # a peer that is not installed: say so, no NaNs
            lines.append(f"| {r.op} | {r.variant} | {r.n} | {r.v} | {k} | {r.dtype} | "
                         f"{r.impl} | - | - | - | - | - | {r.notes} |")
            continue
        lines.append(
            f"| {r.op} | {r.variant} | {r.n} | {r.v} | {k} | {r.dtype} | {r.impl} | "
            f"{r.median_ms:.1f} ({r.spread_ms:.1f}) | {speed} | {r.peak_extra_mib:.0f} "
            f"({r.out_mib:.0f}) | {r.gbps:.2f} | {r.frac_copy_bw:.0%} | {r.notes} |"
        )
    return "\n".join(lines)


def to_json(results: list[Result], env: dict, command: str) -> dict:
    return {"environment": env, "command": command, "results": [asdict(r) for r in results]}
