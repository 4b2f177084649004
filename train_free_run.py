#!/usr/bin/env python
"""MagicStyle from the command line: paint a portrait in the style of a reference image.

    python train_free_run.py --content examples/astronaut.png --style examples/hubble_deep_field.jpg
    python train_free_run.py --content examples/ --style examples/ihc.png --sweep ffa.beta=0,0.2,0.4,0.6,0.8,1.0

Options override ``configs/magicstyle.yaml`` (or ``--config``); ``key=value`` arguments (e.g. ``ffa.beta=0.3``)
override last.  Errors in the input print one line and exit with status 2 before any model is loaded.  This file
only parses the arguments; ``magicstyle.run`` runs them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(EXIT_USAGE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--content", nargs="+", action="extend", metavar="PATH",
                   help="the portrait(s) to stylize: image files or folders of images (required; repeatable)")
    p.add_argument("--style", nargs="+", action="extend", metavar="PATH",
                   help="the style reference image(s): image files or folders of images (required; repeatable)")
    p.add_argument("--output", help="output file for one job, ending in .png (default: outputs/<content>_<style>.png); "
                                    "with several jobs a folder (default: outputs/<run name>/)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="run every value of a config key (repeatable: the Cartesian product), e.g. ffa.beta=0,0.5,1")
    p.add_argument("--setting", action="append", default=[], metavar="'KEY=V ...'",
                   help="one more setting beside the sweep (repeatable), e.g. --setting ffa.recipe=plain")
    p.add_argument("--weights", help="SD1.5 .safetensors checkpoint: a path or hf:OWNER/REPO/FILE.safetensors[@REV] "
                                     "(default: model.weights, see weights/README.md)")
    p.add_argument("--vae", help="a separate VAE .safetensors file, path or hf:...; none: the checkpoint's own")
    p.add_argument("--download-only", action="store_true",
                   help="fetch the model files the configuration names into the Hugging Face cache, print where, exit")
    p.add_argument("--config", help="a YAML file overriding configs/magicstyle.yaml")
    p.add_argument("--size", type=int, help="image size, a multiple of 64 (default 512)")
    p.add_argument("--steps", type=int, help="DDIM steps for inversion and generation (default 30)")
    p.add_argument("--alpha", type=float, help="content query weight a in [0, 1] (default 0.8; 1 - beta if only --beta)")
    p.add_argument("--beta", type=float, help="generated query weight b in [0, 1] (default 0.2; 1 - alpha if only --alpha)")
    p.add_argument("--seed", type=int, help="random seed (only used with inversion.sample_posterior=true)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps", "auto"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--report", help="write a JSON report (seconds per phase, UNet evaluations, memory, jobs) here; "
                                    "a rerun into the same run folder replaces the report it wrote")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output / --report; with several jobs, redo jobs whose output exists")
    p.add_argument("--diagnostics", action="store_true",
                   help="also write NAME.attention.json and NAME.attention.png beside each output: the share of "
                        "attention on style tokens per layer and step (diagnostics.region=x0,y0,x1,y1 for a region)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. ffa.layers=all")
    args = p.parse_intermixed_args(argv)
    missing = [f"--{name}" for name in ("content", "style") if getattr(args, name) is None]
    if missing and not args.download_only:
        p.error(f"the following arguments are required: {', '.join(missing)}")
    for name in ("content", "style"):  # `--style s.png ffa.beta=0.3`: the key=value is an override, not a path
        paths = getattr(args, name) or []
        moved = [a for a in paths[1:] if "=" in a and not Path(a).exists()]
        setattr(args, name, [a for a in paths if a not in moved])
        args.overrides = moved + args.overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from magicstyle.run import run  # imported after parsing, so that --help is instant

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
