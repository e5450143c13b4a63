"""Distillation from a black-box teacher: its API responses (logprobs with top alternatives)
become a target store, and a student trains on it in a plain PyTorch loop.

1. The "API": a small local teacher samples completions and writes them as OpenAI Batch API
   output lines (``custom_id``, ``response.body.choices[0].logprobs.content``, 8
   ``top_logprobs`` per token, token text and bytes), what a real batch job returns.
2. ``distill_ops.store.ingest`` maps every token to the student tokenizer's ids by its bytes
   and writes a compact store keyed by ``custom_id``, with the generated tokens and the
   sampling temperature.
3. The student trains on prompt + completion with one fused loss from its hidden states:
   cross-entropy on the generated tokens (``hard_weight``, the R1-distill recipe) plus the
   sparse KD against the stored top-k with the tail bucket, re-tempered from the recorded
   temperature (``source_temperature``).

Run as a script (models and tokenizer built on the spot, no download):
    python examples/api_teacher_distill.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import distill_ops
from distill_ops.store import TargetDataset, collate_targets
from distill_ops.store.ingest import ingest, tokenizer_vocab

CORPUS = ("the cat sat on the mat. the dog ran to the park. a bird sang in the tree. "
          "café crème brûlée, naïve façade. 中文 字符. ") * 30


def build_tokenizer(out: Path) -> Path:
    """A byte-level BPE tokenizer trained on the corpus (the student's, and the API's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out


class TinyLM(torch.nn.Module):
    """Embedding, a GRU and an LM head: enough to have hidden states and a distribution."""

    def __init__(self, vocab: int, hidden: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.rnn = torch.nn.GRU(hidden, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rnn(self.emb(ids))[0]


def fake_api(teacher: TinyLM, vocab: Any, prompts: list[list[int]], out: Path,
             temperature: float, top: int = 8, length: int = 12) -> Path:
    """Sampled completions as OpenAI Batch API output lines (what the API would return)."""
    lines = []
    g = torch.Generator().manual_seed(0)
    for n, prompt in enumerate(prompts):
        ids, content = list(prompt), []
        with torch.no_grad():
            for _ in range(length):
                logits = teacher.head(teacher.hidden(torch.tensor([ids]))[0, -1]) / temperature
                lp = torch.log_softmax(logits, -1)
                tok = int(torch.multinomial(lp.exp(), 1, generator=g))
                alts = torch.topk(lp, top)
                def entry(i, v):
                    raw = vocab.token_bytes[i]
                    return {"token": raw.decode("utf-8", errors="replace"),
                            "logprob": float(v), "bytes": list(raw)}
                content.append({**entry(tok, lp[tok]), "top_logprobs": [
                    entry(int(i), v) for i, v in zip(alts.indices, alts.values, strict=True)]})
                ids.append(tok)
        body = {"id": f"chatcmpl-{n}", "object": "chat.completion",
                "choices": [{"index": 0, "logprobs": {"content": content}}]}
        lines.append({"custom_id": f"prompt-{n}", "response": {"status_code": 200,
                                                               "body": body}})
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return out


def main(workdir: str = "api_distill", steps: int = 30, n_prompts: int = 16) -> dict:
    from tokenizers import Tokenizer

    work = Path(workdir)
    tok_dir = build_tokenizer(work / "tokenizer")
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    vocab = tokenizer_vocab(tok_dir)
    teacher, student = TinyLM(vocab.size, 48, 0), TinyLM(vocab.size, 24, 1)
    # The teacher learns the corpus a little, so its distribution is worth imitating.
    ids = torch.tensor([tok.encode(CORPUS).ids[:512]])
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(
            teacher.head(teacher.hidden(ids[:, :-1]))[0], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    starts = ["the cat", "the dog", "a bird", "café", "the park", "中文"]
    prompts = [tok.encode(starts[i % len(starts)]).ids for i in range(n_prompts)]
    api_out = fake_api(teacher, vocab, prompts, work / "batch_output.jsonl", temperature=0.8)

    store = work / "store"
    report = ingest([api_out], store, format="openai", tokenizer=tok_dir, temperature=0.8,
                    resume=True)
    base = [{"custom_id": f"prompt-{n}", "prompt_ids": p} for n, p in enumerate(prompts)]
    ds = TargetDataset(store, base=base, id_key="custom_id", prompt_key="prompt_ids")
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0),
        collate_fn=lambda b: collate_targets([{k: v for k, v in x.items()
                                               if k not in ("custom_id", "prompt_ids")}
                                              for x in b]))
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses, step = [], 0
    while step < steps:
        for batch in loader:
            h = student.hidden(batch["input_ids"])
            # Position t predicts token t + 1: the last position has no target.
            loss = distill_ops.fused_linear_kd_loss(
                h[:, :-1], student.head.weight,
                teacher_indices=batch["teacher_indices"][:, :-1],
                teacher_logprobs=batch["teacher_logprobs"][:, :-1],
                labels=batch["labels"][:, 1:], hard_weight=0.5, tail="bucket",
                temperature=1.0, source_temperature=ds.store.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())  # host-sync-ok: the example prints it
            step += 1
            if step == steps:
                break
    print(f"ingested {report.written} responses ({report.positions} positions, "
          f"{report.bytes_per_position:.1f} bytes each); student loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f} in {steps} steps")
    return {"report": report, "losses": losses}


if __name__ == "__main__":
    main()
