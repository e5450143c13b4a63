"""The native module `distill_ops._C`, its dtype codes and the tensor-to-pointer glue."""

from __future__ import annotations

from typing import Any

import torch

try:
    from distill_ops import _C as _native
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _IMPORT_ERROR: ImportError | None = exc
    _native = None
else:
    _IMPORT_ERROR = None

# Codes shared with csrc/include/distill_ops/kd_math.h (enum class DType).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def native() -> Any:
    """The compiled module, or an ImportError that says how to build it."""
    if _native is None:
        raise ImportError(
            "distill_ops._C (the compiled CPU/CUDA kernels) is missing: install the package "
            "with `pip install .` (or `make test`), which builds it with CMake and a C++17 "
            f"compiler; the import failed with: {_IMPORT_ERROR}"
        )
    return _native


def has_native() -> bool:
    return _native is not None


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def fused_outputs(rows: torch.Tensor, wide: bool, compute_grad: bool,
                  grad_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of a fused loss over rows [N, V]: the per-row loss [N] (fp64 when `wide`,
    else fp32) and d loss / d rows [N, V] in the rows' dtype, or `grad_dtype` (an empty tensor
    when not computed). Allocated with new_empty, so fake impls share it too."""
    loss = rows.new_empty(rows.shape[0], dtype=torch.float64 if wide else torch.float32)
    grad = rows.new_empty(tuple(rows.shape) if compute_grad else (0,),
                          dtype=grad_dtype or rows.dtype)
    return loss, grad


def ptr(t: torch.Tensor | None) -> int:
    """Data pointer, or 0 for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()
