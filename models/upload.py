"""Moving checkpoint tensors to their device as the loader reads them, one tensor at a time.

To a CUDA device, each tensor is read from the file straight into pinned (page-locked) host memory and copied to the
GPU asynchronously: the GPU copies tensor i while the file read of tensor i + 1 goes on.  Two pinned buffers are used
in turn, each as large as the largest tensor so far, so a load holds at most two tensors on the host whatever the
model's size (pageable memory would make each copy synchronous, through a driver staging buffer).  The cast to the
model's dtype happens on the GPU.  Elsewhere (CPU, MPS) a tensor is read into its own buffer and moved with
``Tensor.to``, as before.
"""
from __future__ import annotations

import torch

PINNED = True  # bench/benchmark.py turns it off to time the plain path against it
MIN_BUFFER = 1 << 26  # bytes: 64 MiB, so the many small tensors share one buffer


class Upload:
    """``read(file, key)`` a tensor, then ``to_device(tensor, dtype)``; for CUDA through two pinned buffers."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.pinned = PINNED and self.device.type == "cuda"
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.copied: list[torch.cuda.Event | None] = [None, None]  # the copy out of each buffer has finished
        self.turn = 0

    def read(self, file, key: str) -> torch.Tensor:
        if not self.pinned:
            return file.tensor(key)
        if self.copied[self.turn] is not None:
            self.copied[self.turn].synchronize()  # the GPU has finished copying what this buffer held
        nbytes = file.nbytes(key)
        buffer = self.buffers[self.turn]
        if buffer is None or buffer.numel() < nbytes:
            buffer = self.buffers[self.turn] = torch.empty(max(nbytes, MIN_BUFFER), dtype=torch.uint8, pin_memory=True)
        return file.tensor(key, out=buffer)

    def to_device(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not self.pinned:
            return tensor.to(device=self.device, dtype=dtype)
        out = tensor.to(self.device, non_blocking=True)
        event = self.copied[self.turn] = torch.cuda.Event()
        event.record()
        self.turn ^= 1
        return out.to(dtype)
