"""`TopKReader`: random access to a store's sequences, memory-mapped, checksummed."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _codec
from ._format import (
    INDEX_DTYPE,
    StoreError,
    key_id,
    rank_files,
    read_index,
    read_json,
    read_manifest,
    unpack_extra,
)


class TopKReader:
    r"""Reads a target store written by :class:`TopKWriter` (any number of ranks, finished or
    still being written: only committed sequences are seen, as of opening).

    ``reader[i]`` gives the ``(indices int32 [T, k], logprobs float32 [T, k])`` of the i-th
    sequence (ranks, then shards, then order of writing); padding is -1 / -inf. ``get(seq_id)``
    finds a sequence by its id (an int, or the string key it was written under);
    ``tokens(seq_id)`` gives the token ids stored with it. Each payload's CRC-32 is checked
    before decoding (``verify``);
    a corrupt or truncated shard raises :class:`StoreError` naming the shard and sequence.
    The reader pickles as its path, so `DataLoader` workers reopen it.

    Example:
        >>> reader = TopKReader("targets/")
        >>> idx, lp = reader.get(42)
        >>> loss = sparse_kd_loss(student_logits, idx, lp, temperature=reader.temperature)
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.root = Path(path)
        self.verify = verify
        self.manifest = read_manifest(self.root)
        self._params = _codec.codec_params(self.manifest)
        # What each writing rank committed, as of opening: its shards and write-time stats.
        self.rank_states = [read_json(p, "rank file") for p in rank_files(self.root)]
        names: list[str] = []
        parts: list[np.ndarray] = []
        shard_of: list[np.ndarray] = []
        for state in self.rank_states:
            for shard in state["shards"]:
                entries = read_index(self.root, shard)
                shard_of.append(np.full(len(entries), len(names), dtype=np.int32))
                names.append(shard["name"])
                parts.append(entries)
        self._names = names
        self._index = np.concatenate(parts) if parts else np.zeros(0, INDEX_DTYPE)
        self._shard = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
        ids = self._index["seq_id"]
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]
        dup = np.nonzero(self._sorted[1:] == self._sorted[:-1])[0]
        if dup.size:
            sid = int(self._sorted[dup[0]])
            where = sorted({names[self._shard[i]] for i in np.nonzero(ids == sid)[0]})
            raise StoreError(f"seq_id {sid} is stored more than once (shards {where})")
        self._maps: dict[int, np.memmap] = {}

    # -- metadata ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def num_tokens(self) -> int:
        return int(self._index["tokens"].sum())

    def __len__(self) -> int:
        return len(self._index)

    def seq_id(self, i: int) -> int | str:
        """The id of the i-th sequence: its string key if it was written under one."""
        j = self._position(i)
        if self._index["extra"][j]:
            key, _ = self._extra(j)
            if key is not None:
                return key
        return int(self._index["seq_id"][j])

    def seq_ids(self) -> np.ndarray:
        """Every sequence's int64 id (a string key's hash, see `seq_id`), in position order."""
        return self._index["seq_id"].copy()

    def length(self, i: int) -> int:
        """The number of target rows of the i-th sequence."""
        return int(self._index["tokens"][self._position(i)])

    def position(self, seq_id: int | str) -> int:
        """The position of `seq_id`; KeyError when the store does not hold it."""
        key = seq_id if isinstance(seq_id, str) else None
        sid = key_id(seq_id) if key is not None else int(seq_id)
        j = int(np.searchsorted(self._sorted, sid))
        if j >= len(self._sorted) or self._sorted[j] != sid:
            raise KeyError(f"seq_id {seq_id!r} is not in the store at {self.root}")
        pos = int(self._order[j])
        if key is not None and self._extra(pos)[0] != key:
            raise KeyError(f"seq_id {seq_id!r} is not in the store at {self.root} (another key "
                           "shares its 64-bit hash)")
        return pos

    def __contains__(self, seq_id: object) -> bool:
        try:
            self.position(seq_id if isinstance(seq_id, str) else int(seq_id))  # type: ignore
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def tokens(self, seq_id: int | str) -> Tensor | None:
        """The token ids stored with the sequence `seq_id` (int64 ``[L]``), or None. Row i of
        its targets is the teacher's distribution over token ``L - T + i``."""
        _, toks = self._extra(self.position(seq_id))
        return None if toks is None else torch.from_numpy(toks)

    def _payload(self, j: int) -> tuple[np.ndarray, str]:
        e = self._index[j]
        shard = int(self._shard[j])
        start, nbytes = int(e["offset"]), int(e["nbytes"])
        payload = self._map(shard)[start:start + nbytes]
        where = f"shard {self._names[shard]}, sequence {int(e['seq_id'])} (position {j})"
        if payload.size != nbytes:
            raise StoreError(f"{where}: truncated payload ({payload.size} of {nbytes} bytes)")
        if self.verify and zlib.crc32(payload) != int(e["crc32"]):
            raise StoreError(f"{where}: checksum mismatch, the payload is corrupt")
        return payload, where

    def _extra(self, j: int) -> tuple[str | None, np.ndarray | None]:
        n = int(self._index["extra"][j])
        if not n:
            return None, None
        payload, where = self._payload(j)
        if n > payload.size:
            raise StoreError(f"{where}: its key/token block overruns the payload")
        try:
            return unpack_extra(payload[payload.size - n:], self.vocab_size, self.k,
                                lambda: self[j][0].numpy())
        except StoreError as exc:
            raise StoreError(f"{where}: {exc}") from None

    # -- data --------------------------------------------------------------------------

    def _position(self, i: int) -> int:
        n = len(self._index)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"a store position must be an int, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"position {i} out of range for a store of {n} sequences")
        return int(i) % n

    def _map(self, shard: int) -> np.memmap | np.ndarray:
        m = self._maps.get(shard)
        if m is None:
            path = self.root / f"{self._names[shard]}.bin"
            if path.stat().st_size == 0:
                m = np.zeros(0, np.uint8)
            else:
                m = np.memmap(path, dtype=np.uint8, mode="r")
            self._maps[shard] = m
        return m

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        j = self._position(i)
        payload, where = self._payload(j)
        tokens, extra = int(self._index["tokens"][j]), int(self._index["extra"][j])
        if extra > payload.size:
            raise StoreError(f"{where}: its key/token block overruns the payload")
        payload = payload[:payload.size - extra]
        k = self.k
        ids = torch.empty((tokens, k), dtype=torch.int32)
        lp = torch.empty((tokens, k), dtype=torch.float32)
        if not _codec.decode_into(self._params, payload, tokens, ids, lp):
            raise StoreError(f"{where}: the payload does not decode (corrupt)")
        return ids, lp

    def get(self, seq_id: int | str) -> tuple[Tensor, Tensor]:
        """The targets of the sequence `seq_id`."""
        return self[self.position(seq_id)]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(len(self)):
            yield self[i]

    def items(self) -> Iterator[tuple[int | str, Tensor, Tensor]]:
        """``(seq_id, indices, logprobs)`` for every sequence, in position order."""
        for i in range(len(self)):
            yield (self.seq_id(i), *self[i])

    def verify_all(self) -> int:
        """Checks every payload's checksum and decoding and every shard's running CRC;
        returns the number of sequences checked (raises StoreError at the first fault)."""
        verify, self.verify = self.verify, True
        try:
            for i in range(len(self)):
                self[i]
        finally:
            self.verify = verify
        self.check_shard_checksums()
        return len(self)

    def check_shard_checksums(self) -> None:
        """Checks each shard's running CRC over its committed bytes (StoreError if not)."""
        for state in self.rank_states:
            for shard in state["shards"]:
                crc, size = 0, int(shard["bytes"])
                with open(self.root / f"{shard['name']}.bin", "rb") as f:
                    while size > 0:
                        block = f.read(min(size, 1 << 24))
                        if not block:
                            break
                        crc = zlib.crc32(block, crc)
                        size -= len(block)
                if crc != int(shard["data_crc32"]):
                    raise StoreError(f"shard {shard['name']}: data checksum mismatch (corrupt)")

    # -- pickling (DataLoader workers) --------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"root": str(self.root), "verify": self.verify}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], verify=state["verify"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return (f"TopKReader({str(self.root)!r}: {len(self)} sequences, V={self.vocab_size}, "
                f"k={self.k}, {self.manifest['value_encoding']}, {self.kind}, "
                f"T={self.temperature})")

