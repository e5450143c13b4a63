"""The sparse loss's divergence over its coarse classes (the k support ids, plus the rest of
the vocabulary for tail="bucket") and the gradient terms it hands back to the logits: shared
by the vocab-parallel row chunks (vocab_parallel.py) and kernel phases (kernel_rows.py).
Every rank evaluates them identically from the all-reduced statistics."""

from __future__ import annotations

import math

import torch

from ..reference import divergence_from_logprobs, sparse_coarse_teacher, taid_logits
from ..validation import divergence_options

# A rest class below this mass at the row maximum has its gradient's e_j taken at the rest's
# own log-mass (exp(z_j - m) of its ids would be near or past underflow): the kernels'
# floor (csrc/cpu/row_math.h kRestFloor).
LOG_REST_FLOOR = -60.0 * math.log(2.0)


def rest_log_mass(m_loc: torch.Tensor, rest: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """log of the rest class's mass relative to the global maximum m [N], float64, -inf where
    it holds none, from each rank's record [world, N]: its maximum m_loc and its rest
    field, a sum at m_loc where >= 0 and a log-mass relative to m_loc where < 0 (the
    kernels' form for a rest that would underflow at m_loc)."""
    m_loc, rest, m = m_loc.double(), rest.double(), m.double()
    ninf = torch.full((), -math.inf, dtype=torch.float64, device=m.device)
    lr = torch.where(rest >= 0, torch.log(rest.clamp_min(0.0)), rest)
    ok = (m_loc > -math.inf) & (lr > -math.inf)
    lr = torch.where(ok, lr + (torch.where(ok, m_loc, m) - m), ninf)
    return torch.logsumexp(lr, 0)


def coarse_divergence(idx, tlp, z_sup, m, log_s, l_rest, n_sup, divergence, tail, ratio, sc,
                       shard, dt, want_grad):
    """The divergence over the coarse classes (the k support ids, plus the rest for bucket),
    identical on every rank: (div [N], h = dL / d log q_hat [N, k + 1] or None, log q_hat of
    the support [N, k], whether the rest class holds mass [N]). l_rest: the rest's log-mass
    relative to m (rest_log_mass)."""
    has = idx >= 0
    ninf = torch.full((), -math.inf, dtype=dt, device=z_sup.device)
    lp_sup, lp_rest = sparse_coarse_teacher(idx.long(), tlp.to(dt), tail, ratio, shard.total)
    bucket = tail == "bucket"
    has_rest = ((n_sup < shard.total) & (l_rest > -math.inf) if bucket
                else torch.zeros_like(has[:, 0]))
    with torch.enable_grad():
        if tail == "support":
            zi = torch.where(has, z_sup, ninf)
            lq_sup = zi - torch.logsumexp(zi, 1, keepdim=True)
        else:
            lq_sup = torch.where(has, (z_sup - m[:, None]) - log_s[:, None], ninf)
        lq_rest = torch.where(has_rest, l_rest - log_s, ninf)
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


def rest_shift(m: torch.Tensor, l_rest: torch.Tensor, has_rest: torch.Tensor,
               dt: torch.dtype) -> torch.Tensor:
    """The off-support e_j's base m + shift [N] (float64): shift 0, or about l_rest where the
    rest's mass is below the floor (its e_j at m would underflow), rounded so that m + shift
    is a number of `dt`, the kernels' type: they take exp(z_j - base) at it exactly. 0
    for every row but bucket's (coarse_divergence's has_rest is false for the others)."""
    m = m.double()
    zero = torch.zeros_like(m)
    want = torch.where(has_rest & (l_rest < LOG_REST_FLOOR), l_rest.double(), zero)
    return torch.where(want != 0, (m + want).to(dt).double() - m, zero)


def sparse_grad_terms(h, lq_sup, s_all, l_rest, has_rest, tail, shift):
    """dL/dz_j = q_j (h_c(j) / q_hat_c(j) - sum_c h_c): (the coefficient of
    e_j = exp(z_j - m - shift) off the support [N] (None for tail="support": 0 there), each
    support id's own gradient h_c - q_c sum h [N, k]). Off the support: the rest's ids
    e_j (h_rest exp(shift - l_rest) - exp(shift) sum h / s_all) for bucket, renorm / none's
    unclassed ids -e_j sum h / s_all (shift is 0 but for bucket: rest_shift)."""
    k = lq_sup.shape[1]
    sum_h = h.sum(1)
    off = None
    if tail != "support":
        off = -sum_h / s_all
        if tail == "bucket":
            zero = torch.zeros_like(sum_h)
            shift = shift.to(sum_h.dtype)
            off = off * torch.exp(shift) + torch.where(
                has_rest, h[:, -1] * torch.exp(shift - torch.where(has_rest, l_rest, zero)),
                zero)
    return off, h[:, :k] - torch.exp(lq_sup) * sum_h[:, None]
