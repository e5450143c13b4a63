"""The shapes the harness runs: canonical (what the README and the GPU results report),
CPU-sized and quick, and the ops, divergences and tails it knows."""

from __future__ import annotations

from dataclasses import dataclass

OPS = ("dense", "sparse", "topk", "sample", "fused_linear", "fused_linear_sparse",
       "fused_linear_topk")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")  # the default rows
# Every divergence `--divergence` takes (the research family: its issue and docs/api.md).
ALL_DIVERGENCES = (*DIVERGENCES, "skew_kl", "skew_reverse_kl", "ab", "akl")
TAILS = ("bucket", "renorm", "support", "none")



@dataclass(frozen=True)
class Shape:
    """N rows, V vocabulary, k targets per row, student / teacher hidden widths."""

    n: int
    v: int
    k: int = 0
    hs: int = 0
    ht: int = 0

    def label(self) -> str:
        parts = [f"N={self.n}", f"V={self.v}"]
        parts += [f"k={self.k}"] * bool(self.k)
        parts += [f"Hs={self.hs}"] * bool(self.hs) + [f"Ht={self.ht}"] * bool(self.ht)
        return " ".join(parts)


# Canonical shapes (what the README and the GPU results report) and CPU-sized ones.
CANONICAL: dict[str, list[Shape]] = {
    "dense": [Shape(8192, 32000), Shape(8192, 128256), Shape(8192, 262144),
              Shape(2048, 128256), Shape(4096, 128256)],
    "sparse": [Shape(8192, 128256, k=16), Shape(8192, 128256, k=64)],
    "topk": [Shape(8192, 128256, k=64)],
    "sample": [Shape(8192, 128256, k=64)],
    "fused_linear": [Shape(8192, 128256, hs=2048, ht=4096)],
    "fused_linear_sparse": [Shape(8192, 128256, k=64, hs=2048)],
    "fused_linear_topk": [Shape(8192, 128256, k=64, ht=4096)],
}
CPU_FULL: dict[str, list[Shape]] = {
    "dense": [Shape(1024, 32000), Shape(2048, 32000), Shape(1024, 128256)],
    "sparse": [Shape(2048, 32000, k=16), Shape(2048, 32000, k=64)],
    "topk": [Shape(2048, 32000, k=64)],
    "sample": [Shape(2048, 32000, k=64)],
    "fused_linear": [Shape(2048, 32000, hs=256, ht=512)],
    "fused_linear_sparse": [Shape(2048, 32000, k=64, hs=256)],
    "fused_linear_topk": [Shape(2048, 32000, k=64, ht=512)],
}
QUICK: dict[str, list[Shape]] = {
    "dense": [Shape(256, 8192), Shape(256, 32000), Shape(128, 32000)],
    "sparse": [Shape(256, 32000, k=16), Shape(256, 32000, k=64)],
    "topk": [Shape(256, 32000, k=64)],
    "sample": [Shape(256, 32000, k=64)],
    "fused_linear": [Shape(512, 32000, hs=64, ht=128)],
    "fused_linear_sparse": [Shape(512, 32000, k=64, hs=64)],
    "fused_linear_topk": [Shape(512, 32000, k=64, ht=128)],
}


__all__ = ["ALL_DIVERGENCES", "CANONICAL", "CPU_FULL", "DIVERGENCES", "OPS", "QUICK", "TAILS",
           "Shape"]
