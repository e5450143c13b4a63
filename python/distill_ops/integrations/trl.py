"""Our fused losses behind TRL's distillation trainers: change one import, keep the rest.

    from distill_ops.integrations.trl import DistillationTrainer   # was: from trl import ...

- :class:`DistillationTrainer` subclasses ``trl.DistillationTrainer`` (same constructor, same
  ``DistillationConfig``, plus ``divergence=`` for the divergences TRL lacks). Its
  ``_compute_loss`` computes the generalised JSD(beta) (or that divergence) at the
  configured temperature with :func:`distill_ops.fused_linear_kd_loss` from the student's and
  teacher's final hidden states and LM heads, where TRL runs its chunked divergence: the
  logit scales and final softcaps are read from both models' configs as TRL reads them, the
  completion (and tool) mask selects the tokens, ``num_items_in_batch`` normalises, biases
  are honoured, and it returns what TRL's returns (loss, the sum of the student's per-token
  entropy that TRL logs, the number of counted tokens).
- :class:`GKDTrainer` subclasses ``trl.experimental.gkd.GKDTrainer``; its
  ``generalized_jsd_loss`` is :func:`distill_ops.kd_loss` over the full logits (same
  results; TRL's GKD computes it at temperature 1 whatever its config says, and so does this).
- :class:`ServerDistillationTrainer` subclasses
  ``trl.experimental.server_distillation.ServerDistillationTrainer``: the divergence over a
  server teacher's top-k log-probabilities (with ``loss_add_tail``, the tail bucket) is
  :func:`distill_ops.sparse_kd_loss`.

TRL is optional (``pip install distill_ops[trl]``); importing :mod:`distill_ops` never imports
it. The tested TRL is 1.16.x; another version is an ImportError naming that range.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

TESTED_TRL = (1, 16)


def _check_trl() -> Any:
    try:
        import trl
    except ImportError as exc:  # pragma: no cover - exercised without trl installed
        raise ImportError("distill_ops.integrations.trl needs TRL 1.16.x: "
                          "pip install 'distill_ops[trl]'") from exc
    parts = tuple(int(p) for p in trl.__version__.split(".")[:2] if p.isdigit())
    if parts != TESTED_TRL:
        raise ImportError(f"distill_ops.integrations.trl is tested with TRL 1.16.x (>=1.16,<1.17) "
                          f"and subclasses its trainers' internals; found TRL {trl.__version__}")
    return trl


_trl = _check_trl()

from trl.experimental.gkd import GKDTrainer as _TRLGKDTrainer  # noqa: E402
from trl.experimental.server_distillation import (  # noqa: E402
    ServerDistillationTrainer as _TRLServerDistillationTrainer,
)

from ..dense_kd import kd_loss  # noqa: E402
from ..fused_linear import fused_linear_kd_loss  # noqa: E402
from ..sparse_kd import sparse_kd_loss  # noqa: E402

__all__ = ["DistillationTrainer", "GKDTrainer", "ServerDistillationTrainer", "logit_scale"]

_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes",
                    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def logit_scale(config: Any) -> float:
    """The multiplier a model applies to its logits before any softcap, read from its (text)
    config under the names models use: ``logit_scale`` (Cohere), ``output_multiplier``,
    ``lm_head_multiplier`` (Falcon-H1), or ``logits_scaling`` (a divisor for Granite and
    MiniCPM3, a multiplier for HyperCLOVA X). None or absent: 1."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if config.model_type == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


class DistillationTrainer(_trl.DistillationTrainer):
    """``trl.DistillationTrainer`` with :func:`distill_ops.fused_linear_kd_loss` as its loss.

    TRL's one loss choice is the config's ``beta`` (generalised JSD). Two keyword arguments
    beyond TRL's constructor pick any divergence of :func:`distill_ops.kd_loss` instead:
    ``divergence`` (``"skew_kl"``, ``"ab"``, ``"akl"``, ...; None keeps TRL's JSD(beta)) and
    ``divergence_options`` (``skew``, ``ab_alpha``, ``ab_beta``, ``akl_head_mass``,
    ``teacher_interpolation``), checked when the trainer is built."""

    def __init__(self, *args: Any, divergence: str | None = None,
                 divergence_options: dict[str, float] | None = None, **kwargs: Any) -> None:
        options = dict(divergence_options or {})
        unknown = set(options) - set(_DIVERGENCE_OPTIONS)
        if unknown:
            raise ValueError(f"divergence_options takes {', '.join(_DIVERGENCE_OPTIONS)}; got "
                             f"{', '.join(sorted(unknown))}")
        if divergence is not None or options:
            from ..validation import loss_scalars

            loss_scalars(divergence=divergence or "jsd", temperature=1.0, beta=0.5,
                         hard_weight=0.0, soft_weight=1.0, scale_by_t2=False,
                         student_logit_scale=1.0, teacher_logit_scale=1.0,
                         student_softcap=None, teacher_softcap=None, has_labels=False,
                         **options)
        super().__init__(*args, **kwargs)
        self.divergence = divergence
        self.divergence_options = options

    def _compute_loss(self, unwrapped_student: Any, inputs: dict[str, Any],
                      num_items_in_batch: Tensor | int | None) -> tuple[Tensor, Tensor, Tensor]:
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        keep = inputs["completion_ids"].size(1)
        extra = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}

        h_s = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, keep,
                                          **extra)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            h_t = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                            self._get_last_hidden_state, unwrapped_teacher,
                                            input_ids, attention_mask, keep, **extra)
        head_s = unwrapped_student.get_output_embeddings()
        head_t = unwrapped_teacher.get_output_embeddings()
        device = head_s.weight.device
        if head_t.weight.device != device:
            raise ValueError(f"the student's LM head is on {device} but the teacher's on "
                             f"{head_t.weight.device}: place both on one device")
        cfg_s = unwrapped_student.config.get_text_config()
        cfg_t = unwrapped_teacher.config.get_text_config()
        # FSDP2 heads (DTensors) are gathered by the op itself (full_tensor, once a call).
        w_s, b_s = head_s.weight, head_s.bias
        # The teacher is not trained (TRL runs it under no_grad): its head goes in detached.
        w_t = head_t.weight.detach().to(h_t.dtype)
        b_t = None if head_t.bias is None else head_t.bias.detach()
        mask = loss_mask.to(device) != 0
        loss, entropy = fused_linear_kd_loss(
            h_s.to(device), w_s, h_t.to(device), w_t, student_bias=b_s, teacher_bias=b_t,
            divergence=self.divergence or "jsd", beta=self.beta, **self.divergence_options,
            temperature=self.temperature, mask=mask,
            num_items_in_batch=num_items_in_batch,
            student_logit_scale=logit_scale(cfg_s), teacher_logit_scale=logit_scale(cfg_t),
            student_softcap=getattr(cfg_s, "final_logit_softcapping", None),
            teacher_softcap=getattr(cfg_t, "final_logit_softcapping", None),
            return_entropy=True)
        return loss, entropy.sum().detach(), mask.sum()


_DIVERGENCE_OPTIONS = ("skew", "ab_alpha", "ab_beta", "akl_head_mass", "teacher_interpolation")


class GKDTrainer(_TRLGKDTrainer):
    """``trl.experimental.gkd.GKDTrainer`` whose ``generalized_jsd_loss`` is
    :func:`distill_ops.kd_loss` (padded vocabularies of different widths use their common
    leading ids instead of failing)."""

    @staticmethod
    def generalized_jsd_loss(student_logits: Tensor, teacher_logits: Tensor,
                             labels: Tensor | None = None, beta: float = 0.5,
                             temperature: float = 1.0, reduction: str = "batchmean",
                             num_items_in_batch: Tensor | int | None = None) -> Tensor:
        if reduction == "none" and num_items_in_batch is None:
            # Per-vocabulary-entry terms: only TRL's own formula gives those.
            return _TRLGKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels,
                                                       beta, temperature, reduction)
        v = min(student_logits.shape[-1], teacher_logits.shape[-1])
        kw = dict(divergence="jsd", beta=beta, temperature=temperature,
                  vocab_size=v if student_logits.shape[-1] != teacher_logits.shape[-1] else None,
                  labels=labels)
        if num_items_in_batch is not None:
            return kd_loss(student_logits, teacher_logits, num_items_in_batch=num_items_in_batch,
                           **kw)
        if reduction == "batchmean" and labels is not None:
            return kd_loss(student_logits, teacher_logits, **kw)
        total = kd_loss(student_logits, teacher_logits, reduction="sum", **kw)
        if reduction == "sum":
            return total
        if reduction == "batchmean":  # TRL divides by the batch size without labels
            return total / max(student_logits.shape[0], 1)
        # "mean": TRL averages over every (counted) row and vocabulary entry.
        rows = (labels != -100).sum() if labels is not None \
            else student_logits.shape[:-1].numel()
        return total / (rows * v)


class ServerDistillationTrainer(_TRLServerDistillationTrainer):
    """``trl.experimental.server_distillation.ServerDistillationTrainer`` whose divergences over
    the server teacher's top-k (plus the tail bucket with ``loss_add_tail``) are
    :func:`distill_ops.sparse_kd_loss`. The student log-probabilities TRL passes in are
    logits to the loss (the softmax of log-probabilities is the same distribution), so the
    gradient reaching the logits is the same too."""

    def _sparse(self, student_log_probs: Tensor, ids: Tensor, teacher_lp: Tensor,
                valid: Tensor, labels: Tensor, beta: float) -> Tensor:
        idx = torch.where(valid, ids, torch.full_like(ids, -1))
        lp = torch.where(valid, teacher_lp, torch.zeros_like(teacher_lp))
        return sparse_kd_loss(student_log_probs, idx, lp.float(), divergence="jsd", beta=beta,
                              tail="bucket" if self.loss_add_tail else "support",
                              labels=labels)

    def _compute_server_forward_kl_loss(self, teacher_result: dict[str, Tensor],
                                        student_log_probs: Tensor, labels: Tensor) -> Tensor:
        lp = teacher_result["topk_logprobs"]
        return self._sparse(student_log_probs, teacher_result["topk_token_ids"], lp,
                            lp > float("-inf"), labels, 0.0)

    def _compute_sparse_top_1_divergence_loss(
        self, student_log_probs: Tensor, teacher_top1_token_ids: Tensor,
        teacher_top1_logprobs: Tensor, reverse_token_ids: Tensor,
        reverse_teacher_logprobs: Tensor, labels: Tensor, num_items_in_batch: Any = None,
    ) -> Tensor:
        # The support: the teacher's top-1 and the reverse-KL token (once if they coincide).
        if self.beta == 1:
            ids = reverse_token_ids[..., None]
            lp = reverse_teacher_logprobs[..., None]
            valid = torch.ones_like(ids, dtype=torch.bool)
        else:
            ids = torch.stack([teacher_top1_token_ids, reverse_token_ids], -1)
            lp = torch.stack([teacher_top1_logprobs, reverse_teacher_logprobs], -1)
            valid = torch.stack([torch.ones_like(reverse_token_ids, dtype=torch.bool),
                                 reverse_token_ids != teacher_top1_token_ids], -1)
        return self._sparse(student_log_probs, ids, lp, valid, labels, self.beta)
