"""Distillation with a Hugging Face `Trainer` whose loss never builds the student's logits.

`distill_ops.integrations.hf.DistillTrainer` runs the student's decoder (not its LM head) and
hands the final hidden states and the head's weight to `distill_ops.fused_linear_kd_loss`, with
either

- a dense teacher: another causal LM run on the same batch (its head applied chunk by chunk
  too), or
- stored sparse targets: `teacher_indices` / `teacher_logprobs` columns of the batch, e.g.
  top-k written by a teacher job (set `remove_unused_columns=False` in the
  `TrainingArguments`, or the Trainer drops those columns before `compute_loss`);
  examples/offline_distill.py reads them from a target store.

Run as a script for a tiny demonstration on random data (no download):
    python examples/hf_trainer.py
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill_ops.integrations.hf import DistillTrainer


def tiny_causal_lm(hidden: int, vocab: int = 128, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised one-layer Llama built from a config: no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def random_batches(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=g)
        labels = ids.clone()
        labels[: seq // 4] = -100  # a prompt that is not trained on
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def main() -> None:
    from transformers import TrainingArguments

    student, teacher = tiny_causal_lm(32, seed=0), tiny_causal_lm(48, seed=1)
    args = TrainingArguments(output_dir="/tmp/distill_ops_hf_demo", max_steps=5,
                             per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                             remove_unused_columns=False)
    trainer = DistillTrainer(model=student, args=args, train_dataset=random_batches(32, 16, 128),
                             teacher=teacher, distill={"divergence": "jsd", "temperature": 2.0})
    trainer.train()


if __name__ == "__main__":
    main()
