"""`distill-ops extract` / `inspect` on a tiny teacher saved to disk (built from a config, no
download), with a word-level tokenizer built in the test."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import distill_ops
from distill_ops.cli import main
from distill_ops.store import TopKReader
from distill_ops.store.extract import inspect_store, read_sequences

VOCAB = 96
WORDS = [f"w{i}" for i in range(VOCAB - 2)]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.lm_head.weight.data *= 20  # a peaked teacher: top-k holds most of the mass
    model.save_pretrained(path)
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                            pad_token="[PAD]").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(1)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
             for n in torch.randint(3, 20, (7,), generator=g)]
    (path / "a.txt").write_text("\n".join(lines[:4]) + "\n\n")
    with open(path / "b.jsonl", "w") as f:
        for line in lines[4:]:
            f.write(json.dumps({"text": line}) + "\n")
        f.write(json.dumps({"input_ids": [5, 6, 7, 8, 9], "id": 1000}) + "\n")
    return [str(path / "a.txt"), str(path / "b.jsonl")]


def _teacher_topk(teacher_dir, ids, k, temperature):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, local_files_only=True).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return distill_ops.topk_logprobs(logits, k, temperature=temperature)


def test_extract_topk_matches_the_teacher_and_resumes(tmp_path, teacher_dir, data_files, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "store"
    argv = ["extract", "--teacher", str(teacher_dir), "--data", *data_files, "--out", str(out),
            "--k", "8", "--temperature", "2.0", "--encoding", "fp16", "--batch-size", "3",
            "--no-progress"]
    assert main(argv) == 0
    assert "wrote 8 sequences" in capsys.readouterr().out
    reader = TopKReader(out)
    assert sorted(reader.seq_ids().tolist()) == [0, 1, 2, 3, 4, 5, 6, 1000]
    tok = AutoTokenizer.from_pretrained(teacher_dir, local_files_only=True)
    seqs = dict(read_sequences(data_files, tok))
    for sid in (0, 5, 1000):
        ids, lp = reader.get(sid)
        ref = _teacher_topk(teacher_dir, seqs[sid], 8, 2.0)
        assert torch.equal(ids, ref.indices)
        torch.testing.assert_close(lp, ref.logprobs.half().float(), rtol=0, atol=2e-3)
    assert main(argv) == 0  # resumed: everything is there already
    text = capsys.readouterr().out
    assert "wrote 0 sequences" in text and "skipped 8 already stored" in text
    assert len(TopKReader(out)) == 8

    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sequences"] == 8 and info["checksums_verified"] == 8
    assert info["tokens"] == sum(len(v) for v in seqs.values())
    assert info["bytes_per_token"] < 8 * (7 + 16) / 8 + 32
    assert 0 < info["mean_mass_covered"] <= 1 + 1e-6
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bytes/token" in text and "8 sequences verified" in text


def test_extract_sampled_split_over_two_ranks(tmp_path, teacher_dir, data_files):
    from distill_ops.store.extract import extract

    out = tmp_path / "store"
    for rank in (0, 1):  # what torchrun's two processes do, one after the other
        counts = extract(teacher_dir, data_files, out, sample=16, temperature=1.0,
                         rank=rank, world_size=2, progress=False, value_encoding="compact")
        assert counts["written"] == 4
    reader = TopKReader(out)
    assert reader.kind == "sampled" and reader.k == 16 and len(reader) == 8
    info = inspect_store(out)
    assert info["ranks"] == 2
    for _, lp in reader:
        torch.testing.assert_close(torch.exp(lp.double()).sum(-1),
                                   torch.ones(lp.shape[0], dtype=torch.float64), atol=0.1,
                                   rtol=0)
    # The same seeds draw the same targets on a rerun into a fresh store.
    extract(teacher_dir, data_files, tmp_path / "again", sample=16, progress=False)
    a, b = TopKReader(out), TopKReader(tmp_path / "again")
    for sid in (0, 3, 1000):
        assert torch.equal(a.get(sid)[0], b.get(sid)[0])


def test_read_sequences_errors(tmp_path):
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match="unknown format"):
        list(read_sequences([tmp_path / "x.csv"]))
    (tmp_path / "t.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        list(read_sequences([tmp_path / "t.txt"]))
    (tmp_path / "j.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match="neither 'input_ids' nor 'text'"):
        list(read_sequences([tmp_path / "j.jsonl"]))
    import numpy as np

    np.save(tmp_path / "p.npy", np.arange(12).reshape(3, 4))
    assert list(read_sequences([tmp_path / "p.npy"], max_length=2)) == [
        (0, [0, 1]), (1, [4, 5]), (2, [8, 9])]
