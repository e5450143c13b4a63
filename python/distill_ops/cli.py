"""`distill-ops`: the command line. `bench` times the ops against their peers, `extract` stores
a teacher's sparse targets, `inspect` reports on a store."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch

QUICK_SHAPES = [(256, 32000)]
FULL_SHAPES = [(2048, 32000), (512, 128256)]


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


def bench(args: argparse.Namespace) -> int:
    from . import benchmark

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = args.shape or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    reps = args.reps or (3 if args.quick else 7)
    total = len(shapes) * len(args.op)

    def progress(label: str) -> None:
        print(f"  running {label}", file=sys.stderr, flush=True)

    print(f"distill-ops bench: {total} case group(s) on {device}", file=sys.stderr)
    results, env = benchmark.run(
        args.op, shapes, args.divergence, k=args.k, dtype=dtype, device=device,
        temperature=args.temperature, reps=reps,
        include_compile=not args.quick and not args.no_compile, progress=progress,
    )
    env["git_commit"] = _git_commit()
    table = benchmark.format_table(results, env)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        command = "distill-ops " + " ".join(shlex.quote(a) for a in args.argv)
        (out / "bench.json").write_text(
            json.dumps(benchmark.to_json(results, env, command), indent=2))
        (out / "bench.md").write_text(f"`{command}`\n\n{table}\n")
        print(f"wrote {out}/bench.json and bench.md", file=sys.stderr)
    return 0


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


def inspect(args: argparse.Namespace) -> int:
    from .store.extract import format_inspection, inspect_store

    info = inspect_store(args.store, verify=not args.no_verify)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="distill-ops", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time the ops against eager PyTorch, torch.compile, TRL")
    b.add_argument("--op", nargs="+", default=["dense", "sparse", "topk"],
                   choices=["dense", "sparse", "topk", "fused_linear"])
    b.add_argument("--k", type=int, default=64,
                   help="targets per row (sparse, topk); the hidden width H (fused_linear)")
    b.add_argument("--quick", action="store_true", help="one small shape, no torch.compile")
    b.add_argument("--shape", type=_shape, action="append", help="NxV, e.g. 2048x32000")
    b.add_argument("--divergence", nargs="+", default=["forward_kl", "jsd"],
                   choices=["forward_kl", "jsd"])
    b.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    b.add_argument("--temperature", type=float, default=2.0)
    b.add_argument("--reps", type=int, default=None)
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    b.add_argument("--out", default=None, help="folder for JSON and markdown results")
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
