"""The harness's cases: for each op, our backends and the peers users run today, and the
inputs they all share.

A *group* is one op at one shape, dtype and variant (divergence, tail, ...); its *cases* are
our backends and the peers, run one after the other on the same inputs. Peers, each only where
installed (a row says so where not): eager PyTorch written out plainly, `torch.compile` of
that code, TRL (`generalized_jsd_loss`, `_chunked_divergence_loss`, the server-distillation
tail bucket), torchtune's KD losses, Liger (`LigerKLDIVLoss`, `LigerJSD`, `LigerTVDLoss`,
`LigerFusedLinearJSD`; CUDA only).
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dense_kd import kd_loss
from ..fused_linear import fused_linear_kd_loss, fused_linear_topk
from ..sampling import sample_targets
from ..sparse_kd import sparse_kd_loss
from ..topk import topk_logprobs
from .shapes import DIVERGENCES, OPS, TAILS, Shape

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

    def skew_kl(s: Tensor, t: Tensor, skew: float = 0.1) -> Tensor:
        lq, lp = _logsm(s, temperature), _logsm(t, temperature)
        lm = torch.log(skew * lp.exp() + (1 - skew) * lq.exp())
        return (lp.exp() * (lp - lm)).sum(-1).mean()

    def skew_reverse_kl(s: Tensor, t: Tensor, skew: float = 0.1) -> Tensor:
        lq, lp = _logsm(s, temperature), _logsm(t, temperature)
        lm = torch.log(skew * lq.exp() + (1 - skew) * lp.exp())
        return (lq.exp() * (lq - lm)).sum(-1).mean()

    def ab(s: Tensor, t: Tensor, a: float = 0.5, b: float = 0.5) -> Tensor:
        q, p = _logsm(s, temperature).exp(), _logsm(t, temperature).exp()
        terms = p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)
        return (-terms.sum(-1) / (a * b)).mean()

    def akl(s: Tensor, t: Tensor, head_mass: float = 0.5) -> Tensor:
        lq, lp = _logsm(s, temperature), _logsm(t, temperature)
        q, p = lq.exp(), lp.exp()
        with torch.no_grad():  # the head by a sort of each row, as the paper's code does
            ps, order = torch.sort(p, -1, descending=True)
            head_sorted = (torch.cumsum(ps, -1) - ps) < head_mass
            head = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)
            gap = (p - q).abs()
            g_head = (gap * head).sum(-1)
            w = g_head / gap.sum(-1)
        fkl = (p * (lp - lq)).sum(-1)
        rkl = (q * (lq - lp)).sum(-1)
        return (w * fkl + (1 - w) * rkl).mean()

    return {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "tvd": tvd,
            "skew_kl": skew_kl, "skew_reverse_kl": skew_reverse_kl, "ab": ab,
            "akl": akl}[divergence]


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
    from ..backends.extension import has_native, native

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


def _with_cuda_variant(fn: Callable[..., Any], variant: str) -> Callable[..., Any]:
    from ..backends.cuda import cuda_dense_variant

    def run(*args: Any, **kwargs: Any) -> Any:
        with cuda_dense_variant(variant):
            return fn(*args, **kwargs)
    return run


def dense_cases(divergence: str, temperature: float, device: torch.device,
                include_compile: bool) -> list[Case]:
    cases = []
    for label, b in _ours_backends(device, "dense"):
        fn = _bind(kd_loss, divergence=divergence, temperature=temperature, backend=b)
        if b == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
            # Both CUDA designs, side by side: `--write-auto-table` records the faster as
            # dense_cuda_variant (the cluster kernel falls back to the portable one for AKL
            # and rows too big for a cluster's shared memory).
            cases += [Case(f"distill_ops[cuda:{v}]", _with_cuda_variant(fn, v),
                           f"backend=cuda, {v} kernel") for v in ("portable", "cluster")]
        else:
            cases.append(Case(label, fn, f"backend={b}"))
    cases += _missing_ours(device, "dense")
    eager = eager_dense(divergence, temperature)
    cases.append(Case("eager", eager, "log_softmax both + divergence"))
    cases += _compiled(eager, include_compile)
    trl = trl_jsd()
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}.get(divergence)
    if beta is None:
        cases.append(Case("trl", None, f"TRL has no {divergence} loss"))
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
    elif divergence != "tvd":
        cases.append(Case("liger", None, f"Liger has no {divergence} loss"))
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


__all__ = ["Case", "groups", "make_inputs"]
