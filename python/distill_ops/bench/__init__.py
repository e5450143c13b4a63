"""The benchmark harness (``distill-ops bench``): every public op, each backend the device
runs, against the peers users run today, on the same inputs, against the hardware limit.

A *group* is one op at one shape, dtype and variant (divergence, tail, ...); its *cases* are
our backends and the peers, run one after the other on the same inputs. Each case is timed
after a warm-up as the median and spread (max - min) of several repetitions, forward alone
and forward + backward (device events on a GPU, a monotonic clock after synchronisation on the
CPU), with the peak memory it adds on top of its inputs (allocator statistics on a GPU, the
resident set sampled every millisecond on the CPU).

How close to the limit: :func:`bytes_floor` is the one byte model (what must move between
memory and the chip, per op); divided by the forward + backward time it gives GB/s, and over
the copy bandwidth the harness measures at start (device-to-device copy on a GPU, memcpy on
the CPU) the fraction of the bandwidth floor reached. The LM-head ops are compute-bound: their
rows also give the fraction of the matmul-only time (the same projections and their
gradients, with no loss at all).

Peers, each only where installed (a row says so where not): eager PyTorch written out plainly,
`torch.compile` of that code, TRL (`generalized_jsd_loss`, `_chunked_divergence_loss`, the
server-distillation tail bucket), torchtune's KD losses, Liger (`LigerKLDIVLoss`, `LigerJSD`,
`LigerTVDLoss`, `LigerFusedLinearJSD`; CUDA only).

Modules by role: :mod:`.shapes` (the shape sets), :mod:`.cases` (ours and the peers, the
inputs), :mod:`.floors` (bytes and flops that must be spent), :mod:`.measure` (timing, memory,
environment, the run), :mod:`.report` (tables, JSON, plots, the auto table), and the side
harnesses :mod:`.world` (``--world``: vocab-parallel ranks), :mod:`.trl_step`
(``--trl-step``: one TRL training step) and :mod:`.ingest` (``--ingest``: API-log ingest).
"""

from .cases import Case, groups, make_inputs
from .floors import bytes_floor, matmul_flops
from .measure import (
    Result,
    Timing,
    copy_bandwidth,
    device_slug,
    environment,
    measure,
    run,
    store_throughput,
)
from .report import (
    SCHEMA,
    fastest_backends,
    format_table,
    plot,
    summary_table,
    to_json,
    write_auto_table,
)
from .shapes import CANONICAL, CPU_FULL, DIVERGENCES, OPS, QUICK, TAILS, Shape

__all__ = [
    "CANONICAL",
    "CPU_FULL",
    "DIVERGENCES",
    "OPS",
    "QUICK",
    "SCHEMA",
    "TAILS",
    "Case",
    "Result",
    "Shape",
    "Timing",
    "bytes_floor",
    "copy_bandwidth",
    "device_slug",
    "environment",
    "fastest_backends",
    "format_table",
    "groups",
    "make_inputs",
    "matmul_flops",
    "measure",
    "plot",
    "run",
    "store_throughput",
    "summary_table",
    "to_json",
    "write_auto_table",
]
