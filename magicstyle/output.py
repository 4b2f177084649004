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


def check_writable(path: str | Path, *, overwrite: bool = False, what: str = "output",
                   probe: bool = True) -> None:
    """Fail now, before any work, if ``path`` could not be written later.  With ``probe``, a temporary file is
    created and removed in the nearest existing folder: permissions alone do not tell (root may write anywhere the
    mode bits say, yet not in /proc, a read-only mount or a full quota)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise OutputError(f"{what} {path} exists; pass --overwrite to replace it, or choose another name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    advice = "choose a place you can write to"
    if not parent.is_dir():
        raise OutputError(f"{what} {path} cannot be written: {parent} is a file, not a folder; {advice}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path} cannot be written: {parent} is not a writable folder; {advice}")
    if probe:
        try:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=".magicstyle-probe-", suffix=".tmp")
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise OutputError(f"{what} {path} cannot be written: {parent} does not take new files "
                              f"({e.strerror or e}); {advice}") from None


def write_atomic(path: str | Path, data: bytes, *, overwrite: bool = False, what: str = "output") -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, renamed into place when complete."""
    path = Path(path)
    check_writable(path, overwrite=overwrite, what=what, probe=False)  # the temporary file below is the probe
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
        hint = ("free some space and run again" if e.errno == errno.ENOSPC else
                "check that its folder exists and can be written, or choose another place, and run again")
        raise WriteError(f"cannot write {what} {path} ({e.strerror or e}): {hint}") from None
    finally:
        if tmp is not None and Path(tmp).exists():
            Path(tmp).unlink()
