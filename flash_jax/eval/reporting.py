"""Reports of evaluation rows: Markdown tables (mean ± std over training seeds), metric plots and
captioned sample grids."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from flash_jax.data import shapes
from flash_jax.eval import metrics, scoring


def sample_grid(
    images: dict[str, np.ndarray], captions: Sequence[str], num: int = 8, scale: int = 3
) -> Image.Image:
    """Rows = entries (labelled), columns = the first `num` prompts (captioned on top)."""
    names = list(images)
    num = min(num, len(captions))
    h, w = next(iter(images.values())).shape[1:3]
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default(size=11)
    label_w, head_h = 150, 40
    sheet = Image.new("RGB", (label_w + num * (cw + 4), head_h + len(names) * (ch + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for j in range(num):
        words, lines = captions[j].split(), [""]
        for word in words:
            lines[-1] = f"{lines[-1]} {word}".strip()
            if draw.textlength(lines[-1], font=font) > cw:
                lines[-1] = lines[-1].rsplit(" ", 1)[0]
                lines.append(word)
        for k, text in enumerate(lines[:3]):
            draw.text((label_w + j * (cw + 4), 2 + 12 * k), text, fill="black", font=font)
    for i, name in enumerate(names):
        y = head_h + i * (ch + 4)
        draw.text((4, y + ch // 2 - 6), name, fill="black", font=font)
        for j in range(num):
            tile = Image.fromarray(images[name][j]).resize((cw, ch), Image.NEAREST)
            sheet.paste(tile, (label_w + j * (cw + 4), y))
    return sheet


def write_report(
    rows: dict[str, dict[str, float]],
    images: dict[str, np.ndarray],
    captions: Sequence[str],
    out_dir: str | Path,
) -> str:
    """Writes `results.md`, `results.json` and `samples.png` to `out_dir`; returns the table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = metrics.markdown_table(
        rows, [c for c in scoring.COLUMNS if any(c in r for r in rows.values())]
    )
    (out_dir / "results.md").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2))
    sample_grid(images, captions).save(out_dir / "samples.png")
    return table


SUMMARY_COLUMNS = ("fd_judge", *shapes.CATEGORIES, "mean", "chroma", "contrast", "diversity")


def summarize(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (prompt set, label, steps), in first-appearance order: `n` (runs), `nfe` and
    per metric `<m>` (mean over runs) and `<m>_std` (sample std over runs; 0 for one run)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows.values():
        groups.setdefault((row["prompt_set"], row["label"], row["steps"]), []).append(row)
    out = []
    for (prompt_set, label, steps), members in groups.items():
        entry = {"prompt_set": prompt_set, "label": label, "steps": steps, "n": len(members)}
        entry["nfe"] = members[0].get("nfe", 0)
        for m in SUMMARY_COLUMNS:
            values = np.array([r[m] for r in members if m in r], np.float64)
            if values.size:
                entry[m] = float(values.mean())
                entry[f"{m}_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
        out.append(entry)
    return out


def _mean_std(entry: dict[str, Any], m: str) -> str:
    if m not in entry:
        return ""
    mean, std = entry[m], entry[f"{m}_std"]
    fmt = (lambda v: f"{v:.3f}") if abs(mean) <= 1.0 else (lambda v: f"{v:.2f}")
    return fmt(mean) + (f" ± {fmt(std)}" if entry["n"] > 1 else "")


def summary_markdown(summary: list[dict[str, Any]], prompt_set: str) -> str:
    """The mean ± std table of one prompt set (± over the runs of a label: training seeds)."""
    columns = [m for m in SUMMARY_COLUMNS if any(m in e for e in summary)]
    lines = [
        "| method | steps | nfe | runs | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 4) + "|",
    ]
    for e in summary:
        if e["prompt_set"] == prompt_set:
            label, steps = (e["label"], e["steps"]) if e["label"] != "real" else ("real", "–")
            cells = [label, str(steps), str(e["nfe"]), str(e["n"])]
            lines.append("| " + " | ".join(cells + [_mean_std(e, m) for m in columns]) + " |")
    return "\n".join(lines)


def plot_metrics(
    summary: list[dict[str, Any]], prompt_set: str, metric_names: Sequence[str], path: Path
) -> None:
    """Metric vs steps, one line per method label (error bars: std over runs); the real
    reference as a dashed line. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in summary if e["prompt_set"] == prompt_set]
    labels = list(dict.fromkeys(e["label"] for e in entries if e["label"] != "real"))
    real = next((e for e in entries if e["label"] == "real"), None)
    fig, axes = plt.subplots(1, len(metric_names), figsize=(4.2 * len(metric_names), 3.6))
    axes = np.atleast_1d(axes)
    all_steps = sorted({e["steps"] for e in entries if e["label"] != "real"})
    for ax, m in zip(axes, metric_names, strict=True):
        for label in labels:
            pts = sorted(
                (e["steps"], e[m], e[f"{m}_std"]) for e in entries if e["label"] == label and m in e
            )
            if pts:
                x, y, err = zip(*pts, strict=True)
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        if real is not None and m in real:
            ax.axhline(real[m], color="gray", linestyle="--", label="real")
        ax.set_xscale("log")
        ax.set_xticks(all_steps, [str(s) for s in all_steps])
        ax.minorticks_off()
        ax.set_xlabel("steps")
        ax.set_title(m)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"prompt set: {prompt_set}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
