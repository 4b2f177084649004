"""Many processes (``torchrun``): the jobs of a run sharded over ranks, one device each.

    torchrun --nproc_per_node=4 train_free_run.py --content portraits/ --style styles/ --output runs/grid

Every rank plans the same run from the same command line, runs its share of the pending jobs (``deal``: pairs
grouped by content image, so that each content is inverted by one rank only; by style when there are fewer contents
than ranks; balanced by the number of jobs) and writes their PNGs; rank 0 gathers the results after a barrier and
writes ``index.json``, ``grid.png`` and the report.  NCCL on CUDA, gloo on the CPU.  A rank that dies loses only
its unfinished jobs: the same command run again skips what exists (resume).
"""
from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .config import ConfigError
from .progress import Progress, say


def world() -> tuple[int, int]:
    """(rank, number of ranks) from torchrun's environment; (0, 1) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def start(device: str) -> None:
    """Join the process group (once); each CUDA rank uses the GPU of its local rank."""
    if world()[1] == 1 or dist.is_initialized():
        return
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        local, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local >= gpus:
            raise ConfigError(f"torchrun started more processes on this machine than it has GPUs ({gpus}); use "
                              f"--nproc_per_node={gpus}, or --device cpu")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))


def deal(jobs: list, ranks: int) -> list[list]:
    """Jobs -> one list per rank, in the run's order.  Jobs are dealt in whole groups that share an image, so that
    each image is inverted by one rank where possible: by content image; by style image when there are fewer
    contents than ranks; then by pair, then job by job (an image is then inverted by several ranks, in parallel).
    Groups go largest first to the rank with the fewest jobs (ties: the lower rank), so a resumed run, where some
    contents have fewer pending jobs than others, is still balanced."""
    keys = (lambda j: j.content.path, lambda j: j.style.path, lambda j: (j.content.path, j.style.path), id)
    for key in keys:
        groups: dict = {}
        for job in jobs:
            groups.setdefault(key(job), []).append(job)
        if len(groups) >= ranks:
            break
    shares: list[list] = [[] for _ in range(ranks)]
    for group in sorted(groups.values(), key=len, reverse=True):  # stable: equal sizes keep the run's order
        min(shares, key=len).extend(group)
    order = {id(job): i for i, job in enumerate(jobs)}
    return [sorted(share, key=lambda j: order[id(j)]) for share in shares]


def share(jobs: list) -> list:
    """This rank's jobs (``deal``); all of them without torchrun."""
    rank, size = world()
    return jobs if size == 1 else deal(jobs, size)[rank]


def log(message: str, quiet: bool = False) -> None:
    """A line on stderr from every rank under torchrun (``rank 1/4: ...``); nothing without torchrun or with --quiet."""
    rank, size = world()
    if size > 1 and not quiet:
        say(f"rank {rank}/{size}: {message}")  # after any bar's unfinished line


class RunProgress(Progress):
    """Rank 0's bar for the whole run under torchrun: its own finished jobs plus the other ranks' jobs whose output
    exists (the run folder is shared), over all pending jobs."""

    def __init__(self, others: list[Path], total: int, **kwargs):
        super().__init__(**kwargs)
        self.others, self.run_total = list(others), total  # the other ranks' outputs not seen yet
        self.phase, self.total, self.start = "jobs", total, time.perf_counter()  # a rank 0 without jobs: ``finish``
        self.shown = self.others_done = 0

    def begin(self, phase: str, total: int) -> None:
        super().begin(phase, self.run_total)

    def update(self, done: int) -> None:
        missing = [path for path in self.others if not path.exists()]  # an output seen once is not looked for again
        self.others_done += len(self.others) - len(missing)
        self.others = missing
        self.shown = min(done + self.others_done, self.total)
        super().update(self.shown)

    def finish(self) -> None:
        """After the barrier: the whole run is done (the bar's last line, unless it was drawn already)."""
        if self.shown < self.total:
            self.update(self.total)


def agree(obj):
    """Rank 0's ``obj`` on every rank (e.g. which jobs are pending: decided once, before any rank writes)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order (after a barrier); ``[obj]`` without torchrun."""
    if not dist.is_initialized():
        return [obj]
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def stop() -> None:
    """Leave the process group, all ranks together (a barrier), after a pause that lets the backend's worker threads
    drop the finished collectives.  Without the pause gloo could deadlock (seen with torch 2.5, a few runs in ten): the
    last reference to a finished collective is in gloo's worker thread, and freeing its tensors takes the GIL, while the
    main thread holds the GIL in ``destroy_process_group`` and waits for that very thread to end.  Sleeping releases
    the GIL."""
    if dist.is_initialized():
        dist.barrier()
        time.sleep(0.1)
        dist.destroy_process_group()
