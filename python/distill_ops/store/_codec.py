"""Encoding and decoding of one sequence's targets (C++: csrc/cpu/store_codec.cpp)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..backends.extension import native
from ..validation import check_teacher_logprobs
from ._format import ENCODINGS


def codec_params(manifest: dict[str, Any]) -> Any:
    p = native().CodecParams()
    p.vocab = int(manifest["vocab_size"])
    p.k = int(manifest["k"])
    p.encoding = ENCODINGS[manifest["value_encoding"]]
    c = manifest.get("compact") or {}
    p.head = int(c.get("head", 16))
    p.head_tol = float(c.get("head_error", 0.02))
    p.tail_tol = float(c.get("tail_error", 0.1))
    p.head_min_bits = int(c.get("head_min_bits", 8))
    return p


def _as_numpy(name: str, x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.requires_grad:
            x = x.detach()
        return x.cpu().numpy()  # host-sync-ok: the store encodes on the host
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(x).__name__}")


def check_targets(indices: Any, logprobs: Any, vocab: int,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated, contiguous int32 ids and float32 log-probabilities [T, k]."""
    ids, lp = _as_numpy("indices", indices), _as_numpy("logprobs", logprobs)
    if ids.ndim != 2 or ids.shape[1] != k:
        raise ValueError(f"indices must have shape [T, k={k}], got {tuple(ids.shape)}")
    if lp.shape != ids.shape:
        raise ValueError(f"logprobs must have the shape of indices {tuple(ids.shape)}, "
                         f"got {tuple(lp.shape)}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"indices must be integers, got {ids.dtype}")
    if lp.dtype.kind != "f":
        raise TypeError(f"logprobs must be floating point, got {lp.dtype}")
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1 or hi >= vocab:
            raise ValueError(f"indices must lie in [0, vocab_size={vocab}) or be -1 (padding), "
                             f"got values in [{lo}, {hi}]")
        pad = ids < 0
        if np.any(pad[:, :-1] & ~pad[:, 1:]):
            row = int(np.nonzero(np.any(pad[:, :-1] & ~pad[:, 1:], axis=1))[0][0])
            raise ValueError(f"indices: padding (-1) must come after a token's valid ids; "
                             f"token {row} has a valid id after a -1")
        s = np.sort(ids, axis=1)
        dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
        if np.any(dup):
            row = int(np.nonzero(dup.any(axis=1))[0][0])
            raise ValueError(f"indices: ids must be unique within a token; token {row} repeats "
                             f"id {int(s[row, 1:][dup[row]][0])}")
        valid_lp = lp[~pad]
        if np.isnan(valid_lp).any() or np.isposinf(valid_lp).any():
            raise ValueError("logprobs must be finite or -inf where indices are valid; got "
                             + ("NaN" if np.isnan(valid_lp).any() else "+inf"))
        # The loss's own check (values <= 0, mass <= 1, up to the encodings' rounding), on
        # copies: the arrays may be read-only views (the ingest scanner's buffers).
        check_teacher_logprobs(torch.from_numpy(ids.astype(np.int64)),
                               torch.from_numpy(lp.astype(np.float32)), raise_errors=True,
                               name="logprobs", row="token")
    return (np.ascontiguousarray(ids, dtype=np.int32),
            np.ascontiguousarray(lp, dtype=np.float32))


def encode(params: Any, ids: np.ndarray, lp: np.ndarray) -> tuple[bytes, float, float]:
    return native().store_encode(ids.ctypes.data, lp.ctypes.data, ids.shape[0], params)


def decode_into(params: Any, payload: np.ndarray, tokens: int, ids: torch.Tensor,
                lp: torch.Tensor) -> bool:
    """Decodes `payload` (a uint8 array) into the [tokens, k] tensors `ids` and `lp`."""
    return native().store_decode(payload.ctypes.data, payload.size, tokens, params,
                                 ids.data_ptr(), lp.data_ptr())
