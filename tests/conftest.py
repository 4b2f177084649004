import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_WEIGHTS = FIXTURES / "sd15_tiny_random.safetensors"  # a tiny SD1.5 in the real single-file layout
TINY_HPARAMS = FIXTURES / "sd15_tiny_random.hparams.json"
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are tiny: one intra-op thread is as fast as two, much faster when the cores are busy, and the
    in-process runs then match the subprocess run (OMP_NUM_THREADS=1) bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
