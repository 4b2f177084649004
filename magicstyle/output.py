"""Writing results: never over a user's file without ``overwrite``, never half a file (temporary file + rename)."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from models.errors import MagicStyleError


class OutputError(MagicStyleError):
    """An output path that exists (without --overwrite), is a folder, or cannot be written."""


class WriteError(OutputError):
    """Writing failed once the work was done (a full disk, an I/O error): the run failed, not its input, so the CLI
    exits with status 1, as for a failed job, not 2."""


def check_writable(path: str | Path, *, overwrite: bool = False, what: str = "output") -> None:
    """Fail now, before any work, if ``path`` could not be written later."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise OutputError(f"{what} {path} exists; pass --overwrite to replace it, or choose another name")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path} cannot be written: {parent} is not a writable folder")


def write_atomic(path: str | Path, data: bytes, *, overwrite: bool = False, what: str = "output") -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, renamed into place when complete."""
    path = Path(path)
    check_writable(path, overwrite=overwrite, what=what)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions a plain open() would
        os.replace(tmp, path)
    except OSError as e:
        hint = ": free some space and run again" if e.errno == errno.ENOSPC else ""
        raise WriteError(f"cannot write {what} {path} ({e.strerror or e}){hint}") from None
    finally:
        if tmp is not None and Path(tmp).exists():
            Path(tmp).unlink()
