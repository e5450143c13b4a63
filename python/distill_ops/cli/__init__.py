"""`distill-ops`: the command line of distill_ops.

- ``bench``: time every op against its peers and the hardware limit (:mod:`.bench_commands`);
- ``extract``: store a local teacher's top-k or sampled targets; ``ingest``: store an API's or
  inference server's logprobs; ``inspect``: what a store holds (:mod:`.store_commands`);
- ``demo``: distil a teacher into students through every kind of target, measured.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .. import __version__
from ..bench.shapes import ALL_DIVERGENCES, DIVERGENCES, OPS, TAILS
from .bench_commands import _shape, bench
from .common import CommandError, positive_float, positive_int
from .store_commands import extract, ingest, inspect

DESCRIPTION = ("Fused kernels for knowledge distillation of language models: time the ops "
               "(bench), store a teacher's targets (extract, ingest, inspect), or run the "
               "end-to-end demo (demo).")


def demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo
    from ..demo.run import RUNS

    runs = RUNS + tuple(f"dense-{d}" for d in args.divergence or ())
    run_demo(quick=args.quick, corpus=args.corpus, out=args.out, device=args.device,
             cache=args.cache, progress=not args.no_progress, runs=runs)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (`distill-ops <cmd>: error: ...`, exit 2), no usage dump."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `distill-ops` parser: every command and flag, each with its help."""
    ap = _Parser(prog="distill-ops", description=DESCRIPTION)
    ap.add_argument("--version", action="version", version=f"distill-ops {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time every op against its peers and the hardware limit")
    b.add_argument("--op", nargs="+", default=list(OPS), choices=list(OPS), metavar="OP",
                   help=f"ops to time (default: all of {', '.join(OPS)})")
    b.add_argument("--quick", action="store_true",
                   help="small CPU-friendly sizes, 3 repetitions, no torch.compile")
    b.add_argument("--shape", type=_shape, action="append",
                   help="NxV (repeatable), replacing every op's default sizes")
    b.add_argument("--k", type=positive_int, nargs="+",
                   help="targets per row (ops that take k)")
    b.add_argument("--hidden", type=positive_int, nargs=2, metavar=("HS", "HT"),
                   help="student and teacher hidden widths of the LM-head ops")
    b.add_argument("--divergence", nargs="+", default=list(DIVERGENCES),
                   choices=ALL_DIVERGENCES,
                   metavar="D", help=f"divergences of the dense rows (default: all of "
                                     f"{', '.join(DIVERGENCES)})")
    b.add_argument("--tail", nargs="+", default=list(TAILS), choices=TAILS, metavar="TAIL",
                   help=f"tail modes of the sparse rows (default: all of {', '.join(TAILS)})")
    b.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default: bf16 on a GPU, fp32 on the CPU")
    b.add_argument("--temperature", type=positive_float, default=2.0,
                   help="the temperature every case runs at (default 2)")
    b.add_argument("--reps", type=positive_int, default=None,
                   help="timed repetitions per case, after one warm-up (default: 10, 3 with "
                        "--quick)")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    b.add_argument("--extra", nargs="*", default=["store"], choices=["store"],
                   help="also time the target store reader (default)")
    b.add_argument("--out", default=None,
                   help="folder for <device>-<date>.json, .md and -plots/*.png")
    b.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    b.add_argument("--budget", type=positive_float, default=None, metavar="SECONDS",
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
    b.add_argument("--world", type=positive_int, default=None, metavar="N",
                   help="time the vocab-parallel ops on N processes (gloo on CPUs, NCCL with "
                        "a GPU per rank) and the bytes each sends per row; first --shape")
    b.set_defaults(func=bench)

    e = sub.add_parser("extract", help="store a local teacher's top-k or sampled targets")
    e.add_argument("--teacher", required=True, help="local Hugging Face causal LM directory")
    e.add_argument("--data", nargs="+", required=True, help=".txt, .jsonl, .npy or .pt files")
    e.add_argument("--out", required=True, help="the store directory (resumed if it exists)")
    e.add_argument("--k", type=positive_int, default=64, help="top-k targets per token")
    e.add_argument("--sample", type=positive_int, default=None,
                   help="store N sampled draws per token instead of the top-k")
    e.add_argument("--temperature", type=positive_float, default=1.0,
                   help="the temperature the targets are taken at, recorded in the manifest")
    e.add_argument("--encoding", default="compact", choices=["compact", "fp16", "bf16"],
                   help="how values are stored (default compact: ~half of fp16's bytes, "
                        "errors bounded per token)")
    e.add_argument("--max-length", type=positive_int, default=None,
                   help="cut each sequence to this many tokens")
    e.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass")
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
    d.add_argument("--divergence", nargs="+", default=None, choices=ALL_DIVERGENCES[1:],
                   metavar="D", help="also train a dense student with each of these "
                   "divergences (rows dense-D; the default rows use forward KL): "
                   f"{', '.join(ALL_DIVERGENCES[1:])}")
    d.set_defaults(func=demo)

    g = sub.add_parser("ingest", help="API / inference-server logprobs (JSONL) into a store")
    g.add_argument("files", nargs="+", help="JSONL files (.gz too)")
    g.add_argument("--format", required=True, choices=["openai", "vllm"],
                   help="openai: chat completions or Batch API output; vllm: prompt_logprobs "
                        "or completion logprobs")
    g.add_argument("--tokenizer", required=True,
                   help="the student's tokenizer: a directory with tokenizer.json, or the file")
    g.add_argument("--out", required=True, help="the store directory (continued if it exists)")
    g.add_argument("--k", type=positive_int, default=None,
                   help="targets per position (default: from the first response, or the "
                        "existing store's)")
    g.add_argument("--temperature", type=positive_float, default=None,
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


def _check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors found before any work: paths that do not exist, a GPU that is not there."""
    def need(flag: str, path: str, kind: str = "path") -> None:
        p = Path(path)
        ok = p.is_dir() if kind == "directory" else p.exists()
        if not ok:
            parser.error(f"{flag} {path}: no such {kind}")

    cmd = args.command
    if cmd == "extract":
        need("--teacher", args.teacher, "directory")
        for f in args.data:
            need("--data", f, "file")
    elif cmd == "ingest":
        for f in args.files:
            need("file", f, "file")
        need("--tokenizer", args.tokenizer)
    elif cmd == "inspect":
        need("store", args.store, "directory")
    elif cmd == "demo" and args.corpus is not None:
        need("--corpus", args.corpus)
    device = getattr(args, "device", None)
    if device and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {device}: no CUDA device is available here (torch "
                         f"{torch.__version__}, CUDA {torch.version.cuda})")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Runs one command. A user mistake prints `distill-ops <cmd>: error: <what>` on stderr
    and exits 2 (usage: argparse's own errors, missing paths, bad numbers) or 1 (the command
    failed); DISTILL_OPS_TRACEBACK=1 shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    sub = next(a for a in parser._actions
               if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    if extra:  # named by the command they were given to
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    _check_paths(sub, args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"distill-ops {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("DISTILL_OPS_TRACEBACK", "") not in ("", "0"):
            raise
        what = "" if isinstance(exc, (CommandError, ValueError, OSError)) \
            else f"{type(exc).__name__}: "
        print(f"distill-ops {args.command}: error: {what}{_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
