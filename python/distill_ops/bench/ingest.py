"""`distill-ops bench --ingest`: how fast API logprobs become a target store, and how small.

Synthetic OpenAI Batch API output (`lines` responses of `positions` tokens, `k`
top_logprobs each with token text and bytes, a teacher whose top-k spans several nats) over
a word-level vocabulary of `vocab` ids is written to a temporary folder, then ingested into
a compact store: positions per second (the ingest loop, after the tokenizer is loaded), the
whole call's time, and the stored bytes per position (targets, token ids, string keys).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _fake_batch(path: Path, lines: int, positions: int, k: int, vocab: int) -> int:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for n in range(lines):
            content = []
            width = min(2000, vocab)
            for _ in range(positions):
                logits = rng.standard_normal(width) * 2.5
                cand = rng.choice(vocab, width, replace=False)
                lse = float(np.log(np.exp(logits - logits.max()).sum()) + logits.max())
                order = np.argsort(-logits)[:k]
                top = [{"token": f"t{cand[o]}x", "logprob": round(float(logits[o] - lse), 8),
                        "bytes": list(f"t{cand[o]}x".encode())} for o in order]
                pick = order[int(rng.integers(0, 4))]
                content.append({**top[int(np.nonzero(order == pick)[0][0])],
                                "top_logprobs": top})
            body = {"id": f"chatcmpl-{n}", "object": "chat.completion",
                    "choices": [{"index": 0, "logprobs": {"content": content}}]}
            f.write(json.dumps({"id": f"batch_req_{n}", "custom_id": f"request-{n:07d}",
                                "response": {"status_code": 200, "body": body},
                                "error": None}) + "\n")
    return path.stat().st_size


def run_ingest_bench(lines: int = 500, positions: int = 100, k: int = 20,
                     vocab: int = 151936, reps: int = 3) -> dict[str, Any]:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ..store.ingest import ingest

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = Tokenizer(models.WordLevel(vocab={f"t{i}x": i for i in range(vocab)},
                                         unk_token="t0x"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(root / "tokenizer.json"))
        size = _fake_batch(root / "batch.jsonl", lines, positions, k, vocab)
        rates, walls, report = [], [], None
        for r in range(reps):
            t0 = time.perf_counter()
            report = ingest([root / "batch.jsonl"], root / f"store{r}", format="openai",
                            tokenizer=root / "tokenizer.json", k=k)
            walls.append(time.perf_counter() - t0)
            rates.append(report.positions_per_second)
    return {"lines": lines, "positions": report.positions, "k": k, "vocab": vocab,
            "json_mib": size / 2**20, "positions_per_s": float(np.median(rates)),
            "call_s": float(np.median(walls)), "bytes_per_position": report.bytes_per_position,
            "mib_per_s": size / 2**20 / (report.positions / float(np.median(rates)))}


def format_ingest_table(r: dict[str, Any]) -> str:
    return ("| responses | positions | k | V | JSON MiB | positions/s | JSON MiB/s | whole call s "
            "| bytes/position |\n|---|---|---|---|---|---|---|---|---|\n"
            f"| {r['lines']} | {r['positions']} | {r['k']} | {r['vocab']} | {r['json_mib']:.1f} "
            f"| {r['positions_per_s']:,.0f} | {r['mib_per_s']:.0f} | {r['call_s']:.2f} | "
            f"{r['bytes_per_position']:.1f} |")
