"""examples/hf_trainer.py: a Hugging Face Trainer whose compute_loss is fused_linear_kd_loss,
with a dense teacher model or stored sparse targets, on two tiny randomly initialised models
built from configs (no download)."""

from __future__ import annotations

import pytest
import torch
from helpers import load_example

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import distill_ops


@pytest.fixture(scope="module")
def example():
    return load_example("hf_trainer")


def _args(tmp_path):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), max_steps=3,
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                             save_strategy="no", use_cpu=True, logging_steps=1,
                             disable_tqdm=True, remove_unused_columns=False)


def test_compute_loss_equals_kd_loss_on_materialised_logits(example):
    student, teacher = example.tiny_causal_lm(32, seed=0), example.tiny_causal_lm(48, seed=1)
    batch = example.random_batches(4, 12, 128)
    inputs = {k: torch.stack([r[k] for r in batch]) for k in batch[0]}
    trainer = example.DistillTrainer(model=student, args=_args("/tmp/distill_ops_t1"),
                                     teacher=teacher,
                                     distill={"divergence": "jsd", "temperature": 2.0})
    loss = trainer.compute_loss(student, dict(inputs))
    with torch.no_grad():
        s_logits = student(input_ids=inputs["input_ids"]).logits[:, :-1]
        t_logits = teacher(input_ids=inputs["input_ids"]).logits[:, :-1]
    ref = distill_ops.kd_loss(s_logits, t_logits, labels=inputs["labels"][:, 1:],
                              divergence="jsd", temperature=2.0)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_trainer_trains_with_the_fused_loss(example, tmp_path, mode):
    student = example.tiny_causal_lm(32, seed=0)
    teacher = example.tiny_causal_lm(48, seed=1)
    data = example.random_batches(16, 12, 128)
    if mode == "sparse":
        # A stored top-k batch: what a teacher job would have written.
        with torch.no_grad():
            for row in data:
                logits = teacher(input_ids=row["input_ids"][None]).logits[0]
                top = distill_ops.topk_logprobs(logits, 8)
                row["teacher_indices"], row["teacher_logprobs"] = top.indices, top.logprobs
        teacher = None
    before = student.lm_head.weight.detach().clone()
    trainer = example.DistillTrainer(model=student, args=_args(tmp_path), train_dataset=data,
                                     teacher=teacher, distill={"temperature": 2.0})
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert not torch.equal(before, student.lm_head.weight.detach())
