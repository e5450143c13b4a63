"""`distill-ops extract`, `ingest` and `inspect`: the target store from the command line."""

from __future__ import annotations

import argparse
import json

import torch

from .common import CommandError


def extract(args: argparse.Namespace) -> int:
    import os

    from ..store.extract import extract as run_extract

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
    if counts["written"] == 0 and counts["skipped"] == 0:
        raise CommandError(f"no sequence found in {', '.join(map(str, args.data))}: "
                           "nothing stored")
    return 0


def ingest(args: argparse.Namespace) -> int:
    from ..store.ingest import ingest as run_ingest

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
    if r.written == 0 and r.already_stored == 0:
        why = ", ".join(f"{c} {w}" for w, c in sorted(r.skipped.items())) or "no lines"
        raise CommandError(f"no sequence stored from {', '.join(map(str, args.files))} "
                           f"({why})")
    return 0


def inspect(args: argparse.Namespace) -> int:
    from ..store.extract import format_inspection, inspect_store

    info = inspect_store(args.store, verify=not args.no_verify)
    print(json.dumps(info, indent=2, allow_nan=False) if args.json else format_inspection(info))
    return 0
