"""Attention diagnostics: how much of the generated image's attention lands on the style image, per layer and step.

For every layer the recipe runs in (rows) and every generation step (columns), the share of the generated queries'
softmax attention mass that lands on style tokens, averaged over the heads, the queries (all, or those of
``diagnostics.region``) and the pair's rows (both guidance branches, or the conditional one with
``ffa.cfg_rows=cond``).  The rest lands on content tokens (``ffa``) or on the generated image's own (``stylealigned``);
``styleid`` and ``vsp`` attend to style tokens only (1.0 by construction); ``plain`` and plain-function recipes
report nothing (null).  A step where the recipe does not run (``ffa.timesteps``) is null too.

    diagnostics = AttentionDiagnostics.from_config(cfg)
    z = fff(sd, inversion, cfg, pairs, diagnostics=diagnostics)       # the same z as without diagnostics
    write_diagnostics(diagnostics, Path("outputs/astronaut_ihc"))     # .attention.json and .attention.png

Off (``diagnostics=None``) it costs one attribute test per recipe call.  On, it computes the attention scores a
second time, in chunks of queries, without touching what the recipe returns.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig

from .config import diagnostics_region
from .output import write_atomic

SCORE_BLOCK = 2**26  # scores computed at a time (256 MiB in float32): queries are taken in chunks to stay under it


def style_share(q: torch.Tensor, k: torch.Tensor, style_keys: int, heads: int,
                queries: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of q: the mean over heads and queries of sum over the last ``style_keys`` keys of
    softmax(Q K^T / sqrt(d)), the attention mass on style tokens, in [0, 1].

    q: (B, Nq, C); k: (1 or B, Nk, C); ``queries``: indices of the queries to average over (default all).
    Returns (B,) float32 (float64 for float64 inputs).
    """
    B, _, C = q.shape
    d = C // heads
    dtype = torch.promote_types(q.dtype, torch.float32)
    qh = q.unflatten(-1, (heads, d)).transpose(1, 2).to(dtype)  # (B, heads, Nq, d)
    kh = k.expand(B, -1, -1).unflatten(-1, (heads, d)).transpose(1, 2).to(dtype)  # (B, heads, Nk, d)
    if queries is not None:
        qh = qh[:, :, queries]
    if style_keys == 0:
        return torch.zeros(B, dtype=dtype, device=q.device)
    total = torch.zeros(B, dtype=dtype, device=q.device)
    chunk = max(1, SCORE_BLOCK // (B * heads * kh.shape[2]))
    for start in range(0, qh.shape[2], chunk):
        scores = qh[:, :, start:start + chunk] @ kh.transpose(-1, -2) / math.sqrt(d)  # (B, heads, n, Nk)
        share = torch.exp(scores[..., -style_keys:].logsumexp(-1) - scores.logsumexp(-1))  # (B, heads, n)
        total += share.sum((1, 2))
    return (total / (heads * qh.shape[2])).clamp(0.0, 1.0)


def region_queries(region: Sequence[int], size: int, tokens: int, device=None) -> torch.Tensor:
    """The query indices (row-major over the layer's square token grid) whose cells' centres lie in the pixel box
    x0, y0, x1, y1 of the size x size output; at least the cell holding the box's centre."""
    side = math.isqrt(tokens)
    cell = size / side
    x0, y0, x1, y1 = region
    centres = (torch.arange(side, dtype=torch.float64) + 0.5) * cell
    cols = ((centres >= x0) & (centres < x1)).nonzero().flatten()
    rows = ((centres >= y0) & (centres < y1)).nonzero().flatten()
    if len(cols) == 0:
        cols = torch.tensor([min(int((x0 + x1) / 2 / cell), side - 1)])
    if len(rows) == 0:
        rows = torch.tensor([min(int((y0 + y1) / 2 / cell), side - 1)])
    return (rows[:, None] * side + cols[None, :]).flatten().to(device)


class AttentionDiagnostics:
    """Collects the style shares of one FFF run (``fff(..., diagnostics=this)``); one table per pair."""

    def __init__(self, region: Sequence[int] | None = None):
        self.region = tuple(region) if region is not None else None
        self.layers: list[str] = []
        self.timesteps: list[int] = []
        self.pairs: list[tuple[int, int]] = []
        self.recipe = ""
        self.size = 0
        self.shares: dict[tuple[str, int], torch.Tensor] = {}  # (layer, timestep) -> (pairs,)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> AttentionDiagnostics:
        return cls(diagnostics_region(cfg))

    def begin(self, layers: list[str], timesteps: list[int], pairs: list[tuple[int, int]], *, size: int,
              recipe: str):
        """Called by ``fff``: start a run; returns the observer the feature store calls."""
        self.layers, self.timesteps, self.pairs, self.size, self.recipe = list(layers), list(timesteps), list(pairs), size, recipe
        self.shares = {}
        return self.observe

    def observe(self, path: str, t: int, q: torch.Tensor, k: torch.Tensor, style_keys: int, heads: int,
                row_pairs: list[int]) -> None:
        queries = None if self.region is None else region_queries(self.region, self.size, q.shape[1], q.device)
        share = style_share(q, k, style_keys, heads, queries).float()  # (rows,)
        index = torch.tensor(row_pairs, device=share.device)
        sums = torch.zeros(len(self.pairs), device=share.device).index_add_(0, index, share)
        counts = torch.zeros(len(self.pairs), device=share.device).index_add_(0, index, torch.ones_like(share))
        self.shares[(path, t)] = sums / counts  # NaN for a pair without rows (never: every pair has a row)

    def table(self, pair_index: int = 0) -> list[list[float | None]]:
        """Rows: layers; columns: generation steps; None where the recipe did not run or reports nothing."""
        def value(path: str, t: int) -> float | None:
            share = self.shares.get((path, t))
            return None if share is None else round(float(share[pair_index]), 6)

        return [[value(path, t) for t in self.timesteps] for path in self.layers]

    def to_dict(self, pair_index: int = 0) -> dict:
        table = self.table(pair_index)
        values = [v for row in table for v in row if v is not None]
        return {
            "format": "magicstyle-attention/1",
            "recipe": self.recipe,
            "pair": list(self.pairs[pair_index]),
            "region": list(self.region) if self.region else None,
            "layers": self.layers,
            "steps": list(range(len(self.timesteps))),
            "timesteps": self.timesteps,
            "style_share": table,
            "mean": sum(values) / len(values) if values else None,
        }


def write_diagnostics(diag: AttentionDiagnostics, stem: str | Path, pair_index: int = 0, *,
                      overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``STEM.attention.json`` and ``STEM.attention.png`` (a labelled heat map with a colour bar) for one pair.
    ``stem``: the output's path without its extension (``outputs/a_b`` or ``outputs/a_b.png``).  Atomic writes; an
    existing file is an ``OutputError`` unless ``overwrite``.  Returns the two paths."""
    stem = Path(stem)
    stem = stem.with_suffix("") if stem.suffix.lower() == ".png" else stem
    json_path, png_path = (stem.with_name(stem.name + ext) for ext in (".attention.json", ".attention.png"))
    record = diag.to_dict(pair_index)
    png = heat_map(record, title=stem.name)
    write_atomic(json_path, (json.dumps(record, indent=1) + "\n").encode(), overwrite=overwrite, what="diagnostics")
    write_atomic(png_path, png, overwrite=overwrite, what="diagnostics")
    return json_path, png_path


def heat_map(record: dict, title: str) -> bytes:
    """The PNG bytes of the layers x steps style-share map (matplotlib, imported here: only diagnostics need it)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = np.array([[np.nan if v is None else v for v in row] for row in record["style_share"]], dtype=float)
    layers = [".".join(path.split(".")[:2]) if path.count(".") > 1 else path for path in record["layers"]]
    steps = len(record["steps"])
    fig = Figure(figsize=(max(5.0, 1.6 + 0.28 * steps), max(2.4, 1.4 + 0.32 * len(layers))), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = _colormap()
    image = ax.imshow(np.ma.masked_invalid(table), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    every = max(1, steps // 15)
    ax.set_xticks(range(0, steps, every), [str(i) for i in range(0, steps, every)], fontsize=8)
    ax.set_xlabel("generation step (0 = noisiest)" + ("; grey: the recipe did not run" if np.isnan(table).any() else ""))
    ax.set_ylabel("layer")
    region = f", region {tuple(record['region'])}" if record["region"] else ""
    ax.set_title(f"{title}: recipe {record['recipe']}, pair {tuple(record['pair'])}{region}", fontsize=9)
    fig.colorbar(image, ax=ax, label="attention share on style tokens")
    if np.isnan(table).all():
        ax.text(0.5, 0.5, "this recipe reports no attention shares", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _colormap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="lightgrey")  # grey: steps or layers where the recipe did not run
