#!/usr/bin/env bash
# Everything issue 11 measures on a GPU, in one call on the GPU machine (about 9 minutes): install the carried wheels,
# write a random full-size checkpoint, run the CUDA tests, then the benchmark section by section, most important
# first, each with its own time limit.  Results go to $OUT (at most 8 files): device.txt, pytest_cuda.txt,
# bench_unet.md, bench_stylize.md, bench_cli.md, bench_load.md, results.json (every figure, and the summary table at
# the end of the last bench_*.md).  See bench/README.md, "GPU".
set -u
OUT=${OUT:-/tmp/magicstyle-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
    nproc
} > "$OUT/device.txt" 2>&1
CKPT=/tmp/sd15_random.safetensors
python3 bench/random_checkpoint.py "$CKPT" >> "$OUT/device.txt" 2>&1
BENCH="python3 bench/benchmark.py --device cuda --weights $CKPT --steps 30 --dtypes float16 bfloat16 --batches 2 4"
BENCH="$BENCH --results $OUT/results.json"
timeout 100 python3 -m pytest tests -m cuda -q -p no:cacheprovider --continue-on-collection-errors \
    > "$OUT/pytest_cuda.txt" 2>&1
timeout 140 $BENCH --unet > "$OUT/bench_unet.md" 2>&1
timeout 200 $BENCH --pipeline > "$OUT/bench_stylize.md" 2>&1
timeout 80 $BENCH --cli > "$OUT/bench_cli.md" 2>&1
timeout 20 $BENCH --load > "$OUT/bench_load.md" 2>&1
tail -n 30 "$OUT"/bench_*.md "$OUT/pytest_cuda.txt"
