"""Write a full-size SD1.5 single-file checkpoint with random weights, in the real layout, for benchmarks.

    python bench/random_checkpoint.py /tmp/sd15_random.safetensors

Every key, shape and dtype comes from ``tests/fixtures/sd15_checkpoint_keys.json`` (the manifest of a real SD1.5
file, schedule buffers and ``position_ids`` included), so loading it exercises the same code path as a real
checkpoint.  Speed and memory do not depend on the values; images made with it are noise.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

MANIFEST = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sd15_checkpoint_keys.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32, "int64": torch.int64}


def random_tensor(key: str, shape: list[int], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Random weights that keep activations of a sensible size: N(0, 1/fan_in) for matrices and kernels, 0.02 for
    embeddings, 1 for normalisation scales (every 1-D weight), 0 for biases."""
    if dtype == torch.int64:  # position_ids
        return torch.arange(shape[-1]).reshape(shape)
    if "." not in key or key.endswith("bias"):  # schedule buffers (not used by the loader) and biases
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    std = 0.02 if "embedding" in key else 1.0 / math.sqrt(math.prod(shape[1:]))
    return (torch.randn(shape, generator=g) * std).to(dtype)


def write_random_checkpoint(path: str | Path, seed: int = 0) -> Path:
    manifest = json.loads(MANIFEST.read_text())
    g = torch.Generator().manual_seed(seed)
    tensors = {k: random_tensor(k, shape, DTYPES[dtype], g) for k, (shape, dtype) in manifest.items()}
    save_file(tensors, str(path))
    return Path(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_random_checkpoint(args.path, args.seed))
