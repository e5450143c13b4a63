"""The demo's report: the markdown table, demo.json and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MIN_BIN_TOKENS = 50  # a reliability bin with fewer tokens is noise, not a point


def format_table(report: dict[str, Any]) -> str:
    """Markdown: one row per student, its held-out loss against the CE student's and the
    full-KD student's."""
    ref = {r["name"]: r["heldout_loss"] for r in report["runs"]}
    rel = lambda x, name: "-" if name not in ref else f"{100 * (x / ref[name] - 1):+.2f}%"
    lines = ["| run | held-out loss | vs CE | vs full KD | perplexity | ECE | "
             "grad angle to full KD | tokens/s | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        angle = "-" if r["grad_angle_deg"] is None else f"{r['grad_angle_deg']:.1f}°"
        x = r["heldout_loss"]
        lines.append(f"| {r['name']} | {x:.4f} | {rel(x, 'ce')} | {rel(x, 'dense')} | "
                     f"{r['perplexity']:.2f} | {r['ece']:.4f} | {angle} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_mib']:.0f} |")
    t = report["teacher"]
    students = report.get("student_parameters")
    lines.append(
        f"\nteacher: {t['parameters'] / 1e6:.2f}M parameters"
        + (f" (students {students / 1e6:.2f}M)" if students else "")
        + f", held-out loss {t['heldout_loss']:.4f} ({rel(t['heldout_loss'], 'ce')} vs CE), "
        f"ECE {t['ece']:.4f}, weights of step {t['best_step']} of {t['steps']} (best on "
        f"validation); sampled targets: {report['config']['sampled_draws']} draws per token")
    return "\n".join(lines)


def _style(name: str) -> dict[str, Any]:
    """The other divergences' dense rows dashed, so eleven curves stay apart in ten colours."""
    return {"ls": "--"} if name.startswith("dense-") else {}


def write_report(report: dict[str, Any], table: str, out: Path) -> None:
    """`out`/demo.json, demo.md (the table) and the PNG plots (loss curves, calibration)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(report, indent=1))
    (out / "demo.md").write_text(f"# distill-ops demo\n\n{table}\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the dev extras
        return
    fig, (tax, ax) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=(1, 2))
    t = report["teacher"]
    steps, losses = zip(*t["validation_curve"], strict=True)
    tax.plot(steps, losses, marker=".", color="k")
    tax.axvline(t["best_step"], color="k", ls=":", lw=1)
    tax.set_xlabel("teacher step")
    tax.set_ylabel("validation loss (nats/token)")
    tax.set_title(f"Teacher ({t['parameters'] / 1e6:.1f}M parameters)")
    for r in report["runs"]:
        steps, losses = zip(*r["curve"], strict=True)
        ax.plot(steps, losses, label=r["name"], marker="." if len(steps) < 40 else None,
                **_style(r["name"]))
    ax.axhline(report["teacher"]["heldout_loss"], color="k", ls=":", label="teacher")
    ax.set_xlabel("student step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # off the curves
    ax.set_title("Held-out loss of each student (same steps, same windows)")
    fig.tight_layout()
    fig.savefig(out / "demo-loss.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 5))
    seen = []
    for r in report["runs"]:
        rel = r["reliability"]
        # bins with too few tokens to say anything are left out of the curve (not the ECE)
        pts = [(c, a) for c, a, n in zip(rel["confidence"], rel["accuracy"], rel["count"],
                                         strict=True) if n >= MIN_BIN_TOKENS]
        seen += [v for pt in pts for v in pt]
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, **_style(r["name"]),
                label=f"{r['name']} "
                f"(ECE {r['ece']:.3f})")
    # The axes span the data (small students are rarely confident), with the diagonal.
    lo, hi = (max(0.0, min(seen) - 0.05), min(1.0, max(seen) + 0.05)) if seen else (0.0, 1.0)
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"Calibration (reliability; bins of at least {MIN_BIN_TOKENS} tokens)")
    fig.tight_layout()
    fig.savefig(out / "demo-calibration.png", dpi=120)
    plt.close(fig)


__all__ = ["format_table", "write_report"]
