"""`distill-ops`: the command line of distill_ops.

- ``bench``: time every op against its peers and the hardware limit (:mod:`.bench_commands`);
- ``extract``: store a local teacher's top-k or sampled targets; ``ingest``: store an API's or
  inference server's logprobs; ``inspect``: what a store holds (:mod:`.store_commands`);
- ``demo``: distil a teacher into students through every kind of target, measured.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..bench.shapes import DIVERGENCES, OPS, TAILS
from .bench_commands import _shape, bench
from .store_commands import extract, ingest, inspect

DESCRIPTION = ("Fused kernels for knowledge distillation of language models: time the ops "
               "(bench), store a teacher's targets (extract, ingest, inspect), or run the "
               "end-to-end demo (demo).")


def demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(quick=args.quick, corpus=args.corpus, out=args.out, device=args.device,
             cache=args.cache, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `distill-ops` parser: every command and flag, each with its help."""
    ap = argparse.ArgumentParser(prog="distill-ops", description=DESCRIPTION)
    ap.add_argument("--version", action="version", version=f"distill-ops {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time every op against its peers and the hardware limit")
    b.add_argument("--op", nargs="+", default=list(OPS), choices=list(OPS), metavar="OP",
                   help=f"ops to time (default: all of {', '.join(OPS)})")
    b.add_argument("--quick", action="store_true",
                   help="small CPU-friendly sizes, 3 repetitions, no torch.compile")
    b.add_argument("--shape", type=_shape, action="append",
                   help="NxV (repeatable), replacing every op's default sizes")
    b.add_argument("--k", type=int, nargs="+", help="targets per row (ops that take k)")
    b.add_argument("--hidden", type=int, nargs=2, metavar=("HS", "HT"),
                   help="student and teacher hidden widths of the LM-head ops")
    b.add_argument("--divergence", nargs="+", default=list(DIVERGENCES), choices=DIVERGENCES,
                   metavar="D", help=f"divergences of the dense rows (default: all of "
                                     f"{', '.join(DIVERGENCES)})")
    b.add_argument("--tail", nargs="+", default=list(TAILS), choices=TAILS, metavar="TAIL",
                   help=f"tail modes of the sparse rows (default: all of {', '.join(TAILS)})")
    b.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default: bf16 on a GPU, fp32 on the CPU")
    b.add_argument("--temperature", type=float, default=2.0,
                   help="the temperature every case runs at (default 2)")
    b.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per case, after one warm-up (default: 10, 3 with "
                        "--quick)")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    b.add_argument("--extra", nargs="*", default=["store"], choices=["store"],
                   help="also time the target store reader (default)")
    b.add_argument("--out", default=None,
                   help="folder for <device>-<date>.json, .md and -plots/*.png")
    b.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    b.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="start no new case after this long (the rest say so); results are "
                        "still written")
    b.add_argument("--no-progress", action="store_true",
                   help="a line per case instead of a progress bar")
    b.add_argument("--write-auto-table", default=None, metavar="JSON",
                   help="merge the fastest of our backends per op family on this device into "
                        "this table (python/distill_ops/backends/auto_backends.json is the one "
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
    e.add_argument("--temperature", type=float, default=1.0,
                   help="the temperature the targets are taken at, recorded in the manifest")
    e.add_argument("--encoding", default="compact", choices=["compact", "fp16", "bf16"],
                   help="how values are stored (default compact: ~half of fp16's bytes, "
                        "errors bounded per token)")
    e.add_argument("--max-length", type=int, default=None,
                   help="cut each sequence to this many tokens")
    e.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    e.add_argument("--device", default=None,
                   help="where the teacher runs (default: cuda if present; under torchrun "
                        "cuda:LOCAL_RANK)")
    e.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the teacher's weights (default: the checkpoint's)")
    e.add_argument("--seed", type=int, default=0, help="sampling seed (plus each seq_id)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=demo)

    g = sub.add_parser("ingest", help="API / inference-server logprobs (JSONL) into a store")
    g.add_argument("files", nargs="+", help="JSONL files (.gz too)")
    g.add_argument("--format", required=True, choices=["openai", "vllm"],
                   help="openai: chat completions or Batch API output; vllm: prompt_logprobs "
                        "or completion logprobs")
    g.add_argument("--tokenizer", required=True,
                   help="the student's tokenizer: a directory with tokenizer.json, or the file")
    g.add_argument("--out", required=True, help="the store directory (continued if it exists)")
    g.add_argument("--k", type=int, default=None, help="targets per position (default: from "
                   "the first response, or the existing store's)")
    g.add_argument("--temperature", type=float, default=None,
                   help="the teacher's sampling temperature (recorded in the manifest)")
    g.add_argument("--encoding", default="compact", choices=["compact", "fp16", "bf16"],
                   help="how values are stored (default compact)")
    g.add_argument("--on-unmappable", default="cut", choices=["cut", "skip"],
                   help="a generated token the tokenizer has no id for: cut the sequence "
                        "there (keep the prefix; default) or skip the sequence")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=ingest)

    i = sub.add_parser("inspect", help="what a target store holds, checksums verified")
    i.add_argument("store", help="the store directory")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--no-verify", action="store_true",
                   help="skip decoding every sequence and checking its checksum")
    i.set_defaults(func=inspect)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
