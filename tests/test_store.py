"""The target store: round trips, bit packing, compact sizes and errors, crash safety,
corruption, distributed writing, datasets."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import distill_ops
from distill_ops.store import (
    StoreError,
    TargetDataset,
    TopKReader,
    TopKWriter,
    collate_targets,
    pad_targets,
)

ENCODINGS = ["fp16", "bf16", "compact"]


def lm_logits(t: int, v: int, spread: float = 2.0) -> torch.Tensor:
    """Teacher-like logits: a Gaussian body and a few strongly preferred tokens per row."""
    x = torch.randn(t, v) * spread
    boost = torch.randint(0, v, (t, min(8, v)))
    x[torch.arange(t)[:, None], boost] += torch.rand(t, boost.shape[1]) * 12
    return x


def targets(kind: str, t: int, v: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = lm_logits(t, v)
    if kind == "topk":
        top = distill_ops.topk_logprobs(x, k)
        return top.indices, top.logprobs
    s = distill_ops.sample_targets(x, k)  # unique ids, -1 padding, log(count / k)
    return s.indices, s.logprobs


def as_logprobs(x):
    """Random values made log-probabilities of one distribution: each row shifted to hold 95%
    of the mass (the store refuses a mass above 1), numpy or torch alike."""
    if isinstance(x, np.ndarray):
        return (x - np.logaddexp.reduce(x, axis=1, keepdims=True) + np.log(0.95)).astype(
            x.dtype)
    return x - torch.logsumexp(x, dim=1, keepdim=True) + math.log(0.95)


def by_id(ids: torch.Tensor, lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's valid entries sorted by id (pads, -1, first)."""
    order = torch.argsort(ids.long(), dim=1)
    return ids.gather(1, order), lp.gather(1, order)


def check_values(enc: str, orig: torch.Tensor, got: torch.Tensor, head: int = 16) -> None:
    """got (decoded) vs orig, both id-sorted, per encoding's promise."""
    if enc == "fp16":
        assert torch.equal(got, orig.half().float())
    elif enc == "bf16":
        assert torch.equal(got, orig.bfloat16().float())
    else:
        neg = orig == float("-inf")
        assert torch.equal(got == float("-inf"), neg)
        rank = torch.argsort(torch.argsort(-orig, dim=1, stable=True), dim=1)
        err = (got - orig).abs().masked_fill(neg, 0)
        assert torch.all(err[rank < head] <= 0.02)
        assert torch.all(err <= 0.1)


@pytest.mark.parametrize("kind", ["topk", "sampled"])
@pytest.mark.parametrize("enc", ENCODINGS)
def test_round_trip(tmp_path, seed, enc, kind):
    v, k = 1000, 24
    data = {}
    with TopKWriter(tmp_path, vocab_size=v, k=k, temperature=2.0, value_encoding=enc,
                    kind=kind, metadata={"teacher": "test"}) as w:
        for s, t in [(7, 33), (3, 1), (100, 0), (2**40, 65)]:
            ids, lp = targets(kind, t, v, k)
            data[s] = (ids, lp)
            assert w.append(s, ids, lp)
    r = TopKReader(tmp_path)
    assert len(r) == 4 and r.num_tokens == 99 and r.kind == kind and r.temperature == 2.0
    assert r.manifest["metadata"] == {"teacher": "test"}
    assert [r.seq_id(i) for i in range(4)] == [7, 3, 100, 2**40]
    for s, (ids, lp) in data.items():
        got_i, got_lp = r.get(s)
        assert got_i.dtype == torch.int32 and got_lp.dtype == torch.float32
        assert got_i.shape == ids.shape
        if enc != "compact":  # stored order
            assert torch.equal(got_i, ids.int())
            check_values(enc, lp.masked_fill(ids < 0, float("-inf")), got_lp)
        else:  # ascending ids, pads last
            oi, olp = by_id(ids, lp)
            gi, glp = by_id(got_i, got_lp)
            assert torch.equal(gi, oi.int())
            check_values(enc, olp.masked_fill(oi < 0, float("-inf")), glp)
            valid = got_i >= 0
            assert torch.all(valid[:, :-1] >= valid[:, 1:])  # pads after the valid ids
            ids_v = got_i.masked_fill(~valid, 2**31 - 1).long()
            assert torch.all(ids_v[:, 1:] >= ids_v[:, :-1])
    assert [s for s, *_ in r.items()] == [7, 3, 100, 2**40]


@pytest.mark.parametrize("enc", ENCODINGS)
@pytest.mark.parametrize("bits", [1, 8, 17])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_bit_packing_at_powers_of_two(tmp_path, seed, enc, bits, delta):
    v = max(2**bits + delta, 2)
    k = min(v, 5)
    t = 40
    ids = torch.stack([torch.randperm(v)[:k] for _ in range(t)]).int()
    ids[0, 0] = v - 1  # both ends of the range
    ids[0, 1:] = torch.arange(k - 1)
    lp = as_logprobs(torch.randn(t, k).abs().neg() * 3)
    with TopKWriter(tmp_path, vocab_size=v, k=k, temperature=1.0, value_encoding=enc) as w:
        w.append(0, ids, lp)
    r = TopKReader(tmp_path)
    gi, glp = r[0]
    oi, olp = by_id(ids, lp)
    assert torch.equal(by_id(gi, glp)[0], oi)
    id_bits = max(1, (v - 1).bit_length())
    assert id_bits == distill_ops.backends.extension.native().store_id_bits(v)
    nbytes = r.manifest["payload_bytes"]
    if enc != "compact":
        assert nbytes == 1 + (t * k * (id_bits + 16) + 7) // 8
        assert torch.equal(gi, ids)
        check_values(enc, lp, glp)
    else:
        check_values(enc, olp, by_id(gi, glp)[1])


def zipf_logits(t: int, v: int, a: float) -> torch.Tensor:
    """Logits whose sorted values fall as -a log(rank) (a heavy-tailed teacher), shuffled."""
    base = -a * torch.log(torch.arange(1, v + 1, dtype=torch.float32))
    return torch.stack([base[torch.randperm(v)] for _ in range(t)]) + torch.randn(t, v) * 0.5


@pytest.mark.parametrize(("kind", "param"), [("gauss", 2.0), ("gauss", 3.0), ("zipf", 1.2),
                                             ("zipf", 2.0)])
def test_compact_size_and_errors_at_k128_qwen_vocab(tmp_path, seed, kind, param):
    """The issue's bar: k=128 top-k, V=151936, compact: <= 300 bytes/token, exact ids,
    |error| <= 0.02 nats on the top 16 and <= 0.1 on the rest; on Gaussian teachers and on
    Zipf-like ones whose top-128 tail spans up to ~4 nats."""
    v, k, t = 151936, 128, 96
    x = lm_logits(t, v, param) if kind == "gauss" else zipf_logits(t, v, param)
    top = distill_ops.topk_logprobs(x, k)
    with TopKWriter(tmp_path, vocab_size=v, k=k, temperature=1.0,
                    value_encoding="compact") as w:
        w.append(0, top.indices, top.logprobs)
    r = TopKReader(tmp_path)
    per_token = r.manifest["payload_bytes"] / t
    assert per_token <= 300, per_token
    gi, glp = by_id(*r[0])
    oi, olp = by_id(top.indices, top.logprobs)
    assert torch.equal(gi, oi)
    check_values("compact", olp, glp)
    stats = json.loads((tmp_path / "rank-00000.json").read_text())["stats"]
    assert stats["max_err_head"] <= 0.02 and stats["max_err_tail"] <= 0.1


def test_compact_extremes(tmp_path, seed):
    """-inf targets, constant rows, huge ranges (raw float32 fallback), one-id vocabularies."""
    v, k = 300, 20
    lp = as_logprobs(torch.randn(6, k) * 3 - 5)
    lp[0, 5:] = float("-inf")                 # head finite, tail all -inf
    lp[1, :] = float("-inf")                  # everything -inf
    lp[2, :] = -3.0                           # constant
    lp[3, 10] = -1e30                         # range far too wide to quantise
    lp[4, ::3] = float("-inf")                # mixed classes
    lp[5] = torch.linspace(-1e-3, -4e4, k)    # extreme but quantisable
    ids = torch.stack([torch.randperm(v)[:k] for _ in range(6)])
    with TopKWriter(tmp_path / "a", vocab_size=v, k=k, temperature=1.0,
                    value_encoding="compact") as w:
        w.append(1, ids, lp)
    gi, glp = by_id(*TopKReader(tmp_path / "a")[0])
    oi, olp = by_id(ids, lp)
    assert torch.equal(gi, oi.int())
    check_values("compact", olp, glp)
    assert glp[3].min() == -1e30
    with TopKWriter(tmp_path / "b", vocab_size=1, k=1, temperature=1.0,
                    value_encoding="compact") as w:
        w.append(0, torch.zeros(3, 1, dtype=torch.int64), torch.zeros(3, 1))
    gi, glp = TopKReader(tmp_path / "b")[0]
    assert torch.equal(gi, torch.zeros(3, 1, dtype=torch.int32))
    assert torch.equal(glp, torch.zeros(3, 1))


def test_sparse_loss_from_the_store_matches_the_targets(tmp_path, seed):
    v, k, t = 512, 32, 40
    x, s = lm_logits(t, v), torch.randn(t, v, requires_grad=True)
    top = distill_ops.topk_logprobs(x, k, temperature=2.0)
    with TopKWriter(tmp_path, vocab_size=v, k=k, temperature=2.0, value_encoding="fp16") as w:
        w.append(0, top.indices, top.logprobs)
    ids, lp = TopKReader(tmp_path)[0]
    a = distill_ops.sparse_kd_loss(s, ids, lp, temperature=2.0)
    b = distill_ops.sparse_kd_loss(s, top.indices, top.logprobs.half().float(), temperature=2.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_duplicates_and_settings(tmp_path, seed):
    ids, lp = targets("topk", 5, 100, 4)
    opts = dict(vocab_size=100, k=4, temperature=1.0)
    with TopKWriter(tmp_path, **opts) as w:
        w.append(1, ids, lp)
        with pytest.raises(ValueError, match="seq_id 1 is already in the store"):
            w.append(1, ids, lp)
    with pytest.raises(FileExistsError, match="resume=True"):
        TopKWriter(tmp_path, **opts)
    with pytest.raises(ValueError, match="k: store has 4, writer asked for 5"):
        TopKWriter(tmp_path, **dict(opts, k=5), resume=True)
    with pytest.raises(ValueError, match="temperature"):
        TopKWriter(tmp_path, **dict(opts, temperature=2.0), resume=True)
    with TopKWriter(tmp_path, **opts, resume=True, skip_existing=True) as w:
        assert w.seq_ids == {1}
        assert not w.append(1, ids, lp)
        assert w.append(2, ids, lp)
    r = TopKReader(tmp_path)
    assert r.seq_ids().tolist() == [1, 2] and r.manifest["sequences"] == 2
    with pytest.raises(KeyError, match="seq_id 3"):
        r.get(3)
    assert 2 in r and 3 not in r


def test_shard_rotation(tmp_path, seed):
    with TopKWriter(tmp_path, vocab_size=50, k=3, temperature=1.0, shard_bytes=200) as w:
        for s in range(12):
            w.append(s, *targets("topk", 9, 50, 3))
    assert len(list(tmp_path.glob("*.bin"))) > 3
    r = TopKReader(tmp_path)
    assert r.seq_ids().tolist() == list(range(12))
    assert r.verify_all() == 12


def test_bad_appends(tmp_path):
    with TopKWriter(tmp_path, vocab_size=10, k=3, temperature=1.0) as w:
        ok_i, ok_lp = torch.tensor([[0, 1, 2]]), torch.full((1, 3), -1.5)
        with pytest.raises(ValueError, match=r"shape \[T, k=3\]"):
            w.append(0, ok_i[:, :2], ok_lp[:, :2])
        with pytest.raises(ValueError, match="shape of indices"):
            w.append(0, ok_i, ok_lp[:, :2])
        with pytest.raises(ValueError, match=r"\[0, vocab_size=10\)"):
            w.append(0, torch.tensor([[0, 1, 10]]), ok_lp)
        with pytest.raises(ValueError, match="padding"):
            w.append(0, torch.tensor([[0, -1, 2]]), ok_lp)
        with pytest.raises(ValueError, match="repeats id 1"):
            w.append(0, torch.tensor([[1, 1, 2]]), ok_lp)
        with pytest.raises(ValueError, match="NaN"):
            w.append(0, ok_i, torch.tensor([[-1.0, float("nan"), -2.0]]))
        with pytest.raises(TypeError, match="seq_id must be an int or a str"):
            w.append(1.5, ok_i, ok_lp)
        with pytest.raises(ValueError, match="at least the 1 tokens"):
            w.append("a", ok_i, ok_lp, tokens=torch.tensor([], dtype=torch.long))
        with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=10\)"):
            w.append("a", ok_i, ok_lp, tokens=torch.tensor([3, 10]))
        with pytest.raises(TypeError, match="indices must be integers"):
            w.append(0, ok_i.float(), ok_lp)
        with pytest.raises(TypeError, match=r"torch\.Tensor or a numpy array"):
            w.append(0, [[0, 1, 2]], ok_lp)
        assert w.append(0, ok_i, ok_lp)
    for bad, match in [(dict(k=11), "k must be <= vocab_size"),
                       (dict(value_encoding="fp8"), "value_encoding must be one of"),
                       (dict(kind="dense"), "kind must be one of"),
                       (dict(temperature=0.0), "temperature must be a positive"),
                       (dict(vocab_size=0), "vocab_size must be a positive int")]:
        with pytest.raises(ValueError, match=match):
            TopKWriter(tmp_path / "x", **{**dict(vocab_size=10, k=3, temperature=1.0), **bad})
    with pytest.raises(FileNotFoundError, match=r"manifest\.json is missing"):
        TopKReader(tmp_path / "nowhere")


def _write_store(path: Path, n: int, enc: str = "fp16") -> dict[int, tuple]:
    data = {}
    with TopKWriter(path, vocab_size=300, k=6, temperature=1.0, value_encoding=enc) as w:
        for s in range(n):
            data[s] = targets("topk", 7 + s, 300, 6)
            w.append(s, *data[s])
    return data


def test_corrupt_and_truncated_shards_are_rejected(tmp_path, seed):
    _write_store(tmp_path / "a", 4)
    r = TopKReader(tmp_path / "a")
    entry = r._index[2]
    data = bytearray((tmp_path / "a" / "r00000-00000.bin").read_bytes())
    data[int(entry["offset"]) + int(entry["nbytes"]) // 2] ^= 0x10  # one bit of sequence 2
    (tmp_path / "a" / "r00000-00000.bin").write_bytes(bytes(data))
    r = TopKReader(tmp_path / "a")
    r[1]
    with pytest.raises(StoreError, match=r"shard r00000-00000, sequence 2 .*checksum"):
        r[2]
    with pytest.raises(StoreError, match="sequence 2"):
        r.verify_all()
    # A flipped bit with verification off must still never crash the decoder.
    TopKReader(tmp_path / "a", verify=False)[1]

    _write_store(tmp_path / "b", 4)
    path = tmp_path / "b" / "r00000-00000.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(StoreError, match=r"shard r00000-00000 is truncated: .*\.bin.*sequence 3 "):
        TopKReader(tmp_path / "b")

    _write_store(tmp_path / "c", 4)
    path = tmp_path / "c" / "r00000-00000.idx"
    raw = bytearray(path.read_bytes())
    raw[40] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"index .* fails its checksum"):
        TopKReader(tmp_path / "c")


@pytest.mark.parametrize("enc", ENCODINGS)
def test_decoder_survives_garbage(tmp_path, seed, enc):
    """Random payloads either decode or are reported; the decoder never reads outside them."""
    from distill_ops.store import _codec

    _write_store(tmp_path, 1, enc)
    r = TopKReader(tmp_path, verify=False)
    rng = np.random.default_rng(seed)
    payload = np.array(r._map(0)[: int(r._index[0]["nbytes"])])
    for trial in range(200):
        junk = payload.copy()
        flips = rng.integers(0, junk.size, size=1 + trial % 5)
        junk[flips] ^= rng.integers(1, 256, size=flips.size).astype(np.uint8)
        if trial % 7 == 0:
            junk = junk[: rng.integers(0, junk.size)]
        ids = torch.empty((7, 6), dtype=torch.int32)
        lp = torch.empty((7, 6))
        if _codec.decode_into(r._params, junk, 7, ids, lp):
            assert ((ids >= -1) & (ids < 300)).all()


# -- crash safety ---------------------------------------------------------------------------

def _payload(seq_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic targets of a sequence (numpy only: safe in a forked child)."""
    rng = np.random.default_rng(seq_id)
    t = 40 + seq_id % 50
    ids = np.stack([rng.permutation(5000)[:16] for _ in range(t)]).astype(np.int32)
    lp = as_logprobs(-np.abs(rng.standard_normal((t, 16)) * 4).astype(np.float32))
    return ids, lp


def _write_all(path: Path, n: int, enc: str) -> None:
    with TopKWriter(path, vocab_size=5000, k=16, temperature=1.0, value_encoding=enc,
                    resume=(path / "manifest.json").exists(), skip_existing=True) as w:
        for s in range(n):
            if s not in w.seq_ids:
                w.append(s, *_payload(s))


def _check_complete(path: Path, n: int, enc: str) -> None:
    r = TopKReader(path)
    assert sorted(r.seq_ids().tolist()) == list(range(n)), "lost or duplicated sequences"
    assert r.verify_all() == n
    for i in range(n):
        ids, lp = r[i]
        want_i, want_lp = _payload(r.seq_id(i))
        gi, glp = by_id(ids, lp)
        wi, wlp = by_id(torch.from_numpy(want_i), torch.from_numpy(want_lp))
        assert torch.equal(gi, wi)
        tol = 0.1 if enc == "compact" else 0.02
        assert (glp - wlp).abs().max() <= tol


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("enc", ["fp16", "compact"])
def test_kill_9_at_random_points_then_resume(tmp_path, enc):
    """20 writers killed with SIGKILL at random instants; each restart resumes. In the end:
    every sequence exactly once, none corrupt."""
    rnd = random.Random(os.getpid())
    # Enough sequences that no writer can finish inside the 20 kill windows (<= 1.6 s in all)
    # on this machine, however fast: calibrated on a scratch store, with a factor 2 to spare.
    t0 = time.perf_counter()
    _write_all(tmp_path / "calibrate", 20, enc)
    per_seq = (time.perf_counter() - t0) / 20
    n = int(3.2 / per_seq) + 50
    store = tmp_path / "s"
    kills = 0
    for _ in range(20):
        pid = os.fork()
        if pid == 0:  # child: write until killed
            try:
                _write_all(store, n, enc)
            finally:
                os._exit(0)
        time.sleep(rnd.uniform(0.005, 0.08))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        kills += os.WIFSIGNALED(status)
        if (store / "rank-00000.json").exists():
            r = TopKReader(store)  # readable at every crash point
            assert len(set(r.seq_ids().tolist())) == len(r)
    assert kills == 20  # every writer died mid-run
    _write_all(store, n, enc)
    _check_complete(store, n, enc)


def test_kill_9_of_a_writer_process(tmp_path):
    """The same with a separate interpreter, killed once mid-write and resumed."""
    store = tmp_path / "s"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_store import _write_all
        _write_all(__import__("pathlib").Path({str(store)!r}), 100000, "compact")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.2)
        if (store / "rank-00000.json").exists() and len(TopKReader(store)) >= 30:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n = len(TopKReader(store))
    assert 30 <= n < 100000
    _write_all(store, n + 20, "compact")
    _check_complete(store, n + 20, "compact")


# -- distributed ----------------------------------------------------------------------------

def _rank_main(rank: int, world: int, init: str, store: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        with TopKWriter(store, vocab_size=5000, k=16, temperature=1.0,
                        value_encoding="compact", shard_bytes=20000) as w:
            assert (w.rank, w.world_size) == (rank, world)
            for s in range(rank, 30, world):
                w.append(s, *_payload(s))
    finally:
        dist.destroy_process_group()


def test_two_ranks_write_one_store(tmp_path):
    import torch.multiprocessing as mp

    store = tmp_path / "s"
    mp.spawn(_rank_main, args=(2, f"file://{tmp_path / 'init'}", str(store)), nprocs=2)
    m = json.loads((store / "manifest.json").read_text())
    assert {s["rank"] for s in m["shards"]} == {0, 1} and m["sequences"] == 30
    assert len(list(store.glob("rank-*.json"))) == 2
    _check_complete(store, 30, "compact")


# -- datasets -------------------------------------------------------------------------------

def test_dataset_collate_and_pickling(tmp_path, seed):
    data = _write_store(tmp_path, 5)
    r = TopKReader(tmp_path)
    r2 = pickle.loads(pickle.dumps(r))
    assert torch.equal(r2[3][0], r[3][0])
    base = [{"seq_id": s, "input_ids": list(range(7 + s)), "labels": list(range(7 + s)),
             "weight": float(s)} for s in (4, 0, 2)]
    ds = TargetDataset(str(tmp_path), base=base)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_targets)
    (batch,) = list(loader)
    assert batch["teacher_indices"].shape == (3, 11, 6)
    assert batch["input_ids"].shape == (3, 11) and batch["labels"][1, 7:].eq(-100).all()
    assert batch["teacher_indices"][1, 7:].eq(-1).all()
    assert batch["teacher_logprobs"][1, 7:].eq(float("-inf")).all()
    assert torch.equal(batch["teacher_indices"][0], data[4][0].int())
    assert batch["weight"].tolist() == [4.0, 0.0, 2.0]
    plain = TargetDataset(r)
    assert len(plain) == 5 and plain[2]["seq_id"] == 2
    idx, lp = pad_targets([r[0], r[1]], length=20)
    assert idx.shape == (2, 20, 6) and lp[0, 7:].eq(float("-inf")).all()
    with pytest.raises(ValueError, match="more than length"):
        pad_targets([r[4]], length=3)


@pytest.mark.parametrize("encoding", ["compact", "fp16", "bf16"])
@pytest.mark.parametrize("vocab", [300, 65536, 65537, 151936])
def test_string_keys_and_token_ids_round_trip(tmp_path, encoding, vocab):
    """Keys may be strings (kept verbatim, indexed by a 64-bit hash) and a sequence may carry
    its token ids: slot-coded when every predicted token is among its row's targets (a few
    bits each), stored whole otherwise; token widths 2, 3 bytes at the 2^16 boundary."""
    rng = np.random.default_rng(0)
    k = 6
    with TopKWriter(tmp_path, vocab_size=vocab, k=k, temperature=1.0,
                    value_encoding=encoding) as w:
        want = {}
        for n, key in enumerate(["custom-0", "req_1", 42, "ünïcode-key", 7]):
            t = 5 + n
            ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(t)])
            ids[0, k - 1] = -1  # padding
            lp = as_logprobs(-rng.uniform(0.1, 8, (t, k)).astype(np.float32))
            tokens = None
            if n % 2 == 0:  # tokens the targets predict, after a two-token prefix
                tokens = np.concatenate([rng.integers(0, vocab, 2), ids[:, 1]])
            elif n == 1:  # a token outside its row: stored whole
                tokens = rng.integers(0, vocab, t)
            w.append(key, torch.from_numpy(ids), torch.from_numpy(lp), tokens=tokens)
            want[key] = (ids, tokens)
        assert "req_1" in w and 42 in w and "nope" not in w
    reader = TopKReader(tmp_path)
    assert sorted(map(str, (reader.seq_id(i) for i in range(len(reader))))) == \
        sorted(map(str, want))
    for key, (ids, tokens) in want.items():
        got = reader.tokens(key)
        assert (got is None) == (tokens is None)
        if tokens is not None:
            assert got.tolist() == tokens.tolist()
        assert sorted(reader.get(key)[0][2].tolist()) == sorted(ids[2].tolist())
        assert key in reader
    assert "missing" not in reader
    with pytest.raises(KeyError, match="missing"):
        reader.get("missing")


def test_a_corrupt_token_block_is_a_store_error(tmp_path):
    with TopKWriter(tmp_path, vocab_size=50, k=2, temperature=1.0, value_encoding="fp16") as w:
        w.append("a", torch.tensor([[1, 2]]), torch.tensor([[-0.5, -1.0]]),
                 tokens=torch.tensor([9, 1]))
    shard = next(tmp_path.glob("*.bin"))
    raw = bytearray(shard.read_bytes())
    # The block's tail: ... u32 token count, mode, u32 prefix, one 2-byte token, one slot
    # byte. Its token count corrupted: the CRC catches it, and unchecked the layout does.
    raw[-12] ^= 0x10
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="checksum"):
        TopKReader(tmp_path).tokens("a")
    with pytest.raises(StoreError, match="malformed key/token block"):
        TopKReader(tmp_path, verify=False).tokens("a")


def test_version_1_stores_are_read_and_refuse_keys_and_tokens(tmp_path):
    with TopKWriter(tmp_path, vocab_size=50, k=2, temperature=1.0) as w:
        w.append(3, torch.tensor([[1, 2]]), torch.tensor([[-0.5, -1.0]]))
    manifest = tmp_path / "manifest.json"
    m = json.loads(manifest.read_text())
    m["version"] = 1
    manifest.write_text(json.dumps(m))
    reader = TopKReader(tmp_path)
    assert reader.tokens(3) is None and reader.seq_id(0) == 3
    with TopKWriter(tmp_path, vocab_size=50, k=2, temperature=1.0, resume=True) as w:
        w.append(4, torch.tensor([[1, 2]]), torch.tensor([[-0.5, -1.0]]))
        with pytest.raises(ValueError, match="format version 1"):
            w.append("x", torch.tensor([[1, 2]]), torch.tensor([[-0.5, -1.0]]))
