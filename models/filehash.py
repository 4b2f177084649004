"""The SHA-256 of a checkpoint (the hash model sites show, written into every PNG), computed once per file.

Hashing a 2 GB checkpoint takes seconds, as long as the rest of a one-shot GPU run.  The digest is remembered in the
user's cache folder (``$XDG_CACHE_HOME/magicstyle``, else ``~/.cache/magicstyle``), in ``sha256.json``, keyed by the
file's resolved path, size and modification time (ns): a file that changes is hashed again.  The cache is a
convenience: a folder that cannot be read or written, or a damaged cache file, only means hashing again (never an
error).  Writers replace the file atomically; when two processes write at once, one entry may be lost and is hashed
again next time.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from models.usercache import cache_folder, read_json, write_json

CACHE_FILE = "sha256.json"
MAX_ENTRIES = 256  # the most recently hashed files are kept


def file_sha256(path: str | Path) -> str:
    """The SHA-256 (64 hex digits) of the file at ``path``, from the cache when the file has not changed."""
    path = Path(path).resolve()
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns, str(cache_folder()))


def short_sha256(path: str | Path) -> str:
    """The first 10 hex digits of the file's SHA-256, as model sites show them."""
    return file_sha256(path)[:10]


@functools.lru_cache(maxsize=16)  # a long-lived process (the demo, a job run) asks again without reading the cache
def _sha256(path: str, size: int, mtime_ns: int, folder: str) -> str:
    cache = Path(folder) / CACHE_FILE
    entries = read_json(cache)
    entry = entries.get(path)
    if isinstance(entry, dict) and entry.get("size") == size and entry.get("mtime_ns") == mtime_ns:
        digest = entry.get("sha256")
        if isinstance(digest, str) and len(digest) == 64:
            return digest
    digest = hash_file(path)
    entries.pop(path, None)
    entries[path] = {"size": size, "mtime_ns": mtime_ns, "sha256": digest}
    write_json(cache, dict(list(entries.items())[-MAX_ENTRIES:]))
    return digest


def hash_file(path: str | Path) -> str:
    """The SHA-256 of the file's bytes, read in 16 MiB chunks (no cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()
