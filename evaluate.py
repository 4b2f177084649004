#!/usr/bin/env python
"""Evaluate a run folder: Table I (CLIP-I, DINO, FaceSim, FID) and the StyleID protocol (LPIPS, ArtFID).

    python evaluate.py outputs/my_sweep

Reads RUN_DIR/index.json; writes RUN_DIR/eval/metrics.md, metrics.csv and scatter.png.  Model files: see
configs/eval.yaml (a missing one prints where to get it).  ``key=value`` arguments override configs/eval.yaml.
"""
from __future__ import annotations

import argparse
import sys

from train_free_run import EXIT_USAGE, Parser  # one-line errors, exit status 2

EVAL_PACKAGES = ("onnxruntime", "timm", "torchvision", "scipy")  # setup.cfg [eval]: missing ones are one line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (holding index.json)")
    p.add_argument("--config", help="a YAML file overriding configs/eval.yaml")
    p.add_argument("--metrics", help="comma-separated subset of clip,dino,face,fid,styleid (default: all)")
    p.add_argument("--content-axis", choices=["clip", "face"], help="scatter plot x axis: CLIP-I content or FaceSim")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help="output folder (default RUN_DIR/eval)")
    p.add_argument("--overwrite", action="store_true", help="replace the tables and plot of an earlier evaluation")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. models.clip.file=/data/clip.safetensors")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from magicstyle.progress import Progress
    from models.errors import MagicStyleError

    try:
        from metrics import run_evaluation
    except ModuleNotFoundError as e:  # scipy, torchvision, timm, onnxruntime: the [eval] extra; anything else is a bug
        if (e.name or "").split(".")[0] not in EVAL_PACKAGES:
            raise
        sys.stderr.write(f"error: evaluation needs the [eval] extra ({e}); pip install -e '.[eval]'\n")
        return EXIT_USAGE

    dotlist = list(args.overrides)
    if args.metrics:
        dotlist.append(f"metrics=[{args.metrics}]")
    for key, value in (("content_axis", args.content_axis), ("device", args.device)):
        if value:
            dotlist.append(f"{key}={value}")
    try:
        paths = run_evaluation(args.run_dir, config=args.config, dotlist=dotlist, out=args.out,
                               overwrite=args.overwrite, progress=Progress(enabled=not args.quiet))
    except MagicStyleError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    if not args.quiet:
        for path in paths.values():
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
