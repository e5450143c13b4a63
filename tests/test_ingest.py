"""distill_ops.store.ingest: API and inference-server logprobs into a target store.

Both formats are built here from their documented schemas, over a byte-level BPE tokenizer
trained in the test on text whose multi-byte characters (é, 中, 🙂) split across tokens, so
that tokens are identified by their bytes, never by their text. Checked: every position's
ids and log-probabilities come back (compact: within its 0.02-nat bound), keys and tokens are
kept, the Batch API wrapper, the vLLM prompt_logprobs and token_id forms, temperatures,
every kind of bad line, a killed ingest that resumes, and the size bar (<= 64 bytes a
position at k = 20, V = 151936).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")

from distill_ops.store import TargetDataset, TopKReader, collate_targets  # noqa: E402
from distill_ops.store.ingest import ingest, tokenizer_vocab  # noqa: E402

TEXT = ("Le café est très bon. 中文字符在这里。 Emoji 🙂 and naïve façade. "
        "The quick brown fox jumps over the lazy dog. ") * 20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    out = tmp_path_factory.mktemp("tok")
    tok.save(str(out / "tokenizer.json"))
    return out


def _vocab(tok_dir):
    return tokenizer_vocab(tok_dir)


def _token_entry(vocab, i: int, logprob: float, style: int) -> dict:
    """An OpenAI-style token: text (U+FFFD or "bytes:" for a partial character), bytes."""
    raw = vocab.token_bytes[i]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace") if style % 2 else \
            "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return {"token": text, "logprob": logprob, "bytes": list(raw)}


def _response(vocab, ids: list[int], n_alts: int, rng, key: str | None = None,
              batch: bool = False, temperature: float | None = None) -> tuple[dict, list]:
    """A chat completion with logprobs over the generated `ids`, and the rows it stands for:
    [(ids, logprobs)] with the chosen token first."""
    content, rows = [], []
    usable = [i for i, b in enumerate(vocab.token_bytes) if b is not None]
    for pos, i in enumerate(ids):
        logits = rng.standard_normal(len(usable)) * 3
        lse = float(np.log(np.exp(logits - logits.max()).sum()) + logits.max())
        order = np.argsort(-logits)[:n_alts]
        alts = [(usable[o], float(logits[o] - lse)) for o in order]
        chosen_lp = dict(alts).get(i, float(rng.uniform(-12, -6)))
        content.append({**_token_entry(vocab, i, chosen_lp, pos),
                        "top_logprobs": [_token_entry(vocab, a, lp, pos + 1) for a, lp in alts]})
        row = [(i, chosen_lp), *[(a, lp) for a, lp in alts if a != i]]
        rows.append(row)
    body = {"id": key or f"chatcmpl-{rng.integers(1 << 30)}", "object": "chat.completion",
            "choices": [{"index": 0, "logprobs": {"content": content},
                         "message": {"role": "assistant", "content": "..."}}]}
    if temperature is not None:
        body["temperature"] = temperature
    if batch:
        return {"id": "batch_req", "custom_id": key,
                "response": {"status_code": 200, "body": body}, "error": None}, rows
    return body, rows


def _write(path: Path, lines: list, gz: bool = False) -> Path:
    data = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                   for line in lines)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def _encode_text(tok_dir, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json")).encode(text).ids


def _check_rows(reader: TopKReader, key, rows, tol: float = 0.021):
    ids, lp = reader.get(key)
    assert ids.shape[0] == len(rows)
    for r, want in enumerate(rows):
        got = {int(i): float(v) for i, v in zip(ids[r], lp[r], strict=True) if i >= 0}
        assert set(got) == {i for i, _ in want}, (key, r)
        for i, v in want:
            assert abs(got[i] - v) <= tol, (key, r, i, got[i], v)


def test_multibyte_characters_split_across_tokens_map_by_bytes(tok_dir):
    vocab = _vocab(tok_dir)
    ids = _encode_text(tok_dir, "中文 🙂 café")
    partial = [i for i in ids if _is_partial(vocab.token_bytes[i])]
    assert partial, "the test text must split a character across tokens"
    for i in ids:
        for style in (0, 1):
            e = _token_entry(vocab, i, -1.0, style)
            assert vocab.lookup(e["token"], e["bytes"]) == i


def _is_partial(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@pytest.mark.parametrize("encoding", ["compact", "fp16"])
@pytest.mark.parametrize("batch", [False, True], ids=["chat", "batch-api"])
def test_openai_responses_round_trip_with_keys_and_tokens(tok_dir, tmp_path, encoding, batch):
    vocab = _vocab(tok_dir)
    rng = np.random.default_rng(0)
    texts = ["Le café est très bon.", "中文字符在这里。", "Emoji 🙂 and naïve façade.",
             "The quick brown fox."]
    lines, want = [], {}
    for n, text in enumerate(texts):
        ids = _encode_text(tok_dir, text)
        key = f"req-{n}" if batch else f"chatcmpl-{n}"
        obj, rows = _response(vocab, ids, 5, rng, key=key, batch=batch)
        lines.append(obj)
        want[key] = (ids, rows)
    path = _write(tmp_path / "out.jsonl.gz", lines, gz=True)
    report = ingest([path], tmp_path / "store", format="openai", tokenizer=tok_dir,
                    temperature=0.7, value_encoding=encoding, k=6)
    assert report.written == 4 and not report.skipped and report.unmapped_alternatives == 0
    reader = TopKReader(tmp_path / "store")
    assert reader.temperature == 0.7 and reader.k == 6
    assert sorted(reader.seq_id(i) for i in range(len(reader))) == sorted(want)
    for key, (ids, rows) in want.items():
        assert reader.tokens(key).tolist() == ids
        _check_rows(reader, key, rows, 0.021 if encoding == "compact" else 0.01)


def test_python_and_native_scanners_give_the_same_rows(tok_dir):
    from distill_ops.backends.extension import native
    from distill_ops.store.ingest import IngestReport, _arrays, _openai_result, _parse_openai

    vocab = _vocab(tok_dir)
    rng = np.random.default_rng(1)
    obj, _ = _response(vocab, _encode_text(tok_dir, "naïve 中文 🙂 fox"), 6, rng, key="a",
                       batch=True)
    line = json.dumps(obj).encode()
    r1, r2 = IngestReport(), IngestReport()
    py = _parse_openai(obj, "x", vocab, r1, 6, "cut")
    nat = _openai_result(native().scan_openai(line, vocab.native, 6, False), "x", r2, 6)
    a1, a2 = _arrays(py, 6, r1), _arrays(nat, 6, r2)
    assert np.array_equal(a1[0], a2[0]) and np.allclose(a1[1], a2[1])
    assert list(py.tokens) == list(nat.tokens) and py.key == nat.key == "a"
    assert r1.dropped_alternatives == r2.dropped_alternatives > 0


def test_vllm_prompt_logprobs_with_and_without_prompt_token_ids(tok_dir, tmp_path):
    vocab = _vocab(tok_dir)
    rng = np.random.default_rng(2)
    ids = _encode_text(tok_dir, "Le café 中文 🙂")
    plp, rows = [None], []
    for j in range(1, len(ids)):
        alts = [int(a) for a in rng.choice(vocab.size - 1, 4, replace=False) if a != ids[j]][:3]
        lps = sorted(rng.uniform(-6, -0.1, len(alts) + 1), reverse=True)
        entry = {str(ids[j]): {"logprob": float(lps[-1]), "rank": 9,
                               "decoded_token": "x"}}
        entry.update({str(a): {"logprob": float(v), "rank": r + 1, "decoded_token": "y"}
                      for r, (a, v) in enumerate(zip(alts, lps[:-1], strict=True))})
        plp.append(entry)
        rows.append([(ids[j], float(lps[-1])),
                     *zip(alts, map(float, lps[:-1]), strict=True)])
    with_ids = {"id": "cmpl-1", "choices": [{"prompt_logprobs": plp, "text": ""}],
                "prompt_token_ids": ids}
    without = {"id": "cmpl-2", "choices": [{"prompt_logprobs": plp, "text": ""}]}
    path = _write(tmp_path / "v.jsonl", [with_ids, without])
    report = ingest([path], tmp_path / "store", format="vllm", tokenizer=tok_dir, k=4)
    assert report.written == 2
    reader = TopKReader(tmp_path / "store")
    assert reader.tokens("cmpl-1").tolist() == ids  # the first token too
    assert reader.tokens("cmpl-2").tolist() == ids[1:]  # unknown without prompt_token_ids
    for key in ("cmpl-1", "cmpl-2"):
        _check_rows(reader, key, rows)


def test_token_id_forms_and_out_of_vocabulary_ids(tok_dir, tmp_path):
    vocab = _vocab(tok_dir)
    content = [{"token": f"token_id:{i}", "logprob": -0.5, "bytes": None,
                "top_logprobs": [{"token": f"token_id:{(i + 1) % 250}", "logprob": -1.5,
                                  "bytes": None}]} for i in (5, 17, 42)]
    obj = {"id": "r1", "choices": [{"logprobs": {"content": content}}]}
    path = _write(tmp_path / "t.jsonl", [obj])
    ingest([path], tmp_path / "s1", format="openai", tokenizer=tok_dir, k=2)
    assert TopKReader(tmp_path / "s1").tokens("r1").tolist() == [5, 17, 42]
    bad = {"id": "v", "choices": [{"prompt_logprobs": [None, {str(vocab.size + 5): {
        "logprob": -1.0, "rank": 1}}]}]}
    with pytest.raises(ValueError, match=r"t2\.jsonl:1: token id \d+ .* does not fit"):
        ingest([_write(tmp_path / "t2.jsonl", [bad])], tmp_path / "s2", format="vllm",
               tokenizer=tok_dir, k=2)


def test_bad_lines_are_counted_skips_or_clear_errors(tok_dir, tmp_path):
    vocab = _vocab(tok_dir)
    rng = np.random.default_rng(3)
    good, _ = _response(vocab, _encode_text(tok_dir, "fox"), 3, rng, key="ok", batch=True)
    lines = [
        "{not json",
        {"id": "b", "custom_id": "err", "response": {"status_code": 500, "body": None},
         "error": {"message": "boom"}},
        {"id": "nolp", "choices": [{"message": {"content": "hi"}, "logprobs": None}]},
        good,
        "[1, 2]",
    ]
    report = ingest([_write(tmp_path / "b.jsonl", lines)], tmp_path / "s", format="openai",
                    tokenizer=tok_dir, k=4)
    assert report.written == 1
    assert report.skipped == {"malformed": 2, "batch_error": 1, "no_logprobs": 1}
    assert report.examples["malformed"] == ["b.jsonl:1", "b.jsonl:5"]
    # More alternatives than the store's k: an error naming the line.
    many, _ = _response(vocab, _encode_text(tok_dir, "dog"), 5, rng, key="many")
    with pytest.raises(ValueError, match=r"m\.jsonl:1: 5 top_logprobs .* k = 4"):
        ingest([_write(tmp_path / "m.jsonl", [many])], tmp_path / "s", format="openai",
               tokenizer=tok_dir)


def test_temperatures_recorded_checked_and_applied(tok_dir, tmp_path):
    vocab = _vocab(tok_dir)
    rng = np.random.default_rng(4)
    a, _ = _response(vocab, _encode_text(tok_dir, "fox"), 2, rng, key="a", temperature=0.6)
    b, _ = _response(vocab, _encode_text(tok_dir, "dog"), 2, rng, key="b", temperature=0.6)
    c, _ = _response(vocab, _encode_text(tok_dir, "cat"), 2, rng, key="c", temperature=1.0)
    ingest([_write(tmp_path / "ab.jsonl", [a, b])], tmp_path / "s", format="openai",
           tokenizer=tok_dir, k=3)
    reader = TopKReader(tmp_path / "s")
    assert reader.temperature == 0.6
    with pytest.raises(ValueError, match=r"c\.jsonl:1: the teacher's temperature 1\.0 differs "
                                         r"from 0\.6"):
        ingest([_write(tmp_path / "c.jsonl", [c])], tmp_path / "s", format="openai",
               tokenizer=tok_dir)
    with pytest.raises(ValueError, match=r"temperature 0\.6 differs from 0\.9"):
        ingest([tmp_path / "ab.jsonl"], tmp_path / "s2", format="openai", tokenizer=tok_dir,
               temperature=0.9, k=3)


@pytest.mark.parametrize("policy", ["cut", "skip"])
def test_an_unmappable_token_cuts_or_skips_its_sequence(tok_dir, tmp_path, policy):
    vocab = _vocab(tok_dir)
    rng = np.random.default_rng(5)
    ids = _encode_text(tok_dir, "The quick brown fox")
    obj, _ = _response(vocab, ids, 2, rng, key="u")
    content = obj["choices"][0]["logprobs"]["content"]
    content[3]["token"], content[3]["bytes"] = "\u2603", [0xE2, 0x98, 0x83, 0xFF]  # no id
    content[1]["top_logprobs"][0]["token"] = "zzz-not-a-token"
    content[1]["top_logprobs"][0]["bytes"] = [0xFF, 0xFE]
    report = ingest([_write(tmp_path / "u.jsonl", [obj])], tmp_path / "s", format="openai",
                    tokenizer=tok_dir, k=3, on_unmappable=policy)
    if policy == "skip":
        assert report.written == 0 and report.skipped == {"unmappable": 1}
        return
    assert report.written == 1 and report.cut_sequences == 1
    assert report.cut_positions == len(ids) - 3 and report.unmapped_alternatives == 1
    reader = TopKReader(tmp_path / "s")
    assert reader.tokens("u").tolist() == ids[:3]


def _ingest_cli(files, out, tok_dir, extra=()):
    return [sys.executable, "-m", "distill_ops.cli", "ingest", *map(str, files), "--format",
            "openai", "--tokenizer", str(tok_dir), "--out", str(out), "--k", "4",
            "--no-progress", *extra]


def test_cli_reports_and_a_killed_ingest_resumes_without_loss_or_duplicates(tok_dir, tmp_path):
    vocab = _vocab(tok_dir)
    rng = np.random.default_rng(6)
    ids = _encode_text(tok_dir, TEXT[:400])
    lines, want = [], {}
    for n in range(400):
        obj, rows = _response(vocab, ids[:60], 3, rng, key=f"k{n}", batch=True)
        lines.append(obj)
        want[f"k{n}"] = rows
    path = _write(tmp_path / "big.jsonl", lines)
    out = tmp_path / "store"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(_ingest_cli([path], out, tok_dir), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:  # kill it once some sequences are committed
        rank_file = out / "rank-00000.json"
        if rank_file.exists() and json.loads(rank_file.read_text())["shards"][0]["sequences"]:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(_ingest_cli([path], out, tok_dir), env=env, capture_output=True,
                          text=True, check=True)
    assert "already stored" in done.stdout
    reader = TopKReader(out)
    keys = [reader.seq_id(i) for i in range(len(reader))]
    assert sorted(keys) == sorted(want) and len(set(keys)) == len(keys)
    for key in ("k0", "k199", "k399"):
        _check_rows(reader, key, want[key])
    reader.verify_all()


def test_compact_store_holds_20_targets_in_at_most_64_bytes_a_position(tmp_path):
    """The size bar: k = 20, V = 151936, compact, tokens and string keys included, on a
    teacher whose top-20 spans several nats (Gaussian logits, spread 2.5)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    v = 151936
    words = {f"t{i}x": i for i in range(v)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="t0x"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    rng = np.random.default_rng(7)
    lines = []
    for n in range(40):
        content = []
        for _ in range(50):
            logits = rng.standard_normal(3000) * 2.5
            cand = rng.choice(v, 3000, replace=False)
            lse = float(np.log(np.exp(logits - logits.max()).sum()) + logits.max())
            order = np.argsort(-logits)[:20]
            top = [{"token": f"t{cand[o]}x", "logprob": float(logits[o] - lse),
                    "bytes": list(f"t{cand[o]}x".encode())} for o in order]
            pick = order[int(rng.integers(0, 4))]
            content.append({"token": f"t{cand[pick]}x", "logprob": float(logits[pick] - lse),
                            "bytes": list(f"t{cand[pick]}x".encode()), "top_logprobs": top})
        lines.append({"custom_id": f"request-{n:06d}", "response": {"status_code": 200, "body": {
            "id": f"c{n}", "choices": [{"logprobs": {"content": content}}]}}})
    report = ingest([_write(tmp_path / "z.jsonl", lines)], tmp_path / "s", format="openai",
                    tokenizer=tmp_path / "tokenizer.json", k=20)
    assert report.positions == 2000 and report.dropped_alternatives == 0
    assert report.bytes_per_position <= 64, report.bytes_per_position


def test_target_dataset_aligns_ingested_tokens_after_a_prompt(tok_dir, tmp_path):
    vocab = _vocab(tok_dir)
    rng = np.random.default_rng(8)
    ids = _encode_text(tok_dir, "café 中文")
    obj, rows = _response(vocab, ids, 2, rng, key="p1", batch=True)
    ingest([_write(tmp_path / "p.jsonl", [obj])], tmp_path / "s", format="openai",
           tokenizer=tok_dir, k=3, value_encoding="fp16")
    prompt = [7, 8, 9]
    ds = TargetDataset(tmp_path / "s", base=[{"custom_id": "p1", "prompt_ids": prompt}],
                       id_key="custom_id", prompt_key="prompt_ids")
    item = ds[0]
    assert item["input_ids"].tolist() == prompt + ids
    assert item["labels"].tolist() == [-100] * 3 + ids
    idx, lp = item["teacher_indices"], item["teacher_logprobs"]
    for r, row in enumerate(rows):  # position 2 + r predicts token 3 + r
        assert idx[2 + r, 0].item() == row[0][0] == ids[r]
    assert (idx[:2] == -1).all() and (idx[-1] == -1).all() and math.isinf(lp[-1, 0].item())
    batch = collate_targets([item, item])
    assert batch["teacher_indices"].shape == (2, len(prompt) + len(ids), 3)


def test_distill_trainer_trains_on_an_ingested_store(tok_dir, tmp_path):
    """The R1-distill recipe plus logit KD in one fused loss: cross-entropy on the generated
    tokens (hard_weight) and the sparse KD with the tail bucket on their top-k, re-tempered
    from the store's recorded temperature."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from distill_ops.integrations.hf import DistillTrainer

    vocab = _vocab(tok_dir)
    rng = np.random.default_rng(9)
    lines, base = [], []
    for n, text in enumerate(["café au lait", "中文字符", "quick fox 🙂", "naïve"]):
        obj, _ = _response(vocab, _encode_text(tok_dir, text), 4, rng, key=f"q{n}", batch=True)
        lines.append(obj)
        base.append({"custom_id": f"q{n}", "prompt_ids": _encode_text(tok_dir, "Say:")})
    ingest([_write(tmp_path / "r.jsonl", lines)], tmp_path / "s", format="openai",
           tokenizer=tok_dir, k=5, temperature=0.8)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab.size, hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64))
    ds = TargetDataset(tmp_path / "s", base=base, id_key="custom_id", prompt_key="prompt_ids")
    args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2,
                             max_steps=4, learning_rate=5e-3, report_to=[], use_cpu=True,
                             remove_unused_columns=False, logging_steps=1, save_strategy="no")
    trainer = DistillTrainer(model=model, args=args, train_dataset=ds,
                             data_collator=lambda b: {k: v for k, v in collate_targets(
                                 [{k: v for k, v in x.items() if k not in ("custom_id",
                                                                          "prompt_ids")}
                                  for x in b]).items()},
                             store=tmp_path / "s",
                             distill={"tail": "bucket", "temperature": 1.0, "hard_weight": 0.5})
    assert trainer.distill["source_temperature"] == 0.8
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


def test_api_teacher_example_learns_from_an_ingested_store(tmp_path):
    from helpers import load_example

    out = load_example("api_teacher_distill").main(str(tmp_path), steps=12, n_prompts=8)
    assert out["report"].written == 8 and out["report"].skipped == {}
    losses = out["losses"]
    assert losses[-1] < 0.8 * losses[0], losses


def test_ingest_benchmark_reports_rate_and_size():
    from distill_ops.bench.ingest import format_ingest_table, run_ingest_bench

    r = run_ingest_bench(lines=3, positions=5, k=4, vocab=1000, reps=1)
    assert r["positions"] == 15 and r["positions_per_s"] > 0 and r["bytes_per_position"] > 0
    assert "| 15 |" in format_ingest_table(r)
