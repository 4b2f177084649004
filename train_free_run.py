#!/usr/bin/env python
"""MagicStyle from the command line: paint a portrait in the style of a reference image.

    python train_free_run.py --content examples/astronaut.png --style examples/hubble_deep_field.jpg

Options override ``configs/magicstyle.yaml`` (or ``--config``); ``key=value`` arguments (e.g. ``ffa.beta=0.3``)
override last.  Errors in the input print one line and exit with status 2 before any model is loaded.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import time
from pathlib import Path

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(EXIT_USAGE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--content", help="the portrait to stylize (required)")
    p.add_argument("--style", help="the style reference image (required)")
    p.add_argument("--output", help="output PNG (default: outputs/<content>_<style>.png)")
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
    p.add_argument("--report", help="write a JSON report (seconds per phase, UNet evaluations, memory) here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output / --report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. ffa.layers=all")
    args = p.parse_intermixed_args(argv)
    missing = [f"--{name}" for name in ("content", "style") if getattr(args, name) is None]
    if missing and not args.download_only:
        p.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def config_overrides(args: argparse.Namespace) -> dict:
    flags = {
        "size": args.size, "steps": args.steps, "seed": args.seed,
        "model": {"weights": args.weights, "vae": args.vae, "device": args.device, "dtype": args.dtype},
        "ffa": {"alpha": args.alpha, "beta": args.beta},
    }
    if (args.alpha is None) != (args.beta is None):  # eq. 5 has alpha + beta = 1: one flag sets both
        given = args.alpha if args.alpha is not None else args.beta
        if 0.0 <= given <= 1.0:
            other = round(1.0 - given, 12)
            flags["ffa"] = {"alpha": given, "beta": other} if args.alpha is not None else {"alpha": other, "beta": given}

    def prune(d: dict) -> dict:
        return {k: prune(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None and v != {}}

    return prune(flags)


def default_output(content: str, style: str) -> Path:
    return Path("outputs") / f"{Path(content).stem}_{Path(style).stem}.png"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported after parsing, so that --help is instant.
    import torch
    from omegaconf import OmegaConf

    from magicstyle import __version__
    from magicstyle.config import load_config
    from magicstyle.hub import fetch_all, quiet_hub
    from magicstyle.images import open_rgb, save_png
    from magicstyle.output import check_writable, write_atomic
    from magicstyle.pipeline import load_model, stylize
    from magicstyle.progress import Progress
    from models.errors import CheckpointError, MagicStyleError

    try:
        # 1. Everything the user gave is checked before the model is loaded.
        cfg = load_config(args.config, config_overrides(args), args.overrides)
        quiet_hub(progress=not args.quiet)
        if args.download_only:
            for key, path in fetch_all(cfg).items():
                print(f"{key}: {path}")
            return 0
        content, style = open_rgb(args.content), open_rgb(args.style)
        output = Path(args.output) if args.output else default_output(args.content, args.style)
        report = Path(args.report) if args.report else None
        check_writable(output, overwrite=args.overwrite, what="--output")
        if report is not None:
            check_writable(report, overwrite=args.overwrite, what="--report")
        files = fetch_all(cfg)  # local paths, or Hub files (downloaded now if not in the cache)
        weights = files["model.weights"]

        for name, img in (("content", content), ("style", style)):
            if img.width != img.height and not args.quiet:
                print(f"note: the {name} image is {img.width}x{img.height}; it is resized and centre-cropped to "
                      f"{cfg.size}x{cfg.size}", file=sys.stderr)

        # 2. The job.
        start = time.perf_counter()
        try:
            sd = load_model(cfg)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (see weights/README.md)") from None
        load_seconds = time.perf_counter() - start
        stats: dict = {}
        image = stylize(content, style, cfg, sd=sd, progress=Progress(enabled=not args.quiet), stats=stats)

        # 3. Output, written atomically.
        parameters = {
            "config": OmegaConf.to_container(cfg, resolve=True),
            "seed": cfg.seed,
            "checkpoint": weights.name,
            "checkpoint_sha256": file_sha256(weights)[:10],
            "vae": files["model.vae"].name if "model.vae" in files else None,
            "content": Path(args.content).name,
            "style": Path(args.style).name,
            "version": __version__,
        }
        save_png(image, output, json.dumps(parameters), overwrite=args.overwrite)
        if report is not None:
            device = next(sd.unet.parameters()).device
            data = {
                "seconds": {"load": load_seconds, **stats["seconds"]},
                "unet_evals": stats["unet_evals"],
                "unet_rows": stats["unet_rows"],
                "feature_store_bytes": stats["feature_store_bytes"],
                "peak_rss_bytes": peak_rss_bytes(),
                "device": str(device),
                "dtype": str(next(sd.unet.parameters()).dtype).removeprefix("torch."),
            }
            if "face_refine" in stats:  # the small-face pass: whether it ran, and where (faces/refine.py)
                data["face_refine"] = stats["face_refine"]
            if device.type == "cuda":
                data["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
            write_atomic(report, json.dumps(data, indent=2).encode(), overwrite=args.overwrite, what="--report")
        if not args.quiet:
            print(f"wrote {output}", file=sys.stderr)
        return 0
    except MagicStyleError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; nothing was written\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
