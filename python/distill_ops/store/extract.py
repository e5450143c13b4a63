"""`distill-ops extract`: run a local causal LM over data and store its sparse targets, and
`distill-ops inspect`: what a store holds.

The teacher's ``[N, V]`` logits are never built: top-k comes from the final hidden states and
the LM head through :func:`fused_linear_topk` (vocabulary tiles), sampled targets from
``[chunk, V]`` logits of a few hundred tokens at a time.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..fused_linear import fused_linear_topk
from ..sampling import sample_targets
from ._format import INDEX_DTYPE
from .reader import TopKReader
from .writer import TopKWriter

# Logits of at most this many elements exist at once when sampling (256 MiB of fp32).
_SAMPLE_ELEMENTS = 1 << 26


def read_sequences(files: Sequence[str | os.PathLike[str]], tokenizer: Any = None,
                   max_length: int | None = None) -> Iterator[tuple[int, list[int]]]:
    """``(seq_id, token ids)`` for every sequence of `files`, in order.

    Formats: ``.txt`` (each non-empty line a document), ``.jsonl`` (objects with ``input_ids``
    or ``text``, and optionally an integer ``id`` used as seq_id), ``.npy`` / ``.pt`` (a 2-D
    integer array or a list of 1-D ones). Without an ``id`` a sequence's seq_id is its running
    number over all files, so a rerun over the same files gives the same ids (what resuming
    relies on). Text needs the teacher's `tokenizer`; sequences are cut to `max_length`.
    """
    number = 0
    for f in files:
        path = Path(f)
        suffix = path.suffix.lower()
        if suffix == ".txt":
            records: Any = ({"text": line.rstrip("\n")} for line in open(path, encoding="utf-8")
                            if line.strip())
        elif suffix == ".jsonl":
            records = (json.loads(line) for line in open(path, encoding="utf-8") if line.strip())
        elif suffix in (".npy", ".pt"):
            arr = np.load(path, allow_pickle=False) if suffix == ".npy" else torch.load(path)
            records = ({"input_ids": [int(t) for t in row]} for row in arr)
        else:
            raise ValueError(f"data file {path}: unknown format {suffix!r} (use .txt, .jsonl, "
                             ".npy or .pt)")
        for rec in records:
            if "input_ids" in rec:
                ids = [int(t) for t in rec["input_ids"]]
            elif "text" in rec:
                if tokenizer is None:
                    raise ValueError(f"data file {path} holds text: the teacher directory needs "
                                     "a tokenizer")
                ids = tokenizer(rec["text"])["input_ids"]
            else:
                raise ValueError(f"data file {path}: a record has neither 'input_ids' nor "
                                 f"'text' (keys: {sorted(rec)})")
            sid = int(rec["id"]) if "id" in rec else number
            number += 1
            yield sid, ids[:max_length] if max_length else ids


def _head(model: Any) -> tuple[Tensor, Tensor | None, float, float | None]:
    head = model.get_output_embeddings()
    cfg = model.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = float(getattr(cfg, "logit_scale", 1.0) or 1.0)
    return head.weight, getattr(head, "bias", None), scale, cap


def _sampled(hidden: Tensor, weight: Tensor, bias: Tensor | None, n: int, temperature: float,
             scale: float, cap: float | None, seed: int) -> tuple[Tensor, Tensor]:
    from ..reference import transform_logits

    rows = max(1, _SAMPLE_ELEMENTS // weight.shape[0])
    gen = torch.Generator(device=hidden.device).manual_seed(seed)
    ids, lps = [], []
    for a in range(0, hidden.shape[0], rows):
        logits = hidden[a:a + rows].float() @ weight.float().T
        if bias is not None:
            logits += bias.float()
        logits = transform_logits(logits, scale, cap, 1.0, torch.float32)
        s = sample_targets(logits, n, temperature=temperature, generator=gen)
        ids.append(s.indices)
        lps.append(s.logprobs)
    return torch.cat(ids), torch.cat(lps)


def extract(
    teacher: str | os.PathLike[str] | None,
    data: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    k: int = 64,
    sample: int | None = None,
    temperature: float = 1.0,
    value_encoding: str = "compact",
    max_length: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    model: Any = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Runs the causal LM at `teacher` (a local Hugging Face directory; nothing is
    downloaded) over `data` and writes its top-`k` (or, with `sample`, `sample` draws of
    sampled) targets at `temperature` into the store `out`, resuming it when it exists.

    Sequence i goes to rank ``i % world_size`` (from ``torch.distributed`` under torchrun).
    Sampled targets are drawn with a generator seeded by ``seed + seq_id``: a resumed run
    draws what the first would have. Returns counts of what was written and skipped.
    """
    from .writer import _dist

    d_rank, d_world, _ = _dist()
    rank = d_rank if rank is None else rank
    world = d_world if world_size is None else world_size
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model is None:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise ImportError("distill-ops extract needs transformers (pip install "
                              "transformers)") from exc
        torch_dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16,
                       "fp16": torch.float16}[dtype]
        model = AutoModelForCausalLM.from_pretrained(teacher, local_files_only=True,
                                                     torch_dtype=torch_dtype)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(teacher, local_files_only=True)
            except (OSError, ValueError):
                tokenizer = None  # pre-tokenised data only
    model = model.to(dev).eval()
    weight, bias, scale, cap = _head(model)
    vocab = weight.shape[0]
    width = min(sample, vocab) if sample else k
    meta = {"teacher": str(teacher), "data": [str(p) for p in data], "max_length": max_length,
            "seed": seed, "num_samples": sample, "logit_scale": scale, "softcap": cap}
    resume = (Path(out) / "manifest.json").exists()
    if world > 1 and rank != 0 and not resume:  # rank 0 creates the store
        while not (Path(out) / "manifest.json").exists():
            time.sleep(0.05)
        resume = True
    counts = {"written": 0, "skipped": 0, "tokens": 0}
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(unit="tok", unit_scale=True, desc=f"extract rank {rank}", disable=None)
        except ImportError:  # pragma: no cover - tqdm comes with transformers
            bar = None
    started = time.perf_counter()
    with TopKWriter(out, vocab_size=vocab, k=width, temperature=temperature,
                    value_encoding=value_encoding, kind="sampled" if sample else "topk",
                    metadata=None if resume else meta, resume=resume, skip_existing=True,
                    rank=rank, world_size=world) as writer:
        pending: list[tuple[int, list[int]]] = []

        def run(batch: list[tuple[int, list[int]]]) -> None:
            longest = max(len(ids) for _, ids in batch)
            inp = torch.zeros((len(batch), longest), dtype=torch.long)
            mask = torch.zeros_like(inp)
            for b, (_, ids) in enumerate(batch):
                inp[b, :len(ids)] = torch.tensor(ids)
                mask[b, :len(ids)] = 1
            with torch.no_grad():
                hidden = model.get_decoder()(input_ids=inp.to(dev),
                                             attention_mask=mask.to(dev)).last_hidden_state
                for b, (sid, ids) in enumerate(batch):
                    h = hidden[b, :len(ids)]
                    if sample:
                        idx, lp = _sampled(h, weight, bias, sample, temperature, scale, cap,
                                           seed + sid)
                    else:
                        top = fused_linear_topk(h, weight, k, bias=bias, temperature=temperature,
                                                logit_scale=scale, softcap=cap)
                        idx, lp = top.indices, top.logprobs
                    writer.append(sid, idx.cpu(), lp.cpu())  # host-sync-ok: to disk
                    counts["written"] += 1
                    counts["tokens"] += len(ids)
                    if bar is not None:
                        bar.update(len(ids))

        for number, (sid, ids) in enumerate(read_sequences(data, tokenizer, max_length)):
            if number % world != rank:
                continue
            if sid in writer.seq_ids:
                counts["skipped"] += 1
                continue
            if not ids:
                writer.append(sid, np.zeros((0, width), np.int32), np.zeros((0, width), np.float32))
                counts["written"] += 1
                continue
            pending.append((sid, ids))
            if len(pending) == batch_size:
                run(pending)
                pending = []
        if pending:
            run(pending)
    if bar is not None:
        bar.close()
    counts["seconds"] = time.perf_counter() - started
    return counts


def inspect_store(path: str | os.PathLike[str], *, verify: bool = True,
                  bins: Sequence[float] = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0001)
                  ) -> dict[str, Any]:
    """What a store holds: sequences, tokens, bytes per token, the teacher mass its targets
    cover (histogram over tokens of the sum of their probabilities), the encoding's largest
    error (recorded at write time) and, with `verify`, every checksum checked."""
    reader = TopKReader(path, verify=verify)
    mass_hist = np.zeros(len(bins) - 1, dtype=np.int64)
    mass_sum, tokens = 0.0, 0
    for _, lp in reader:  # with verify, each payload's CRC is checked as it is read
        if lp.shape[0] == 0:
            continue
        mass = torch.exp(lp.double()).sum(-1).numpy()
        mass_hist += np.histogram(np.clip(mass, 0, 1), bins=bins)[0]
        mass_sum += float(mass.sum())
        tokens += lp.shape[0]
    if verify:
        reader.check_shard_checksums()
    checked = len(reader) if verify else 0
    shards = [s for state in reader.rank_states for s in state["shards"]]
    payload = sum(int(s["bytes"]) for s in shards)
    index = sum(int(s["sequences"]) for s in shards) * INDEX_DTYPE.itemsize
    stats = {key: max((float(st.get("stats", {}).get(key, 0.0)) for st in reader.rank_states),
                      default=0.0) for key in ("max_err_head", "max_err_tail")}
    m = reader.manifest
    return {
        "path": str(reader.root), "sequences": len(reader), "tokens": tokens,
        "vocab_size": m["vocab_size"], "k": m["k"], "kind": m["kind"],
        "value_encoding": m["value_encoding"], "temperature": m["temperature"],
        "ranks": len(reader.rank_states), "shards": len(shards),
        "payload_bytes": payload, "index_bytes": index,
        # None (JSON null) for an empty store: a ratio over no tokens is no number.
        "bytes_per_token": (payload + index) / tokens if tokens else None,
        "mean_mass_covered": mass_sum / tokens if tokens else None,
        "mass_histogram": {f"[{lo:g}, {min(hi, 1):g}{']' if hi > 1 else ')'}": int(c)
                           for lo, hi, c in zip(bins[:-1], bins[1:], mass_hist, strict=True)},
        "max_error_head": stats["max_err_head"], "max_error_tail": stats["max_err_tail"],
        "verified": verify, "checksums_verified": checked, "metadata": m.get("metadata", {}),
    }


def format_inspection(info: dict[str, Any]) -> str:
    def num(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    lines = [
        f"store        {info['path']}",
        f"targets      {info['kind']}, k={info['k']}, V={info['vocab_size']}, "
        f"T={info['temperature']:g}, {info['value_encoding']}",
        f"sequences    {info['sequences']:,} ({info['ranks']} rank(s), {info['shards']} shard(s))",
        f"tokens       {info['tokens']:,}",
        f"bytes/token  {num(info['bytes_per_token'], '.1f')} (payload {info['payload_bytes']:,} "
        f"B, index {info['index_bytes']:,} B)",
        f"mass covered mean {num(info['mean_mass_covered'], '.4f')}",
    ]
    total = max(1, sum(info["mass_histogram"].values()))
    for label, count in info["mass_histogram"].items():
        bar = "#" * round(40 * count / total)
        lines.append(f"  {label:>14} {count:>10,} {bar}")
    lines.append(f"max |error|  head {info['max_error_head']:.4g} nats, rest "
                 f"{info['max_error_tail']:.4g} nats (at write time)")
    lines.append(f"checksums    {info['checksums_verified']:,} sequences verified, all shards OK"
                 if info["verified"] else "checksums    not verified (--no-verify)")
    return "\n".join(lines)
