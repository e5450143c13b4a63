"""Distillation with a Hugging Face `Trainer` whose loss never builds the student's logits.

`DistillTrainer.compute_loss` runs the student's decoder (not its LM head) and hands the final
hidden states and the head's weight to `distill_ops.fused_linear_kd_loss`, with either

- a dense teacher: another causal LM run on the same batch (its head applied chunk by chunk
  too), or
- stored sparse targets: `teacher_indices` / `teacher_logprobs` columns of the batch, e.g.
  top-k written by a teacher job (set `remove_unused_columns=False` in the
  `TrainingArguments`, or the Trainer drops those columns before `compute_loss`).

Run as a script for a tiny demonstration on random data (no download):
    python examples/hf_trainer.py
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import Trainer

import distill_ops


class DistillTrainer(Trainer):
    """`Trainer` with a fused LM-head distillation loss.

    Args:
        teacher: a causal LM for a dense teacher, or None when batches carry sparse targets.
        distill: options of `fused_linear_kd_loss` (divergence, temperature, tail, ...).
    """

    def __init__(self, *args: Any, teacher: torch.nn.Module | None = None,
                 distill: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval() if teacher is not None else None
        self.distill = distill or {}

    @staticmethod
    def _hidden_and_head(model: torch.nn.Module, inputs: dict[str, Tensor]):
        # The decoder alone: the [B, T, V] logits of the full model are never computed.
        hidden = model.get_decoder()(**inputs).last_hidden_state
        head = model.get_output_embeddings()
        return hidden, head.weight, getattr(head, "bias", None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        indices = inputs.pop("teacher_indices", None)
        logprobs = inputs.pop("teacher_logprobs", None)
        hidden, weight, bias = self._hidden_and_head(model, inputs)
        # Position t predicts token t + 1.
        kwargs = dict(student_bias=bias, labels=labels[:, 1:],
                      num_items_in_batch=num_items_in_batch, **self.distill)
        if self.teacher is not None:
            with torch.no_grad():
                t_hidden, t_weight, t_bias = self._hidden_and_head(self.teacher, inputs)
            loss = distill_ops.fused_linear_kd_loss(
                hidden[:, :-1], weight, t_hidden[:, :-1], t_weight, teacher_bias=t_bias,
                **kwargs)
        else:
            loss = distill_ops.fused_linear_kd_loss(
                hidden[:, :-1], weight, teacher_indices=indices[:, :-1],
                teacher_logprobs=logprobs[:, :-1], **kwargs)
        return (loss, {"hidden": hidden}) if return_outputs else loss


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
