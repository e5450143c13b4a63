"""`distill-ops demo`: distillation end to end on a real corpus, measured.

The embedded default exists wherever Python does: the standard library's own source files
(train / held-out split by file), a byte-level BPE tokenizer trained on them, and a GPT-style
teacher trained on every training window, its checkpoint chosen on validation windows of
held-out files (the teacher is cached after its first training). The students are five
times smaller and learn on a transfer set: `student_windows` of the training windows, the
same windows in the same order for every student, for the same steps (the token budget).
That is the setting distillation is for: a teacher that knows more than the student's data
shows. The teacher's targets go through the store once (top-12 from its hidden states with
`fused_linear_topk`; sampled targets, about 12 distinct ids per token, by
`sample_targets`), and students of the same initialisation train with:

- ``ce``: cross-entropy on the data alone;
- ``dense``: forward KL to the full teacher distribution (the teacher run live);
- ``top12-<tail>``: sparse KD to the stored top-12, for each tail mode;
- ``sampled``: sparse KD to the stored sampled targets (``tail="none"``): unbiased;
- ``dense-<divergence>`` (asked for with ``--divergence``): the dense run with another
  divergence (skew KL, AB, AKL, ...: each at its default parameter), so the table says
  which distils best on the corpus.

Reported per run: held-out loss and perplexity, expected calibration error, the angle
between its gradient and the full-KD gradient (at a common point: the CE student, on
held-out windows), training tokens/s (a step's tokens over the median time of steps timed
in rounds across all the students, steps.py) and peak
memory (CUDA: the allocator's peak; CPU: resident-set growth above the run's start, the
kernel's high-water mark, after freed memory is handed back to the OS); a table, `OUT/demo.json`,
and PNG plots (the teacher's validation curve, the students' held-out curves,
calibration). The tokenizer, teacher and stores are cached (rerun: students only). This is
the experiment of Anshumann et al. 2025 ("Sparse Logit Sampling", 8B -> 3B) in miniature.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..fused_linear import fused_linear_kd_loss, fused_linear_topk
from ..sampling import sample_targets
from ..store import TopKReader, TopKWriter
from . import data as dd
from .report import format_table, write_report
from .steps import interleaved_tokens_per_s, train_step


@dataclasses.dataclass(frozen=True)
class Config:
    corpus_bytes: int
    vocab: int
    context: int
    batch: int
    teacher: tuple[int, int, int]  # width, layers, heads
    student: tuple[int, int, int]
    teacher_steps: int
    student_steps: int
    teacher_lr: float
    student_lr: float
    k: int = 12
    sampled_unique: float = 12.0
    eval_every: int = 50
    teacher_eval_every: int = 100
    student_windows: int | None = None  # the transfer set's size (None: every window)
    val_windows: int = 128
    eval_windows: int = 64
    angle_windows: int = 16
    final_windows: int = 512
    timing_rounds: int = 10  # tokens/s: 3 timed steps of every student a round (steps.py)
    seed: int = 0


QUICK = Config(corpus_bytes=600_000, vocab=1024, context=64, batch=16,
               teacher=(128, 2, 4), student=(48, 1, 2), teacher_steps=600, student_steps=200,
               teacher_lr=3e-3, student_lr=3e-3, eval_every=10, eval_windows=32,
               angle_windows=8, final_windows=128, teacher_eval_every=50, val_windows=64,
               student_windows=1300)
FULL = Config(corpus_bytes=4_000_000, vocab=4096, context=128, batch=16,
              teacher=(192, 4, 6), student=(64, 2, 4), teacher_steps=3000, student_steps=1200,
              teacher_lr=2e-3, student_lr=3e-3, eval_every=40, eval_windows=64,
              angle_windows=32, final_windows=384, teacher_eval_every=100,
              student_windows=4096)
RUNS = ("ce", "dense", "top12-bucket", "top12-renorm", "top12-support", "top12-none",
        "sampled")


def _lr(step: int, total: int, peak: float) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _peak_memory():
    """A CPU run's peak memory: resident-set growth above the run's start, from the kernel's
    high-water mark (reset at the start; sampled where that is not allowed). Python's
    garbage and glibc's free lists are handed back first (gc, malloc_trim), so memory an
    earlier run freed does not hide this run's growth."""
    import gc

    from ..bench.measure import HighWaterRSS, glibc

    gc.collect()
    try:
        glibc().malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the growth may read low
        pass
    return HighWaterRSS()


class _Stage:
    """A progress bar over one stage's steps (tqdm), silent when `progress` is False."""

    def __init__(self, name: str, total: int, progress: bool) -> None:
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=name, unit="step", leave=False)

    def step(self, **post: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if post:
                self.bar.set_postfix({k: f"{v:.3f}" for k, v in post.items()})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cache_key(cfg: Config, corpus: str | None, files: list[Path]) -> str:
    h = hashlib.sha1(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    h.update(str(corpus).encode())
    for f in files:
        h.update(f"{f}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def prepare(cfg: Config, corpus: str | None, cache: Path, device: torch.device,
            progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Corpus, tokenizer, token windows and the trained teacher (cached)."""
    files, root = dd.corpus_files(corpus, cfg.corpus_bytes)
    key = _cache_key(cfg, corpus, files)
    where = cache / key
    train_text, held_text = dd.read_split(files, root)
    tok_path = where / "tokenizer.json"
    if tok_path.exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_path))
    else:
        log(f"training a {cfg.vocab}-token BPE tokenizer on {len(train_text) / 1e6:.1f} MB")
        tok = dd.train_tokenizer(train_text, cfg.vocab, tok_path)
    vocab = tok.get_vocab_size()
    enc = lambda text: torch.tensor(tok.encode(text).ids, dtype=torch.long)
    train = dd.windows(enc(train_text), cfg.context)
    held_all = dd.windows(enc(held_text), cfg.context)
    # Held-out files' windows, alternately: `held` scores every model (curves and the
    # table), `val` selects the teacher's checkpoint; the two never overlap.
    held, val = held_all[0::2], held_all[1::2][:cfg.val_windows]
    if len(val) == 0:  # a corpus with one held-out window: it must do both jobs
        val = held
    g = torch.Generator().manual_seed(cfg.seed)
    # The students' transfer set: `student_windows` of the training windows (the teacher
    # trained on all of them), in one shuffled order repeated over the steps: one store
    # row each, so every student reads exactly the same data.
    order = torch.randperm(len(train), generator=g)[:cfg.student_windows or len(train)]
    need = cfg.student_steps * cfg.batch
    seen = order.repeat(need // len(order) + 1)[:need]
    t_width, t_layers, t_heads = cfg.teacher
    torch.manual_seed(cfg.seed + 1)  # the teacher's initialisation, like the students'
    teacher = dd.GPT(vocab, t_width, t_layers, t_heads, cfg.context).to(device)
    t_path, t_log = where / "teacher.pt", where / "teacher.json"
    if t_path.exists() and t_log.exists():
        teacher.load_state_dict(torch.load(t_path, map_location=device))
        curve = [tuple(x) for x in json.loads(t_log.read_text())["curve"]]
    else:
        log(f"training the teacher ({_params(teacher) / 1e6:.2f}M parameters, "
            f"{cfg.teacher_steps} steps of {cfg.batch} x {cfg.context} tokens)")
        curve = _train_lm(teacher, train, cfg.teacher_steps, cfg.batch, cfg.teacher_lr,
                          cfg.seed + 1, device, _Stage("teacher", cfg.teacher_steps, progress),
                          val, cfg.teacher_eval_every)
        where.mkdir(parents=True, exist_ok=True)
        torch.save(teacher.state_dict(), t_path)
        t_log.write_text(json.dumps({"curve": curve}))
    teacher.eval().requires_grad_(False)  # distilled from, never trained by the students
    return {"where": where, "tokenizer": tok, "vocab": vocab, "train": train, "held": held,
            "seen": seen, "teacher": teacher, "teacher_curve": curve, "files": len(files),
            "train_tokens": train.numel(), "held_tokens": held.numel()}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _train_lm(model, windows: Tensor, steps: int, batch: int, lr: float, seed: int,
              device: torch.device, stage: _Stage, val: Tensor, eval_every: int
              ) -> list[tuple[int, float]]:
    """Trains `model` with cross-entropy (AdamW, warm-up then cosine), evaluating on the
    validation windows `val` every `eval_every` steps; keeps the weights of the best
    evaluation (checkpoint selection, so a teacher that starts to overfit the corpus is not
    the one distilled). Returns the validation curve [(step, loss)]."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    curve: list[tuple[int, float]] = []
    best, best_state = math.inf, None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        w = windows[torch.randint(0, len(windows), (batch,), generator=g)].to(device)
        loss = F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            v = evaluate(model, val, device)["loss"]
            curve.append((step + 1, v))
            if v < best:
                best = v
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        stage.step(loss=loss.item())  # host-sync-ok: the progress bar
    stage.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return curve


def _sample_draws(teacher, windows: Tensor, device: torch.device, unique: float,
                  seed: int) -> int:
    """The number of draws with replacement that gives about `unique` distinct ids per
    token from this teacher (on a sample of windows)."""
    with torch.no_grad():
        logits = teacher(windows[:8, :-1].to(device)).flatten(0, 1)
    lo, hi = 1, 4096
    while lo < hi:
        mid = (lo + hi) // 2
        t = sample_targets(logits, mid, generator=torch.Generator(device).manual_seed(seed))
        if (t.indices >= 0).sum(-1).float().mean().item() >= unique:  # host-sync-ok
            hi = mid
        else:
            lo = mid + 1
    return lo


def extract_targets(data: dict[str, Any], cfg: Config, device: torch.device,
                    progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The teacher's top-k and sampled targets of every window students see, into two
    stores (once; reruns read them)."""
    where, teacher, train = data["where"], data["teacher"], data["train"]
    ids = torch.unique(data["seen"]).tolist()  # host-sync-ok: store keys, once
    draws = _sample_draws(teacher, train, device, cfg.sampled_unique, cfg.seed)
    stores = {"topk": where / f"top{cfg.k}", "sampled": where / f"sampled{draws}"}
    if not all((p / "manifest.json").exists() for p in stores.values()):
        log(f"extracting targets of {len(ids)} windows: top-{cfg.k} and {draws} draws "
            f"(~{cfg.sampled_unique:g} distinct ids per token)")
        stage = _Stage("extract", len(ids), progress)
        w_t = teacher.head.weight.detach()
        writers = {
            "topk": TopKWriter(stores["topk"], vocab_size=data["vocab"], k=cfg.k,
                               temperature=1.0, value_encoding="compact", resume=True,
                               skip_existing=True),
            "sampled": TopKWriter(stores["sampled"], vocab_size=data["vocab"], k=draws,
                                  temperature=1.0, value_encoding="compact", kind="sampled",
                                  resume=True, skip_existing=True),
        }
        with torch.no_grad():
            for a in range(0, len(ids), cfg.batch):  # the teacher runs a batch at a time
                chunk = ids[a:a + cfg.batch]
                hs = teacher.hidden(train[chunk, :-1].to(device))
                top = fused_linear_topk(hs.flatten(0, 1), w_t, cfg.k)
                top_idx = top.indices.view(len(chunk), -1, cfg.k).cpu()
                top_lp = top.logprobs.view(len(chunk), -1, cfg.k).cpu()
                for j, i in enumerate(chunk):
                    writers["topk"].append(i, top_idx[j], top_lp[j])
                    # one generator per window: its draws do not depend on the batching
                    gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + i)
                    st = sample_targets(hs[j] @ w_t.T, draws, generator=gen)
                    lp = torch.where(st.indices >= 0, st.probs.clamp_min(1e-30).log(),
                                     torch.full_like(st.probs, float("-inf")))
                    writers["sampled"].append(i, st.indices.cpu(), lp.cpu())
                    stage.step()
        for w in writers.values():
            w.close()
        stage.close()
    return {name: TopKReader(path) for name, path in stores.items()} | {"draws": draws}


def _is_dense(run: str) -> bool:
    """A run against the full teacher distribution: ``dense`` or ``dense-<divergence>``."""
    return run == "dense" or run.startswith("dense-")


def _divergence_of(run: str) -> str:
    """The divergence a distilling run trains with (forward KL unless ``dense-<it>``)."""
    return run.split("-", 1)[1] if run.startswith("dense-") else "forward_kl"


def _loss_fn(run: str, stores: dict[str, Any], teacher, device: torch.device
             ) -> Callable[[Any, Tensor, Tensor], Tensor]:
    """The training loss of a run: (student, window ids, windows [B, C + 1]) -> loss."""

    def hidden(student, w):
        return student.hidden(w[:, :-1].to(device))

    if run == "ce":
        return lambda s, ids, w: F.cross_entropy(s(w[:, :-1].to(device)).flatten(0, 1),
                                                 w[:, 1:].flatten().to(device))
    if _is_dense(run):
        divergence = _divergence_of(run)

        def dense(s, ids, w):
            with torch.no_grad():
                h_t = teacher.hidden(w[:, :-1].to(device))
            return fused_linear_kd_loss(hidden(s, w), s.head.weight, h_t, teacher.head.weight,
                                        divergence=divergence)
        return dense
    reader = stores["sampled" if run == "sampled" else "topk"]
    tail = "none" if run == "sampled" else run.split("-")[1]

    def sparse(s, ids, w):
        targets = [reader.get(int(i)) for i in ids]
        idx = torch.stack([t[0] for t in targets]).to(device)
        lp = torch.stack([t[1] for t in targets]).to(device)
        return fused_linear_kd_loss(hidden(s, w), s.head.weight, teacher_indices=idx,
                                    teacher_logprobs=lp, tail=tail)
    return sparse


def evaluate(student, held: Tensor, device: torch.device, bins: int = 15,
             batch: int = 16) -> dict[str, Any]:
    """Held-out next-token loss, perplexity, expected calibration error (top-1 confidence
    against accuracy in `bins` equal-width bins) and the reliability diagram's points,
    `batch` windows at a time."""
    student.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros(bins, dtype=torch.float64, device=device)
    acc_sum, conf_sum = torch.zeros_like(count), torch.zeros_like(count)
    edges = torch.linspace(0, 1, bins + 1, device=device)
    with torch.no_grad():
        for a in range(0, len(held), batch):
            w = held[a:a + batch].to(device)
            logits = student(w[:, :-1]).flatten(0, 1).float()
            labels = w[:, 1:].flatten()
            total += F.cross_entropy(logits, labels, reduction="sum").double()
            conf, pred = logits.softmax(-1).max(-1)
            which = torch.bucketize(conf, edges[1:-1])
            count += torch.bincount(which, minlength=bins).double()
            acc_sum += torch.bincount(which, weights=(pred == labels).double(), minlength=bins)
            conf_sum += torch.bincount(which, weights=conf.double(), minlength=bins)
    student.train()
    n = count.sum()
    loss = (total / n).item()  # host-sync-ok: a metric
    acc, avg = acc_sum / count.clamp_min(1), conf_sum / count.clamp_min(1)
    ece = ((acc - avg).abs() * count).sum().item() / n.item()  # host-sync-ok
    # host-sync-ok: the report's reliability curve
    rel = {"confidence": avg.tolist(), "accuracy": acc.tolist(), "count": count.tolist()}
    return {"loss": loss, "perplexity": math.exp(loss), "ece": ece, "reliability": rel}


def _grad(student, loss: Tensor) -> Tensor:
    """Every parameter's gradient as one float64 vector (the angle of nearly parallel
    vectors needs the cosine to better than fp32's 1e-7: acos(1 - 1e-7) is 0.03 degrees)."""
    grads = torch.autograd.grad(loss, [p for p in student.parameters() if p.requires_grad])
    return torch.cat([g.flatten() for g in grads]).double()


def gradient_angles(point, teacher, held: Tensor, cfg: Config, draws: int,
                    device: torch.device) -> dict[str, float]:
    """Degrees between each run's loss gradient and the full-KD gradient, at the same
    student weights, on held-out windows (targets made on the spot, as the stores would)."""
    w = held[:cfg.angle_windows]
    x = w[:, :-1].to(device)
    with torch.no_grad():
        h_t = teacher.hidden(x)
        top = fused_linear_topk(h_t, teacher.head.weight, cfg.k)
        t_logits = h_t @ teacher.head.weight.T
        st = sample_targets(t_logits, draws, generator=torch.Generator(device).manual_seed(7))
        s_lp = torch.where(st.indices >= 0, st.probs.clamp_min(1e-30).log(),
                           torch.full_like(st.probs, float("-inf")))
    h = point.hidden(x)
    full = _grad(point, fused_linear_kd_loss(h, point.head.weight, h_t, teacher.head.weight))
    losses = {
        "ce": lambda: F.cross_entropy(point.head(point.hidden(x)).flatten(0, 1),
                                      w[:, 1:].flatten().to(device)),
        "dense": lambda: fused_linear_kd_loss(point.hidden(x), point.head.weight, h_t,
                                              teacher.head.weight),
        "sampled": lambda: fused_linear_kd_loss(point.hidden(x), point.head.weight,
                                                teacher_indices=st.indices,
                                                teacher_logprobs=s_lp, tail="none"),
    }
    for tail in ("bucket", "renorm", "support", "none"):
        losses[f"top12-{tail}"] = lambda tail=tail: fused_linear_kd_loss(
            point.hidden(x), point.head.weight, teacher_indices=top.indices,
            teacher_logprobs=top.logprobs, tail=tail)
    out = {}
    for run, fn in losses.items():
        g = _grad(point, fn())
        cos = (g @ full / (g.norm() * full.norm()).clamp_min(1e-30)).clamp(-1, 1)
        out[run] = math.degrees(math.acos(cos.item()))  # host-sync-ok: a metric
    return out


def train_student(run: str, data: dict[str, Any], stores: dict[str, Any], cfg: Config,
                  device: torch.device, progress: bool) -> dict[str, Any]:
    s_width, s_layers, s_heads = cfg.student
    torch.manual_seed(cfg.seed + 2)  # every student starts from the same weights
    student = dd.GPT(data["vocab"], s_width, s_layers, s_heads, cfg.context).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.student_lr, weight_decay=0.01)
    loss_fn = _loss_fn(run, stores, data["teacher"], device)
    held = data["held"][:cfg.eval_windows]
    curve, stage = [], _Stage(run, cfg.student_steps, progress)
    seen, train = data["seen"], data["train"]
    step_seconds = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    mem = _peak_memory() if device.type == "cpu" else None
    if mem is not None:
        mem.__enter__()
    try:
        for step in range(cfg.student_steps):
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = _lr(step, cfg.student_steps, cfg.student_lr)
            ids = seen[step * cfg.batch:(step + 1) * cfg.batch]
            loss = train_step(student, opt, loss_fn, ids, train[ids])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_seconds.append(time.perf_counter() - t0)  # the step alone, not evaluation
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.student_steps:
                curve.append((step + 1, evaluate(student, held, device)["loss"]))
            stage.step(loss=loss.item())  # host-sync-ok: the progress bar
    finally:
        if mem is not None:
            mem.__exit__()
        stage.close()
    # tokens/s while training: one step's tokens over the median step time (the first step,
    # which warms caches and allocators, and the evaluations do not count); the report's
    # comes from steps.interleaved_tokens_per_s.
    median_step = float(torch.tensor(step_seconds[1:] or step_seconds).median())
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else mem.extra
    final = evaluate(student, data["held"][:cfg.final_windows], device)
    return {"model": student, "loss_fn": loss_fn, "curve": curve,
            "tokens_per_s": cfg.batch * cfg.context / median_step,
            "peak_mib": peak / 2**20, **final}


def run_demo(quick: bool = True, corpus: str | None = None, out: str | None = "demo_out",
             device: str | None = None, cache: str | None = None, progress: bool = True,
             cfg: Config | None = None, runs: tuple[str, ...] = RUNS,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the experiment; returns (and writes to `out`) the results of every run."""
    cfg = cfg or (QUICK if quick else FULL)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu":  # steady step times (tokens/s), see steady_allocator
        from ..bench.measure import steady_allocator

        steady_allocator()
    cache_dir = Path(cache) if cache else Path.home() / ".cache" / "distill_ops" / "demo"
    t0 = time.perf_counter()
    data = prepare(cfg, corpus, cache_dir, dev, progress, log)
    t1 = time.perf_counter()
    stores = extract_targets(data, cfg, dev, progress, log)
    t2 = time.perf_counter()
    teacher_eval = evaluate(data["teacher"], data["held"][:cfg.final_windows], dev)
    results, models = [], {}
    # The quick students' steps (a few ms) gain little from a second CPU thread and time
    # unsteadily with it: three identical quick runs on the 2-core VM spread each row's
    # tokens/s by 8-46% with two threads, by 3-12% with one (2026-12-03).
    threads = torch.get_num_threads()
    student_threads = 1 if quick and dev.type == "cpu" else threads
    torch.set_num_threads(student_threads)
    loss_fns = {}
    try:
        for run in runs:
            t = time.perf_counter()
            r = train_student(run, data, stores, cfg, dev, progress)
            models[run], loss_fns[run] = r.pop("model"), r.pop("loss_fn")
            results.append(r | {"name": run, "seconds": time.perf_counter() - t})
            log(f"  {run:14s} held-out loss {r['loss']:.4f}  ECE {r['ece']:.4f}")
        speed = interleaved_tokens_per_s(models, loss_fns, data["seen"], data["train"],
                                         cfg.batch, cfg.context, cfg.student_lr,
                                         cfg.timing_rounds, dev)
    finally:
        torch.set_num_threads(threads)
    for r in results:
        r["tokens_per_s_training"], r["tokens_per_s"] = r["tokens_per_s"], speed[r["name"]]
    log("  tokens/s (the median step, timed in interleaved rounds): " +
        ", ".join(f"{r['name']} {r['tokens_per_s']:,.0f}" for r in results))
    dense_rows = [r for r in results if _is_dense(r["name"])]
    if len(dense_rows) > 1:
        best = min(dense_rows, key=lambda r: r["loss"])
        log(f"  best divergence on this corpus: {best['name']} (held-out loss "
            f"{best['loss']:.4f})")
    point = models.get("ce")
    angles = gradient_angles(point, data["teacher"], data["held"], cfg, stores["draws"], dev) \
        if point is not None else {}
    report = {
        "config": dataclasses.asdict(cfg) | {"quick": quick, "corpus": corpus or "stdlib",
                                             "vocab_actual": data["vocab"],
                                             "sampled_draws": stores["draws"]},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "device": str(dev), "machine": platform.machine(),
                        "student_threads": student_threads if dev.type == "cpu" else None,
                        "corpus_files": data["files"], "train_tokens": data["train_tokens"],
                        "heldout_tokens": data["held_tokens"]},
        "teacher": {"heldout_loss": teacher_eval["loss"], "ece": teacher_eval["ece"],
                    "parameters": _params(data["teacher"]), "steps": cfg.teacher_steps,
                    "best_step": min(data["teacher_curve"], key=lambda x: x[1])[0],
                    "validation_curve": data["teacher_curve"]},
        "student_parameters": _params(next(iter(models.values()))) if models else None,
        "runs": [_run_entry(r, angles, cfg) for r in results],
        "seconds": time.perf_counter() - t0,
        # what this run spent where (a cached tokenizer/teacher or stores take ~0 here)
        "stage_seconds": {"tokenizer_and_teacher": t1 - t0, "extract": t2 - t1,
                          "students": sum(r["seconds"] for r in results)},
    }
    table = format_table(report)
    log(table)
    if out:
        write_report(report, table, Path(out))
    return report


def _run_entry(r: dict[str, Any], angles: dict[str, float], cfg: Config) -> dict[str, Any]:
    name = r["name"]
    dense = _is_dense(name)
    targets = "ce" if name == "ce" else "dense" if dense else \
        "sampled" if name == "sampled" else "topk"
    return {"name": name, "targets": targets,
            "divergence": None if targets == "ce" else _divergence_of(name),
            "k": None if targets in ("ce", "dense") else (cfg.k if targets == "topk" else None),
            "tail": name.split("-")[1] if targets == "topk" else
            ("none" if targets == "sampled" else None),
            "heldout_loss": r["loss"], "perplexity": r["perplexity"], "ece": r["ece"],
            "grad_angle_deg": angles.get(name), "tokens_per_s": r["tokens_per_s"],
            "tokens_per_s_training": r["tokens_per_s_training"], "peak_mib": r["peak_mib"],
            "seconds": r["seconds"], "curve": r["curve"],
            "reliability": r["reliability"]}
