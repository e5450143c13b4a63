"""`distill-ops bench --trl-step`: one training step of TRL's DistillationTrainer against
distill_ops.integrations.trl.DistillationTrainer on the same models and batch.

The models are one-layer Llamas built from configs (no download) with the LM-head sizes of
the issue's bar: student hidden 256, teacher 512, V = 32000, a batch of 4 sequences of 16
prompt + 512 completion tokens (2048 completion tokens). A step is the trainer's
``_compute_loss`` (both backbones, the teacher under no_grad, the LM-head loss) plus the
backward and an SGD update; the median of `reps` timed steps after one warm-up, and the peak
memory added over the step (CUDA allocator, or the resident set sampled every millisecond).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from typing import Any

import torch


def _models(hs: int, ht: int, vocab: int) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(hidden: int, seed: int):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=1024, tie_word_embeddings=False))

    return make(hs, 0), make(ht, 1)


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 3)}
    words.update({"<pad>": vocab - 3, "<eos>": vocab - 2, "<unk>": vocab - 1})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def run_trl_step(hs: int = 256, ht: int = 512, vocab: int = 32000, batch: int = 4,
                 prompt: int = 16, completion: int = 512, reps: int = 3,
                 device: str = "cpu") -> list[dict[str, Any]]:
    """Rows {impl, step_ms, spread_ms, peak_extra_mib, loss} for TRL's trainer and ours."""
    import trl
    from datasets import Dataset

    from ..integrations import trl as ours
    from .measure import PeakRSS, release_freed_memory

    release_freed_memory()
    dev = torch.device(device)
    student, teacher = _models(hs, ht, vocab)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "prompt_ids": torch.randint(0, vocab - 3, (batch, prompt), generator=g),
        "prompt_mask": torch.ones(batch, prompt, dtype=torch.long),
        "completion_ids": torch.randint(0, vocab - 3, (batch, completion), generator=g),
        "completion_mask": torch.ones(batch, completion, dtype=torch.long),
    }
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    ds = Dataset.from_dict({"prompt": ["w1 w2"]})
    rows = []
    with tempfile.TemporaryDirectory() as out:
        config = trl.DistillationConfig(output_dir=out, report_to=[], use_cpu=dev.type == "cpu",
                                        temperature=1.0, beta=0.5,
                                        max_completion_length=completion)
        for name, cls in (("trl", trl.DistillationTrainer),
                          ("distill_ops", ours.DistillationTrainer)):
            trainer = cls(model=copy.deepcopy(student).to(dev),
                          teacher_model=copy.deepcopy(teacher).to(dev), args=config,
                          train_dataset=ds, processing_class=_tokenizer(vocab))
            model = trainer.model
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)

            def step(trainer=trainer, model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss, _, _ = trainer._compute_loss(model, inputs, None)
                loss.backward()
                opt.step()
                return loss.detach()

            step()  # warm-up
            times, peak, loss = [], 0, None
            for _ in range(reps):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                    base = torch.cuda.memory_allocated(dev)
                    t0 = time.perf_counter()
                    loss = step()
                    torch.cuda.synchronize(dev)
                    times.append(time.perf_counter() - t0)
                    peak = max(peak, torch.cuda.max_memory_allocated(dev) - base)
                else:
                    with PeakRSS() as mem:
                        t0 = time.perf_counter()
                        loss = step()
                        times.append(time.perf_counter() - t0)
                    peak = max(peak, mem.extra)
            rows.append({"impl": name, "step_ms": statistics.median(times) * 1e3,
                         "spread_ms": (max(times) - min(times)) * 1e3,
                         "peak_extra_mib": peak / 2**20, "loss": float(loss),
                         "hs": hs, "ht": ht, "vocab": vocab,
                         "completion_tokens": batch * completion, "device": str(dev)})
            del trainer, model, opt
    return rows


def format_trl_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| trainer | step ms (spread) | peak extra MiB | loss |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['step_ms']:.1f} ({r['spread_ms']:.1f}) | "
                     f"{r['peak_extra_mib']:.0f} | {r['loss']:.6f} |")
    return "\n".join(lines)
