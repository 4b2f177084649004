"""The run folder's ``grid.png``: rows = content/style pairs, columns = settings.

A header row holds each setting's text (wrapped to the column); the left column holds the small content and style
images with their file names.  Text is PIL's bundled font (FreeType) at 16 px, so the sheet is readable on paper.
A job without an image (failed, or not run) is a grey cell that says so.
"""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .images import ImageError, open_rgb, square

RUN_CONFIG_LABEL = "(run config)"  # the name of a setting with an empty label: the run's own configuration (no sweep)

CELL = 192  # px, each output image
PAD = 8
FONT_SIZE = 16
MAX_ROWS = 64  # pairs shown; a larger run's grid shows the first ones and says how many are left out
BACKGROUND, INK, EMPTY = (255, 255, 255), (0, 0, 0), (225, 225, 225)


def font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def wrap(text: str, width: int, f: ImageFont.FreeTypeFont) -> list[str]:
    """Greedy line breaking after spaces; a word wider than the column breaks at any character."""
    lines = [""]
    for word in text.replace(" ", " \0").split("\0"):
        if f.getlength((lines[-1] + word).rstrip()) <= width:
            lines[-1] += word
            continue
        if lines[-1]:
            lines.append("")
        for ch in word:
            if lines[-1] and f.getlength((lines[-1] + ch).rstrip()) > width:
                lines.append("")
            lines[-1] += ch
    return [line.rstrip() for line in lines]


def fit(text: str, width: int, f: ImageFont.FreeTypeFont) -> str:
    """``text`` cut with an ellipsis so that it fits ``width``."""
    if f.getlength(text) <= width:
        return text
    while text and f.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def thumbnail(path: Path | None, size: int, note: str = "") -> Image.Image:
    """The image at ``path`` resized to size x size, or a grey square that says ``note``."""
    if path is not None and path.is_file():
        try:  # the same reading as the job's (EXIF orientation, transparency on white, size limit)
            return square(open_rgb(path), size)
        except ImageError:
            note = note or "unreadable"
    cell = Image.new("RGB", (size, size), EMPTY)
    f = font(14)
    draw = ImageDraw.Draw(cell)
    draw.text((size / 2, size / 2), fit(note or "missing", size - 4, f), fill=INK, font=f, anchor="mm")
    return cell


def render(labels: list[str], rows: list[tuple[Path, Path]], cells: list[list[tuple[Path | None, str]]]) -> Image.Image:
    """labels: one per column; rows: (content, style) per row; cells[r][k]: (image path or None, note if none)."""
    f, small = font(), font(14)
    shown = rows[:MAX_ROWS]
    line = FONT_SIZE + 4
    header_lines = [wrap(label or RUN_CONFIG_LABEL, CELL, f) for label in labels]
    header = PAD + line * max(len(h) for h in header_lines) + PAD
    footer = line + PAD if len(rows) > len(shown) else 0
    left = CELL + 2 * PAD
    sheet = Image.new("RGB", (left + len(labels) * (CELL + PAD) + PAD, header + len(shown) * (CELL + PAD) + footer),
                      BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, PAD), "content", fill=INK, font=f)
    draw.text((PAD + CELL // 2, PAD), "style", fill=INK, font=f)
    for k, lines in enumerate(header_lines):
        x = left + k * (CELL + PAD)
        for i, text in enumerate(lines):
            draw.text((x, PAD + i * line), text, fill=INK, font=f)
    half = CELL // 2 - PAD // 2
    for r, (content, style) in enumerate(shown):
        y = header + r * (CELL + PAD)
        for i, path in enumerate((content, style)):
            x = PAD + i * (half + PAD)
            sheet.paste(thumbnail(path, half, "unreadable"), (x, y))
            draw.text((x, y + half + 4), fit(path.stem, half, small), fill=INK, font=small)
        for k, (path, note) in enumerate(cells[r]):
            sheet.paste(thumbnail(path, CELL, note), (left + k * (CELL + PAD), y))
    if footer:
        draw.text((PAD, sheet.height - footer), f"... and {len(rows) - len(shown)} more pairs (see index.json)",
                  fill=INK, font=f)
    return sheet


def png_bytes(jobs: list, settings: list, folder: Path) -> bytes:
    """The grid of a run's jobs (``magicstyle.jobs.Job``, content-major) as PNG bytes."""
    rows: dict[tuple[Path, Path], list] = {}
    for job in jobs:
        row = rows.setdefault((job.content.path, job.style.path), [(None, "not run")] * len(settings))
        path = folder / job.output
        row[job.setting] = (path, "") if job.status in ("done", "skipped") else (None, job.status)
    buffer = io.BytesIO()
    render([s.label for s in settings], list(rows), list(rows.values())).save(buffer, format="PNG")
    return buffer.getvalue()
