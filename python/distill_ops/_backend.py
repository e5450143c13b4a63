"""The one place that decides which backend runs an op."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map `backend` (or the DISTILL_OPS_BACKEND override of "auto") to the one that runs.

    `auto` picks `cpu` for CPU tensors and `triton` for CUDA tensors. An explicit backend that
    cannot run on `device` is a ValueError that says why.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("DISTILL_OPS_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(
                f"DISTILL_OPS_BACKEND must be one of {BACKENDS}, got {backend!r}"
            )
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "triton":
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the Triton "
                "kernels on the CPU through the interpreter), got CPU tensors"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device}")
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise ValueError(f"backend='triton' needs the triton package: {exc}") from exc
    if backend == "cuda":
        from ._ext import has_native, native

        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not (has_native() and native().has_cuda):
            raise ValueError(
                "backend='cuda' needs distill_ops built with its CUDA kernels (nvcc found at "
                "build time and DISTILL_OPS_CUDA not OFF); this build has none: use "
                "backend='triton'"
            )
    return backend
