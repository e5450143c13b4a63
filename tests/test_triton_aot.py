"""Every Triton kernel compiles ahead of time for real GPUs (sm_80 and sm_90), here, without
one: the interpreter accepts code the GPU compiler rejects, so this is what catches it.

Each kernel is compiled twice: by the Triton installed beside torch (the newest), and by
Triton 3.6, what torch 2.11 ships and the GPU image runs. The two disagree: 3.6 reads a
Python float below fp32's normal range as an fp64 constant, which once turned the sparse
kernel's maths fp64 (it failed to compile on the H200, 2026-11-28, and nowhere here).
Triton 3.6 is installed once with `pip install --target` into a cache folder
(DISTILL_OPS_TRITON36_DIR, default ~/.cache/distill_ops/triton-3.6.0-py3.X) and put on
PYTHONPATH of a subprocess; an install that fails is a test failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

TRITON_36 = "3.6.0"


def _triton36_dir() -> Path:
    default = (Path.home() / ".cache" / "distill_ops" /
               f"triton-{TRITON_36}-py{sys.version_info.major}.{sys.version_info.minor}")
    return Path(os.environ.get("DISTILL_OPS_TRITON36_DIR", default))


def _install_triton36() -> Path:
    """The folder holding triton==3.6.0 for this interpreter, installed on first use (into a
    temporary folder renamed into place, so a cut install is never taken for a whole one)."""
    target = _triton36_dir()
    if (target / "triton" / "__init__.py").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".triton36-", dir=target.parent))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
         "--target", str(tmp), f"triton=={TRITON_36}"],
        capture_output=True, text=True, timeout=900,
    )
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.fail(f"could not install triton=={TRITON_36} into {tmp} for the AOT check "
                    f"(set DISTILL_OPS_TRITON36_DIR to a folder that holds it):\n"
                    f"{proc.stdout}{proc.stderr}")
    try:
        tmp.rename(target)
    except OSError:  # another process installed it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.fixture(scope="module", params=["newest", TRITON_36])
def triton_path(request) -> tuple[str, str | None]:
    """(label, folder to put first on PYTHONPATH, or None for the installed Triton)."""
    if request.param == "newest":
        return "newest", None
    return TRITON_36, str(_install_triton36())


def _run_aot(cc: int, extra_path: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    code = ("import sys, triton; print('triton', triton.__version__, flush=True); "
            "from distill_ops.backends.triton.aot import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, "--cc", str(cc)], env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("cc", [80, 90])
def test_all_triton_kernels_compile_for_gpu(cc, triton_path):
    label, extra = triton_path
    proc = _run_aot(cc, extra)
    report = proc.stdout + proc.stderr
    if label != "newest":
        assert f"triton {label}" in proc.stdout.splitlines()[0], report
    assert proc.returncode == 0, report
    assert "FAIL" not in proc.stdout
    from distill_ops.backends.triton import aot

    assert proc.stdout.count(f"ok   sm_{cc} ") == len(aot.all_specs()), report


def test_aot_specs_cover_every_kernel():
    """A new @triton.jit kernel must be added to the AOT list, else it escapes the check."""
    import importlib
    import inspect
    import pkgutil

    from distill_ops.backends import triton as pkg
    from distill_ops.backends.triton import aot

    covered = {spec.fn for spec in aot.all_specs()}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in inspect.getmembers(mod):
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction") and name.endswith(
                "_kernel"
            ):
                assert obj in covered, f"{mod.__name__}.{name} has no AOT spec"
