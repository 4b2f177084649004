"""The background PNG writer of batch runs (magicstyle/writer.py): a batch is written while the next one runs, the
jobs are reported in order in the caller's thread, a failed write is reported on its jobs, and an exception in the
caller lets the write in flight finish without reporting it."""
from __future__ import annotations

import threading

import pytest

from magicstyle.writer import Writer


class Log:
    def __init__(self):
        self.done, self.failed, self.threads = [], [], []

    def on_done(self, jobs, seconds):
        self.threads.append(threading.current_thread())
        self.done.append((jobs, seconds))

    def on_failed(self, jobs, error):
        self.threads.append(threading.current_thread())
        self.failed.append((jobs, error))


def test_a_batch_is_written_while_the_next_runs_and_reported_in_order():
    log, started, release, writers = Log(), threading.Event(), threading.Event(), []

    def slow():
        writers.append(threading.current_thread())
        started.set()
        assert release.wait(10), "the caller was blocked while the batch was written"

    with Writer(log.on_done, log.on_failed) as writer:
        writer.submit(["a1", "a2"], slow)
        assert started.wait(10)  # the first batch is being written ...
        assert log.done == []  # ... and not reported yet, while the caller runs the next batch
        release.set()
        writer.submit(["b"], lambda: None)  # collects the first batch before handing over the second
        assert [jobs for jobs, _ in log.done] == [["a1", "a2"]]
    assert [jobs for jobs, _ in log.done] == [["a1", "a2"], ["b"]]  # the last one at the end of the block
    assert all(seconds >= 0 for _, seconds in log.done) and log.failed == []
    assert writers[0] is not threading.main_thread()
    assert set(log.threads) == {threading.main_thread()}  # the callbacks run in the caller's thread


def test_a_failed_write_is_reported_on_its_jobs_and_the_next_batches_go_on():
    log = Log()

    def full_disk():
        raise OSError(28, "No space left on device")

    with Writer(log.on_done, log.on_failed) as writer:
        writer.submit(["a"], full_disk)
        writer.submit(["b"], lambda: None)
    assert [(jobs, type(e)) for jobs, e in log.failed] == [(["a"], OSError)]
    assert [jobs for jobs, _ in log.done] == [["b"]]


def test_an_exception_in_the_caller_lets_the_write_in_flight_finish_unreported():
    log, started, finished = Log(), threading.Event(), []

    def write():
        started.set()
        threading.Event().wait(0.2)  # still writing when the caller is interrupted
        finished.append(True)

    with pytest.raises(KeyboardInterrupt):
        with Writer(log.on_done, log.on_failed) as writer:
            writer.submit(["a"], write)
            assert started.wait(10)
            raise KeyboardInterrupt
    assert finished == [True]  # whole (each PNG is written atomically: whole or absent)
    assert log.done == [] and log.failed == []
