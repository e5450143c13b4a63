"""Benchmark harness: every public op, each backend the device runs, against the peers users
run today, on the same inputs, against the hardware limit.

A *group* is one op at one shape, dtype and variant (divergence, tail, ...); its *cases* are
our backends and the peers, run one after the other on the same inputs. Each case is timed
after a warm-up as the median and spread (max - min) of several repetitions, forward alone
and forward + backward (device events on a GPU, a monotonic clock after synchronisation on the
CPU), with the peak memory it adds on top of its inputs (allocator statistics on a GPU, the
resident set sampled every millisecond on the CPU).

How close to the limit: :func:`bytes_floor` is the one byte model (what must move between
memory and the chip, per op); divided by the forward + backward time it gives GB/s, and over
the copy bandwidth the harness measures at start (device-to-device copy on a GPU, memcpy on
the CPU) the fraction of the bandwidth floor reached. The LM-head ops are compute-bound: their
rows also give the fraction of the matmul-only time (the same projections and their
gradients, with no loss at all).

Peers, each only where installed (a row says so where not): eager PyTorch written out plainly,
`torch.compile` of that code, TRL (`generalized_jsd_loss`, `_chunked_divergence_loss`, the
server-distillation tail bucket), torchtune's KD losses, Liger (`LigerKLDIVLoss`, `LigerJSD`,
`LigerTVDLoss`, `LigerFusedLinearJSD`; CUDA only).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .dense_kd import kd_loss
from .fused_linear import fused_linear_kd_loss, fused_linear_topk
from .sampling import sample_targets
from .sparse_kd import sparse_kd_loss
from .topk import topk_logprobs

SCHEMA = "distill_ops.bench/2"
OPS = ("dense", "sparse", "topk", "sample", "fused_linear", "fused_linear_sparse",
       "fused_linear_topk")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
TAILS = ("bucket", "renorm", "support", "none")


@dataclass(frozen=True)
class Shape:
    """N rows, V vocabulary, k targets per row, student / teacher hidden widths."""

    n: int
    v: int
    k: int = 0
    hs: int = 0
    ht: int = 0

    def label(self) -> str:
        parts = [f"N={self.n}", f"V={self.v}"]
        parts += [f"k={self.k}"] * bool(self.k)
        parts += [f"Hs={self.hs}"] * bool(self.hs) + [f"Ht={self.ht}"] * bool(self.ht)
        return " ".join(parts)


# Canonical shapes (what the README and the GPU results report) and CPU-sized ones.
CANONICAL: dict[str, list[Shape]] = {
    "dense": [Shape(8192, 32000), Shape(8192, 128256), Shape(8192, 262144),
              Shape(2048, 128256), Shape(4096, 128256)],
    "sparse": [Shape(8192, 128256, k=16), Shape(8192, 128256, k=64)],
    "topk": [Shape(8192, 128256, k=64)],
    "sample": [Shape(8192, 128256, k=64)],
    "fused_linear": [Shape(8192, 128256, hs=2048, ht=4096)],
    "fused_linear_sparse": [Shape(8192, 128256, k=64, hs=2048)],
    "fused_linear_topk": [Shape(8192, 128256, k=64, ht=4096)],
}
CPU_FULL: dict[str, list[Shape]] = {
    "dense": [Shape(1024, 32000), Shape(2048, 32000), Shape(1024, 128256)],
    "sparse": [Shape(2048, 32000, k=16), Shape(2048, 32000, k=64)],
    "topk": [Shape(2048, 32000, k=64)],
    "sample": [Shape(2048, 32000, k=64)],
    "fused_linear": [Shape(2048, 32000, hs=256, ht=512)],
    "fused_linear_sparse": [Shape(2048, 32000, k=64, hs=256)],
    "fused_linear_topk": [Shape(2048, 32000, k=64, ht=512)],
}
QUICK: dict[str, list[Shape]] = {
    "dense": [Shape(256, 8192), Shape(256, 32000), Shape(128, 32000)],
    "sparse": [Shape(256, 32000, k=16), Shape(256, 32000, k=64)],
    "topk": [Shape(256, 32000, k=64)],
    "sample": [Shape(256, 32000, k=64)],
    "fused_linear": [Shape(512, 32000, hs=64, ht=128)],
    "fused_linear_sparse": [Shape(512, 32000, k=64, hs=64)],
    "fused_linear_topk": [Shape(512, 32000, k=64, ht=128)],
}


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


# ----------------------------------------------------------------------------------------
# Peers, written out plainly, the way a user would without this library.

def _logsm(x: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(x.float() / temperature, dim=-1)


def eager_dense(divergence: str, temperature: float, beta: float = 0.5) -> Callable[..., Tensor]:
    def forward_kl(s: Tensor, t: Tensor) -> Tensor:
        return F.kl_div(_logsm(s, temperature), _logsm(t, temperature), reduction="batchmean",
                        log_target=True)

    def reverse_kl(s: Tensor, t: Tensor) -> Tensor:
        return F.kl_div(_logsm(t, temperature), _logsm(s, temperature), reduction="batchmean",
                        log_target=True)

    def jsd(s: Tensor, t: Tensor) -> Tensor:
        ls, lt = _logsm(s, temperature), _logsm(t, temperature)
        lm = torch.logaddexp(ls + torch.log1p(torch.tensor(-beta)),
                             lt + torch.log(torch.tensor(beta)))
        kl_t = F.kl_div(lm, lt, reduction="none", log_target=True).sum(-1)
        kl_s = F.kl_div(lm, ls, reduction="none", log_target=True).sum(-1)
        return (beta * kl_t + (1 - beta) * kl_s).mean()

    def tvd(s: Tensor, t: Tensor) -> Tensor:
        q, p = _logsm(s, temperature).exp(), _logsm(t, temperature).exp()
        return 0.5 * (q - p).abs().sum(-1).mean()

    return {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "tvd": tvd}[divergence]


def eager_sparse(tail: str, temperature: float) -> Callable[..., Tensor]:
    """Forward KL against top-k targets, each tail as its users write it."""

    def loss(s: Tensor, idx: Tensor, tlp: Tensor) -> Tensor:
        ls = _logsm(s, temperature)
        lq = ls.gather(-1, idx.long())
        lp = tlp.float()
        if tail == "bucket":
            def with_tail(x: Tensor) -> Tensor:
                covered = torch.logsumexp(x, dim=-1, keepdim=True).clamp(max=-1e-7)
                return torch.cat([x, torch.log(-torch.expm1(covered))], dim=-1)

            lq, lp = with_tail(lq), with_tail(lp)
        elif tail == "renorm":
            lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
        elif tail == "support":
            lq = lq - torch.logsumexp(lq, dim=-1, keepdim=True)
            lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
        return (lp.exp() * (lp - lq)).sum(-1).mean()

    return loss


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


def trl_server_sparse(tail: str, temperature: float) -> Callable[..., Tensor] | None:
    """TRL's server-distillation sparse forward KL (its own `_add_tail_bucket` and
    `_jsd_divergence`), with the tail bucket or renormalised over the support."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.server_distillation import server_distillation_trainer as sd

        add_tail, divergence = sd._add_tail_bucket, sd._jsd_divergence
    except (ImportError, AttributeError):
        return None

    def loss(s: Tensor, idx: Tensor, tlp: Tensor) -> Tensor:
        lq = _logsm(s, temperature).gather(-1, idx.long())
        tlp = tlp.float()
        valid = tlp > float("-inf")
        if tail == "bucket":
            lq, mask = add_tail(lq, valid)
            tlp, _ = add_tail(tlp, valid)
        else:
            mask = valid
            lq = lq - torch.logsumexp(lq, dim=-1, keepdim=True)
            tlp = tlp - torch.logsumexp(tlp, dim=-1, keepdim=True)
        return divergence(lq, tlp, beta=0.0, support_mask=mask).sum(-1).mean()

    return loss


def trl_chunked_divergence() -> Callable[..., tuple] | None:
    """TRL's DistillationTrainer chunked LM-head divergence, where TRL is installed."""
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except ImportError:
        return None
    return _chunked_divergence_loss


def torchtune_losses() -> dict[str, type] | None:
    try:
        from torchtune.modules import loss as tt
    except ImportError:
        return None
    # (SymmetricKLLoss mixes the two KLs: not a JSD, so no peer for it here.)
    return {"forward_kl": tt.ForwardKLLoss, "reverse_kl": tt.ReverseKLLoss}


def _liger(name: str) -> Any:
    from liger_kernel import transformers as lk

    return getattr(lk, name)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------------
# Cases.

@dataclass
class Case:
    impl: str
    fn: Callable[..., Any] | None  # None: not run, `note` says why
    note: str = ""
    grads: int = 1  # how many leading inputs get gradients (0: forward only)


def _ours_backends(device: torch.device, op: str) -> list[tuple[str, str]]:
    """(impl label, backend) of our kernels that run at speed on `device`."""
    if device.type == "cpu":
        return [("distill_ops[cpu]", "cpu")]
    out = [("distill_ops[triton]", "triton")]
    if _cuda_built():
        out.append(("distill_ops[cuda]", "cuda"))
    return out


def _cuda_built() -> bool:
    from ._ext import has_native, native

    return has_native() and bool(native().has_cuda)


def _missing_ours(device: torch.device, op: str) -> list[Case]:
    if device.type == "cpu":
        return [Case("distill_ops[triton]", None, "runs only interpreted on a CPU: not timed")]
    if not _cuda_built():
        return [Case("distill_ops[cuda]", None, "distill_ops built without its CUDA kernels")]
    return []


def _compiled(fn: Callable[..., Any], include: bool) -> list[Case]:
    if not include:
        return [Case("torch.compile", None, "skipped (--quick or --no-compile)")]
    return [Case("torch.compile", torch.compile(fn), "of the eager code, warm")]


def _no_liger(device: torch.device, what: str) -> Case | None:
    if _version("liger-kernel") is None:
        return Case(f"liger {what}", None, "Liger not installed")
    if device.type != "cuda":
        return Case(f"liger {what}", None, "Liger's Triton kernels need a CUDA GPU")
    return None


def dense_cases(divergence: str, temperature: float, device: torch.device,
                include_compile: bool) -> list[Case]:
    cases = [Case(label, _bind(kd_loss, divergence=divergence, temperature=temperature,
                               backend=b), f"backend={b}")
             for label, b in _ours_backends(device, "dense")]
    cases += _missing_ours(device, "dense")
    eager = eager_dense(divergence, temperature)
    cases.append(Case("eager", eager, "log_softmax both + divergence"))
    cases += _compiled(eager, include_compile)
    trl = trl_jsd()
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}.get(divergence)
    if beta is None:
        cases.append(Case("trl", None, "TRL has no TVD loss"))
    elif trl is None:
        cases.append(Case("trl", None, "TRL not installed"))
    else:
        cases.append(Case("trl", lambda s, t: trl(s, t, beta=beta, temperature=temperature),
                          f"generalized_jsd_loss beta={beta:g}"))
    tt = torchtune_losses()
    if tt is None:
        cases.append(Case("torchtune", None, "torchtune not installed"))
    elif divergence not in tt:
        cases.append(Case("torchtune", None, f"torchtune has no {divergence} loss"))
    else:
        mod = tt[divergence]()
        note = f"{type(mod).__name__} on logits / T" + (
            " (cross-entropy form: our gradient, loss minus the teacher entropy)"
            if divergence == "forward_kl" else "")
        cases.append(Case("torchtune", lambda s, t: mod(
            s.float() / temperature, t.float() / temperature,
            torch.zeros(s.shape[0], dtype=torch.long, device=s.device)), note))
    missing = _no_liger(device, "")
    if missing is not None:
        cases.append(Case("liger", None, missing.note))
    elif divergence in ("forward_kl", "reverse_kl"):
        kl = _liger("LigerKLDIVLoss")(reduction="batchmean", log_target=True)
        if divergence == "forward_kl":
            fn = lambda s, t: kl(_logsm(s, temperature), _logsm(t, temperature))
        else:
            fn = lambda s, t: kl(_logsm(t, temperature), _logsm(s, temperature))
        cases.append(Case("liger", fn, "LigerKLDIVLoss on log_softmax"))
    elif divergence == "jsd":
        jsd = _liger("LigerJSD")(beta=0.5)
        cases.append(Case("liger", lambda s, t: jsd(_logsm(s, temperature),
                                                    _logsm(t, temperature)),
                          "LigerJSD on log_softmax"))
    else:
        tvd = _liger("LigerTVDLoss")()
        cases.append(Case("liger", lambda s, t: tvd(torch.softmax(s.float() / temperature, -1),
                                                    torch.softmax(t.float() / temperature, -1)),
                          "LigerTVDLoss on softmax"))
    return cases


def sparse_cases(tail: str, temperature: float, device: torch.device,
                 include_compile: bool) -> list[Case]:
    cases = [Case(label, _bind(sparse_kd_loss, tail=tail, temperature=temperature, backend=b),
                  f"backend={b}") for label, b in _ours_backends(device, "sparse")]
    cases += _missing_ours(device, "sparse")
    eager = eager_sparse(tail, temperature)
    cases.append(Case("eager", eager, "log_softmax + gather + tail + KL"))
    cases += _compiled(eager, include_compile)
    if tail in ("bucket", "support"):
        trl = trl_server_sparse(tail, temperature)
        cases.append(Case("trl", trl, "server distillation, " + (
            "_add_tail_bucket" if tail == "bucket" else "no tail")) if trl is not None
            else Case("trl", None, "TRL not installed"))
    return cases


def topk_cases(k: int, temperature: float, device: torch.device,
               include_compile: bool) -> list[Case]:
    cases = [Case(label, _bind(topk_logprobs, k=k, temperature=temperature, backend=b),
                  f"backend={b}", grads=0) for label, b in _ours_backends(device, "topk")]
    cases += _missing_ours(device, "topk")
    eager = lambda x: torch.topk(_logsm(x, temperature), k)
    cases.append(Case("eager", eager, "topk(log_softmax(x / T))", grads=0))
    cases += [Case(c.impl, c.fn, c.note, grads=0) for c in _compiled(eager, include_compile)]
    return cases


def sample_cases(k: int, temperature: float) -> list[Case]:
    def eager(x: Tensor) -> tuple[Tensor, Tensor]:
        p = torch.softmax(x.float() / temperature, dim=-1)
        draws = torch.multinomial(p, k, replacement=True)
        counts = torch.zeros_like(p).scatter_add_(1, draws, torch.ones_like(draws, dtype=p.dtype))
        top = torch.topk(counts, k)
        return top.indices, top.values / k

    return [Case("distill_ops", lambda x: sample_targets(x, k, temperature=temperature),
                 "inverse CDF, no host sync", grads=0),
            Case("eager", eager, "multinomial + scatter_add counts + topk", grads=0)]


def fused_linear_cases(temperature: float, device: torch.device) -> list[Case]:
    """Forward KL from hidden states and heads (dense teacher)."""
    eager = lambda hs, ws, ht, wt: eager_dense("forward_kl", temperature)(hs @ ws.t(),
                                                                          ht @ wt.t())
    cases = [Case("distill_ops", lambda hs, ws, ht, wt: fused_linear_kd_loss(
                      hs, ws, ht, wt, temperature=temperature), "chunked, default chunk", 2),
             Case("eager", eager, "materialised logits", 2),
             Case("matmuls only", _matmuls_dense, "the projections and their gradients", 2)]
    trl = trl_chunked_divergence()
    if trl is None:
        cases.append(Case("trl", None, "TRL not installed"))
    else:
        def trl_fn(hs: Tensor, ws: Tensor, ht: Tensor, wt: Tensor) -> Tensor:
            mask = torch.ones(hs.shape[0], dtype=torch.long, device=hs.device)
            return trl(hs, ht, ws, wt, mask, beta=0.0, temperature=temperature)[0]

        cases.append(Case("trl", trl_fn, "_chunked_divergence_loss, beta=0", 2))
    missing = _no_liger(device, "")
    if missing is not None:
        cases.append(Case("liger", None, missing.note))
    else:
        lig = _liger("LigerFusedLinearJSD")(jsd_beta=0.0, temperature=temperature)
        cases.append(Case("liger", lambda hs, ws, ht, wt: lig(hs, ws, ht, wt, None),
                          "LigerFusedLinearJSD, beta=0", 2))
    return cases


def fused_linear_sparse_cases(temperature: float) -> list[Case]:
    def eager(hs: Tensor, ws: Tensor, idx: Tensor, lp: Tensor) -> Tensor:
        return eager_sparse("bucket", temperature)(hs @ ws.t(), idx, lp)

    return [Case("distill_ops", lambda hs, ws, idx, lp: fused_linear_kd_loss(
                hs, ws, teacher_indices=idx, teacher_logprobs=lp, tail="bucket",
                temperature=temperature), "tail=bucket", 2),
            Case("eager", eager, "materialised student logits", 2),
            Case("matmuls only", lambda hs, ws, idx, lp: (hs @ ws.t()).sum(),
                 "the projection and its gradients", 2)]


def fused_linear_topk_cases(k: int, temperature: float) -> list[Case]:
    return [Case("distill_ops", lambda h, w: fused_linear_topk(h, w, k, temperature=temperature),
                 "vocabulary tiles", 0),
            Case("eager", lambda h, w: torch.topk(_logsm(h @ w.t(), temperature), k),
                 "materialised logits", 0),
            Case("matmuls only", lambda h, w: h @ w.t(), "the projection", 0)]


def _matmuls_dense(hs: Tensor, ws: Tensor, ht: Tensor, wt: Tensor) -> Tensor:
    with torch.no_grad():
        (ht @ wt.t()).sum()
    return (hs @ ws.t()).sum()


def _bind(fn: Callable[..., Any], **kw: Any) -> Callable[..., Any]:
    return lambda *args: fn(*args, **kw)


# ----------------------------------------------------------------------------------------
# Inputs.

def make_inputs(op: str, s: Shape, dtype: torch.dtype, device: torch.device,
                temperature: float) -> tuple[Tensor, ...]:
    gen = torch.Generator(device="cpu").manual_seed(s.n * 7 + s.v + s.k)

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    if op == "fused_linear":
        return (rand(s.n, s.hs), rand(s.v, s.hs, scale=2 * s.hs**-0.5),
                rand(s.n, s.ht), rand(s.v, s.ht, scale=2 * s.ht**-0.5))
    if op == "fused_linear_sparse":
        with torch.no_grad():
            top = topk_logprobs(rand(s.n, s.v, scale=2.0), s.k, temperature=temperature)
        return (rand(s.n, s.hs), rand(s.v, s.hs, scale=2 * s.hs**-0.5), top.indices,
                top.logprobs)
    if op == "fused_linear_topk":
        return (rand(s.n, s.ht), rand(s.v, s.ht, scale=2 * s.ht**-0.5))
    student, teacher = rand(s.n, s.v, scale=2.0), rand(s.n, s.v, scale=2.0)
    if op == "dense":
        return (student, teacher)
    if op in ("topk", "sample"):
        return (teacher,)
    top = topk_logprobs(teacher, s.k, temperature=temperature)
    return (student, top.indices, top.logprobs)


def groups(op: str, s: Shape, temperature: float, device: torch.device,
           include_compile: bool, divergences: Sequence[str] = DIVERGENCES,
           tails: Sequence[str] = TAILS) -> list[tuple[str, list[Case]]]:
    """(variant, cases) of one op at one shape."""
    if op == "dense":
        return [(d, dense_cases(d, temperature, device, include_compile)) for d in divergences]
    if op == "sparse":
        return [(f"forward_kl tail={t}", sparse_cases(t, temperature, device, include_compile))
                for t in tails]
    if op == "topk":
        return [("", topk_cases(s.k, temperature, device, include_compile))]
    if op == "sample":
        return [(f"{s.k} draws", sample_cases(s.k, temperature))]
    if op == "fused_linear":
        return [("forward_kl", fused_linear_cases(temperature, device))]
    if op == "fused_linear_sparse":
        return [("forward_kl tail=bucket", fused_linear_sparse_cases(temperature))]
    if op == "fused_linear_topk":
        return [("", fused_linear_topk_cases(s.k, temperature))]
    raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")


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
            with _PeakRSS() as mem:
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
        _release_freed_memory()
    env = environment(device)
    bw = env["copy_bandwidth_gbps"] * 1e9
    dtype_name = str(dtype).split(".")[-1]
    results: list[Result] = []
    for op in ops:
        for s in shapes[op]:
            inputs = make_inputs(op, s, dtype, device, temperature)
            floor, out_bytes = bytes_floor(op, s, inputs[0].element_size())
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

    from .store import TopKReader, TopKWriter

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


def fastest_backends(results: list[Result]) -> dict[str, str]:
    """{op family: backend}: per case, which of our backends ran fastest (forward +
    backward); per family, the backend that won most cases (ties: the lower summed time)."""
    wins: dict[str, dict[str, list[float]]] = {}
    cases: dict[tuple, list[Result]] = {}
    for r in results:
        if r.status == "ok" and r.impl.startswith("distill_ops[") and r.total_ms is not None:
            cases.setdefault((r.op, r.variant, r.n, r.v, r.k), []).append(r)
    for (op, *_), rows in cases.items():
        best = min(rows, key=lambda r: r.total_ms)
        tally = wins.setdefault(op, {})
        for r in rows:
            won, total = tally.get(r.impl, [0.0, 0.0])
            tally[r.impl] = [won + (r is best), total + r.total_ms]
    out = {}
    for op, tally in wins.items():
        impl = max(tally, key=lambda i: (tally[i][0], -tally[i][1]))
        out[op] = impl[len("distill_ops["):-1]
    return out


def write_auto_table(path: str | os.PathLike[str], device: str, results: list[Result],
                     note: str) -> dict[str, str]:
    """Merges this run's fastest backends for `device` into the auto table at `path` (the
    package's auto_backends.json, or a copy to commit there)."""
    import json

    path = Path(path)
    table = json.loads(path.read_text()) if path.exists() else {"devices": {}}
    best = {op: b for op, b in fastest_backends(results).items()
            if op in ("dense", "sparse", "topk")}
    table.setdefault("devices", {}).setdefault(device, {}).update(best, measured=note)
    path.write_text(json.dumps(table, indent=1) + "\n")
    return best


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


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(results: list[Result], env: dict[str, Any],
                 store: list[dict[str, Any]] | None = None) -> str:
    """Markdown: one row per case, speed-up against eager PyTorch of the same group."""
    key = lambda r: (r.op, r.variant, r.shape, r.dtype)
    eager = {key(r): r.total_ms for r in results if r.impl == "eager" and r.status == "ok"}
    peers = ", ".join(f"{p} {v}" for p, v in env["peers"].items() if v) or "none"
    lines = [
        f"device: {env['device']}; torch {env['torch']}; triton {env.get('triton')}; "
        f"CUDA {env.get('cuda')}; peers: {peers}; copy bandwidth "
        f"{env['copy_bandwidth_gbps']:.1f} GB/s; commit {env.get('git_commit')}",
        "",
        "| op | variant | shape | dtype | impl | fwd ms (spread) | fwd+bwd ms (spread) | "
        "vs eager | peak MiB (output) | floor MiB | GB/s | of copy BW | of matmul | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.op} | {r.variant} | {r.shape.label()} | {r.dtype} | {r.impl} | "
                         f"- | - | - | - | - | - | - | - | {r.status}: {r.notes} |")
            continue
        base = eager.get(key(r))
        speed = f"{base / r.total_ms:.1f}x" if base else "-"
        lines.append(
            f"| {r.op} | {r.variant} | {r.shape.label()} | {r.dtype} | {r.impl} | "
            f"{r.fwd_ms:.2f} ({r.fwd_spread_ms:.2f}) | {r.total_ms:.2f} "
            f"({r.total_spread_ms:.2f}) | {speed} | {r.peak_extra_mib:.0f} ({r.out_mib:.0f}) | "
            f"{r.floor_mib:.0f} | {r.gbps:.1f} | {r.frac_copy_bw:.0%} | "
            f"{_fmt(r.frac_matmul, '.0%')} | {r.notes} |")
    if store:
        lines += ["", "Target store reader (one process; CRC checked, decoded into tensors):", "",
                  "| encoding | k | V | tokens | bytes/token | read tokens/s | write tokens/s |",
                  "|---|---|---|---|---|---|---|"]
        for s in store:
            lines.append(f"| {s['encoding']} | {s['k']} | {s['vocab']} | {s['tokens']} | "
                         f"{s['bytes_per_token']:.1f} | {s['read_tokens_per_s']:,.0f} | "
                         f"{s['write_tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def summary_table(results: list[Result]) -> str:
    """Markdown, one row per group: our fastest backend against the fastest peer that ran
    (the matmul-only yardstick is not a peer)."""
    lines = ["| op | variant | shape | dtype | ours | ms | fastest peer | ms | speed-up | "
             "peak MiB ours / peer | of copy BW | of matmul |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups_: dict[tuple, list[Result]] = {}
    for r in results:
        if r.status == "ok":
            groups_.setdefault((r.op, r.variant, r.shape, r.dtype), []).append(r)
    for (op, variant, shape, dtype), rows in groups_.items():
        ours = [r for r in rows if r.impl.startswith("distill_ops")]
        peers = [r for r in rows if not r.impl.startswith("distill_ops")
                 and r.impl != "matmuls only"]
        if not ours:
            continue
        a = min(ours, key=lambda r: r.total_ms)
        b = min(peers, key=lambda r: r.total_ms) if peers else None
        lines.append(
            f"| {op} | {variant} | {shape.label()} | {dtype} | {a.impl} | {a.total_ms:.2f} | "
            + (f"{b.impl} | {b.total_ms:.2f} | {b.total_ms / a.total_ms:.1f}x | "
               f"{a.peak_extra_mib:.0f} / {b.peak_extra_mib:.0f} | " if b else
               "- | - | - | - | ")
            + f"{a.frac_copy_bw:.0%} | {_fmt(a.frac_matmul, '.0%')} |")
    return "\n".join(lines)


def to_json(results: list[Result], env: dict[str, Any], command: str,
            config: dict[str, Any], store: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"schema": SCHEMA,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": command, "environment": env, "config": config,
            "results": [asdict(r) for r in results], "store": store or []}


def plot(results: list[Result], folder: str | os.PathLike[str],
         copy_gbps: float | None = None) -> list[str]:
    """PNG plots of time (forward + backward) and peak memory against V (at the most common N)
    and against N (at the most common V), one pair per op and variant with two or more sizes;
    with `copy_gbps`, the bandwidth floor (the bytes that must move at the measured copy
    bandwidth) as a dashed line. Returns the files written (none when matplotlib is
    missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from collections import Counter
    from pathlib import Path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    by_group: dict[tuple[str, str, str], list[Result]] = {}
    for r in results:
        if r.status == "ok":
            by_group.setdefault((r.op, r.variant, r.dtype), []).append(r)
    for (op, variant, dtype), rows in by_group.items():
        for axis, other in (("v", "n"), ("n", "v")):
            common = Counter(getattr(r, other) for r in rows).most_common(1)[0][0]
            sel = [r for r in rows if getattr(r, other) == common]
            if len({getattr(r, axis) for r in sel}) < 2:
                continue
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
            for impl in dict.fromkeys(r.impl for r in sel):
                pts = sorted((getattr(r, axis), r.total_ms, r.peak_extra_mib)
                             for r in sel if r.impl == impl)
                xs = [p[0] for p in pts]
                ax_t.plot(xs, [p[1] for p in pts], marker="o", label=impl)
                ax_m.plot(xs, [p[2] for p in pts], marker="o", label=impl)
            floor = sorted({(getattr(r, axis), r.floor_mib) for r in sel if r.floor_mib})
            if copy_gbps and floor:
                ax_t.plot([f[0] for f in floor],
                          [f[1] * 2**20 / (copy_gbps * 1e9) * 1e3 for f in floor], "k--",
                          lw=1, label=f"bandwidth floor ({copy_gbps:.0f} GB/s)")
            for ax, what in ((ax_t, "forward + backward ms"), (ax_m, "peak extra MiB")):
                ax.set_xlabel(axis.upper())
                ax.set_ylabel(what)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.grid(True, alpha=0.3)
            ax_t.legend(fontsize=7)
            fig.suptitle(f"{op} {variant} {dtype}, {other.upper()}={common}")
            fig.tight_layout()
            name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{op}-{variant}-{dtype}-vs-{axis.upper()}")
            path = out / f"{name.strip('_')}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(str(path))
    return written


__all__ = [
    "CANONICAL",
    "CPU_FULL",
    "DIVERGENCES",
    "OPS",
    "QUICK",
    "SCHEMA",
    "TAILS",
    "Case",
    "Result",
    "Shape",
    "bytes_floor",
    "copy_bandwidth",
    "device_slug",
    "environment",
    "fastest_backends",
    "format_table",
    "groups",
    "make_inputs",
    "measure",
    "plot",
    "run",
    "store_throughput",
    "summary_table",
    "to_json",
    "write_auto_table",
]
