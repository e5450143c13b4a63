"""The on-disk layout of a target store, shared by the writer, the reader and `inspect`.

A store is a directory::

    manifest.json            format, version, V, k, encoding, kind, temperature, metadata;
                             on close also the joined shard list and totals of every rank
    rank-00000.json          one per writing rank: its shards and what of them is committed
    r00000-00000.bin         a shard's payloads, one per sequence, back to back
    r00000-00000.idx         a shard's index: one 32-byte entry per sequence (INDEX_DTYPE)

A sequence's payload is its encoded targets, followed (version 2) by an optional extra
block of `extra` bytes: the sequence's string key and/or its token ids (see pack_extra).

A rank file is replaced atomically (temporary file + rename) after the payload and index
bytes it counts have been written, so a writer killed at any instant leaves a store whose
rank files describe only complete sequences; bytes past the committed lengths are partial
appends, cut off when the store is resumed and never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "distill_ops.store"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no extra blocks (its index field was always 0)
MANIFEST = "manifest.json"
ENCODINGS = {"fp16": 0, "bf16": 1, "compact": 2}
KINDS = ("topk", "sampled")

# One index entry per sequence: its id, where its payload lies in the shard's .bin file,
# its number of target rows, the payload's size and CRC-32 (extra block included) and the
# size of the extra block at the payload's end.
INDEX_DTYPE = np.dtype([("seq_id", "<i8"), ("offset", "<u8"), ("tokens", "<u4"),
                        ("nbytes", "<u4"), ("crc32", "<u4"), ("extra", "<u4")])
_NO_TOKENS = 0xFFFFFFFF


def key_id(key: str) -> int:
    """The int64 id a string key is indexed by: the first 8 bytes of its BLAKE2b digest. The
    key itself is stored with the sequence and checked on every lookup."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def token_width(vocab: int) -> int:
    """Bytes per stored token id: 2 up to 65536 ids, 3 up to 2^24, else 4."""
    return 2 if vocab <= 1 << 16 else (3 if vocab <= 1 << 24 else 4)


def _pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Unsigned `values` at `bits` bits each, LSB first (bits <= 32)."""
    if bits == 0 or values.size == 0:
        return b""
    shifts = np.arange(bits, dtype=np.uint64)
    flat = ((values.astype(np.uint64)[:, None] >> shifts) & 1).astype(np.uint8).ravel()
    return np.packbits(flat, bitorder="little").tobytes()


def _unpack_bits(buf: bytes, count: int, bits: int) -> np.ndarray:
    if bits == 0 or count == 0:
        return np.zeros(count, np.int64)
    need = (count * bits + 7) // 8
    if len(buf) < need:
        raise ValueError("bit field overruns its block")
    flat = np.unpackbits(np.frombuffer(buf, np.uint8, count=need), bitorder="little")
    weights = np.uint64(1) << np.arange(bits, dtype=np.uint64)
    return (flat[:count * bits].reshape(count, bits).astype(np.uint64) * weights).sum(1) \
        .astype(np.int64)


def slot_bits(k: int) -> int:
    return max(0, int(k - 1).bit_length())


def pack_extra(key: str | None, tokens: np.ndarray | None, vocab: int,
               slots: np.ndarray | None = None, k: int = 0) -> bytes:
    """The extra block: u32 key length and the key (UTF-8); u32 token count L (all ones:
    none); then a mode byte. Mode 0: the L ids at token_width(vocab) bytes each. Mode 1 (the
    tokens the targets predict are among them): u32 P, the first P ids as in mode 0, then for
    each of the L - P others its slot in its target row as decoded, at slot_bits(k) bits
    (about 5 bits a token at k = 20 instead of 18). Empty when there is neither."""
    if key is None and tokens is None:
        return b""
    kb = b"" if key is None else key.encode("utf-8")
    head = struct.pack("<I", len(kb)) + kb
    if tokens is None:
        return head + struct.pack("<I", _NO_TOKENS)
    w = token_width(vocab)

    def explicit(t: np.ndarray) -> bytes:
        return np.ascontiguousarray(t, dtype="<u4").view(np.uint8).reshape(-1, 4)[:, :w].tobytes()

    head += struct.pack("<I", len(tokens))
    if slots is None:
        return head + b"\x00" + explicit(tokens)
    prefix = len(tokens) - len(slots)
    return (head + b"\x01" + struct.pack("<I", prefix) + explicit(tokens[:prefix])
            + _pack_bits(np.asarray(slots), slot_bits(k)))


def unpack_extra(block: np.ndarray | bytes, vocab: int, k: int = 0,
                 ids: Callable[[], np.ndarray] | None = None
                 ) -> tuple[str | None, np.ndarray | None]:
    """(key or None, token ids int64 or None) of an extra block (StoreError if malformed).
    `ids` gives the sequence's decoded target ids [T, k], needed by slot-coded tokens."""
    buf = bytes(block)
    if not buf:
        return None, None
    w = token_width(vocab)

    def explicit(at: int, count: int) -> np.ndarray:
        body = np.frombuffer(buf, np.uint8, count=count * w, offset=at)
        full = np.zeros((count, 4), np.uint8)
        full[:, :w] = body.reshape(count, w)
        return full.view("<u4")[:, 0].astype(np.int64)

    try:
        (n,) = struct.unpack_from("<I", buf, 0)
        key = buf[4:4 + n].decode("utf-8") if n else None
        (t,) = struct.unpack_from("<I", buf, 4 + n)
        at = 8 + n
        if t == _NO_TOKENS:
            if len(buf) != at:
                raise ValueError("trailing bytes")
            return key, None
        mode = buf[at]
        at += 1
        if mode == 0:
            if len(buf) != at + t * w:
                raise ValueError("length mismatch")
            return key, explicit(at, t)
        if mode != 1 or ids is None:
            raise ValueError(f"unknown token mode {mode}")
        (prefix,) = struct.unpack_from("<I", buf, at)
        at += 4
        if prefix > t:
            raise ValueError("prefix longer than the tokens")
        head = explicit(at, prefix)
        at += prefix * w
        bits = slot_bits(k)
        if len(buf) != at + ((t - prefix) * bits + 7) // 8:
            raise ValueError("length mismatch")
        slots = _unpack_bits(buf[at:], t - prefix, bits)
        rows = ids()
        if rows.shape[0] != t - prefix or (slots.size and slots.max() >= rows.shape[1]):
            raise ValueError("slots do not fit the targets")
        tail = rows[np.arange(t - prefix), slots].astype(np.int64)
        if tail.size and tail.min() < 0:
            raise ValueError("a slot points at padding")
        return key, np.concatenate([head, tail])
    except (struct.error, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise StoreError(f"malformed key/token block: {exc}") from exc


class StoreError(ValueError):
    """A store on disk that cannot be read as it is: corrupt, truncated or inconsistent."""


def rank_file(root: Path, rank: int) -> Path:
    return root / f"rank-{rank:05d}.json"


def shard_name(rank: int, number: int) -> str:
    return f"r{rank:05d}-{number:05d}"


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read the {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise StoreError(f"the {what} {path} is not a JSON object")
    return data


def write_json_atomic(path: Path, data: dict[str, Any], fsync: bool = False) -> None:
    """Replaces `path` by `data` in one rename: a reader sees the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no target store at {root}: {MANIFEST} is missing")
    m = read_json(path, "manifest")
    if m.get("format") != FORMAT:
        raise StoreError(f"{path} is not a distill_ops store manifest (format={m.get('format')!r})")
    if m.get("version") not in READABLE_VERSIONS:
        raise StoreError(f"{path} has format version {m.get('version')}; this distill_ops reads "
                         f"versions {READABLE_VERSIONS}")
    return m


def rank_files(root: Path) -> list[Path]:
    return sorted(root.glob("rank-*.json"))


def read_index(root: Path, shard: dict[str, Any]) -> np.ndarray:
    """The committed index entries of a shard, checked against the rank file's CRC."""
    name, count = shard["name"], int(shard["sequences"])
    idx_path, bin_path = root / f"{name}.idx", root / f"{name}.bin"
    need = count * INDEX_DTYPE.itemsize
    have = idx_path.stat().st_size if idx_path.exists() else -1
    if have < need:
        raise StoreError(f"shard {name} is truncated: its index {idx_path.name} has "
                         f"{max(have, 0)} bytes, the store committed {need} ({count} sequences)"
                         + ("" if have >= 0 else " (missing)"))
    with open(idx_path, "rb") as f:
        raw = f.read(need)
    if zlib.crc32(raw) != int(shard["index_crc32"]):
        raise StoreError(f"shard {name}: the index {idx_path.name} fails its checksum (corrupt)")
    entries = np.frombuffer(raw, dtype=INDEX_DTYPE)
    ends = entries["offset"].astype(np.int64) + entries["nbytes"]
    size = bin_path.stat().st_size if bin_path.exists() else -1
    if size < int(shard["bytes"]):
        first = int(np.argmax(ends > size))
        raise StoreError(f"shard {name} is truncated: {bin_path.name} has {max(size, 0)} bytes, "
                         f"the store committed {int(shard['bytes'])}; sequence "
                         f"{int(entries['seq_id'][first])} (and any after it) is cut off"
                         + ("" if size >= 0 else " (missing)"))
    if count and (ends.max() > int(shard["bytes"])
                  or np.any(entries["offset"][1:] != ends[:-1]) or entries["offset"][0] != 0):
        raise StoreError(f"shard {name}: the index {idx_path.name} is inconsistent with its data")
    return entries
