"""The demo's embedded default: a corpus every Python has (its standard library's own source),
a byte-level BPE tokenizer trained on it, and a small GPT-style language model.

Train and held-out text are split by file (a stable hash of each file's relative path), so
held-out loss measures modelling of unseen files, not memorised lines.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def stdlib_files(limit_bytes: int) -> list[Path]:
    """The standard library's .py files in sorted path order (tests, site-packages and
    generated files left out) until `limit_bytes` of text: deterministic for a Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(part in rel for part in ("site-packages", "test", "idlelib", "lib2to3",
                                        "_pydecimal", "pydoc_data")):
            continue
        size = path.stat().st_size
        if size < 2000:
            continue
        out.append(path)
        total += size
        if total >= limit_bytes:
            break
    return out


def corpus_files(corpus: str | None, limit_bytes: int) -> tuple[list[Path], Path]:
    """(files, their root): the user's corpus (a file or a folder of .txt/.py/.md files), or
    the standard library."""
    if corpus is None:
        return stdlib_files(limit_bytes), Path(sysconfig.get_paths()["stdlib"])
    root = Path(corpus)
    if root.is_file():
        return [root], root.parent
    files = sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".py", ".md")
                   and p.is_file())
    if not files:
        raise FileNotFoundError(f"no .txt/.py/.md files under {root}")
    return files, root


def split_files(files: list[Path], root: Path, heldout_every: int = 10
                ) -> tuple[list[Path], list[Path]]:
    """(train, held-out) by a stable hash of each file's path: about 1 in `heldout_every`
    held out. A single-file corpus is split by lines instead (see read_split)."""
    train, held = [], []
    for f in files:
        h = int(hashlib.sha1(f.relative_to(root).as_posix().encode()).hexdigest(), 16)
        (held if h % heldout_every == 0 else train).append(f)
    return train, held


def read_split(files: list[Path], root: Path) -> tuple[str, str]:
    if len(files) == 1:  # one file: its last tenth of lines is held out
        lines = files[0].read_text(encoding="utf-8", errors="replace").splitlines(True)
        cut = max(1, len(lines) * 9 // 10)
        return "".join(lines[:cut]), "".join(lines[cut:])
    train, held = split_files(files, root)
    if not held:
        held, train = train[-1:], train[:-1]
    read = lambda fs: "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in fs)
    return read(train), read(held)


def train_tokenizer(text: str, vocab: int, path: Path):
    """A byte-level BPE tokenizer (the `tokenizers` library) trained on `text`, saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 100_000] for i in range(0, len(text), 100_000)],
                            trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small pre-LayerNorm causal transformer; `hidden` gives the final hidden states,
    `head` is the LM head the fused losses take."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        for blk in self.blocks:  # residual projections scaled down with depth
            nn.init.normal_(blk.proj.weight, std=0.02 / math.sqrt(2 * layers))

    def hidden(self, ids: Tensor) -> Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.hidden(ids))


def windows(tokens: Tensor, context: int) -> Tensor:
    """Non-overlapping [n, context + 1] windows of a token stream (input and next tokens)."""
    n = (tokens.numel() - 1) // context
    return torch.stack([tokens[i * context:i * context + context + 1] for i in range(n)])
