"""Writing a batch run's PNGs in a background thread while the next batch runs.

Pillow encodes a PNG holding the GIL: about 80 ms of CPU for 512 px at its default compression level (Xeon, family 6
model 207).  A batch of 16 pairs spends about 1.3 s writing, beside about 3 s of UNet work for it on an H100, time in
which the main thread mostly waits for the GPU.  So ``run_jobs`` (magicstyle/batch.py) hands each batch's writing to
one writer thread and goes on with the next batch.  Before it hands over the next batch's writing it collects the
previous one's, so at most one batch of images waits in memory and the jobs are recorded in order.  A job is
``done`` once its PNG is in place (set by the writer itself, so that an interrupted run still lists every PNG
written); a write that fails is reported back to the main thread, which records it on the jobs not yet written.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class Writer:
    """``submit(jobs, write)`` runs ``write()`` in the background; ``done(jobs, seconds)`` or ``failed(jobs, error)`` is
    called in the caller's thread when the write is collected (by the next ``submit``, or at the end of the ``with``
    block)."""

    def __init__(self, done: Callable[[list, float], None], failed: Callable[[list, BaseException], None]):
        self.done, self.failed = done, failed
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="png-writer")
        self.pending: tuple[list, Future] | None = None

    def submit(self, jobs: list, write: Callable[[], None]) -> None:
        self.collect()
        self.pending = jobs, self.pool.submit(timed, write)

    def collect(self) -> None:
        """Wait for the batch in flight, if any, and report it."""
        if self.pending is None:
            return
        (jobs, future), self.pending = self.pending, None
        try:
            seconds = future.result()
        except Exception as e:  # noqa: BLE001 - recorded on the jobs not yet written
            self.failed(jobs, e)
        else:
            self.done(jobs, seconds)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, kind, *_) -> None:
        """Collect the last batch and stop the thread.  After an exception (Ctrl-C too) the write in flight still
        finishes, so that each PNG is whole or absent, but it is not reported."""
        try:
            if kind is None:
                self.collect()
        finally:
            self.pending = None
            self.pool.shutdown(wait=True)


def timed(write: Callable[[], None]) -> float:
    start = time.perf_counter()
    write()
    return time.perf_counter() - start
