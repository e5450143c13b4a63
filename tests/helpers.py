"""Shared test helpers: random logits, and comparisons against the float64 reference."""

from __future__ import annotations

import torch

# Relative tolerance of a kernel against the float64 reference, by input dtype: fp32
# accumulation lands near 1e-6; bf16/fp16 gradients are rounded to 8/11 bits when stored.
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-10}
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-10}


def logits(*shape: int, dtype=torch.float32, device="cpu", spread: float = 1.5) -> torch.Tensor:
    """Fresh random logits with a realistic spread (never zeros)."""
    x = torch.randn(*shape, dtype=torch.float64, device=device) * spread
    return x.to(dtype)


def rel_err(a: torch.Tensor, ref: torch.Tensor, floor: float = 1e-2) -> float:
    """||a - ref|| / max(||ref||, floor) in float64: relative, and absolute near zero. The
    losses and gradients here are built from probabilities of size <= 1 whose fp32 rounding
    is ~6e-8 absolute, so a result that is 0 up to rounding (JSD of a one-token vocabulary)
    is held to rtol * floor absolute rather than to a meaningless relative error."""
    a = a.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert not torch.isnan(a).any(), "NaN in result"
    return (a - ref).norm().item() / max(ref.norm().item(), floor)


# Floors of rel_err: a loss is a sum of log-probability differences whose fp32 rounding is
# ~eps * |log p| (1e-7 to 1e-6 absolute); a gradient is built from probabilities (<= 1).
LOSS_FLOOR = 0.1
GRAD_FLOOR = 1e-2


def assert_close(
    a: torch.Tensor, ref: torch.Tensor, rtol: float, what: str = "", floor: float = GRAD_FLOOR
) -> None:
    assert a.shape == ref.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(ref.shape)}"
    err = rel_err(a, ref, floor)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:.3g}"


def fused_rows(op):
    """An autograd.Function over a fused op (returns (rows, grad of its first input)) that
    scales the gradient out of place.

    The public losses scale their saved gradient in place (one gradient of memory), so a graph
    can be backpropagated once; gradcheck backpropagates many times. This checks what gradcheck
    is for, the kernel's gradient against finite differences of its loss, while
    test_backward_scales_the_saved_gradient checks the in-place scaling."""

    class FusedRows(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, *args):
            rows, grad = op(x, *args)
            ctx.save_for_backward(grad)
            ctx.n_args = len(args)
            return rows

        @staticmethod
        def backward(ctx, go):
            (grad,) = ctx.saved_tensors
            return (grad * go[:, None],) + (None,) * ctx.n_args

    return FusedRows


def load_example(name: str):
    """The module examples/<name>.py, imported from its file (examples/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_host_driver(tmp_dir, source: str):
    """Compile tests/cpp/<source> (a host driver of the CUDA kernels' maths, csrc headers on
    the include path) into tmp_dir; skips the test where no C++ compiler is on PATH."""
    import shutil
    import subprocess
    from pathlib import Path

    import pytest

    root = Path(__file__).resolve().parents[1]
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    exe = Path(tmp_dir) / Path(source).stem
    subprocess.run([cxx, "-O2", "-std=c++17", "-Wno-unknown-pragmas",
                    f"-I{root / 'csrc' / 'include'}", f"-I{root / 'csrc' / 'cuda'}",
                    str(root / "tests" / "cpp" / source), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return exe
