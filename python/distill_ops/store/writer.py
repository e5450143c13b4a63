"""`TopKWriter`: appends sequences of sparse targets to a store, crash-safe and resumable."""

from __future__ import annotations

import datetime
import math
import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from . import _codec
from ._format import (
    ENCODINGS,
    FORMAT,
    INDEX_DTYPE,
    KINDS,
    MANIFEST,
    VERSION,
    StoreError,
    key_id,
    pack_extra,
    rank_file,
    rank_files,
    read_index,
    read_json,
    read_manifest,
    shard_name,
    write_json_atomic,
)

_FIXED = ("vocab_size", "k", "value_encoding", "kind", "temperature", "compact")


def _dist(group: Any = None) -> tuple[int, int, Any]:
    """(rank, world size, a barrier over `group` or None) of the writers."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return 0, 1, None
    if dist.is_available() and dist.is_initialized():
        return (dist.get_rank(group), dist.get_world_size(group),
                lambda: dist.barrier(group=group))
    if group is not None:
        raise ValueError("process_group was given but torch.distributed is not initialised")
    return 0, 1, None


class TopKWriter:
    r"""Writes a teacher's sparse targets, one sequence at a time, into a store directory.

    Each `append(seq_id, indices, logprobs)` stores the ``[T, k]`` targets of one sequence
    (ids in ``[0, V)``, -1 padding after a token's valid ids; log-probabilities at the
    recorded `temperature`, -inf allowed). Value encodings:

    - ``"fp16"`` / ``"bf16"``: ids bit-packed to ``ceil(log2 V)`` bits, values rounded to
      nearest even (about ``k * (log2 V + 16) / 8`` bytes per token);
    - ``"compact"``: ids sorted and gap-coded (about ``log2(V/k) + 1.5`` bits each), values in
      the same order, quantised per token: the `head` largest to within `head_error` nats
      (at least 8 bits each), the others to within `tail_error` nats. Readers then get each
      token's targets in ascending id order.

    Crash safety: after every `commit_every` sequences the rank's file is replaced atomically
    (temporary file + rename) once the payloads it counts are written, so a writer killed at
    any point leaves complete sequences only; reopening with ``resume=True`` cuts off the
    partial append and continues. `seq_ids` lists what is complete (every rank's), to skip on
    a restart. ``fsync=True`` also survives power loss, at the cost of a disk flush per commit.

    Under ``torch.distributed`` (or with explicit `rank` / `world_size`) each rank writes its
    own shards and rank files; closing joins them in the manifest (rank 0, after a barrier).
    `process_group` makes the writers the members of that group (ranks and barriers within
    it), e.g. one rank per data-parallel replica of a tensor-parallel teacher.

    Example:
        >>> with TopKWriter("targets/", vocab_size=151936, k=64, temperature=1.0,
        ...                 value_encoding="compact") as w:
        ...     for seq_id, hidden in batches:
        ...         top = fused_linear_topk(hidden, lm_head.weight, 64)
        ...         w.append(seq_id, top.indices, top.logprobs)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        vocab_size: int,
        k: int,
        temperature: float,
        value_encoding: str = "fp16",
        kind: str = "topk",
        metadata: dict[str, Any] | None = None,
        resume: bool = False,
        skip_existing: bool = False,
        head: int = 16,
        head_error: float = 0.02,
        tail_error: float = 0.1,
        shard_bytes: int = 1 << 30,
        commit_every: int = 1,
        fsync: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        process_group: Any = None,
    ) -> None:
        for name, v in (("vocab_size", vocab_size), ("k", k), ("head", head),
                        ("shard_bytes", shard_bytes), ("commit_every", commit_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if vocab_size >= 2**31:
            raise ValueError(f"vocab_size must be < 2**31 (int32 ids), got {vocab_size}")
        if k > vocab_size:
            raise ValueError(f"k must be <= vocab_size={vocab_size}, got {k}")
        if value_encoding not in ENCODINGS:
            raise ValueError(f"value_encoding must be one of {sorted(ENCODINGS)}, "
                             f"got {value_encoding!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        for name, v in (("temperature", temperature), ("head_error", head_error),
                        ("tail_error", tail_error)):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        d_rank, d_world, self._barrier = _dist(process_group)
        self.rank = d_rank if rank is None else int(rank)
        self.world_size = d_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must lie in [0, world_size={self.world_size}), "
                             f"got {self.rank}")
        self.root = Path(path)
        self.skip_existing = skip_existing
        self.shard_bytes = shard_bytes
        self.commit_every = commit_every
        self.fsync = fsync
        header = {
            "format": FORMAT, "version": VERSION, "vocab_size": vocab_size, "k": k,
            "value_encoding": value_encoding, "kind": kind, "temperature": float(temperature),
            "compact": ({"head": head, "head_error": float(head_error),
                         "tail_error": float(tail_error), "head_min_bits": 8}
                        if value_encoding == "compact" else None),
        }
        self.manifest = self._open_manifest(header, metadata, resume)
        self._params = _codec.codec_params(self.manifest)
        self._sorted = value_encoding == "compact"  # the order a reader gets each row in
        self._closed = False
        self._pending = 0
        self._load(resume)

    # -- opening --------------------------------------------------------------------------

    def _open_manifest(self, header: dict[str, Any], metadata: dict[str, Any] | None,
                       resume: bool) -> dict[str, Any]:
        exists = (self.root / MANIFEST).exists()
        if self.rank == 0:
            if exists and not resume:
                raise FileExistsError(f"a target store already exists at {self.root}; pass "
                                      "resume=True to continue it")
            if not exists:
                self.root.mkdir(parents=True, exist_ok=True)
                m = dict(header, metadata=metadata or {},
                         created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                         world_size=self.world_size)
                write_json_atomic(self.root / MANIFEST, m, self.fsync)
        if self._barrier is not None:
            self._barrier()
        try:
            m = read_manifest(self.root)
        except FileNotFoundError:
            raise FileNotFoundError(f"no manifest at {self.root}: rank 0 creates it; with "
                                    "several ranks outside torch.distributed start rank 0 "
                                    "first") from None
        wrong = [f"{key}: store has {m.get(key)!r}, writer asked for {header[key]!r}"
                 for key in _FIXED if m.get(key) != header[key]]
        if wrong:
            raise ValueError(f"the store at {self.root} was written with other settings; "
                             + "; ".join(wrong))
        if exists and metadata is not None and m.get("metadata") != metadata:
            raise ValueError(f"metadata {metadata!r} differs from the store's "
                             f"{m.get('metadata')!r}")
        return m

    def _load(self, resume: bool) -> None:
        """Reads every rank's committed sequences; cuts off this rank's partial appends."""
        self.seq_ids: set[int] = set()
        self._shards: list[dict[str, Any]] = []
        self._stats = {"max_err_head": 0.0, "max_err_tail": 0.0}
        own = rank_file(self.root, self.rank)
        for path in rank_files(self.root):
            state = read_json(path, "rank file")
            for shard in state["shards"]:
                ids = read_index(self.root, shard)["seq_id"]
                self.seq_ids.update(int(s) for s in ids)
            if path == own:
                if not resume:
                    raise FileExistsError(f"{path} exists: pass resume=True to continue it")
                self._shards = state["shards"]
                self._stats.update(state.get("stats", {}))
        if not self._shards:
            self._new_shard()
        else:
            cur = self._shards[-1]
            self._bin = open(self.root / f"{cur['name']}.bin", "r+b")
            self._idx = open(self.root / f"{cur['name']}.idx", "r+b")
            self._bin.truncate(int(cur["bytes"]))
            self._idx.truncate(int(cur["sequences"]) * INDEX_DTYPE.itemsize)
            self._bin.seek(0, os.SEEK_END)
            self._idx.seek(0, os.SEEK_END)
            self._crc_idx = int(cur["index_crc32"])
        self._commit()

    def _new_shard(self) -> None:
        name = shard_name(self.rank, len(self._shards))
        self._shards.append({"name": name, "sequences": 0, "tokens": 0, "bytes": 0,
                             "index_crc32": 0, "data_crc32": 0})
        self._bin = open(self.root / f"{name}.bin", "w+b")
        self._idx = open(self.root / f"{name}.idx", "w+b")
        self._crc_idx = 0

    # -- writing --------------------------------------------------------------------------

    def __contains__(self, seq_id: object) -> bool:
        """Whether `seq_id` (an int or a string key) is stored, by any rank."""
        if isinstance(seq_id, str):
            return key_id(seq_id) in self.seq_ids
        return isinstance(seq_id, (int, np.integer)) and int(seq_id) in self.seq_ids

    def append(self, seq_id: int | str, indices: Any, logprobs: Any,
               tokens: Any = None) -> bool:
        """Stores one sequence's targets ``[T, k]``; returns False when `seq_id` was already
        stored and the writer skips existing ids (else that is a ValueError).

        `seq_id` is an int or a string (a Batch API ``custom_id``, a response id): strings are
        kept verbatim and indexed by a 64-bit hash (:func:`key_id`). `tokens` (optional,
        ``[L]`` ids, L >= T) are the sequence's own token ids, kept beside the targets; row i
        of the targets is the teacher's distribution over token ``L - T + i``."""
        if self._closed:
            raise ValueError("append on a closed TopKWriter")
        key = None
        if isinstance(seq_id, str):
            key, seq_id = seq_id, key_id(seq_id)
        elif isinstance(seq_id, bool) or not isinstance(seq_id, (int, np.integer)):
            raise TypeError(f"seq_id must be an int or a str, got {type(seq_id).__name__}")
        seq_id = int(seq_id)
        if not -(2**63) <= seq_id < 2**63:
            raise ValueError(f"seq_id must fit in int64, got {seq_id}")
        if seq_id in self.seq_ids:
            if self.skip_existing:
                return False
            raise ValueError(f"seq_id {key if key is not None else seq_id!r} is already in the "
                             f"store at {self.root} (pass skip_existing=True to skip sequences "
                             "already written)")
        ids, lp = _codec.check_targets(indices, logprobs, self._params.vocab, self._params.k)
        toks = None if tokens is None else _check_tokens(tokens, ids.shape[0],
                                                         self._params.vocab)
        if (key is not None or toks is not None) and self.manifest.get("version", 1) < 2:
            raise ValueError(f"the store at {self.root} has format version 1, which holds "
                             "neither string keys nor token ids: write a new store")
        payload, err_head, err_tail = _codec.encode(self._params, ids, lp)
        extra = pack_extra(key, toks, self._params.vocab, _slots(ids, toks, self._sorted),
                           self._params.k)
        payload += extra
        if len(payload) >= 2**32:
            raise ValueError(f"sequence {seq_id} encodes to {len(payload)} bytes; split it "
                             "(one payload must stay under 4 GiB)")
        cur = self._shards[-1]
        entry = np.zeros(1, dtype=INDEX_DTYPE)
        entry["seq_id"], entry["offset"], entry["tokens"] = seq_id, cur["bytes"], ids.shape[0]
        entry["nbytes"], entry["crc32"] = len(payload), zlib.crc32(payload)
        entry["extra"] = len(extra)
        raw = entry.tobytes()
        self._bin.write(payload)
        self._idx.write(raw)
        cur["sequences"] += 1
        cur["tokens"] += ids.shape[0]
        cur["bytes"] += len(payload)
        cur["data_crc32"] = zlib.crc32(payload, cur["data_crc32"])
        self._crc_idx = zlib.crc32(raw, self._crc_idx)
        cur["index_crc32"] = self._crc_idx
        self._stats["max_err_head"] = max(self._stats["max_err_head"], err_head)
        self._stats["max_err_tail"] = max(self._stats["max_err_tail"], err_tail)
        self.seq_ids.add(seq_id)
        self._pending += 1
        if self._pending >= self.commit_every:
            self._commit()
        if cur["bytes"] >= self.shard_bytes:
            self._commit()
            self._bin.close()
            self._idx.close()
            self._new_shard()
        return True

    def extend(self, items: Iterable[tuple]) -> int:
        """Appends `(seq_id, indices, logprobs[, tokens])` tuples; returns how many were
        written."""
        return sum(self.append(*item) for item in items)

    def flush(self) -> None:
        """Commits every sequence appended so far."""
        self._commit()

    def _commit(self) -> None:
        self._bin.flush()
        self._idx.flush()
        if self.fsync:
            os.fsync(self._bin.fileno())
            os.fsync(self._idx.fileno())
        state = {"format": FORMAT + ".rank", "version": VERSION, "rank": self.rank,
                 "shards": self._shards, "stats": self._stats}
        write_json_atomic(rank_file(self.root, self.rank), state, self.fsync)
        self._pending = 0

    def close(self) -> None:
        """Commits, closes the files and (rank 0, once every rank closed) joins the manifest."""
        if self._closed:
            return
        self._commit()
        self._bin.close()
        self._idx.close()
        self._closed = True
        if self._barrier is not None:
            self._barrier()
        if self.rank == 0:
            self._join()

    def _join(self) -> None:
        shards, seqs, tokens, nbytes = [], 0, 0, 0
        for path in rank_files(self.root):
            state = read_json(path, "rank file")
            for s in state["shards"]:
                shards.append(dict(s, rank=state["rank"]))
                seqs += s["sequences"]
                tokens += s["tokens"]
                nbytes += s["bytes"]
        m = read_manifest(self.root)
        m.update(shards=shards, sequences=seqs, tokens=tokens, payload_bytes=nbytes)
        write_json_atomic(self.root / MANIFEST, m, self.fsync)
        self.manifest = m

    def __enter__(self) -> TopKWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close still commits what is complete
        if not getattr(self, "_closed", True):
            try:
                self._commit()
            except Exception:
                pass


def _slots(ids: np.ndarray, tokens: np.ndarray | None, sorted_rows: bool) -> np.ndarray | None:
    """Where each token the targets predict sits in its row as a reader decodes it (ids in
    ascending order for the compact encoding, as given otherwise), or None when some token
    is not among its row's ids (then the tokens are stored as they are)."""
    if tokens is None or ids.shape[0] == 0:
        return None
    t = ids.shape[0]
    rows = np.where(ids < 0, np.iinfo(np.int32).max, ids)
    if sorted_rows:
        rows = np.sort(rows, axis=1)
    want = tokens[len(tokens) - t:].astype(np.int64)[:, None]
    hit = rows == want
    if not hit.any(axis=1).all():
        return None
    return hit.argmax(axis=1)


def _check_tokens(tokens: Any, rows: int, vocab: int) -> np.ndarray:
    t = _codec._as_numpy("tokens", tokens)
    if t.ndim != 1 or t.dtype.kind not in "iu":
        raise ValueError(f"tokens must be a 1-D integer array, got {t.dtype} {tuple(t.shape)}")
    if t.shape[0] < rows:
        raise ValueError(f"tokens must hold at least the {rows} tokens the targets predict, "
                         f"got {t.shape[0]}")
    if t.size and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise ValueError(f"tokens must lie in [0, vocab_size={vocab}), got values in "
                         f"[{int(t.min())}, {int(t.max())}]")
    return t


__all__ = ["StoreError", "TopKWriter"]
