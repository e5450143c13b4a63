r"""Targets from black-box teachers: API and inference-server logprobs into a target store.

Two input formats (JSON Lines, optionally gzip-compressed, one response per line):

- ``openai``: a chat completion object per line, or a Batch API output line whose
  ``response.body`` holds it and whose ``custom_id`` is its key. Per generated token,
  ``choices[0].logprobs.content[i] = {token, logprob, bytes, top_logprobs: [{token,
  logprob, bytes}, ...]}``. The stored tokens are the generated ones; row i of the targets
  is the teacher's distribution at step i: the chosen token and its top alternatives.
- ``vllm``: a completion or chat object whose ``choices[0].prompt_logprobs`` scores given
  text: ``null`` first, then per prompt position ``{"<token_id>": {"logprob", "rank",
  "decoded_token"}, ...}`` (the prompt's own token and the top alternatives), with
  ``prompt_token_ids`` where the server returned them (else each position's first entry is
  its token, as vLLM orders them). The stored tokens are the prompt's; the targets predict
  tokens 1..L-1. Completion-style ``choices[0].logprobs`` with
  ``tokens`` / ``top_logprobs`` (token strings, or ``"token_id:<id>"`` with
  ``return_tokens_as_token_ids``) are read too, as generated tokens.

Tokens map to the student tokenizer's ids exactly, by their bytes (``bytes`` where given,
else the token string's UTF-8, ``<0xNN>`` byte tokens and ``token_id:<id>`` forms
understood), never by re-tokenising text: a byte-level BPE token may be part of a UTF-8
character and its string alone says nothing. A chosen token that cannot be mapped ends the
sequence there (``on_unmappable="cut"``, the default: the prefix before it is kept) or drops
it (``"skip"``); an alternative that cannot be mapped is left out of that row (its mass goes
to the tail bucket of ``sparse_kd_loss``). Both are counted in the report.

Bad input: a line that is not JSON, an error line of the Batch API, or a response without
logprobs is a counted skip (the first few line numbers are reported); more alternatives
than the store's k, an id the tokenizer's vocabulary cannot hold, or a temperature that
differs between lines (where lines carry one) or from the store's is a ValueError naming
the file and line. Keys: ``custom_id``, else the response ``id``, else ``<file>:<line>``.
An ingest killed at any point resumes (``resume=True``) with nothing lost or duplicated: the
store commits whole sequences only and skips keys it already holds.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .token_bytes import ByteVocab, tokenizer_vocab
from .writer import TopKWriter

FORMATS = ("openai", "vllm")

try:  # a faster JSON parser where installed; the standard one otherwise
    import orjson as _orjson

    _loads: Callable[[str | bytes], Any] = _orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads


@dataclass
class IngestReport:
    """What an ingest did: sequences written / already in the store, positions stored, and
    every kind of skip and cut with the first line numbers where it happened."""

    files: int = 0
    lines: int = 0
    written: int = 0
    already_stored: int = 0
    positions: int = 0
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    cut_sequences: int = 0
    cut_positions: int = 0
    unmapped_alternatives: int = 0
    dropped_alternatives: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    k: int = 0
    temperature: float = 1.0
    bytes_per_position: float = 0.0

    def note(self, what: str, where: str) -> None:
        self.skipped[what] = self.skipped.get(what, 0) + 1
        seen = self.examples.setdefault(what, [])
        if len(seen) < 5:
            seen.append(where)

    @property
    def positions_per_second(self) -> float:
        return self.positions / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------------------
# The student tokenizer, as bytes -> id


def _open_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    raw = open(path, "rb")
    with raw:
        head = raw.read(2)
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw) if head == b"\x1f\x8b" else raw
        for n, line in enumerate(io.BufferedReader(stream, 1 << 20), start=1):
            if line.strip():
                yield n, line


@dataclass
class _Seq:
    key: str
    tokens: list[int]
    rows: list[tuple[list[int], list[float]]]  # per row: ids (first: the chosen token), logprobs
    temperature: float | None


def _temperature(*objs: Any) -> float | None:
    for o in objs:
        if isinstance(o, dict) and isinstance(o.get("temperature"), (int, float)):
            return float(o["temperature"])
    return None


def _parse_openai(obj: dict, where: str, vocab: ByteVocab, report: IngestReport,
                  max_alternatives: int | None, on_unmappable: str) -> _Seq | str | None:
    """One line as a sequence, or the reason to skip it (a string)."""
    key = obj.get("custom_id")
    body = obj
    if "response" in obj:  # a Batch API output line
        resp = obj.get("response")
        if not isinstance(resp, dict) or resp.get("status_code", 200) != 200 \
                or not isinstance(resp.get("body"), dict):
            return "batch_error"
        body = resp["body"]
    key = key or body.get("id")
    try:
        content = body["choices"][0]["logprobs"]["content"]
    except (KeyError, IndexError, TypeError):
        return "no_logprobs"
    if not isinstance(content, list) or not content:
        return "no_logprobs"
    tokens: list[int] = []
    rows: list[tuple[list[int], list[float]]] = []
    by_text, lookup = vocab.by_text, vocab.lookup
    def token_id(entry: dict) -> int | None:
        # The fast path: a token whose text is whole UTF-8 is found by its text; partial
        # characters (U+FFFD), "bytes:" and "token_id:" forms go by their bytes or id.
        text = entry.get("token")
        i = by_text.get(text) if text is not None and "\ufffd" not in text else None
        return lookup(text, entry.get("bytes")) if i is None else i

    for pos in content:
        chosen = token_id(pos)
        if chosen is None:
            if on_unmappable == "skip":
                return "unmappable"
            report.cut_sequences += 1
            report.cut_positions += len(content) - len(tokens)
            break
        alts = pos.get("top_logprobs") or ()
        if max_alternatives is not None and len(alts) > max_alternatives:
            raise ValueError(f"{where}: {len(alts)} top_logprobs at token {len(tokens)}, more "
                             f"than the store's k = {max_alternatives}: ingest with a larger "
                             "--k")
        ids, lps = [chosen], [pos["logprob"]]
        for alt in alts:
            i = token_id(alt)
            if i is None:
                report.unmapped_alternatives += 1
                continue
            if i != chosen and i not in ids:
                ids.append(i)
                lps.append(alt["logprob"])
        tokens.append(chosen)
        rows.append((ids, lps))
    if not tokens:
        return "unmappable"
    return _Seq(str(key) if key is not None else where, tokens, rows,
                _temperature(obj, body, obj.get("request") or {}))


def _parse_vllm(obj: dict, where: str, vocab: ByteVocab, report: IngestReport,
                max_alternatives: int | None, on_unmappable: str) -> _Seq | str | None:
    key = obj.get("custom_id")
    body = obj
    if "response" in obj:
        resp = obj.get("response")
        if not isinstance(resp, dict) or not isinstance(resp.get("body"), dict):
            return "batch_error"
        body = resp["body"]
    key = key or body.get("id")
    try:
        choice = body["choices"][0]
    except (KeyError, IndexError, TypeError):
        return "no_logprobs"
    plp = choice.get("prompt_logprobs")
    if plp is None:
        lp = choice.get("logprobs")
        if isinstance(lp, dict) and "content" in lp:  # chat: the OpenAI shape
            return _parse_openai(obj, where, vocab, report, max_alternatives, on_unmappable)
        if isinstance(lp, dict) and "tokens" in lp:
            return _parse_completion_logprobs(lp, key, where, vocab, report, max_alternatives,
                                              on_unmappable, _temperature(obj, body))
        return "no_logprobs"
    ids_given = choice.get("prompt_token_ids") or body.get("prompt_token_ids")
    if not isinstance(plp, list) or len(plp) < 2:
        return "no_logprobs"
    tokens: list[int] = []
    rows: list[tuple[list[int], list[float]]] = []
    for j, pos in enumerate(plp[1:], start=1):
        if not isinstance(pos, dict) or not pos:
            return "no_logprobs"
        entries = [(int(t), e["logprob"], e.get("rank")) for t, e in pos.items()]
        for t, _, _ in entries:
            if not 0 <= t < vocab.size:
                raise ValueError(f"{where}: token id {t} at prompt position {j} does not fit "
                                 f"the tokenizer's vocabulary of {vocab.size} ids")
        # The prompt's own token: from prompt_token_ids, else the position's first entry
        # (vLLM puts the scored token first, then the top ranks).
        actual = int(ids_given[j]) if ids_given is not None else entries[0][0]
        if max_alternatives is not None and len(entries) > max_alternatives + 1:
            raise ValueError(f"{where}: {len(entries)} logprobs at prompt position {j}, more "
                             f"than the store's k + 1 = {max_alternatives + 1} (the scored "
                             "token beside its top k): ingest with a larger --k")
        ids, lps = [actual], []
        chosen_lp = None
        for t, v, _ in entries:
            if t == actual:
                chosen_lp = float(v)
            else:
                ids.append(t)
                lps.append(float(v))
        if chosen_lp is None:
            return "no_logprobs"
        if not tokens:
            first = int(ids_given[0]) if ids_given is not None else None
            tokens.append(first if first is not None else -1)
        tokens.append(actual)
        rows.append((ids, [chosen_lp, *lps]))
    if tokens and tokens[0] < 0:
        tokens = tokens[1:]  # the first prompt token is unknown without prompt_token_ids
    return _Seq(str(key) if key is not None else where, tokens, rows, _temperature(obj, body))


def _parse_completion_logprobs(lp: dict, key: Any, where: str, vocab: ByteVocab,
                               report: IngestReport, max_alternatives: int | None,
                               on_unmappable: str, temperature: float | None
                               ) -> _Seq | str:
    toks, tlps, tops = lp.get("tokens"), lp.get("token_logprobs"), lp.get("top_logprobs")
    if not toks or tlps is None or tops is None:
        return "no_logprobs"
    tokens: list[int] = []
    rows: list[tuple[list[int], list[float]]] = []
    for pos, (tok, tlp, top) in enumerate(zip(toks, tlps, tops, strict=False)):
        chosen = vocab.lookup(tok, None)
        if chosen is None:
            if on_unmappable == "skip":
                return "unmappable"
            report.cut_sequences += 1
            report.cut_positions += len(toks) - pos
            break
        top = top or {}
        if max_alternatives is not None and len(top) > max_alternatives:
            raise ValueError(f"{where}: {len(top)} top_logprobs at token {pos}, more than the "
                             f"store's k = {max_alternatives}: ingest with a larger --k")
        ids, lps = [chosen], [float(tlp)]
        for t, v in top.items():
            i = vocab.lookup(t, None)
            if i is None:
                report.unmapped_alternatives += 1
            elif i not in ids:
                ids.append(i)
                lps.append(float(v))
        tokens.append(chosen)
        rows.append((ids, lps))
    if not tokens:
        return "unmappable"
    return _Seq(str(key) if key is not None else where, tokens, rows, temperature)


_PARSERS = {"openai": _parse_openai, "vllm": _parse_vllm}


def _first_k(line: bytes, format: str) -> int:
    """The default k: the first record's number of alternatives at its first position (the
    chosen token is among them in the usual case; when it is not, the least probable one is
    cut and counted)."""
    try:
        obj = _loads(line)
        body = obj["response"]["body"] if "response" in obj else obj
        choice = body["choices"][0]
        if format == "vllm" and choice.get("prompt_logprobs"):
            first = next(p for p in choice["prompt_logprobs"] if p)
            return max(1, len(first) - 1)
        lp = choice["logprobs"]
        if "content" in lp:
            return max(1, len(lp["content"][0].get("top_logprobs") or [None]))
        return max(1, len(lp["top_logprobs"][0] or {1: None}))
    except (ValueError, KeyError, IndexError, TypeError, StopIteration):
        return 20  # an unreadable first line: OpenAI's largest top_logprobs
_NATIVE_SKIPS = {1: "malformed", 2: "batch_error", 3: "no_logprobs", 4: "unmappable"}


def _openai_result(raw: tuple, where: str, report: IngestReport, k: int) -> _Seq | str:
    """The native scanner's result (csrc/cpu/logprob_scan.cpp) for one line: the same rows
    as _parse_openai gives, without a Python object per alternative."""
    (status, custom_id, rid, temperature, rows, ids, lps, toks, unmapped, dropped, cut,
     most) = raw
    if status:
        return _NATIVE_SKIPS[status]
    if most > k:
        raise ValueError(f"{where}: {most} top_logprobs at a position, more than the store's "
                         f"k = {k}: ingest with a larger --k")
    report.unmapped_alternatives += unmapped
    report.dropped_alternatives += dropped
    if cut:
        report.cut_sequences += 1
        report.cut_positions += cut
    key = custom_id if custom_id is not None else rid
    return _Seq(key if key is not None else where, np.frombuffer(toks, np.int64),
                (np.frombuffer(ids, np.int32).reshape(rows, k),
                 np.frombuffer(lps, np.float32).reshape(rows, k)), temperature)


def _records(paths: Sequence[Path], format: str, vocab: ByteVocab, report: IngestReport,
             k: int | None, on_unmappable: str, bar: Any) -> Iterator[tuple[str, _Seq | str, int]]:
    """(where, sequence or the reason to skip it, k) for every line of every file, in order.
    The openai format is scanned natively, a batch of lines at a time on a thread pool (the
    scanner releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..backends.extension import native

    pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) \
        if format == "openai" else None
    skip = on_unmappable == "skip"
    try:
        for path in paths:
            batch: list[tuple[int, bytes]] = []
            lines = _open_lines(path)
            while True:
                batch.clear()
                for item in lines:
                    batch.append(item)
                    if len(batch) == 64:
                        break
                if not batch:
                    break
                if k is None:
                    k = _first_k(batch[0][1], format)
                report.lines += len(batch)
                if bar is not None:
                    bar.update(len(batch))
                if pool is not None:
                    scan = functools.partial(native().scan_openai, map=vocab.native, k=k,
                                             skip_unmappable=skip)
                    raws = pool.map(scan, [line for _, line in batch])
                    for (n, _), raw in zip(batch, raws, strict=True):
                        where = f"{path.name}:{n}"
                        yield where, _openai_result(raw, where, report, k), k
                    continue
                for n, line in batch:
                    where = f"{path.name}:{n}"
                    try:
                        obj = _loads(line)
                    except ValueError:
                        obj = None
                    seq = _PARSERS[format](obj, where, vocab, report, k, on_unmappable) \
                        if isinstance(obj, dict) else "malformed"
                    yield where, seq, k
    finally:
        if pool is not None:
            pool.shutdown()


def _arrays(seq: _Seq, k: int, report: IngestReport) -> tuple[np.ndarray, np.ndarray]:
    """[T, k] ids / logprobs: each row the chosen token first, then its alternatives in the
    order given (most probable first), cut at k (the cut ones counted)."""
    if isinstance(seq.rows, tuple):  # the native scanner's arrays
        return seq.rows
    t = len(seq.rows)
    ids = np.full((t, k), -1, dtype=np.int32)
    lps = np.full((t, k), -np.inf, dtype=np.float32)
    for r, (i, p) in enumerate(seq.rows):
        if len(i) > k:
            report.dropped_alternatives += len(i) - k
            i, p = i[:k], p[:k]
        ids[r, :len(i)] = i
        lps[r, :len(p)] = p
    return ids, lps


# ----------------------------------------------------------------------------------------
# The entry point


def ingest(files: Iterable[str | os.PathLike[str]], out: str | os.PathLike[str], *,
           format: str, tokenizer: Any, k: int | None = None,
           temperature: float | None = None, value_encoding: str = "compact",
           resume: bool = True, on_unmappable: str = "cut", progress: bool = False,
           metadata: dict[str, Any] | None = None) -> IngestReport:
    """Turns JSONL files of API or inference-server logprobs into a target store.

    Args:
        files: JSONL files (``.gz`` too), read in order.
        out: the store directory (created, or continued when `resume`).
        format: ``"openai"`` or ``"vllm"`` (see the module's docstring for both schemas).
        tokenizer: the student's tokenizer (a directory with tokenizer.json, a
            `tokenizers.Tokenizer` or a transformers tokenizer); the store's vocabulary.
        k: targets per position. Default: an existing store's, else one more than the first
            response's number of alternatives (the chosen token takes a slot).
        temperature: the teacher's sampling temperature (recorded in the manifest, where
            ``sparse_kd_loss``'s ``source_temperature`` reads it). Default: what the lines
            say, else an existing store's, else 1.
        value_encoding: ``"compact"``, ``"fp16"`` or ``"bf16"``.
        on_unmappable: ``"cut"`` (keep the tokens before an unmappable chosen token) or
            ``"skip"`` (drop that sequence).
        progress: show a progress bar (lines).

    Returns:
        an :class:`IngestReport`.

    Example:
        >>> report = ingest(["batch_output.jsonl"], "targets/", format="openai",
        ...                 tokenizer="student/", temperature=0.7)
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if on_unmappable not in ("cut", "skip"):
        raise ValueError(f"on_unmappable must be 'cut' or 'skip', got {on_unmappable!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive int, got {k!r}")
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"no such file: {p}")
    vocab = tokenizer_vocab(tokenizer)
    report = IngestReport(files=len(paths))
    out = Path(out)
    existing = None
    if (out / "manifest.json").exists():
        if not resume:
            raise FileExistsError(f"a target store already exists at {out}: pass resume=True")
        from ._format import read_manifest

        existing = read_manifest(out)
        k = k if k is not None else int(existing["k"])
        if temperature is None:
            temperature = float(existing["temperature"])
    writer: TopKWriter | None = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="ingest", unit=" lines")
    start = time.perf_counter()
    try:
        for where, seq, k_seen in _records(paths, format, vocab, report, k, on_unmappable,
                                           bar):
            k = k_seen
            if isinstance(seq, str):
                report.note(seq, where)
                continue
            if seq.temperature is not None:
                if temperature is None:
                    temperature = seq.temperature
                elif abs(seq.temperature - temperature) > 1e-9:
                    raise ValueError(f"{where}: the teacher's temperature {seq.temperature} "
                                     f"differs from {temperature} (earlier lines, the store "
                                     "or the argument): one store holds one temperature")
            if writer is None:
                # Every target at the head's precision (head = k): an API teacher gives
                # at most ~20 alternatives, and each of them matters.
                writer = TopKWriter(out, vocab_size=vocab.size, k=k,
                                    temperature=temperature or 1.0,
                                    value_encoding=value_encoding, resume=existing is not None,
                                    skip_existing=True, head=k,
                                    metadata=metadata if existing is None else None,
                                    commit_every=64)
            if seq.key in writer:
                report.already_stored += 1
                continue
            ids, lps = _arrays(seq, k, report)
            try:
                writer.append(seq.key, ids, lps, tokens=np.asarray(seq.tokens, dtype=np.int64))
            except ValueError as exc:  # invalid targets: name the line they came from
                raise ValueError(f"{where}: {exc}") from None
            report.written += 1
            report.positions += ids.shape[0]
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - start
    report.k = k or 0
    report.temperature = temperature or 1.0
    if writer is not None and report.positions:
        written = writer.manifest.get("payload_bytes", 0)
        tokens = writer.manifest.get("tokens", 0)
        report.bytes_per_position = written / max(tokens, 1)
    return report


__all__ = ["FORMATS", "ByteVocab", "IngestReport", "ingest", "tokenizer_vocab"]
