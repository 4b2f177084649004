#!/usr/bin/env python
"""The MagicStyle web demo: upload a portrait and a style, slide beta, see the result and where the style went.

    python app.py                      # then open http://127.0.0.1:7860

Options and ``key=value`` overrides as in train_free_run.py; the model loads once.  Needs the ``[app]`` extra
(gradio): ``pip install -e ".[app]"``.
"""
from __future__ import annotations

import argparse
import sys

from train_free_run import Parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="SD1.5 .safetensors checkpoint: a path or hf:OWNER/REPO/FILE.safetensors[@REV] "
                                     "(default: model.weights, see weights/README.md)")
    p.add_argument("--vae", help="a separate VAE .safetensors file, path or hf:...; none: the checkpoint's own")
    p.add_argument("--config", help="a YAML file overriding configs/magicstyle.yaml")
    p.add_argument("--device", choices=["cpu", "cuda", "mps", "auto"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a temporary public link through Gradio's relay")
    p.add_argument("--keep-inversions", type=int, default=4, metavar="N",
                   help="inversions kept in memory for reuse (default 4; the newest is always kept)")
    p.add_argument("--cache-gib", type=float, default=4.0, metavar="GIB",
                   help="memory the kept inversions may hold (default 4 GiB)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. ffa.layers=all")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from magicstyle.app.launch import launch  # after parsing, so that --help is instant

    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
