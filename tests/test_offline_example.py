"""examples/offline_distill.py: a teacher writes a target store, a Trainer distils a student
from it; tiny models built from configs (no download)."""

from __future__ import annotations

import pytest
import torch
from helpers import load_example

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import distill_ops
from distill_ops.store import collate_targets


@pytest.fixture(scope="module")
def example():
    return load_example("offline_distill")


def _args(tmp_path):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "args"), report_to=[], use_cpu=True,
                             remove_unused_columns=False)


def test_offline_distillation_from_a_store(example, tmp_path):
    vocab = 128
    rows = example.tokenised_dataset(12, vocab)
    teacher = example.tiny_causal_lm(48, vocab, seed=1)
    reader = example.write_store(teacher, rows, tmp_path / "store", 16, temperature=1.0)
    assert sorted(reader.seq_ids().tolist()) == [r["seq_id"] for r in rows]

    # The trainer's loss on one batch equals sparse_kd_loss on materialised student logits.
    student = example.tiny_causal_lm(32, vocab, seed=0)
    ds = example.TargetDataset(reader, base=rows)
    batch = collate_targets([ds[i] for i in range(4)])
    trainer = example.DistillTrainer(
        model=student, args=_args(tmp_path),
        distill={"temperature": 2.0, "source_temperature": 1.0})
    loss = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"]).logits[:, :-1]
    ref = distill_ops.sparse_kd_loss(logits, batch["teacher_indices"][:, :-1],
                                     batch["teacher_logprobs"][:, :-1],
                                     labels=batch["labels"][:, 1:], temperature=2.0,
                                     source_temperature=1.0)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-6)

    before = student.lm_head.weight.detach().clone()
    out = example.train(student, rows, reader, str(tmp_path / "run"), max_steps=3)
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert not torch.equal(before, student.lm_head.weight.detach())
