"""The one place that decides which backend runs an op (``backend=`` and ``auto``)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from .backends import triton_interpreted

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")


@functools.cache
def _auto_table() -> dict:
    path = Path(__file__).parent / "backends" / "auto_backends.json"
    return json.loads(path.read_text())["devices"] if path.exists() else {}


@functools.lru_cache(maxsize=64)
def _auto_cuda(name: str, op: str) -> str:
    """The fastest measured backend of `op` on the GPU model `name` (auto_backends.json);
    triton where nothing was measured or the CUDA kernels are not built."""
    choice = _auto_table().get(name, {}).get(op, "triton")
    if choice == "cuda":
        from .backends.extension import has_native, native

        if not (has_native() and native().has_cuda):
            return "triton"
    return choice


@functools.lru_cache(maxsize=64)
def measured_cuda_dense_variant(name: str) -> str | None:
    """The CUDA dense kernel ("portable" or "cluster") measured faster on the GPU model
    `name` (auto_backends.json's dense_cuda_variant), None where it was not measured."""
    choice = _auto_table().get(name, {}).get("dense_cuda_variant")
    return choice if choice in ("portable", "cluster") else None


def resolve_backend(backend: str, device: torch.device, op: str | None = None) -> str:
    """Map `backend` (or the DISTILL_OPS_BACKEND override of "auto") to the one that runs.

    `auto` picks `cpu` for CPU tensors; for CUDA tensors, the backend measured fastest for
    `op` ("dense", "sparse", "topk") on that GPU model (auto_backends.json, written by
    ``distill-ops bench --write-auto-table``), else `triton`. An explicit backend that cannot
    run on `device` is a ValueError that says why.
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
        if device.type != "cuda":
            return "cpu"
        return _auto_cuda(torch.cuda.get_device_name(device), op) if op else "triton"
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
        from .backends.extension import has_native, native

        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not (has_native() and native().has_cuda):
            raise ValueError(
                "backend='cuda' needs distill_ops built with its CUDA kernels (nvcc found at "
                "build time and DISTILL_OPS_CUDA not OFF); this build has none: use "
                "backend='triton'"
            )
    return backend
