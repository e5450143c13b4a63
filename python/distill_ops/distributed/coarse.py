"""The sparse loss's divergence over its coarse classes (the k support ids, plus the rest of
the vocabulary for tail="bucket") and the gradient terms it hands back to the logits: shared
by the vocab-parallel row chunks (vocab_parallel.py) and kernel phases (kernel_rows.py).
Every rank evaluates them identically from the all-reduced statistics."""

from __future__ import annotations

import math

import torch

from ..reference import divergence_from_logprobs, sparse_coarse_teacher, taid_logits
from ..validation import divergence_options


def coarse_divergence(idx, tlp, z_sup, m, log_s, s_rest, n_sup, divergence, tail, ratio, sc,
                       shard, dt, want_grad):
    """The divergence over the coarse classes (the k support ids, plus the rest for bucket),
    identical on every rank: (div [N], h = dL / d log q_hat [N, k + 1] or None, log q_hat of
    the support [N, k], whether the rest class holds mass [N])."""
    has = idx >= 0
    ninf = torch.full((), -math.inf, dtype=dt, device=z_sup.device)
    lp_sup, lp_rest = sparse_coarse_teacher(idx.long(), tlp.to(dt), tail, ratio, shard.total)
    bucket = tail == "bucket"
    has_rest = (n_sup < shard.total) & (s_rest > 0) if bucket else torch.zeros_like(has[:, 0])
    with torch.enable_grad():
        if tail == "support":
            zi = torch.where(has, z_sup, ninf)
            lq_sup = zi - torch.logsumexp(zi, 1, keepdim=True)
        else:
            lq_sup = torch.where(has, (z_sup - m[:, None]) - log_s[:, None], ninf)
        lq_rest = torch.where(has_rest, torch.log(torch.where(has_rest, s_rest, 1.0)) - log_s,
                              ninf)
        lq_all = torch.cat([lq_sup, lq_rest[:, None]], 1).detach().requires_grad_(want_grad)
        lp_all = torch.cat([lp_sup, lp_rest[:, None]], 1)
        if sc.interp != 1.0:  # TAID over the classes
            mix = taid_logits(lq_all, lp_all, sc.interp)
            norm = torch.logsumexp(mix, 1, keepdim=True)
            lp_all = mix - torch.where(norm == -math.inf, torch.zeros_like(norm), norm)
        name, params = divergence_options(sc)
        div = divergence_from_logprobs(lp_all, lq_all, name, **params)
        h = torch.autograd.grad(div.sum(), lq_all)[0] if want_grad else None
    return div.detach(), h, lq_sup.detach(), has_rest


def sparse_grad_terms(h, lq_sup, s_all, s_rest, has_rest, tail):
    """dL/dz_j = q_j (h_c(j) / q_hat_c(j) - sum_c h_c): (the coefficient of e_j = exp(z_j - m)
    off the support [N] (None for tail="support": 0 there), each support id's own gradient
    h_c - q_c sum h [N, k]). Off the support: the rest's ids e_j (h_rest / s_rest - sum h /
    s_all) for bucket, renorm / none's unclassed ids -e_j sum h / s_all."""
    k = lq_sup.shape[1]
    sum_h = h.sum(1)
    off = None
    if tail != "support":
        off = -sum_h / s_all
        if tail == "bucket":
            off = off + torch.where(has_rest, h[:, -1] / torch.where(has_rest, s_rest, 1.0),
                                    torch.zeros_like(off))
    return off, h[:, :k] - torch.exp(lq_sup) * sum_h[:, None]
