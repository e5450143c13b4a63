"""A Hugging Face `Trainer` whose distillation loss never builds the student's logits.

`DistillTrainer.compute_loss` runs the student's decoder (not its LM head) and hands the final
hidden states and the head's weight to :func:`distill_ops.fused_linear_kd_loss`, with either

- a dense teacher: another causal LM run on the same batch (its head applied chunk by chunk
  too), or
- sparse targets in the batch: ``teacher_indices`` / ``teacher_logprobs`` ``[B, T, k]``, e.g.
  read from a target store by :class:`distill_ops.store.TargetDataset` and padded by
  :func:`distill_ops.store.collate_targets` (set ``remove_unused_columns=False`` in the
  `TrainingArguments`, or the Trainer drops those columns before `compute_loss`).

Position t of the batch predicts token t + 1: hidden states and targets of the last position
are dropped, labels of the first.

Under DDP or FSDP2 (`fully_shard`) the decoder runs as the wrapped model's forward, so the
wrapper's hooks run as for a full forward (DDP's gradient sync; FSDP2 gathering the root's
embedding, norm and head): loss and gradients equal one process's over all ranks' rows
(tests/test_fsdp_ddp.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import Trainer

from ..fused_linear import fused_linear_kd_loss

# What the decoder is called with; other batch columns (ids of stored sequences, ...) are not
# model inputs.
_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


class DistillTrainer(Trainer):
    """`Trainer` with a fused LM-head distillation loss.

    Args:
        teacher: a causal LM for a dense teacher, or None when batches carry sparse targets.
        distill: options of `fused_linear_kd_loss` (divergence, temperature, tail,
            source_temperature, hard_weight, ...).
        store: the target store the batches come from (a path or a TopKReader): its
            recorded temperature is the default ``source_temperature``.

    Example:
        >>> trainer = DistillTrainer(model=student, args=args, train_dataset=ds,
        ...                          data_collator=collate_targets,
        ...                          distill={"temperature": 2.0, "source_temperature": 2.0})
    """

    def __init__(self, *args: Any, teacher: torch.nn.Module | None = None,
                 distill: dict[str, Any] | None = None, store: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval() if teacher is not None else None
        self.distill = dict(distill or {})
        if store is not None:
            # The targets were recorded at the store's temperature: re-temper from there.
            from ..store import TopKReader

            reader = store if isinstance(store, TopKReader) else TopKReader(store)
            self.distill.setdefault("source_temperature", reader.temperature)

    @staticmethod
    def _hidden_and_head(model: torch.nn.Module, inputs: dict[str, Tensor]):
        # The decoder alone: the [B, T, V] logits of the full model are never computed. It
        # runs as the forward of the model the Trainer trains (a DDP wrapper, an FSDP2
        # module), so that the wrapper's hooks run around it as around a full forward.
        inner = _unwrapped(model)
        hidden = _as_forward(model, inner,
                             lambda: inner.get_decoder()(**inputs).last_hidden_state)
        head = inner.get_output_embeddings()
        return hidden, head.weight, getattr(head, "bias", None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        indices = inputs.get("teacher_indices")
        logprobs = inputs.get("teacher_logprobs")
        model_inputs = {k: inputs[k] for k in _MODEL_INPUTS if k in inputs}
        hidden, weight, bias = self._hidden_and_head(model, model_inputs)
        kwargs = dict(student_bias=bias, labels=labels[:, 1:],
                      num_items_in_batch=num_items_in_batch, **self.distill)
        if self.teacher is not None:
            with torch.no_grad():
                t_hidden, t_weight, t_bias = self._hidden_and_head(self.teacher, model_inputs)
            # The teacher is not trained here: its head is detached (a parameter that
            # requires grad would otherwise be refused by fused_linear_kd_loss).
            loss = fused_linear_kd_loss(hidden[:, :-1], weight, t_hidden[:, :-1],
                                        t_weight.detach(),
                                        teacher_bias=None if t_bias is None else t_bias.detach(),
                                        **kwargs)
        elif indices is None or logprobs is None:
            raise ValueError("DistillTrainer without a teacher needs 'teacher_indices' and "
                             "'teacher_logprobs' in every batch (keep them with "
                             "remove_unused_columns=False)")
        else:
            loss = fused_linear_kd_loss(hidden[:, :-1], weight,
                                        teacher_indices=indices[:, :-1],
                                        teacher_logprobs=logprobs[:, :-1], **kwargs)
        return (loss, {"hidden": hidden}) if return_outputs else loss


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside DDP / DataParallel wrappers (an FSDP2 module is the LM itself)."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel,
                             torch.nn.DataParallel)):
        model = model.module
    return model


def _as_forward(model: torch.nn.Module, inner: torch.nn.Module, fn: Any) -> Tensor:
    """fn() run as the forward of `model`: DDP's forward (its gradient-sync bookkeeping) and
    FSDP2's pre/post-forward hooks (the root's parameters gathered, the backward hooks on the
    output) run around it, as around the module's own forward; a plain module (or one inside
    DataParallel, which would replicate it per call) just calls fn()."""
    from torch.distributed.fsdp import FSDPModule

    wrapped = isinstance(model, (torch.nn.parallel.DistributedDataParallel, FSDPModule))
    if not wrapped:
        return fn()
    had_own = "forward" in inner.__dict__
    own = inner.__dict__.get("forward")
    inner.forward = lambda *args, **kwargs: fn()
    try:
        return model()
    finally:
        if had_own:
            inner.forward = own
        else:
            del inner.forward

