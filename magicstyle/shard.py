"""Many processes (``torchrun``): the jobs of a run sharded over ranks, one device each.

    torchrun --nproc_per_node=4 train_free_run.py --content portraits/ --style styles/ --output runs/grid

Every rank plans the same run from the same command line, runs its share of the pending jobs (pairs grouped by
content image, so that each content is inverted by one rank only; by style when there are fewer contents than
ranks) and writes their PNGs; rank 0 gathers the results after a barrier and writes ``index.json``, ``grid.png`` and
the report.  NCCL on CUDA, gloo on the CPU.  A rank that dies loses only its unfinished jobs: the same command run
again skips what exists (resume).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, number of ranks) from torchrun's environment; (0, 1) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def start(device: str) -> None:
    """Join the process group (once); each CUDA rank uses the GPU of its local rank."""
    if world()[1] == 1 or dist.is_initialized():
        return
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))


def share(jobs: list, n_contents: int, n_styles: int) -> list:
    """This rank's jobs: whole pairs, grouped by content image (by style when there are fewer contents than ranks)."""
    rank, size = world()
    if size == 1:
        return jobs
    by_content = n_contents >= size or n_contents >= n_styles
    keys = list(dict.fromkeys(j.content.path if by_content else j.style.path for j in jobs))
    return [j for j in jobs if keys.index(j.content.path if by_content else j.style.path) % size == rank]


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
    if dist.is_initialized():
        dist.destroy_process_group()
