"""Reports of a harness run: markdown tables (every case; the summary of ours against the
fastest peer), the JSON results file, PNG plots against V and N with the bandwidth floor, and
the auto table (``auto_backends.json``: which backend ran fastest per op on a GPU model)."""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .measure import Result

SCHEMA = "distill_ops.bench/2"


def _fastest_impls(results: list[Result], impls: tuple[str, ...] | None = None,
                   whole: bool = False) -> dict[str, str]:
    """{op family: impl label}: per case, which of our impls (or of `impls`) ran fastest
    (forward + backward); per family, the one that won most cases (ties: the lower summed
    time). `whole`: only the cases where every one of `impls` ran."""
    wins: dict[str, dict[str, list[float]]] = {}
    cases: dict[tuple, list[Result]] = {}
    for r in results:
        ours = r.impl in impls if impls else r.impl.startswith("distill_ops[")
        if r.status == "ok" and ours and r.total_ms is not None:
            cases.setdefault((r.op, r.variant, r.n, r.v, r.k), []).append(r)
    for (op, *_), rows in cases.items():
        if whole and len(rows) < len(impls or ()):
            continue
        best = min(rows, key=lambda r: r.total_ms)
        tally = wins.setdefault(op, {})
        for r in rows:
            won, total = tally.get(r.impl, [0.0, 0.0])
            tally[r.impl] = [won + (r is best), total + r.total_ms]
    return {op: max(tally, key=lambda i: (tally[i][0], -tally[i][1]))
            for op, tally in wins.items()}


def fastest_backends(results: list[Result]) -> dict[str, str]:
    """{op family: backend}: per case, which of our backends ran fastest (forward +
    backward); per family, the backend that won most cases (ties: the lower summed time)."""
    # "cuda:cluster" and "cuda:portable" (the dense kernel's two designs) are both cuda.
    return {op: impl[len("distill_ops["):-1].split(":")[0]
            for op, impl in _fastest_impls(results).items()}


_CUDA_DENSE = ("distill_ops[cuda:portable]", "distill_ops[cuda:cluster]")


def fastest_cuda_dense_variant(results: list[Result]) -> str | None:
    """Which CUDA dense kernel ("portable" or "cluster") won more of the dense cases where
    both ran (ties: the lower summed time); None where they were not both timed."""
    impl = _fastest_impls(results, _CUDA_DENSE, whole=True).get("dense")
    return None if impl is None else impl[len("distill_ops[cuda:"):-1]


def write_auto_table(path: str | os.PathLike[str], device: str, results: list[Result],
                     note: str) -> dict[str, str]:
    """Merges this run's fastest backends for `device` into the auto table at `path` (the
    package's auto_backends.json, or a copy to commit there)."""
    import json

    path = Path(path)
    table = json.loads(path.read_text()) if path.exists() else {"devices": {}}
    best = {op: b for op, b in fastest_backends(results).items()
            if op in ("dense", "sparse", "topk")}
    variant = fastest_cuda_dense_variant(results)
    if variant is not None:
        best["dense_cuda_variant"] = variant
    table.setdefault("devices", {}).setdefault(device, {}).update(best, measured=note)
    path.write_text(json.dumps(table, indent=1) + "\n")
    return best


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(results: list[Result], env: dict[str, Any],
                 store: list[dict[str, Any]] | None = None) -> str:
    """Markdown: one row per case, speed-up against eager PyTorch of the same group."""
    key = lambda r: (r.op, r.variant, r.shape, r.dtype)
    eager = {key(r): r.total_ms for r in results if r.impl == "eager" and r.status == "ok"}
    peers = ", ".join(f"{p} {v}" for p, v in env["peers"].items() if v) or "none"
    lines = [
        f"device: {env['device']}; torch {env['torch']}; triton {env.get('triton')}; "
        f"CUDA {env.get('cuda')}; peers: {peers}; copy bandwidth "
        f"{env['copy_bandwidth_gbps']:.1f} GB/s; commit {env.get('git_commit')}",
        "",
        "| op | variant | shape | dtype | impl | fwd ms (spread) | fwd+bwd ms (spread) | "
        "vs eager | peak MiB (output) | floor MiB | GB/s | of copy BW | of matmul | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.op} | {r.variant} | {r.shape.label()} | {r.dtype} | {r.impl} | "
                         f"- | - | - | - | - | - | - | - | {r.status}: {r.notes} |")
            continue
        base = eager.get(key(r))
        speed = f"{base / r.total_ms:.1f}x" if base else "-"
        lines.append(
            f"| {r.op} | {r.variant} | {r.shape.label()} | {r.dtype} | {r.impl} | "
            f"{r.fwd_ms:.2f} ({r.fwd_spread_ms:.2f}) | {r.total_ms:.2f} "
            f"({r.total_spread_ms:.2f}) | {speed} | {r.peak_extra_mib:.0f} ({r.out_mib:.0f}) | "
            f"{r.floor_mib:.0f} | {r.gbps:.1f} | {r.frac_copy_bw:.0%} | "
            f"{_fmt(r.frac_matmul, '.0%')} | {r.notes} |")
    if store:
        lines += ["", "Target store reader (one process; CRC checked, decoded into tensors):", "",
                  "| encoding | k | V | tokens | bytes/token | read tokens/s | write tokens/s |",
                  "|---|---|---|---|---|---|---|"]
        for s in store:
            lines.append(f"| {s['encoding']} | {s['k']} | {s['vocab']} | {s['tokens']} | "
                         f"{s['bytes_per_token']:.1f} | {s['read_tokens_per_s']:,.0f} | "
                         f"{s['write_tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def summary_table(results: list[Result]) -> str:
    """Markdown, one row per group: our fastest backend against the fastest peer that ran
    (the matmul-only yardstick is not a peer)."""
    lines = ["| op | variant | shape | dtype | ours | ms | fastest peer | ms | speed-up | "
             "peak MiB ours / peer | of copy BW | of matmul |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups_: dict[tuple, list[Result]] = {}
    for r in results:
        if r.status == "ok":
            groups_.setdefault((r.op, r.variant, r.shape, r.dtype), []).append(r)
    for (op, variant, shape, dtype), rows in groups_.items():
        ours = [r for r in rows if r.impl.startswith("distill_ops")]
        peers = [r for r in rows if not r.impl.startswith("distill_ops")
                 and r.impl != "matmuls only"]
        if not ours:
            continue
        a = min(ours, key=lambda r: r.total_ms)
        b = min(peers, key=lambda r: r.total_ms) if peers else None
        lines.append(
            f"| {op} | {variant} | {shape.label()} | {dtype} | {a.impl} | {a.total_ms:.2f} | "
            + (f"{b.impl} | {b.total_ms:.2f} | {b.total_ms / a.total_ms:.1f}x | "
               f"{a.peak_extra_mib:.0f} / {b.peak_extra_mib:.0f} | " if b else
               "- | - | - | - | ")
            + f"{a.frac_copy_bw:.0%} | {_fmt(a.frac_matmul, '.0%')} |")
    return "\n".join(lines)


def to_json(results: list[Result], env: dict[str, Any], command: str,
            config: dict[str, Any], store: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"schema": SCHEMA,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": command, "environment": env, "config": config,
            "results": [asdict(r) for r in results], "store": store or []}


def plot(results: list[Result], folder: str | os.PathLike[str],
         copy_gbps: float | None = None) -> list[str]:
    """PNG plots of time (forward + backward) and peak memory against V (at the most common N)
    and against N (at the most common V), one pair per op and variant with two or more sizes;
    with `copy_gbps`, the bandwidth floor (the bytes that must move at the measured copy
    bandwidth) as a dashed line. Returns the files written (none when matplotlib is
    missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from collections import Counter
    from pathlib import Path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    by_group: dict[tuple[str, str, str], list[Result]] = {}
    for r in results:
        if r.status == "ok":
            by_group.setdefault((r.op, r.variant, r.dtype), []).append(r)
    for (op, variant, dtype), rows in by_group.items():
        for axis, other in (("v", "n"), ("n", "v")):
            common = Counter(getattr(r, other) for r in rows).most_common(1)[0][0]
            sel = [r for r in rows if getattr(r, other) == common]
            if len({getattr(r, axis) for r in sel}) < 2:
                continue
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
            for impl in dict.fromkeys(r.impl for r in sel):
                pts = sorted((getattr(r, axis), r.total_ms, r.peak_extra_mib)
                             for r in sel if r.impl == impl)
                xs = [p[0] for p in pts]
                ax_t.plot(xs, [p[1] for p in pts], marker="o", label=impl)
                ax_m.plot(xs, [p[2] for p in pts], marker="o", label=impl)
            floor = sorted({(getattr(r, axis), r.floor_mib) for r in sel if r.floor_mib})
            if copy_gbps and floor:
                ax_t.plot([f[0] for f in floor],
                          [f[1] * 2**20 / (copy_gbps * 1e9) * 1e3 for f in floor], "k--",
                          lw=1, label=f"bandwidth floor ({copy_gbps:.0f} GB/s)")
            for ax, what in ((ax_t, "forward + backward ms"), (ax_m, "peak extra MiB")):
                ax.set_xlabel(axis.upper())
                ax.set_ylabel(what)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.grid(True, alpha=0.3)
            ax_t.legend(fontsize=7)
            fig.suptitle(f"{op} {variant} {dtype}, {other.upper()}={common}")
            fig.tight_layout()
            name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{op}-{variant}-{dtype}-vs-{axis.upper()}")
            path = out / f"{name.strip('_')}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(str(path))
    return written


__all__ = ["SCHEMA", "fastest_backends", "format_table", "plot", "summary_table", "to_json",
           "write_auto_table"]
