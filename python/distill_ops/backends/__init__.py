"""Where the ops run: the kernels' launchers, one module per backend.

- :mod:`.cpu`: the C++ kernels of ``distill_ops._C`` (OpenMP), launched on CPU tensors.
- :mod:`.cuda`: the CUDA C++ kernels of ``distill_ops._C`` (built when nvcc was found).
- :mod:`.triton`: the Triton kernels (CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``), their autotuning, ahead-of-time compilation and static SASS model.
- :mod:`.head_matmul`: how the fused LM-head ops multiply hidden states by the head (fp32
  tiles on the CPU, tensor-core operands with fp32 logits out on a GPU).
- :mod:`.extension`: the loader of ``distill_ops._C`` and the tensor-to-pointer glue.

Which backend runs a call is decided in one place, :func:`distill_ops.dispatch.resolve_backend`
(``auto_backends.json`` beside this file holds the GPU measurements ``auto`` reads).
"""

from __future__ import annotations

import os


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


__all__ = ["triton_interpreted"]
