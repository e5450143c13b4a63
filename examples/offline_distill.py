"""Offline distillation: the teacher runs once and writes a target store; the student trains
from the store with a Hugging Face `Trainer`, never running (or even loading) the teacher.

1. `distill_ops.store.extract.extract` runs the teacher over the tokenised data and stores its
   top-k log-probabilities (`compact`: ~2.3 bytes per target at V=152k) under the sequences'
   ids. The CLI does the same from files: `distill-ops extract --teacher DIR --data F --out S`.
2. `TargetDataset` joins the tokenised dataset with the store by `seq_id`; `collate_targets`
   pads a batch to `[B, T, k]` (-1 / -inf), which `fused_linear_kd_loss` ignores.
3. `DistillTrainer` (distill_ops.integrations.hf) computes the sparse loss from the student's
   hidden states and LM head, re-tempering the stored targets when the loss temperature
   differs from the store's.

Run as a script for a tiny demonstration (models built from configs, no download):
    python examples/offline_distill.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from distill_ops.integrations.hf import DistillTrainer
from distill_ops.store import TargetDataset, TopKReader, collate_targets
from distill_ops.store.extract import extract


def tiny_causal_lm(hidden: int, vocab: int = 128, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=False))


def tokenised_dataset(n: int, vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows as a tokenised dataset has them; `seq_id` is the join key with the store."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(8, 24, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        rows.append({"seq_id": 1000 + i, "input_ids": ids,
                     "labels": [-100] * 3 + ids[3:]})  # a short prompt not trained on
    return rows


def write_store(teacher: torch.nn.Module, rows: list[dict[str, Any]], out: Path, k: int,
                temperature: float) -> TopKReader:
    data = out.parent / f"{out.name}-data.jsonl"
    import json

    with open(data, "w") as f:
        for row in rows:
            f.write(json.dumps({"id": row["seq_id"], "input_ids": row["input_ids"]}) + "\n")
    extract(None, [data], out, k=k, temperature=temperature, value_encoding="compact",
            model=teacher, progress=False)
    return TopKReader(out)


def train(student: torch.nn.Module, rows: list[dict[str, Any]], reader: TopKReader,
          out_dir: str, max_steps: int = 5, temperature: float = 2.0) -> Any:
    args = TrainingArguments(output_dir=out_dir, max_steps=max_steps,
                             per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
                             save_strategy="no", use_cpu=True, logging_steps=1,
                             disable_tqdm=True, remove_unused_columns=False)
    trainer = DistillTrainer(
        model=student, args=args, train_dataset=TargetDataset(reader, base=rows),
        data_collator=collate_targets,
        distill={"temperature": temperature, "source_temperature": reader.temperature,
                 "tail": "bucket" if reader.kind == "topk" else "none"})
    return trainer.train()


def main() -> None:
    import tempfile

    vocab = 128
    rows = tokenised_dataset(32, vocab)
    with tempfile.TemporaryDirectory() as tmp:
        reader = write_store(tiny_causal_lm(48, vocab, seed=1), rows, Path(tmp) / "store", 16,
                             temperature=1.0)
        print(reader)
        out = train(tiny_causal_lm(32, vocab, seed=0), rows, reader, f"{tmp}/run")
        print(f"training loss {out.training_loss:.4f}")


if __name__ == "__main__":
    main()
