"""The on-disk layout of a target store, shared by the writer, the reader and `inspect`.

A store is a directory::

    manifest.json            format, version, V, k, encoding, kind, temperature, metadata;
                             on close also the joined shard list and totals of every rank
    rank-00000.json          one per writing rank: its shards and what of them is committed
    r00000-00000.bin         a shard's payloads, one per sequence, back to back
    r00000-00000.idx         a shard's index: one 32-byte entry per sequence (INDEX_DTYPE)

A rank file is replaced atomically (temporary file + rename) after the payload and index
bytes it counts have been written, so a writer killed at any instant leaves a store whose
rank files describe only complete sequences; bytes past the committed lengths are partial
appends, cut off when the store is resumed and never read.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "distill_ops.store"
VERSION = 1
MANIFEST = "manifest.json"
ENCODINGS = {"fp16": 0, "bf16": 1, "compact": 2}
KINDS = ("topk", "sampled")

# One index entry per sequence: its id, where its payload lies in the shard's .bin file,
# its number of tokens and the payload's CRC-32.
INDEX_DTYPE = np.dtype([("seq_id", "<i8"), ("offset", "<u8"), ("tokens", "<u4"),
                        ("nbytes", "<u4"), ("crc32", "<u4"), ("reserved", "<u4")])


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
    if m.get("version") != VERSION:
        raise StoreError(f"{path} has format version {m.get('version')}; this distill_ops reads "
                         f"version {VERSION}")
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
