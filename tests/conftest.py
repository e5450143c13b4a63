"""Test setup: Triton runs through its CPU interpreter where there is no GPU, and every test
draws fresh random data (the seed is printed on failure; DISTILL_OPS_SEED replays one)."""

import os

import torch

# Hermetic compile tests: inductor's on-disk caches outlive edits of our ops' autograd.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates the kernels, i.e. before distill_ops imports.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import secrets

import pytest

from distill_ops.backends import triton_interpreted

ON_GPU = torch.cuda.is_available()


def kernel_backends() -> list:
    """Every fused backend: cpu always; triton on a GPU or through the interpreter; cuda
    (csrc/cuda) only on a GPU, skipped elsewhere with the reason."""
    from distill_ops.backends.extension import has_native, native

    out: list = ["cpu"]
    if ON_GPU or triton_interpreted():
        out.append("triton")
    built = has_native() and native().has_cuda
    reason = ("needs a CUDA GPU (the kernels are compiled here, run on a GPU)" if not ON_GPU
              else "distill_ops was built without its CUDA kernels")
    out.append(pytest.param("cuda", marks=pytest.mark.skipif(not (ON_GPU and built),
                                                             reason=reason)))
    return out


def device_for(backend: str) -> torch.device:
    on_gpu = backend in ("triton", "cuda") and ON_GPU
    return torch.device("cuda") if on_gpu else torch.device("cpu")


@pytest.fixture
def seed(request) -> int:
    value = int(os.environ.get("DISTILL_OPS_SEED", secrets.randbits(31)))
    request.node.user_properties.append(("seed", value))
    torch.manual_seed(value)
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(("seed", f"replay with DISTILL_OPS_SEED={value}"))
