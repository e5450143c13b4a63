"""The LM-head matmuls of the fused losses: fp32 on the CPU, tensor cores on a GPU.

Per token chunk a fused LM-head loss projects hidden states to fp32 logits, lets the loss
kernel write d loss / d logits (g), and pushes g back through the head:
grad_hidden = g W, grad_W += g^T h, grad_b += sum_rows g. Two ways to run those matmuls:

- ``fp32`` (the CPU's): operands in fp32 (a bf16/fp16 head upcast one ~32 MiB vocabulary tile
  at a time, never whole), g in fp32, every gradient accumulated in fp32.
- ``head`` (a GPU's): operands in the head's dtype on tensor cores with fp32 accumulation,
  fp32 logits straight out of the matmul (``torch.mm(a, b, out_dtype=torch.float32)``), g
  written by the loss kernel in the head's dtype (one rounding), grad_hidden in the head's
  dtype (each row computed once, one rounding), grad_W accumulated across chunks in the
  head's dtype (each chunk's g^T h summed in fp32 and added with one rounding: after c chunks
  the relative error is at most ~c * 2^-9 for bf16 and typically sqrt(c) * 2^-9; at the
  default chunk of 768 rows and N = 8192, 11 chunks), grad_b in fp32. An fp32 head computes
  in fp32 (TF32 only where the user enabled it through torch.backends.cuda.matmul).

``DISTILL_OPS_HEAD_MATMUL=fp32|head`` forces one (the tests run ``head`` on the CPU, where
``out_dtype`` matmuls do not exist and are computed as fp32 products of the head-dtype
operands: bf16 and fp16 products are exact in fp32, so the maths are the tensor cores').
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..validation import check_float_tensor

_TILE_BUDGET = 32 << 20  # bytes of one fp32 vocabulary tile of a bf16/fp16 head (fp32 mode)
MODES = ("fp32", "head")


def matmul_mode(device: torch.device) -> str:
    """`head` on CUDA, `fp32` elsewhere, unless DISTILL_OPS_HEAD_MATMUL says otherwise."""
    forced = os.environ.get("DISTILL_OPS_HEAD_MATMUL", "")
    if forced:
        if forced not in MODES:
            raise ValueError(f"DISTILL_OPS_HEAD_MATMUL must be one of {MODES}, got {forced!r}")
        return forced
    return "head" if device.type == "cuda" else "fp32"


def tile_rows(v: int, h: int, dtype: torch.dtype) -> int:
    """Vocabulary rows per fp32 tile of a head in fp32 mode: the whole head when it already
    is fp32 (no copy), else tiles of about 32 MiB."""
    return max(1, v) if dtype == torch.float32 else max(1, min(v, _TILE_BUDGET // (4 * h)))


def _fp32(x: Tensor | None) -> Tensor | None:
    return x if x is None or x.dtype == torch.float32 else x.float()


_OUT_DTYPE_MM: dict[torch.device, bool] = {}


def _out_dtype_mm_ok(a: Tensor, b: Tensor) -> bool:
    """Whether torch.mm(..., out_dtype=torch.float32) runs here (CUDA builds of torch >= 2.8;
    asked once per device)."""
    ok = _OUT_DTYPE_MM.get(a.device)
    if ok is None:
        try:
            torch.mm(a[:1], b[:, :1], out_dtype=torch.float32)
            ok = True
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        _OUT_DTYPE_MM[a.device] = ok
    return ok


def mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in fp32 from operands of one dtype: tensor cores with fp32 output on CUDA; the
    same products in fp32 arithmetic on the CPU (bf16/fp16 products are exact in fp32)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def project(h: Tensor, w: Tensor, b: Tensor | None, mode: str) -> Tensor:
    """fp32 logits h @ w.T (+ b), never rounded to the head's dtype. A CUDA torch without
    out_dtype matmuls takes the fp32 path."""
    if mode == "head" and (not h.is_cuda or w.dtype == torch.float32
                           or _out_dtype_mm_ok(w[:1], w[:1].t())):
        out = mm_f32(h.to(w.dtype), w.t())
    else:
        h32 = _fp32(h)
        tile = tile_rows(w.shape[0], w.shape[1], w.dtype)
        if tile >= w.shape[0]:
            out = h32 @ _fp32(w).t()
        else:
            out = torch.empty((h.shape[0], w.shape[0]), dtype=torch.float32, device=h.device)
            for v0 in range(0, w.shape[0], tile):
                out[:, v0:v0 + tile] = h32 @ _fp32(w[v0:v0 + tile]).t()
    if b is not None:
        out += _fp32(b)
    return out


def grad_dtype(w: Tensor, mode: str) -> torch.dtype:
    """The dtype the loss kernel writes d loss / d logits in."""
    return w.dtype if mode == "head" else torch.float32


def weight_grad_buffer(w: Tensor, mode: str) -> Tensor:
    """The accumulator of grad_W across chunks (zeros)."""
    return torch.zeros(w.shape, dtype=grad_dtype(w, mode), device=w.device)


def hidden_grad_buffer(n: int, w: Tensor, mode: str) -> Tensor:
    return torch.empty((n, w.shape[1]), dtype=grad_dtype(w, mode), device=w.device)


def head_grads(g: Tensor, h: Tensor, w: Tensor, gw: Tensor | None, want_h: bool,
               mode: str) -> Tensor | None:
    """Accumulate gw += g^T h and return g @ w (when want_h), in `mode`."""
    if mode == "head":
        hc = h.to(w.dtype)
        if gw is not None:
            if gw.is_cuda:
                gw.addmm_(g.t(), hc)  # fp32 accumulation inside, one rounding into gw
            else:
                gw.copy_(gw.float().addmm_(g.t().float(), hc.float()))
        if not want_h:
            return None
        return torch.mm(g, w) if g.is_cuda else (g.float() @ w.float()).to(w.dtype)
    h32 = _fp32(h)
    tile = tile_rows(w.shape[0], w.shape[1], w.dtype)
    gh = None
    for v0 in range(0, w.shape[0], tile):
        gt = g[:, v0:v0 + tile]
        if want_h:
            part = gt @ _fp32(w[v0:v0 + tile])
            gh = part if gh is None else gh.add_(part)
        if gw is not None:
            gw[v0:v0 + tile].addmm_(gt.t(), h32)
    if want_h and gh is None:  # a head without rows (a vocab-parallel rank with no ids)
        gh = h32.new_zeros(h32.shape)
    return gh


def check_head(name_h: str, h: object, name_w: str, w: object, name_b: str,
                b: object, vocab_parallel: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """The head's operands checked; a DTensor weight or bias (an FSDP2-sharded or
    tensor-parallel parameter read outside its module's forward) is gathered whole by
    `full_tensor()`, whose backward hands each rank its shard of the ranks' mean gradient."""
    h = check_float_tensor(name_h, _plain(name_h, h, False, vocab_parallel))
    w = check_float_tensor(name_w, _plain(name_w, w, True, vocab_parallel))
    b = _plain(name_b, b, True, vocab_parallel)
    if w.dim() != 2 or w.shape[1] != h.shape[-1]:
        raise ValueError(f"{name_w} must be [V, H] with H = {name_h}.shape[-1] = "
                         f"{h.shape[-1]}, got {tuple(w.shape)}")
    if b is not None:
        b = check_float_tensor(name_b, b, allow_empty=w.shape[0] == 0)
        if b.shape != (w.shape[0],):
            raise ValueError(f"{name_b} must be [V] = [{w.shape[0]}], got {tuple(b.shape)}")
    return h, w, b


def _plain(name: str, t: object, gather: bool, vocab_parallel: bool) -> object:
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    if vocab_parallel:
        raise ValueError(f"{name} is a DTensor, but process_group= takes each rank's plain "
                         f"slice: pass {name}.to_local()")
    if not gather:
        raise ValueError(f"{name} is a DTensor ({t.placements}): pass the local tensor "
                         f"({name}.to_local()); only the head's weight and bias are gathered")
    # Every rank computed its own gradient of the whole head from its own tokens: the
    # backward averages them into each rank's shard (FSDP's data-parallel mean; where the
    # ranks saw the same tokens, as in tensor parallelism, the mean is that gradient).
    from torch.distributed.tensor import Partial

    return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)
