#!/usr/bin/env bash
# Download, here, the wheels the GPU machine's image lacks, into .whl/ (git-ignored; never committed).
# The image has Python 3.12, torch, numpy, PyYAML, regex, safetensors, huggingface_hub, requests, filelock, Pillow.
# omegaconf 2.4 needs only PyYAML; open_clip_torch is only searched for its tokenizer module (ftfy, wcwidth, regex);
# diffusers (+ importlib_metadata) is the UNet the benchmark compares with.
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    omegaconf==2.4.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 diffusers==0.42.1 importlib_metadata==10.2.0
ls -la .whl
