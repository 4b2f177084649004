"""The user's cache folder and the small JSON files kept there (the CPU tuning, the checkpoint hashes).

The folder follows the XDG base directory rule: ``$XDG_CACHE_HOME/magicstyle`` when that variable holds an absolute
path, else ``~/.cache/magicstyle``.  Everything in it is a convenience: a missing, unreadable or damaged file reads as
empty, and a folder that cannot be written (a read-only home, a full disk) is skipped silently, so the caller only
computes again.  Writes go through a temporary file and a rename, so a reader never sees half a file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or ""
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "magicstyle"


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; {} for a missing, unreadable or malformed file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict, **dump_options) -> None:
    """Replace ``path`` with ``data`` atomically; a file that cannot be written is skipped silently."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, **dump_options)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
