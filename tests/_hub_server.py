"""A stand-in for the Hugging Face Hub's file endpoint, for tests/test_hub.py: the part ``hf_hub_download`` uses.

    HEAD/GET /{owner}/{name}/resolve/{revision}/{path}
      200 (206 for ``Range: bytes=N-``) with ETag (the file's SHA-256, as the Hub gives for LFS files),
      X-Repo-Commit, Content-Length, Accept-Ranges; the Hub's error codes (X-Error-Code: RepoNotFound,
      RevisionNotFound, EntryNotFound, GatedRepo) otherwise.

It listens on 127.0.0.1 only, on a free port, in daemon threads, and stops itself after ``lifetime`` seconds even if a
test forgets to.  ``drop_after={path: n}`` sends the first n bytes of that file and then drops the connection, on
every request (a download that cannot complete); ``token`` makes every repository in ``gated`` need
``Authorization: Bearer <token>``.  ``requests`` records (method, path, Range) of each request.
"""
from __future__ import annotations

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # every repository's one commit ("main" resolves to it)


class HubServer:
    def __init__(self, repos: dict[str, dict[str, bytes]], *, gated=(), token: str | None = None,
                 drop_after: dict[str, int] | None = None, lifetime: float = 120.0):
        self.repos, self.gated, self.token = repos, set(gated), token
        self.drop_after = drop_after or {}
        self.requests: list[tuple[str, str, str | None]] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._stopped = False

    def __enter__(self) -> "HubServer":
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving and close the port: later connections are refused."""
        if not self._stopped:
            self._stopped = True
            self._timer.cancel()
            self._httpd.shutdown()
            self._httpd.server_close()

    def answer(self, method: str, path: str, headers) -> tuple[int, dict[str, str], bytes, int | None]:
        """(status, headers, body, bytes to send before dropping the connection or None)."""
        parts = [unquote(p) for p in urlsplit(path).path.split("/")[1:]]
        if len(parts) < 5 or parts[2] != "resolve":
            return 400, {}, b"", None
        repo, revision, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo not in self.repos:
            return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b"", None
        if repo in self.gated and headers.get("Authorization") != f"Bearer {self.token}":
            return 401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this repository is restricted"}, \
                b"", None
        if revision not in ("main", COMMIT):
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b"", None
        if file not in self.repos[repo]:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                         "X-Repo-Commit": COMMIT}, b"", None
        data = self.repos[repo][file]
        found = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes",
                 "Content-Type": "application/octet-stream"}
        start, status = 0, 200
        wanted = headers.get("Range")
        if method == "GET" and wanted and wanted.startswith("bytes=") and wanted.endswith("-"):
            start, status = int(wanted[6:-1]), 206
            found["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        drop = self.drop_after.get(file)
        return status, found, data[start:], None if drop is None else max(drop - start, 0)


def _handler(server: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 10  # seconds a silent client may hold a thread

        def do_HEAD(self):
            self._serve("HEAD")

        def do_GET(self):
            self._serve("GET")

        def _serve(self, method: str) -> None:
            server.requests.append((method, self.path, self.headers.get("Range")))
            status, headers, body, drop = server.answer(method, self.path, self.headers)
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if method == "GET":
                self.wfile.write(body if drop is None else body[:drop])
                if drop is not None:  # the connection dies mid-file
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True

        def log_message(self, *args):  # quiet
            pass

    return Handler
