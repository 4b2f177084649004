import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_WEIGHTS = FIXTURES / "sd15_tiny_random.safetensors"  # a tiny SD1.5 in the real single-file layout
TINY_HPARAMS = FIXTURES / "sd15_tiny_random.hparams.json"
sys.path.insert(0, str(ROOT))

from magicstyle.config import COMPILE_MIN_TORCH, compile_supported  # noqa: E402  (after ROOT is on the path)

# model.compile needs torch 2.8 or newer (magicstyle/config.py); the eager path is tested down to setup.cfg's floor
needs_compile = pytest.mark.skipif(not compile_supported(),
                                   reason="model.compile needs torch %d.%d or newer" % COMPILE_MIN_TORCH)

# No test touches the network or the user's Hugging Face cache: the Hub is offline and its cache is a fresh folder
# (set before huggingface_hub is imported, which reads these once; tests/test_hub.py points them at a local server).
HF_HOME = tempfile.mkdtemp(prefix="magicstyle-test-hf-")
os.environ.update(HF_HOME=HF_HOME, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
for _name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_CACHE"):
    os.environ.pop(_name, None)


def pytest_unconfigure(config):
    shutil.rmtree(HF_HOME, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are tiny: one intra-op thread is as fast as two, much faster when the cores are busy, and the
    in-process runs then match the subprocess run (OMP_NUM_THREADS=1) bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``@pytest.mark.cuda`` run only where a CUDA GPU is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def no_tf32():
    """float32 on a GPU means float32: TF32 convolutions and matrix products (10-bit mantissa) would be compared
    against float32 tolerances.  A no-op without CUDA."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="session", autouse=True)
def private_cache_folder(tmp_path_factory):
    """Runs remember checkpoint hashes in the user's cache folder (models/filehash.py): not the real one in tests
    (subprocesses inherit it too), nor the real CPU tuning cache; and the suite runs the UNet eagerly wherever it runs."""
    import os

    before = {key: os.environ.get(key) for key in ("XDG_CACHE_HOME", "MAGICSTYLE_COMPILE_AUTO")}
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    # model.compile: auto stays eager on a GPU too: compiling the tiny UNet in every test (and every CLI subprocess)
    # would take minutes; tests/test_gpu_fastpath.py compiles on purpose
    os.environ["MAGICSTYLE_COMPILE_AUTO"] = "0"
    # model.prepack / attention / cpu_compute: auto would time convolutions once per CPU (models/cpu_tuning.py): the
    # cache holds this CPU's answer instead (prepack on, SDPA, native dtype); the decision logic has fake timings
    from models.cpu_tuning import cache_file, cache_key, cpu_info, write_cache

    answer = {"prepack": True, "attention": "sdpa"}
    write_cache(cache_file(), {cache_key(cpu_info(), dtype): {**answer, "compute": name}
                               for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16"))})
    yield
    for key, value in before.items():
        if value is None:
            del os.environ[key]
        else:
            os.environ[key] = value
