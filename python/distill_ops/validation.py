"""The one place that validates arguments. Kernels never validate.

Every check here reads only metadata (shapes, dtypes, devices, Python scalars), so it costs no
host synchronisation and traces under torch.compile. The single data-dependent check (label
range) runs only on CPU tensors in eager mode, where it costs no device sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "ab",
               "akl")
DIVERGENCE_CODES = {name: i for i, name in enumerate(DIVERGENCES)}
REDUCTIONS = ("mean", "sum", "none", "batchmean")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class LossScalars:
    """The scalar options of a KD loss after validation, as every backend receives them."""

    divergence: int  # code in DIVERGENCE_CODES; jsd at beta 0/1 is already forward/reverse KL
    temperature: float
    beta: float  # the divergence's parameter: JSD beta, skew, AB alpha or AKL head mass
    student_scale: float
    student_softcap: float  # 0.0 = none
    teacher_scale: float
    teacher_softcap: float  # 0.0 = none
    hard_weight: float
    soft_coef: float  # soft_weight, times T^2 when scale_by_t2
    param2: float = 0.0  # AB beta
    interp: float = 1.0  # TAID teacher interpolation t (1: the plain teacher)


def check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float_tensor(name: str, t: object, *, allow_empty: bool = False) -> Tensor:
    """A float tensor with a vocabulary dimension; `allow_empty`: that dimension may be 0 (a
    vocab-parallel rank whose slice holds no ids)."""
    t = check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16 or float16 (float64 on the cpu/torch backends), "
            f"got {t.dtype}"
        )
    if t.dim() < 1:
        raise ValueError(f"{name} must have a vocabulary dimension [..., V], got a 0-d tensor")
    if t.shape[-1] < 1 and not allow_empty:
        raise ValueError(f"{name} has an empty vocabulary dimension: shape {tuple(t.shape)}")
    return t


def check_positive(name: str, value: object, *, allow_none: bool = False) -> float:
    if value is None and allow_none:
        return 0.0
    value = _number(name, value)
    # abs(v) < inf rather than math.isfinite: the former also works on the symbolic floats
    # torch.compile(dynamic=True) passes in.
    if not (abs(value) < math.inf and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def check_non_negative(name: str, value: object) -> float:
    value = _number(name, value)
    if not (abs(value) < math.inf and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def teacher_wants_grad(*tensors: Tensor | None) -> bool:
    """Whether a teacher tensor asks for its gradient (it requires grad and grad mode is on)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_kernel_dtype(backend: str, **tensors: Tensor) -> None:
    """The GPU kernels (triton, cuda) take fp32/bf16/fp16: float64 is a TypeError naming the
    tensor (float64 runs on the cpu and torch backends)."""
    if backend not in ("triton", "cuda"):
        return
    for name, t in tensors.items():
        if t.dtype == torch.float64:
            raise TypeError(f"backend={backend!r} takes fp32/bf16/fp16 {name}, got float64 "
                            "(float64 runs on backend='cpu' or 'torch')")


def check_same_device(**tensors: Tensor | None) -> torch.device:
    present = {k: t for k, t in tensors.items() if t is not None}
    devices = {k: t.device for k, t in present.items()}
    first_name, first = next(iter(devices.items()))
    for k, d in devices.items():
        if d != first:
            raise ValueError(
                f"{k} is on {d} but {first_name} is on {first}: all tensors must share a device"
            )
    return first


def check_row_tensors(
    lead: torch.Size,
    labels: Tensor | None,
    mask: Tensor | None,
    ignore_index: object,
) -> Tensor | None:
    """labels (integer) and mask must have the logits' leading shape; returns the mask as bool.

    A mask is bool, or 0/1 values of any integer or float dtype (what Hugging Face's
    attention masks and TRL's completion masks are), equal to the bool mask. Other values
    are refused: a ValueError naming one on CPU tensors; on a GPU an asynchronous device
    assertion (no host synchronisation), so a weight never passes for a mask."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if labels is not None:
        check_tensor("labels", labels)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.shape != lead:
            raise ValueError(
                f"labels must have the logits' leading shape {tuple(lead)}, "
                f"got {tuple(labels.shape)}"
            )
    if mask is not None:
        check_tensor("mask", mask)
        if mask.dtype.is_complex:
            raise TypeError(f"mask must be bool or hold 0/1 values, got {mask.dtype}")
        if mask.shape != lead:
            raise ValueError(
                f"mask must have the logits' leading shape {tuple(lead)}, got {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            mask = _mask_from_01(mask)
    return mask


def _mask_from_01(mask: Tensor) -> Tensor:
    """mask != 0, after checking that every value is 0 or 1."""
    ok = (mask == 0) | (mask == 1)
    if not torch.compiler.is_compiling():
        if mask.device.type == "cpu":
            if not bool(ok.all()):
                seen = mask[~ok].reshape(-1)[0].item()  # host-sync-ok: CPU, to an error
                raise ValueError(
                    f"mask must be bool or hold only 0 and 1 ({mask.dtype}), got the value "
                    f"{seen}; per-token weights are not a mask"
                )
        elif mask.numel():
            torch._assert_async(ok.all(), "mask must be bool or hold only 0 and 1")
    return mask != 0


def check_num_items(num_items_in_batch: object) -> None:
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                "num_items_in_batch must be a number or a one-element tensor, got shape "
                f"{tuple(num_items_in_batch.shape)}"
            )
        return
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        kind = type(num_items_in_batch).__name__
        raise TypeError(f"num_items_in_batch must be an int or a tensor, got {kind}")
    if not num_items_in_batch > 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")


def check_labels_in_range(labels: Tensor, ignore_index: int, vocab: int) -> None:
    """Label values must index the vocabulary. Checked only where it costs no device sync
    (CPU tensors, eager mode); elsewhere an out-of-range label makes that row's loss NaN."""
    if labels.device.type != "cpu" or torch.compiler.is_compiling():
        return
    flat = labels.reshape(-1)
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= vocab))
    if bool(bad.any()):
        first = int(flat[bad][0])
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}, got {first}"
        )


def resolve_vocab(student_v: int, teacher_v: int, vocab_size: object) -> int:
    """The number of leading vocabulary columns both sides use."""
    if vocab_size is None:
        if student_v != teacher_v:
            raise ValueError(
                f"student_logits has V={student_v} but teacher_logits has V={teacher_v}; "
                "for padded vocabularies pass vocab_size=K (K <= both) to use the first K "
                "columns of each"
            )
        return student_v
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= min(student_v, teacher_v):
        raise ValueError(
            f"vocab_size must lie in [1, {min(student_v, teacher_v)}] (student V={student_v}, "
            f"teacher V={teacher_v}), got {vocab_size}"
        )
    return vocab_size


def loss_scalars(
    *,
    divergence: object,
    temperature: object,
    beta: object,
    hard_weight: object,
    soft_weight: object,
    scale_by_t2: object,
    student_logit_scale: object,
    teacher_logit_scale: object,
    student_softcap: object,
    teacher_softcap: object,
    has_labels: bool,
    skew: object = 0.1,
    ab_alpha: object = 0.5,
    ab_beta: object = 0.5,
    akl_head_mass: object = 0.5,
    teacher_interpolation: object = 1.0,
) -> LossScalars:
    """Validate the scalar options shared by the dense and sparse losses (`has_labels`: the
    hard term needs them)."""
    div = check_choice("divergence", divergence, DIVERGENCES)
    t = check_positive("temperature", temperature)
    beta = _number("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if div == "jsd" and beta == 0.0:
        div = "forward_kl"
    elif div == "jsd" and beta == 1.0:
        div = "reverse_kl"
    skew = _number("skew", skew)
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must lie in [0, 1), got {skew}")
    ab_alpha = check_positive("ab_alpha", ab_alpha)
    ab_beta = check_positive("ab_beta", ab_beta)
    head_mass = _number("akl_head_mass", akl_head_mass)
    if not 0.0 < head_mass <= 1.0:
        raise ValueError(f"akl_head_mass must lie in (0, 1], got {head_mass}")
    interp = _number("teacher_interpolation", teacher_interpolation)
    if not 0.0 <= interp <= 1.0:
        raise ValueError(f"teacher_interpolation must lie in [0, 1], got {interp}")
    if div == "skew_kl" and skew == 0.0:  # the mixture is q itself: exactly forward KL
        div = "forward_kl"
    elif div == "skew_reverse_kl" and skew == 0.0:
        div = "reverse_kl"
    param, param2 = {"skew_kl": (skew, 0.0), "skew_reverse_kl": (skew, 0.0),
                     "ab": (ab_alpha, ab_beta), "akl": (head_mass, 0.0)}.get(div, (beta, 0.0))
    if not isinstance(scale_by_t2, bool):
        raise TypeError(f"scale_by_t2 must be a bool, got {type(scale_by_t2).__name__}")
    soft = check_non_negative("soft_weight", soft_weight)
    hard = check_non_negative("hard_weight", hard_weight)
    if hard > 0 and not has_labels:
        raise ValueError(f"hard_weight={hard_weight} > 0 needs labels for the cross-entropy term")
    return LossScalars(
        divergence=DIVERGENCE_CODES[div],
        temperature=t,
        beta=param,
        student_scale=check_positive("student_logit_scale", student_logit_scale),
        student_softcap=check_positive("student_softcap", student_softcap, allow_none=True),
        teacher_scale=check_positive("teacher_logit_scale", teacher_logit_scale),
        teacher_softcap=check_positive("teacher_softcap", teacher_softcap, allow_none=True),
        hard_weight=hard,
        soft_coef=soft * (t * t if scale_by_t2 else 1.0),
        param2=param2,
        interp=interp,
    )


def divergence_options(sc: LossScalars) -> tuple[str, dict[str, float]]:
    """The divergence's name and its parameter as `reference.divergence_from_logprobs`
    takes it."""
    name = DIVERGENCES[sc.divergence]
    if name in ("skew_kl", "skew_reverse_kl"):
        return name, {"skew": sc.beta}
    if name == "ab":
        return name, {"ab_alpha": sc.beta, "ab_beta": sc.param2}
    if name == "akl":
        return name, {"akl_head_mass": sc.beta}
    return name, {"beta": sc.beta}


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


TAILS = ("bucket", "renorm", "support", "none")
TAIL_CODES = {name: i for i, name in enumerate(TAILS)}


def check_sparse_targets(lead: torch.Size, vocab: int, indices: object,
                         teacher_logprobs: object) -> int:
    """indices (integer, -1 = padding) and teacher_logprobs (float) of shape [..., k] with the
    logits' leading dims and 1 <= k <= V; returns k."""
    indices = check_tensor("indices", indices)
    teacher_logprobs = check_tensor("teacher_logprobs", teacher_logprobs)
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor (-1 for padding), got {indices.dtype}")
    if teacher_logprobs.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"teacher_logprobs must be a float tensor, got {teacher_logprobs.dtype}"
        )
    if indices.shape != teacher_logprobs.shape:
        raise ValueError(
            f"indices and teacher_logprobs must have the same shape [..., k], got "
            f"{tuple(indices.shape)} and {tuple(teacher_logprobs.shape)}"
        )
    if indices.dim() < 1 or indices.shape[:-1] != lead:
        raise ValueError(
            f"indices must be [..., k] with the logits' leading shape {tuple(lead)}, got "
            f"{tuple(indices.shape)}"
        )
    k = indices.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k (the last dim of indices) must lie in [1, V={vocab}], got {k}")
    return k


# How far sparse targets may stray from a distribution before they are refused: a
# log-probability above 0, or a support holding more than all the mass, by more than the
# rounding of the store's encodings (compact keeps the top 16 within 0.02 nats).
LOGPROB_SLACK = 0.02
MASS_SLACK = 0.05


def check_teacher_logprobs(indices: Tensor, teacher_logprobs: Tensor,
                           counted: Tensor | None = None, *, raise_errors: bool | None = None,
                           name: str = "teacher_logprobs", row: str = "row") -> Tensor | None:
    """Sparse teacher targets must be log-probabilities: at valid ids (>= 0) not NaN or
    +inf, at most 0, and summing to at most 1 per row (each up to rounding: LOGPROB_SLACK,
    MASS_SLACK). Probabilities passed as log-probabilities fail the first test. Only the rows
    that count are checked (`counted`: bool [N], None = all): an ignored row may hold
    anything, as everywhere.

    On CPU tensors in eager mode a violation is a ValueError naming the row and the value
    (`name` and `row` say what the caller calls them; the store writer: "logprobs" and
    "token"; the check is free there); returns None. Elsewhere it would cost a host sync: returns a
    bool [N] of the rows that violate it, which the op makes NaN (loss and gradient)."""
    k = teacher_logprobs.shape[-1]
    lp = teacher_logprobs.detach().reshape(-1, k).float()
    on = indices.reshape(-1, k) >= 0
    ninf = torch.full((), -math.inf, dtype=lp.dtype, device=lp.device)
    lp = torch.where(on, lp, ninf)
    mass = torch.logsumexp(lp, dim=-1)
    bad_value = torch.isnan(lp) | (lp > LOGPROB_SLACK)
    bad = bad_value.any(dim=-1) | (mass > math.log1p(MASS_SLACK))
    if counted is not None:
        bad = bad & counted
        bad_value = bad_value & counted[:, None]
    if raise_errors is None:
        raise_errors = teacher_logprobs.device.type == "cpu" and \
            not torch.compiler.is_compiling()
    if not raise_errors:
        return bad
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        values = lp[r][bad_value[r]]
        if values.numel():
            seen = values[0].item()  # host-sync-ok: CPU tensors, on the way to an error
            hint = " (probabilities passed as log-probabilities?)" if 0 < seen <= 1 else ""
            raise ValueError(f"{name} must be log-probabilities (<= 0), not NaN or +inf: "
                             f"{row} {r} holds {seen:g}{hint}")
        total = math.exp(mass[r].item())  # host-sync-ok: CPU tensors, on the way to an error
        raise ValueError(f"{name} of {row} {r} hold a probability mass of {total:.4g} > 1: "
                         "not log-probabilities of one distribution")
    return None


def check_indices_in_range(indices: Tensor, vocab: int) -> None:
    """Ids must be -1 (padding) or in [0, V), and unique within a row. Checked only where it
    costs no device sync (CPU tensors, eager mode); elsewhere an id >= V makes that row's
    loss NaN."""
    if indices.device.type != "cpu" or torch.compiler.is_compiling():
        return
    flat = indices.reshape(-1, indices.shape[-1])
    bad = (flat < -1) | (flat >= vocab)
    if bool(bad.any()):
        first = int(flat[bad][0])
        raise ValueError(f"indices must be -1 (padding) or lie in [0, {vocab}), got {first}")
    ids = torch.sort(flat, dim=-1).values
    dup = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)
    if bool(dup.any()):
        row = int(dup.any(dim=-1).nonzero()[0, 0])
        raise ValueError(f"indices must be unique within a row: row {row} repeats an id")
