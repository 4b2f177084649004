"""The checkpoint's SHA-256, cached in the user's cache folder (models/filehash.py)."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from models import filehash


@pytest.fixture
def hashes(tmp_path, monkeypatch):
    """A fresh cache folder under tmp_path, and a count of the files actually read and hashed."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []
    real = filehash.hash_file

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(filehash, "hash_file", counting)
    filehash._sha256.cache_clear()  # each test starts like a new process
    yield calls
    filehash._sha256.cache_clear()


def new_process():
    filehash._sha256.cache_clear()


def test_a_second_run_reads_the_digest_from_the_cache(tmp_path, hashes):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"weights" * 1000)
    want = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert filehash.file_sha256(ckpt) == want and filehash.short_sha256(ckpt) == want[:10]
    assert len(hashes) == 1  # the second call in the same process did not hash again
    new_process()
    assert filehash.short_sha256(tmp_path / "." / "model.safetensors") == want[:10]  # same file, other spelling
    assert len(hashes) == 1
    entry = json.loads((tmp_path / "cache" / "magicstyle" / "sha256.json").read_text())[str(ckpt.resolve())]
    assert entry == {"size": ckpt.stat().st_size, "mtime_ns": ckpt.stat().st_mtime_ns, "sha256": want}


def test_a_changed_file_is_hashed_again(tmp_path, hashes):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"a" * 100)
    first = filehash.file_sha256(ckpt)
    new_process()
    ckpt.write_bytes(b"b" * 100)  # same size: the modification time tells them apart
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert filehash.file_sha256(ckpt) == hashlib.sha256(b"b" * 100).hexdigest() != first
    assert len(hashes) == 2


def test_an_unwritable_or_damaged_cache_still_gives_the_digest(tmp_path, hashes, monkeypatch):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x" * 10)
    want = hashlib.sha256(b"x" * 10).hexdigest()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the cache folder would have to be created inside a file: fails even as root
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert filehash.file_sha256(ckpt) == want
    assert blocker.read_text() == ""
    new_process()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "magicstyle").mkdir(parents=True)
    (tmp_path / "cache" / "magicstyle" / "sha256.json").write_text("{not json")
    assert filehash.file_sha256(ckpt) == want  # a damaged cache is replaced
    assert json.loads((tmp_path / "cache" / "magicstyle" / "sha256.json").read_text())[str(ckpt.resolve())]


def test_the_cache_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert filehash.cache_folder() == tmp_path / "magicstyle"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the spec: relative values are ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert filehash.cache_folder() == tmp_path / "home" / ".cache" / "magicstyle"
