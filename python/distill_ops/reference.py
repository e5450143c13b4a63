"""Plain-PyTorch reference of every op: the specification the kernels are tested against.

Differentiable by autograd, float64-capable (inputs in float64 are computed in float64,
everything else in float32), and written for clarity, not speed: it materialises every
intermediate. `backend="torch"` runs these functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .reduction import resolve_batchmean

__all__ = [
    "divergence_from_logprobs",
    "divergence_rows",
    "kd_loss",
    "sparse_kd_loss",
    "topk_logprobs",
    "transform_logits",
]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def transform_logits(
    x: Tensor, scale: float, softcap: float | None, temperature: float, dtype: torch.dtype
) -> Tensor:
    """z = f(x) / T with f(x) = softcap * tanh(scale * x / softcap), or scale * x.

    A -inf logit is a masked vocabulary entry: it stays -inf through the softcap.
    """
    x = x.to(dtype)
    if softcap is None:
        y = scale * x
    else:
        y = torch.where(x == -math.inf, x, softcap * torch.tanh(scale * x / softcap))
    return y / temperature


def _xlogratio(p: Tensor, lp: Tensor, lo: Tensor) -> Tensor:
    """p * (lp - lo) with 0 * log 0 = 0, differentiable without NaN."""
    pos = p > 0
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    return torch.where(pos, p * (torch.where(pos, lp, zero) - torch.where(pos, lo, zero)), zero)


def divergence_rows(zs: Tensor, zt: Tensor, divergence: str, beta: float = 0.5,
                    **params: float) -> Tensor:
    """Per-row divergence between softmax(zs) (student q) and softmax(zt) (teacher p).

    forward_kl = KL(p||q); reverse_kl = KL(q||p); tvd = 0.5 * sum|q - p|;
    jsd = beta * KL(p||m) + (1 - beta) * KL(q||m) with m = beta * p + (1 - beta) * q, which
    is defined as forward KL at beta = 0 and reverse KL at beta = 1 (TRL and Liger's
    convention: the formula itself tends to 0 at both ends). The research family
    (`skew`, `ab_alpha`, `ab_beta`, `akl_head_mass` in `params`): see
    `divergence_from_logprobs`.
    """
    return divergence_from_logprobs(torch.log_softmax(zt, dim=-1), torch.log_softmax(zs, dim=-1),
                                    divergence, beta, **params)


def divergence_from_logprobs(lp: Tensor, lq: Tensor, divergence: str, beta: float = 0.5, *,
                             skew: float = 0.1, ab_alpha: float = 0.5, ab_beta: float = 0.5,
                             akl_head_mass: float = 0.5) -> Tensor:
    """The divergence over the last dim from teacher (lp) and student (lq) log-probabilities.
    The student side may be sub-normalised (sparse tails renorm/none): no formula assumes
    otherwise.

    skew_kl: KL(p || skew p + (1 - skew) q); skew_reverse_kl: KL(q || skew q + (1 - skew) p)
    (DistiLLM). ab: -1/(a b) sum [p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)] with a =
    ab_alpha, b = ab_beta (ABKD), evaluated without cancellation (`ab_elementwise`). akl:
    w KL(p||q) + (1 - w) KL(q||p), w = g_head / (g_head + g_tail), g = sum |p - q| over the
    head (the teacher's most probable ids up to cumulative mass akl_head_mass, top-1 always,
    ties at the boundary all in) and the tail, w without gradient (Wu et al., 2024)."""
    p, q = lp.exp(), lq.exp()
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        return _xlogratio(p, lp, lq).sum(-1)
    if divergence == "reverse_kl":
        return _xlogratio(q, lq, lp).sum(-1)
    if divergence == "jsd":
        lm = _log_mixture(lp, lq, p, q, beta)
        return beta * _xlogratio(p, lp, lm).sum(-1) + (1.0 - beta) * _xlogratio(q, lq, lm).sum(-1)
    if divergence == "tvd":
        return 0.5 * (q - p).abs().sum(-1)
    if divergence == "skew_kl":
        return _xlogratio(p, lp, _log_mixture(lp, lq, p, q, skew)).sum(-1)
    if divergence == "skew_reverse_kl":
        return _xlogratio(q, lq, _log_mixture(lq, lp, q, p, skew)).sum(-1)
    if divergence == "ab":
        return ab_elementwise(lp, lq, ab_alpha, ab_beta).sum(-1)
    if divergence == "akl":
        w = akl_head_weight(p.detach(), q.detach(), akl_head_mass)
        return w * _xlogratio(p, lp, lq).sum(-1) + (1.0 - w) * _xlogratio(q, lq, lp).sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")


def _log_mixture(la: Tensor, lb: Tensor, a: Tensor, b: Tensor, w: float) -> Tensor:
    """log(w a + (1 - w) b) by logaddexp. Where both probabilities are 0, m is 0 too and no
    term reads log m: logaddexp gets finite inputs there, else its gradient is NaN
    (exp(-inf - -inf))."""
    both_zero = (a == 0) & (b == 0)
    zero = torch.zeros((), dtype=la.dtype, device=la.device)
    log_w = math.log(w) if w > 0 else -math.inf
    log_1mw = math.log1p(-w) if w < 1 else -math.inf
    return torch.logaddexp(torch.where(both_zero, zero, la + log_w),
                           torch.where(both_zero, zero, lb + log_1mw))


def akl_head_mask(p: Tensor, head_mass: float) -> Tensor:
    """bool [..., V]: the head of each row of p, the ids whose probability is at least the
    m-th largest, where m is the first count at which the sorted cumulative mass reaches
    head_mass (so the top-1 always, and ties at the boundary all; every id at 1)."""
    if head_mass >= 1.0:  # the whole vocabulary, whatever its sum rounds to: no sort
        return torch.ones_like(p, dtype=torch.bool)
    ps = torch.sort(p, dim=-1, descending=True).values
    before = torch.cat([torch.zeros_like(ps[..., :1]), torch.cumsum(ps, dim=-1)[..., :-1]], -1)
    m = (before < head_mass).sum(-1, keepdim=True).clamp(min=1)
    return p >= ps.gather(-1, m - 1)


def akl_head_weight(p: Tensor, q: Tensor, head_mass: float) -> Tensor:
    """AKL's forward-KL weight g_head / (g_head + g_tail) per row (1/2 where p == q)."""
    head = akl_head_mask(p, head_mass)
    gap = (p - q).abs()
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    g_head = torch.where(head, gap, zero).sum(-1)
    total = gap.sum(-1)
    return torch.where(total > 0, g_head / torch.where(total > 0, total, zero + 1), zero + 0.5)


def _exp_series(x: Tensor, k0: int) -> Tensor:
    """(e^x - sum_{n<k0} x^n / n!) / x^k0 = sum_n x^n / (n + k0)! for |x| < 1/2, as
    kd_math.h's exp_series_tail (one more term than it keeps in each precision)."""
    last = 17 if x.dtype == torch.float64 else 9
    acc = torch.zeros_like(x)
    for n in range(last, -1, -1):
        acc = acc * x + 1.0 / math.factorial(n + k0)
    return acc


def _ab_dlogq(lp: Tensor, lq: Tensor, a: float, b: float) -> Tensor:
    """dL/dlog q of the AB element: q^b (q^a - p^a) / a (kd_math.h: ab_dlogq)."""
    s = a + b
    ninf_p, ninf_q = lp == -math.inf, lq == -math.inf
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    lp0 = torch.where(ninf_p | ninf_q, zero, lp)
    lq0 = torch.where(ninf_q, zero, lq)
    d = lq0 - lp0
    x = a * d
    g = torch.exp(a * lp0 + b * lq0)
    small = x.abs() < 0.5
    out = torch.where(small, g * d * _exp_series(torch.where(small, x, zero), 1),
                      (torch.exp(s * lq0) - g) / a)
    out = torch.where(ninf_p, torch.exp(s * lq0) / a, out)
    return torch.where(ninf_q, zero, out)


def _ab_loss(lp: Tensor, lq: Tensor, a: float, b: float) -> Tensor:
    """The AB element (A - G) / (a b) (kd_math.h: ab_loss, which explains the form)."""
    s = a + b
    ninf_p, ninf_q = lp == -math.inf, lq == -math.inf
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    lp0 = torch.where(ninf_p | ninf_q, zero, lp)
    lq0 = torch.where(ninf_p | ninf_q, zero, lq)
    lpz, lqz = torch.where(ninf_p, zero, lp), torch.where(ninf_q, zero, lq)
    if b <= a:
        w, lu, r = b / s, s * lp0, s * (lq0 - lp0)
    else:
        w, lu, r = a / s, s * lq0, s * (lp0 - lq0)
    wr = w * r
    u = torch.exp(lu)

    def u_phi(y: Tensor) -> Tensor:
        small = y.abs() < 0.5
        ys = torch.where(small, y, zero)
        return torch.where(small, u * ys * ys * _exp_series(ys, 2), torch.exp(lu + y) - u - u * y)

    direct = (1.0 - w) * u + w * torch.exp(lu + r) - torch.exp(lu + wr)
    amg = torch.where((r < 0) & (wr <= -1), direct, w * u_phi(r) - u_phi(wr))
    out = amg / (a * b)
    out = torch.where(ninf_p, torch.exp(s * lqz) / (a * s), out)
    out = torch.where(ninf_q, torch.exp(s * lpz) / (b * s), out)
    return torch.where(ninf_p & ninf_q, zero, out)


class _ABElement(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lp: Tensor, lq: Tensor, a: float, b: float) -> Tensor:
        ctx.save_for_backward(lp, lq)
        ctx.ab = (a, b)
        return _ab_loss(lp, lq, a, b)

    @staticmethod
    def backward(ctx, grad: Tensor):
        lp, lq = ctx.saved_tensors
        a, b = ctx.ab
        g_lp = grad * _ab_dlogq(lq, lp, b, a) if ctx.needs_input_grad[0] else None
        g_lq = grad * _ab_dlogq(lp, lq, a, b) if ctx.needs_input_grad[1] else None
        return g_lp, g_lq, None, None


def ab_elementwise(lp: Tensor, lq: Tensor, a: float, b: float) -> Tensor:
    """The alpha-beta divergence per element, differentiable in both log-probabilities."""
    return _ABElement.apply(lp, lq, a, b)


def taid_logits(zs: Tensor, zt: Tensor, t: float) -> Tensor:
    """TAID's target logits (1 - t) stopgrad(zs) + t zt; a -inf on either side stays -inf
    for 0 < t < 1."""
    if t == 1.0:
        return zt
    zs = zs.detach()
    if t == 0.0:
        return zs
    masked = (zs == -math.inf) | (zt == -math.inf)
    zero = torch.zeros((), dtype=zt.dtype, device=zt.device)
    mix = (1.0 - t) * torch.where(masked, zero, zs) + t * torch.where(masked, zero, zt)
    return torch.where(masked, zero - math.inf, mix)


def _valid_rows(n: int, device: torch.device, labels: Tensor | None, ignore_index: int,
                mask: Tensor | None) -> Tensor:
    valid = torch.ones(n, dtype=torch.bool, device=device)
    if labels is not None:
        valid = valid & (labels.reshape(-1) != ignore_index)
    if mask is not None:
        valid = valid & (mask.reshape(-1) != 0)  # bool, or 0/1 of any dtype
    return valid


def _non_finite(z: Tensor) -> Tensor:
    """bool [N]: rows holding a NaN or +inf (-inf is a masked entry, legal)."""
    return (torch.isnan(z) | (z == math.inf)).any(dim=-1)


def _poison(rows: Tensor, bad: Tensor, z: Tensor) -> Tensor:
    """A row whose inputs hold a NaN or +inf has a NaN loss and a NaN gradient w.r.t. the
    student's z, whatever the divergence's 0 * log 0 guards would hide (as the kernels)."""
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return torch.where(bad, z.sum(dim=-1) * torch.where(bad, zero + math.nan, zero), rows)


def _reduce(rows: Tensor, valid: Tensor, reduction: str,
            num_items_in_batch: int | Tensor | None, lead: torch.Size) -> Tensor:
    rows = torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / valid.sum().clamp(min=1)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    scale_by_t2: bool = False,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    vocab_size: int | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    skew: float = 0.1,
    ab_alpha: float = 0.5,
    ab_beta: float = 0.5,
    akl_head_mass: float = 0.5,
    teacher_interpolation: float = 1.0,
) -> Tensor:
    """Reference of `distill_ops.kd_loss` (same arguments, no validation, no backend)."""
    lead = student_logits.shape[:-1]
    reduction, num_items_in_batch = resolve_batchmean(
        reduction, lead, labels is not None or mask is not None, num_items_in_batch)
    k = vocab_size if vocab_size is not None else student_logits.shape[-1]
    dtype = _compute_dtype(student_logits, teacher_logits)
    xs = student_logits.reshape(-1, student_logits.shape[-1])[:, :k]
    # Not detached: a teacher that requires grad gets its exact gradient (mutual and
    # online distillation), as from F.kl_div.
    xt = teacher_logits.reshape(-1, teacher_logits.shape[-1])[:, :k]
    n = xs.shape[0]

    valid = _valid_rows(n, xs.device, labels, ignore_index, mask)
    # Ignored rows may hold anything (all -inf padding included): replace them before any
    # maths, so neither their loss nor their gradient can leak a NaN.
    xs = torch.where(valid[:, None], xs, torch.zeros((), dtype=xs.dtype, device=xs.device))
    xt = torch.where(valid[:, None], xt, torch.zeros((), dtype=xt.dtype, device=xt.device))

    zs = transform_logits(xs, student_logit_scale, student_softcap, temperature, dtype)
    zt = transform_logits(xt, teacher_logit_scale, teacher_softcap, temperature, dtype)
    coef = soft_weight * (temperature**2 if scale_by_t2 else 1.0)
    rows = coef * divergence_rows(zs, taid_logits(zs, zt, teacher_interpolation), divergence,
                                  beta, skew=skew, ab_alpha=ab_alpha, ab_beta=ab_beta,
                                  akl_head_mass=akl_head_mass)
    if hard_weight != 0.0:
        z1 = transform_logits(xs, student_logit_scale, student_softcap, 1.0, dtype)
        safe_labels = torch.where(valid, labels.reshape(-1), 0)
        rows = rows + hard_weight * F.cross_entropy(z1, safe_labels, reduction="none")
    rows = _poison(rows, _non_finite(zs) | _non_finite(zt), zs)
    return _reduce(rows, valid, reduction, num_items_in_batch, lead)


# ----------------------------------------------------------------------------------------
# Sparse targets: top-k / sampled teacher distributions and the loss against them.

TAILS = ("bucket", "renorm", "support", "none")


def topk_logprobs(
    teacher_logits: Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(indices int32 [..., k], logprobs fp32 [..., k]): the k most probable ids at T, sorted
    by descending probability (ties: lower id first), log-probabilities over the full V."""
    dtype = _compute_dtype(teacher_logits)
    z = transform_logits(teacher_logits, logit_scale, softcap, temperature, dtype)
    lp = torch.log_softmax(z, dim=-1)
    # Stable order: sort by (-logprob, id). argsort is stable, and sorting an id-ordered
    # row by descending value keeps lower ids first among ties.
    order = torch.argsort(-lp, dim=-1, stable=True)[..., :k]
    vals = torch.gather(lp, -1, order)
    return order.to(torch.int32), vals.to(torch.float64 if dtype == torch.float64
                                          else torch.float32)


def sparse_coarse_teacher(
    indices: Tensor, teacher_logprobs: Tensor, tail: str, ratio: float, vocab: int
) -> tuple[Tensor, Tensor]:
    """Teacher log-probabilities over the coarse classes: (log p_hat [N, k] on the support,
    -inf on padding slots; log p_hat_rest [N], -inf unless tail == "bucket").

    `ratio` = source_temperature / temperature re-tempers the targets: p^ratio renormalised
    over the support (+ the tail class for "bucket"). With ratio == 1, "bucket" keeps the
    given support probabilities and gives the rest 1 - their sum; "none" keeps the targets
    exactly as given. A "bucket" row whose support is the whole vocabulary has no rest class
    (its would-be mass is rounding residue): it is renormalised over the support."""
    lt = teacher_logprobs
    ninf = torch.full_like(lt, -math.inf)
    lt = torch.where(indices >= 0, lt, ninf)
    rest = torch.full(lt.shape[:-1], -math.inf, dtype=lt.dtype, device=lt.device)
    if tail == "bucket":
        covered = torch.logsumexp(lt, dim=-1)
        # log(1 - sum p) without cancellation in the log domain; 0 mass when sum p >= 1.
        r0 = -torch.expm1(covered.clamp(max=0.0))
        rest = torch.where(r0 > 0, torch.log(r0.clamp(min=torch.finfo(lt.dtype).tiny)), rest)
        whole_vocab = (indices >= 0).sum(-1) == vocab
        rest = torch.where(whole_vocab, torch.full_like(rest, -math.inf), rest)
        renormed, _ = sparse_coarse_teacher(indices, teacher_logprobs, "renorm", ratio, vocab)
    if ratio == 1.0 and tail in ("bucket", "none"):
        lp, lp_rest = lt, rest
    else:
        lw = torch.cat([lt * ratio, (rest * ratio)[..., None]], dim=-1)
        norm = torch.logsumexp(lw, dim=-1, keepdim=True)
        # A row without any target keeps probability 0 everywhere (no -inf - -inf).
        lw = lw - torch.where(norm == -math.inf, torch.zeros_like(norm), norm)
        lp, lp_rest = lw[..., :-1], lw[..., -1]
    if tail == "bucket":
        lp = torch.where(whole_vocab[..., None], renormed, lp)
    return lp, lp_rest


def sparse_kd_loss(
    student_logits: Tensor,
    indices: Tensor,
    teacher_logprobs: Tensor,
    *,
    divergence: str = "forward_kl",
    tail: str = "bucket",
    temperature: float = 1.0,
    source_temperature: float = 1.0,
    beta: float = 0.5,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    scale_by_t2: bool = False,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    skew: float = 0.1,
    ab_alpha: float = 0.5,
    ab_beta: float = 0.5,
    akl_head_mass: float = 0.5,
    teacher_interpolation: float = 1.0,
) -> Tensor:
    """Reference of `distill_ops.sparse_kd_loss` (same arguments, no validation).
    `teacher_interpolation` t acts on the coarse classes: the target is the softmax over the
    classes of (1 - t) log q_hat (no gradient) + t log p_hat."""
    lead = student_logits.shape[:-1]
    reduction, num_items_in_batch = resolve_batchmean(
        reduction, lead, labels is not None or mask is not None, num_items_in_batch)
    v = student_logits.shape[-1]
    k = indices.shape[-1]
    dtype = _compute_dtype(student_logits, teacher_logprobs)
    xs = student_logits.reshape(-1, v)
    idx = indices.reshape(-1, k).long()
    lt_in = teacher_logprobs.reshape(-1, k)
    n = xs.shape[0]

    valid = _valid_rows(n, xs.device, labels, ignore_index, mask)
    xs = torch.where(valid[:, None], xs, torch.zeros((), dtype=xs.dtype, device=xs.device))

    lp_sup, lp_rest = sparse_coarse_teacher(idx, lt_in.to(dtype), tail,
                                            source_temperature / temperature, v)
    z = xs.to(dtype) / temperature
    safe_idx = idx.clamp(min=0)
    zi = torch.gather(z, -1, safe_idx)
    ninf = torch.full_like(zi, -math.inf)
    if tail == "support":
        zi = torch.where(idx >= 0, zi, ninf)
        lq_sup = zi - torch.logsumexp(zi, dim=-1, keepdim=True)
        lq_rest = torch.full_like(lp_rest, -math.inf)
    else:
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        lq_sup = torch.where(idx >= 0, zi - lse, ninf)
        lq_rest = torch.full_like(lp_rest, -math.inf)
        if tail == "bucket":
            on_support = torch.zeros_like(z, dtype=torch.int32).scatter_reduce(
                -1, safe_idx, (idx >= 0).to(torch.int32), reduce="amax") > 0
            any_off = ~on_support.all(dim=-1)
            # Rows whose support is the whole vocabulary have no rest: keep logsumexp (and
            # its gradient) away from an all -inf row.
            off = torch.where(on_support & any_off[:, None], torch.full_like(z, -math.inf), z)
            lq_rest = torch.where(any_off, torch.logsumexp(off, dim=-1) - lse[..., 0],
                                  torch.full_like(lp_rest, -math.inf))
    lp_all = torch.cat([lp_sup, lp_rest[..., None]], dim=-1)
    lq_all = torch.cat([lq_sup, lq_rest[..., None]], dim=-1)
    if teacher_interpolation != 1.0:
        mix = taid_logits(lq_all, lp_all, teacher_interpolation)
        norm = torch.logsumexp(mix, dim=-1, keepdim=True)
        lp_all = mix - torch.where(norm == -math.inf, torch.zeros_like(norm), norm)
    coef = soft_weight * (temperature**2 if scale_by_t2 else 1.0)
    rows = coef * divergence_from_logprobs(lp_all, lq_all, divergence, beta, skew=skew,
                                           ab_alpha=ab_alpha, ab_beta=ab_beta,
                                           akl_head_mass=akl_head_mass)
    if hard_weight != 0.0:
        safe_labels = torch.where(valid, labels.reshape(-1), 0)
        rows = rows + hard_weight * F.cross_entropy(xs.to(dtype), safe_labels, reduction="none")
    lt_valid = torch.where(idx >= 0, lt_in, torch.zeros((), dtype=lt_in.dtype,
                                                        device=lt_in.device))
    rows = _poison(rows, _non_finite(z) | _non_finite(lt_valid), z)
    return _reduce(rows, valid, reduction, num_items_in_batch, lead)
