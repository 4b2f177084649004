"""The evaluation's outputs: a Markdown table (Table I's cosines x100, as the paper prints them), a CSV file (all
values as computed: cosines as fractions) and a scatter plot (content vs style fidelity, fractions)."""
from __future__ import annotations

import csv
import io
import json

import numpy as np

HEADERS = {  # column -> Markdown header
    "setting": "setting", "n": "N", "not_done": "not done", "clip_content": "CLIP-I content ×100 ↑",
    "clip_style": "CLIP-I style ×100 ↑", "dino_content": "DINO ×100 ↑", "facesim": "FaceSim ×100 ↑",
    "faces_missing": "no face",
    "fid_style": "FID style ↓", "fid_content": "FID content ↓", "lpips": "LPIPS ↓", "fid_art": "FID (ArtFID) ↓",
    "artfid": "ArtFID ↓",
}


# Cosine columns that the paper's Table I prints x100 (CLIP-I 89.2, FaceSim 95.8, DINO 96.9); metrics.md does the same
# (the header says x100), metrics.csv keeps the fractions
PERCENT = ("clip_content", "clip_style", "dino_content", "facesim")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"
    return str(value)


def _scaled(value, column: str):
    return 100 * value if column in PERCENT and isinstance(value, float) else value


def markdown(rows: list[dict], columns: list[str], note: str = "") -> str:
    lines = ["| " + " | ".join(HEADERS[c] for c in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_fmt(_scaled(r[c], c)).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([["" if r[c] is None else r[c] for c in columns] for r in rows])
    return buffer.getvalue()


def sweep_lines(settings: list[dict]) -> list[list[int]]:
    """Groups of settings that differ only in ffa.beta (and ffa.alpha), each sorted by beta: the beta sweeps.  Only
    settings whose beta is a number take part (a hand-edited index may hold anything there)."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(settings):
        overrides = s.get("overrides") or {}
        beta = overrides.get("ffa.beta")
        if isinstance(beta, (int, float)) and not isinstance(beta, bool):
            rest = {k: v for k, v in overrides.items() if k not in ("ffa.beta", "ffa.alpha")}
            groups.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(i)
    return [sorted(g, key=lambda i: settings[i]["overrides"]["ffa.beta"]) for g in groups.values() if len(g) > 1]


def scatter_png(rows: list[dict], settings: list[dict], content_axis: str) -> bytes | None:
    """Content fidelity (CLIP-I content or FaceSim) against style fidelity (CLIP-I style), one point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = "clip_content" if content_axis == "clip" else "facesim"
    points = {i: (r[x_key], r["clip_style"]) for i, r in enumerate(rows)
              if r[x_key] is not None and r["clip_style"] is not None}
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    for line in sweep_lines(settings):
        xy = np.array([points[i] for i in line if i in points])
        if len(xy) > 1:
            ax.plot(xy[:, 0], xy[:, 1], "-", color="0.6", zorder=1, label="beta sweep")
    for i, (x, y) in points.items():
        ax.scatter([x], [y], zorder=2)
        ax.annotate(rows[i]["setting"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("content fidelity: " + ("CLIP-I content" if content_axis == "clip" else "FaceSim"))
    ax.set_ylabel("style fidelity: CLIP-I style")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles[:1], labels[:1], loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
