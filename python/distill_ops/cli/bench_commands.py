"""`distill-ops bench`: the harness (:mod:`distill_ops.bench`) from the command line, and its
side harnesses (``--world``, ``--trl-step``, ``--ingest``)."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _shape(text: str) -> tuple[int, int]:
    """NxV, both >= 1 (an argparse type: anything else is a usage error)."""
    try:
        n, v = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be NxV (e.g. 2048x32000), got {text!r}") \
            from None
    if n < 1 or v < 1:
        raise argparse.ArgumentTypeError(f"N and V must be >= 1, got {text!r}")
    return n, v


def _shapes(args: argparse.Namespace, device: str) -> dict:
    from .. import bench as bm

    base = bm.QUICK if args.quick else (bm.CANONICAL if device == "cuda" else bm.CPU_FULL)
    shapes = {op: list(v) for op, v in base.items()}
    if args.shape:  # NxV replaces the sizes of every op, keeping each op's k and widths
        for op, defaults in shapes.items():
            d = defaults[0]
            shapes[op] = [bm.Shape(n, v, d.k, d.hs, d.ht) for n, v in args.shape]
    if args.k:
        for op, rows in shapes.items():
            if rows[0].k:
                shapes[op] = list(dict.fromkeys(
                    bm.Shape(s.n, s.v, k, s.hs, s.ht) for s in rows for k in args.k))
    if args.hidden:
        hs, ht = args.hidden
        for op, rows in shapes.items():
            shapes[op] = [bm.Shape(s.n, s.v, s.k, hs if s.hs else 0, ht if s.ht else 0)
                          for s in rows]
    return shapes


def _write_result(args: argparse.Namespace, kind: str, payload: dict, text: str) -> None:
    """`<kind>-<date>.json` (the payload, the command, the commit, torch's version) and `.md`
    (the command and `text`) in --out, when given."""
    import datetime

    if not args.out:
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{kind}-{datetime.date.today().isoformat()}"
    command = "distill-ops " + " ".join(shlex.quote(a) for a in args.argv)
    record = {"command": command, "git_commit": _git_commit(), "torch": torch.__version__,
              **payload}
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (out / f"{stem}.md").write_text(f"`{command}`\n\n{text}\n")
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)


def bench_world(args: argparse.Namespace) -> int:
    """`bench --world N`: the vocab-parallel ops on N processes."""
    from ..bench import world as bp

    n, v = (args.shape or [(2048, 32000)])[0]
    k = (args.k or [64])[0]
    dtype = args.dtype or "fp32"
    print(f"distill-ops bench --world {args.world}: N={n} V={v} k={k} {dtype}", file=sys.stderr)
    result = bp.run_world(args.world, n, v, k=k, dtype=dtype, temperature=args.temperature,
                          divergences=args.divergence, reps=args.reps or 5)
    table = bp.format_world_table(result)
    print(f"ranks on {result['device']} ({result['backend']})\n\n{table}")
    kind = "cuda" if result["device"].startswith("cuda") else "cpu"
    _write_result(args, f"{kind}-world{args.world}", result, table)
    return 0


def bench_trl_step(args: argparse.Namespace) -> int:
    """`bench --trl-step`: one training step of TRL's DistillationTrainer against ours."""
    from ..bench import trl_step as bench_trl

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    hs, ht = args.hidden or (256, 512)
    v = (args.shape or [(0, 32000)])[0][1]
    rows = bench_trl.run_trl_step(hs, ht, v, reps=args.reps or 3, device=device)
    table = bench_trl.format_trl_table(rows)
    head = (f"one DistillationTrainer step: student hidden {hs}, teacher {ht}, V={v}, "
            f"{rows[0]['completion_tokens']} completion tokens, {device}")
    print(f"{head}\n\n{table}")
    _write_result(args, f"{device}-trl-step", {"rows": rows}, f"{head}\n\n{table}")
    return 0


def bench_ingest(args: argparse.Namespace) -> int:
    """`bench --ingest`: API logprobs into a compact store, positions/s and bytes/position."""
    from ..bench import ingest as bench_ingest

    k = (args.k or [20])[0]
    v = (args.shape or [(0, 151936)])[0][1]
    r = bench_ingest.run_ingest_bench(k=k, vocab=v, reps=args.reps or 3)
    table = bench_ingest.format_ingest_table(r)
    print(table)
    _write_result(args, "cpu-ingest", {"result": r}, table)
    return 0


def bench(args: argparse.Namespace) -> int:
    import datetime

    from .. import bench as bm

    if args.ingest:
        return bench_ingest(args)

    if args.world:
        return bench_world(args)
    if args.trl_step:
        return bench_trl_step(args)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = _shapes(args, device)
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    reps = args.reps or (3 if args.quick else 10)
    include_compile = not args.quick and not args.no_compile
    total = 0
    for op in args.op:
        for s in shapes[op]:
            total += sum(len(c) for _, c in bm.groups(op, s, args.temperature,
                                                      torch.device(device), False,
                                                      args.divergence, args.tail))
    bar = _progress(total, args.no_progress)
    print(f"distill-ops bench: {total} cases on {device} ({dtype_name})", file=sys.stderr)
    results, env = bm.run(args.op, shapes, dtype=dtype, device=device,
                          temperature=args.temperature, reps=reps,
                          include_compile=include_compile, divergences=args.divergence,
                          tails=args.tail, progress=bar, budget_s=args.budget)
    bar(None)
    store = None
    if "store" in args.extra:
        print("  timing the target store reader", file=sys.stderr)
        store = bm.store_throughput(tokens=1 << 14 if args.quick else 1 << 17)
    env["git_commit"] = _git_commit()
    table = bm.format_table(results, env, store)
    summary = bm.summary_table(results)
    print(table)
    print("\nSummary: our fastest backend against the fastest peer, forward + backward\n")
    print(summary)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{bm.device_slug(env)}-{datetime.date.today().isoformat()}"
        command = "distill-ops " + " ".join(shlex.quote(a) for a in args.argv)
        config = {"ops": list(args.op), "quick": args.quick, "dtype": dtype_name,
                  "reps": reps, "temperature": args.temperature,
                  "torch_compile": include_compile,
                  "shapes": {op: [vars(s) for s in shapes[op]] for op in args.op}}
        (out / f"{stem}.json").write_text(
            json.dumps(bm.to_json(results, env, command, config, store), indent=1))
        (out / f"{stem}.md").write_text(f"`{command}`\n\n## Summary\n\n{summary}\n\n"
                                        f"## Every case\n\n{table}\n")
        plots = [] if args.no_plots else bm.plot(results, out / f"{stem}-plots",
                                                  env.get("copy_bandwidth_gbps"))
        note = f", {len(plots)} plots in {out / (stem + '-plots')}" if plots else (
            "" if args.no_plots else " (no plots: matplotlib is not installed)")
        print(f"wrote {out / stem}.json and .md{note}", file=sys.stderr)
    if args.write_auto_table:
        note = f"{datetime.date.today().isoformat()}, {' '.join(args.argv)}"
        best = bm.write_auto_table(args.write_auto_table, env["device"], results, note)
        print(f"auto backends for {env['device']}: {best} -> {args.write_auto_table}",
              file=sys.stderr)
    return 0


def _progress(total: int, disabled: bool):
    """A progress callback: a tqdm bar on stderr (a line per case without tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    if tqdm is None or disabled:
        def line(label):
            if label is not None and not disabled:
                print(f"  {label}", file=sys.stderr, flush=True)
        return line
    bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)
    started = []

    def step(label):  # called as each case starts; None when all are done
        if started:
            bar.update(1)
        started.append(True)
        if label is None:
            bar.close()
        else:
            bar.set_description_str(label[:60])
    return step
