"""`distill-ops`: the command line. `bench` times the ops against their peers, `extract` stores
a teacher's sparse targets, `inspect` reports on a store, `demo` runs the three stages end to
end on synthetic models."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from .benchmark import DIVERGENCES, OPS, TAILS


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _shape(text: str) -> tuple[int, int]:
    n, v = text.lower().split("x")
    return int(n), int(v)


def _shapes(args: argparse.Namespace, device: str) -> dict:
    from . import benchmark as bm

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
    from . import bench_parallel as bp

    n, v = (args.shape or [(2048, 32000)])[0]
    k = (args.k or [64])[0]
    dtype = args.dtype or "fp32"
    print(f"distill-ops bench --world {args.world}: N={n} V={v} k={k} {dtype}", file=sys.stderr)
    result = bp.run_world(args.world, n, v, k=k, dtype=dtype, temperature=args.temperature,
                          divergences=args.divergence[:2], reps=args.reps or 5)
    table = bp.format_world_table(result)
    print(f"ranks on {result['device']} ({result['backend']})\n\n{table}")
    kind = "cuda" if result["device"].startswith("cuda") else "cpu"
    _write_result(args, f"{kind}-world{args.world}", result, table)
    return 0


def bench_trl_step(args: argparse.Namespace) -> int:
    """`bench --trl-step`: one training step of TRL's DistillationTrainer against ours."""
    from . import bench_trl

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
    from . import bench_ingest

    k = (args.k or [20])[0]
    v = (args.shape or [(0, 151936)])[0][1]
    r = bench_ingest.run_ingest_bench(k=k, vocab=v, reps=args.reps or 3)
    table = bench_ingest.format_ingest_table(r)
    print(table)
    _write_result(args, "cpu-ingest", {"result": r}, table)
    return 0


def bench(args: argparse.Namespace) -> int:
    import datetime

    from . import benchmark as bm

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


def extract(args: argparse.Namespace) -> int:
    import os

    from .store.extract import extract as run_extract

    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one process per rank
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    counts = run_extract(args.teacher, args.data, args.out, k=args.k, sample=args.sample,
                         temperature=args.temperature, value_encoding=args.encoding,
                         max_length=args.max_length, batch_size=args.batch_size,
                         device=device, dtype=args.dtype, seed=args.seed,
                         progress=not args.no_progress)
    rate = counts["tokens"] / counts["seconds"] if counts["seconds"] else 0.0
    print(f"wrote {counts['written']} sequences ({counts['tokens']} tokens, {rate:,.0f} tokens/s)"
          f", skipped {counts['skipped']} already stored, into {args.out}")
    return 0


def ingest(args: argparse.Namespace) -> int:
    from .store.ingest import ingest as run_ingest

    r = run_ingest(args.files, args.out, format=args.format, tokenizer=args.tokenizer, k=args.k,
                   temperature=args.temperature, value_encoding=args.encoding,
                   on_unmappable=args.on_unmappable, progress=not args.no_progress)
    print(f"ingested {r.lines} lines of {r.files} file(s) into {args.out}: {r.written} "
          f"sequences ({r.positions} positions, {r.positions_per_second:,.0f} positions/s, "
          f"{r.bytes_per_position:.1f} bytes/position, k={r.k}, T={r.temperature}), "
          f"{r.already_stored} already stored")
    if r.cut_sequences:
        print(f"  cut {r.cut_sequences} sequences at an unmappable token ({r.cut_positions} "
              "positions dropped)")
    for what, count in sorted(r.skipped.items()):
        print(f"  skipped {count} lines ({what}), e.g. {', '.join(r.examples[what])}")
    for what, count in (("alternatives without an id", r.unmapped_alternatives),
                        ("alternatives past k", r.dropped_alternatives)):
        if count:
            print(f"  left out {count} {what}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(quick=args.quick, corpus=args.corpus, out=args.out, device=args.device,
             cache=args.cache, progress=not args.no_progress)
    return 0


def inspect(args: argparse.Namespace) -> int:
    from .store.extract import format_inspection, inspect_store

    info = inspect_store(args.store, verify=not args.no_verify)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="distill-ops", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time every op against its peers and the hardware limit")
    b.add_argument("--op", nargs="+", default=list(OPS), choices=list(OPS))
    b.add_argument("--quick", action="store_true",
                   help="small CPU-friendly sizes, 3 repetitions, no torch.compile")
    b.add_argument("--shape", type=_shape, action="append",
                   help="NxV (repeatable), replacing every op's default sizes")
    b.add_argument("--k", type=int, nargs="+", help="targets per row (ops that take k)")
    b.add_argument("--hidden", type=int, nargs=2, metavar=("HS", "HT"),
                   help="student and teacher hidden widths of the LM-head ops")
    b.add_argument("--divergence", nargs="+", default=list(DIVERGENCES), choices=DIVERGENCES)
    b.add_argument("--tail", nargs="+", default=list(TAILS), choices=TAILS)
    b.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default: bf16 on a GPU, fp32 on the CPU")
    b.add_argument("--temperature", type=float, default=2.0)
    b.add_argument("--reps", type=int, default=None)
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    b.add_argument("--extra", nargs="*", default=["store"], choices=["store"],
                   help="also time the target store reader (default)")
    b.add_argument("--out", default=None,
                   help="folder for <device>-<date>.json, .md and -plots/*.png")
    b.add_argument("--no-plots", action="store_true")
    b.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="start no new case after this long (the rest say so); results are "
                        "still written")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--write-auto-table", default=None, metavar="JSON",
                   help="merge the fastest of our backends per op family on this device into "
                        "this table (python/distill_ops/auto_backends.json is the one "
                        "backend='auto' reads)")
    b.add_argument("--ingest", action="store_true",
                   help="time API-logprobs ingest into a compact store (k from --k, V from "
                        "--shape): positions/s and bytes/position")
    b.add_argument("--trl-step", action="store_true",
                   help="one training step of TRL's DistillationTrainer against "
                        "distill_ops.integrations.trl's (--hidden HS HT, V from --shape)")
    b.add_argument("--world", type=int, default=None, metavar="N",
                   help="time the vocab-parallel ops on N processes (gloo on CPUs, NCCL with "
                        "a GPU per rank) and the bytes each sends per row; first --shape")
    b.set_defaults(func=bench)

    e = sub.add_parser("extract", help="store a local teacher's top-k or sampled targets")
    e.add_argument("--teacher", required=True, help="local Hugging Face causal LM directory")
    e.add_argument("--data", nargs="+", required=True, help=".txt, .jsonl, .npy or .pt files")
    e.add_argument("--out", required=True, help="the store directory (resumed if it exists)")
    e.add_argument("--k", type=int, default=64, help="top-k targets per token")
    e.add_argument("--sample", type=int, default=None,
                   help="store N sampled draws per token instead of the top-k")
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--encoding", default="compact", choices=["compact", "fp16", "bf16"])
    e.add_argument("--max-length", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    e.add_argument("--device", default=None)
    e.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    e.add_argument("--seed", type=int, default=0, help="sampling seed (plus each seq_id)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=extract)

    d = sub.add_parser("demo", help="distil a teacher into students on a real corpus: CE, "
                                    "dense, top-12 (each tail) and sampled targets, measured")
    d.add_argument("--quick", action="store_true", help="small sizes: about a minute on 2 CPUs")
    d.add_argument("--corpus", default=None,
                   help="a text file or a folder of .txt/.py/.md files (default: the Python "
                        "standard library's source)")
    d.add_argument("--out", default="demo_out", help="demo.json, demo.md and plots go here")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    d.add_argument("--cache", default=None,
                   help="tokenizer, teacher and stores (default ~/.cache/distill_ops/demo)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=demo)

    g = sub.add_parser("ingest", help="API / inference-server logprobs (JSONL) into a store")
    g.add_argument("files", nargs="+", help="JSONL files (.gz too)")
    g.add_argument("--format", required=True, choices=["openai", "vllm"])
    g.add_argument("--tokenizer", required=True,
                   help="the student's tokenizer: a directory with tokenizer.json, or the file")
    g.add_argument("--out", required=True, help="the store directory (continued if it exists)")
    g.add_argument("--k", type=int, default=None, help="targets per position (default: from "
                   "the first response, or the existing store's)")
    g.add_argument("--temperature", type=float, default=None,
                   help="the teacher's sampling temperature (recorded in the manifest)")
    g.add_argument("--encoding", default="compact", choices=["compact", "fp16", "bf16"])
    g.add_argument("--on-unmappable", default="cut", choices=["cut", "skip"])
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=ingest)

    i = sub.add_parser("inspect", help="what a target store holds, checksums verified")
    i.add_argument("store")
    i.add_argument("--json", action="store_true")
    i.add_argument("--no-verify", action="store_true")
    i.set_defaults(func=inspect)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
