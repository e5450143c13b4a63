r"""The target store: a teacher's sparse targets kept compactly on disk.

A teacher job writes per-sequence top-k (or sampled) targets with :class:`TopKWriter`
(sharded per rank, crash-safe, resumable); training jobs stream them back with
:class:`TopKReader` / :class:`TargetDataset` and :func:`collate_targets`, which pads a batch to
``[B, T, k]`` with index -1 and log-probability -inf, the padding :func:`sparse_kd_loss`
ignores.

Sizes per token at k targets over a vocabulary of V ids:

========== ================================================= ===========================
encoding   what is stored                                    k=128, V=151936
========== ================================================= ===========================
fp16/bf16  ids at ceil(log2 V) bits, values at 16 bits       544 bytes
compact    sorted id gaps (Rice), values quantised per       ~290 bytes (ids exact,
           token: top 16 within 0.02 nats, rest within 0.1   errors bounded per token)
========== ================================================= ===========================

Example:
    >>> from distill_ops.store import TargetDataset, TopKReader, collate_targets
    >>> ds = TargetDataset(TopKReader("targets/"), base=tokenised, id_key="seq_id")
    >>> loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate_targets)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._format import StoreError
from .reader import TopKReader
from .writer import TopKWriter

# Batch keys of the targets, as examples/hf_trainer.py and the loss functions name them.
INDEX_KEY = "teacher_indices"
LOGPROB_KEY = "teacher_logprobs"
# Padding of the other per-token keys collate_targets knows.
_PAD = {"input_ids": 0, "labels": -100, "attention_mask": 0}


class TargetDataset(torch.utils.data.Dataset):
    """A `torch.utils.data.Dataset` of stored targets, optionally joined with another dataset.

    Without `base`, item i is ``{"seq_id", "teacher_indices", "teacher_logprobs"}`` of the
    store's i-th sequence. With `base` (any indexable of mappings, e.g. a tokenised Hugging
    Face dataset), item i is ``base[i]`` plus the targets of the sequence ``base[i][id_key]``
    (a KeyError when the store lacks it).

    Sequences stored with their own token ids (ingested API / server responses) become
    training rows: ``input_ids`` = the prompt (``base[i][prompt_key]``, when given) followed
    by the stored tokens; ``labels`` = the tokens the targets predict (-100 elsewhere); and
    the targets moved to the positions that predict them (position t predicts token t + 1,
    as causal LMs and DistillTrainer read a batch), -1 / -inf elsewhere.
    """

    def __init__(self, store: TopKReader | str, *, base: Sequence[Mapping[str, Any]] | None = None,
                 id_key: str = "seq_id", prompt_key: str | None = None) -> None:
        self.store = store if isinstance(store, TopKReader) else TopKReader(store)
        self.base = base
        self.id_key = id_key
        self.prompt_key = prompt_key
        if prompt_key is not None and base is None:
            raise ValueError("prompt_key needs a base dataset that holds the prompts")

    def __len__(self) -> int:
        return len(self.base) if self.base is not None else len(self.store)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.base is None:
            key = self.store.seq_id(i)
            item: dict[str, Any] = {"seq_id": key}
            ids, lp = self.store[i]
        else:
            item = dict(self.base[i])
            key = item[self.id_key]
            ids, lp = self.store.get(key if isinstance(key, str) else int(key))
        tokens = self.store.tokens(key)
        if tokens is None:
            item[INDEX_KEY], item[LOGPROB_KEY] = ids, lp
            return item
        prompt = torch.as_tensor(item[self.prompt_key] if self.prompt_key else [],
                                 dtype=torch.long)
        full = torch.cat([prompt, tokens])
        t = ids.shape[0]
        first = full.shape[0] - t  # the first predicted token's position
        rows = torch.arange(t)
        keep = rows + first - 1 >= 0  # a first token with nothing before it is not predicted
        aligned_i = torch.full((full.shape[0], ids.shape[1]), -1, dtype=ids.dtype)
        aligned_l = torch.full((full.shape[0], ids.shape[1]), float("-inf"), dtype=lp.dtype)
        aligned_i[rows[keep] + first - 1] = ids[keep]
        aligned_l[rows[keep] + first - 1] = lp[keep]
        labels = torch.full_like(full, -100)
        labels[first:][keep] = full[first:][keep]
        item.update(input_ids=full, labels=labels, attention_mask=torch.ones_like(full))
        item[INDEX_KEY], item[LOGPROB_KEY] = aligned_i, aligned_l
        return item


def pad_targets(targets: Sequence[tuple[Tensor, Tensor]],
                length: int | None = None) -> tuple[Tensor, Tensor]:
    """Stacks per-sequence ``(indices [T_i, k], logprobs [T_i, k])`` into ``[B, T, k]``,
    T = `length` or the longest T_i, padding with index -1 and log-probability -inf."""
    if not targets:
        raise ValueError("pad_targets needs at least one sequence")
    k = targets[0][0].shape[-1]
    t = max(x[0].shape[0] for x in targets) if length is None else length
    idx = torch.full((len(targets), t, k), -1, dtype=targets[0][0].dtype)
    lp = torch.full((len(targets), t, k), float("-inf"), dtype=targets[0][1].dtype)
    for b, (i, p) in enumerate(targets):
        if i.shape[-1] != k:
            raise ValueError(f"sequence {b} has k={i.shape[-1]}, sequence 0 has k={k}")
        if i.shape[0] > t:
            raise ValueError(f"sequence {b} has {i.shape[0]} tokens, more than length={t}")
        idx[b, :i.shape[0]] = i
        lp[b, :i.shape[0]] = p
    return idx, lp


def collate_targets(batch: Sequence[Mapping[str, Any]], *, length: int | None = None,
                    pad_values: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Collates items of :class:`TargetDataset` into a batch dict.

    The targets are padded to ``[B, T, k]`` (-1 / -inf); `input_ids`, `labels` and
    `attention_mask` (lists or 1-D tensors) are padded to the same T with 0, -100 and 0 (or
    `pad_values`); other keys go through `torch.utils.data.default_collate`.
    """
    if not batch:
        raise ValueError("collate_targets needs a non-empty batch")
    pads = dict(_PAD, **(pad_values or {}))
    t = length
    if t is None:
        t = max(len(item[INDEX_KEY]) for item in batch)
        for key in pads:
            if key in batch[0]:
                t = max(t, max(len(item[key]) for item in batch))
    idx, lp = pad_targets([(item[INDEX_KEY], item[LOGPROB_KEY]) for item in batch], t)
    out: dict[str, Any] = {INDEX_KEY: idx, LOGPROB_KEY: lp}
    for key in batch[0]:
        if key in (INDEX_KEY, LOGPROB_KEY):
            continue
        if key in pads:
            col = torch.full((len(batch), t), pads[key], dtype=torch.long)
            for b, item in enumerate(batch):
                v = torch.as_tensor(item[key], dtype=torch.long)
                col[b, :len(v)] = v
            out[key] = col
        else:
            out[key] = torch.utils.data.default_collate([item[key] for item in batch])
    return out


__all__ = [
    "INDEX_KEY",
    "LOGPROB_KEY",
    "StoreError",
    "TargetDataset",
    "TopKReader",
    "TopKWriter",
    "collate_targets",
    "pad_targets",
]
