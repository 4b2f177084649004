"""A run of the command line (``train_free_run.py`` parses the arguments, ``run`` does the rest).

Everything the user gave is checked first (configuration of every setting, images, output paths, weights), before
the model is loaded.  One job (one content, one style, one setting) writes one PNG.  Several
jobs write a run folder: one PNG per job, ``index.json`` and ``grid.png``.  Jobs share work: each image is encoded
and inverted (CSDI) once per run, or once per group of settings that change the inversion (``inversion_key``); FFF
runs once per job.  A job whose PNG exists is skipped (resume) unless ``--overwrite``; a job that fails is recorded
and the others still run (exit status 1).  A run of one job that fails at run time (out of memory, a file that cannot
be read or written) says so in one line, with exit status 1 too; any other exception is a bug and keeps its
traceback.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from models.errors import CheckpointError, MagicStyleError

from . import batch, cache, grid, jobs, pipeline, shard
from .compiled import compile_report
from .config import one_minus
from models.hub import fetch_all, quiet_hub
from .output import OutputError, WriteError, check_writable, write_atomic
from .parameters import png_parameters
from .progress import Progress, end_line, say

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
REPORT_FORMAT = "magicstyle-report/1"  # the --report JSON's "format": how a rerun knows the file is ours


def config_overrides(args) -> dict:
    """The options that set config keys -> a nested override mapping (None: not given)."""
    flags = {
        "size": args.size, "steps": args.steps, "seed": args.seed,
        "model": {"weights": args.weights, "vae": args.vae, "device": args.device, "dtype": args.dtype},
        "ffa": {"alpha": args.alpha, "beta": args.beta},
    }
    if (args.alpha is None) != (args.beta is None):  # eq. 5 has alpha + beta = 1: one flag sets both
        given = args.alpha if args.alpha is not None else args.beta
        if (other := one_minus(given)) is not None:
            flags["ffa"] = {"alpha": given, "beta": other} if args.alpha is not None else {"alpha": other, "beta": given}

    def prune(d: dict) -> dict:
        return {k: prune(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None and v != {}}

    return prune(flags)


def free_keys(args) -> set[str]:
    """ffa.alpha / ffa.beta when the command line leaves them unset: a sweep of the other sets them (eq. 5)."""
    given = {"ffa.alpha": args.alpha is not None, "ffa.beta": args.beta is not None}
    for o in args.overrides:
        given[o.split("=", 1)[0].strip()] = True
    return {k for k in ("ffa.alpha", "ffa.beta") if not given[k]}


def followed_overrides(args) -> list[str]:
    """The command line's ``key=value`` overrides, plus the weight of eq. 5 that follows one given alone:
    ``ffa.beta=0.3`` without ffa.alpha (as ``--alpha`` or ``ffa.alpha=``) adds ``ffa.alpha=0.7``, as ``--beta 0.3``
    does, and the other way round; both given, both are kept.  A config file's weights are not followed."""
    keys = {o.split("=", 1)[0].strip(): o.split("=", 1)[1] for o in args.overrides if "=" in o}
    try:
        more = jobs.follow(keys, free_keys(args))
    except MagicStyleError:  # a value that does not parse: load_config names it
        more = {}
    return [*args.overrides, *(f"{k}={v}" for k, v in more.items())]


def is_report(path: Path, folder: Path) -> bool:
    """Whether ``path`` holds the ``--report`` this program wrote for the run folder ``folder``: its format marker
    and the folder it names, or (reports from before the marker, which name none) the fields every report has."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    if data.get("format") == REPORT_FORMAT:
        return data.get("run") == str(folder.resolve())
    return "format" not in data and isinstance(data.get("seconds"), dict) and {
        "unet_evals", "unet_rows", "peak_rss_bytes"} <= data.keys()


def default_output(content: str | Path, style: str | Path) -> Path:
    return Path("outputs") / f"{Path(content).stem}_{Path(style).stem}.png"


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


@dataclass
class Run:
    """What every job of a run shares."""

    args: object
    weights: Path
    vae: Path | None
    quiet: bool
    sd: object = None
    overwrite_extras: bool = False  # diagnostics beside a job's PNG: replaced in a run folder, else only --overwrite
    phases: Progress | None = None  # per-phase bars (a run of one job)
    extra: dict = field(default_factory=dict)  # more report fields of a run of one job (e.g. face_refine)
    notes: list = field(default_factory=list)  # said once the model has loaded (a bad checkpoint stays one line)
    seconds: dict = field(default_factory=lambda: dict.fromkeys(
        ("load", "encode", "invert", "generate", "decode", "write"), 0.0))  # write: the PNGs, beside the next batch
    counts: dict = field(default_factory=lambda: dict(unet_evals=0, unet_rows=0, feature_store_bytes=0,
                                                      images_inverted=0, images_from_cache=0))

    def log(self, message: str) -> None:
        if not self.quiet:
            say(message)

    def load(self, cfg: DictConfig, images: list[jobs.Source], count: int = 1) -> None:
        """Load the model (once) for ``count`` jobs, then say which images get resized: notes only once the run
        really starts."""
        start = time.perf_counter()
        try:
            self.sd = pipeline.load_model(cfg, jobs=count)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (see weights/README.md)") from None
        self.seconds["load"] = time.perf_counter() - start
        for note in self.notes:
            self.log(f"note: {note}")
        for src in {s.path: s for s in images if s.size}.values():
            if src.size[0] != src.size[1]:
                self.log(f"note: {src.path.name} is {src.size[0]}x{src.size[1]}; it is resized and centre-cropped "
                         f"to {cfg.size}x{cfg.size}")

    @property
    def files(self) -> dict[str, Path]:
        """The run's model files, as ``models.hub.fetch_all`` resolved them."""
        return {"model.weights": self.weights, **({"model.vae": self.vae} if self.vae else {})}

    def parameters(self, cfg: DictConfig, content: Path, style: Path) -> str:
        """The PNG's ``parameters`` chunk (``magicstyle.parameters``, shared with the web demo)."""
        return png_parameters(cfg, self.files, content.name, style.name)

    def report(self, extra: dict | None = None) -> dict:
        data = {"format": REPORT_FORMAT, "seconds": {**self.seconds, **compile_report()},
                **{k: v for k, v in self.counts.items() if k not in ("images_inverted", "images_from_cache")},
                "peak_rss_bytes": peak_rss_bytes(), "device": None, "dtype": None, "compute_dtype": None}
        if self.sd is not None and hasattr(self.sd, "unet"):
            param = next(self.sd.unet.parameters())
            runs_in = getattr(self.sd.unet, "compute_dtype", None) or param.dtype  # model.cpu_compute
            data.update(device=str(param.device), dtype=str(param.dtype).removeprefix("torch."),
                        compute_dtype=str(runs_in).removeprefix("torch."))
            if param.device.type == "cuda":
                data["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(param.device)
        return {**data, **(extra or {})}


def run(args) -> int:
    """The command line's whole run; the exit status (0, 1: a job or the run failed, 2: bad input, 130:
    interrupted)."""
    try:
        return _run(args)
    except BaseException as e:
        end_line()  # a progress bar's unfinished line ends before the message: not "... 00:13 < 01:06interrupted"
        if isinstance(e, WriteError):  # a full disk once the work is done: the run failed, not its input
            sys.stderr.write(f"error: {e}\n")
            return EXIT_FAILED
        if isinstance(e, MagicStyleError):
            sys.stderr.write(f"error: {e}\n")
            return EXIT_USAGE
        if isinstance(e, KeyboardInterrupt):
            sys.stderr.write("interrupted; finished outputs are kept, nothing half-written (run again to resume)\n")
            return EXIT_INTERRUPTED
        if not isinstance(e, Exception) or (line := batch.runtime_failure(e)) is None:
            raise  # a bug: its traceback (SystemExit and the like: as they are)
        sys.stderr.write(f"error: {line}\n")
        return EXIT_FAILED


def _run(args) -> int:
    # 1. Everything the user gave is checked before the model is loaded.
    settings = jobs.make_settings(args.sweep, args.setting, free_keys(args))
    jobs.load_settings(settings, args.config, config_overrides(args), followed_overrides(args))
    quiet_hub(progress=not args.quiet)
    if args.download_only:
        for key, path in fetch_all(settings[0].cfg).items():
            print(f"{key}: {path}")
        return 0
    contents, styles = jobs.find_images(args.content, "content"), jobs.find_images(args.style, "style")
    many = len(contents) * len(styles) * len(settings) > 1
    diagnostics = (".attention.json", ".attention.png") if args.diagnostics else ()
    if many:
        name = "_".join([jobs.run_name(args.content), jobs.run_name(args.style),
                         *[s.split("=", 1)[0] for s in args.sweep]])
        output = Path(args.output) if args.output else Path("outputs") / name
        jobs.check_run_folder(output)
        check_writable(output / jobs.INDEX, overwrite=True, what="--output")
    else:
        output = Path(args.output) if args.output else default_output(contents[0].path, styles[0].path)
        if output.suffix.lower() != ".png" and not output.is_dir():  # (a folder: check_writable says so)
            raise OutputError(f"--output {output}: one job writes a PNG; give a name ending in .png, e.g. "
                              f"{output.with_suffix('.png')}")
        for path in [output, *(output.with_suffix(ext) for ext in diagnostics)]:
            check_writable(path, overwrite=args.overwrite, what="--output" if path == output else "diagnostics")
    report = Path(args.report) if args.report else None
    if report is not None:  # resuming a run folder replaces the report this program wrote; any other file: --overwrite
        resumes = many and (output / jobs.INDEX).is_file() and report.is_file() and is_report(report, output)
        args.report_overwrite = args.overwrite or resumes  # checked now, and what the report is written with at the end
        check_writable(report, overwrite=args.report_overwrite, what="--report")
    for setting in settings:
        if batch.alone(setting.cfg):  # the small-face pass: its face detector, checked before the model loads
            from faces.weights import require_file, resolve
            require_file(resolve(setting.cfg.face.detector), "scrfd", setting="face.detector")
    files = fetch_all(settings[0].cfg)  # local paths, or Hub files (downloaded now if not in the cache)
    state = Run(args, files["model.weights"], files.get("model.vae"), args.quiet)
    if unused := next((s.cfg.batch.cache for s in settings if s.cfg.batch.cache and not cache.enabled(s.cfg)), None):
        state.notes.append(f"batch.cache {unused} is not used in memory mode (store.mode=memory): nothing is read "
                           "from it or written to it; set batch.cache_features=true to cache the recorded features "
                           "(about 340 MiB per image at 512 px), or store.mode=recompute to cache the small latents")

    # 2. The jobs, 3. outputs (each written atomically).
    if not many:
        return run_one(state, contents[0], styles[0], settings, output, report)
    return run_many(state, contents, styles, settings, output, report)


def run_one(state: Run, content: jobs.Source, style: jobs.Source, settings: list, output: Path,
            report: Path | None) -> int:
    """One job: its PNG at ``output`` (checked, not existing unless --overwrite); an error stops the run."""
    if shard.world()[0] > 0:  # under torchrun, one job is rank 0's
        return 0
    job = jobs.Job(content, style, 0, output.name)
    state.load(settings[0].cfg, [content, style])
    state.overwrite_extras = state.args.overwrite
    batch.run_jobs(state, [job], settings, output.parent, strict=True)
    if report is not None:
        write_atomic(report, json.dumps(state.report(state.extra), indent=2).encode(),
                     overwrite=state.args.report_overwrite,
                     what="--report")
    state.log(f"wrote {output}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Many jobs


def run_many(state: Run, contents: list, styles: list, settings: list, folder: Path, report: Path | None) -> int:
    """Several jobs: skip those whose PNG exists, run the rest (this rank's share under torchrun), then write the
    run folder's index.json and grid.png, and the report."""
    rank, size = shard.world()
    shard.start(settings[0].cfg.model.device)
    state.quiet = state.quiet or rank > 0
    todo = jobs.make_jobs(contents, styles, settings)
    exists = [(folder / j.output).exists() and not state.args.overwrite for j in todo]
    for job, skip in zip(todo, exists):  # on every rank: an error stops them all before anything is written
        if skip:
            jobs.check_resumable(folder / job.output, settings[job.setting].cfg, state.files)
    exists = shard.agree(exists)  # rank 0's view: what another rank writes later does not count
    for job, skip in zip(todo, exists):
        job.status = "skipped" if skip and job.status == "pending" else job.status
    skipped = sum(j.status == "skipped" for j in todo)
    state.log(f"{len(todo)} jobs ({len(contents)} content x {len(styles)} style x {len(settings)} settings)"
              + (f"; {skipped} skipped, their output exists (--overwrite redoes them)" if skipped else "")
              + (f"; {size} ranks" if size > 1 else ""))
    pending = [j for j in todo if j.status == "pending"]
    mine = shard.share(pending)
    shard.log(f"{len(mine)} of the {len(pending)} pending jobs", state.args.quiet)
    ours = {id(j) for j in mine}
    bar = shard.RunProgress([folder / j.output for j in pending if id(j) not in ours], len(pending),
                            enabled=not state.quiet and len(pending) > 1) if size > 1 else None
    state.overwrite_extras = True  # the run folder's own files
    try:
        if mine:
            state.load(settings[0].cfg, [s for j in mine for s in (j.content, j.style)], len(mine))
            batch.run_jobs(state, mine, settings, folder, progress=bar)
    except KeyboardInterrupt:
        if size == 1:  # the index lists what is finished
            write_index(folder, settings, [j for j in todo if j.status != "pending"])
        raise
    shard.log(f"{sum(j.status == 'done' for j in mine)} jobs done, {sum(j.status == 'failed' for j in mine)} failed, "
              f"of {len(mine)}" + (f", on {batch.device_of(state.sd)}; {state.counts['images_inverted']} images "
                                   f"inverted, {state.counts['images_from_cache']} from the cache" if mine else ""),
              state.args.quiet)  # a line per rank in the log; rank 0 also draws the run's bar
    results = shard.gather(({j.output: (j.status, j.error, j.seconds) for j in mine}, state.seconds, state.counts,
                            peak_rss_bytes()))
    for r, (done, *_) in enumerate(results):
        for job in todo:
            if job.output in done:
                job.status, job.error, job.seconds = done[job.output]
                job.rank = r if size > 1 else None
    counts = {s: sum(j.status == s for j in todo) for s in ("done", "skipped", "failed")}
    if bar is not None:
        bar.finish()
    if rank == 0:
        write_index(folder, settings, todo)
        write_atomic(folder / jobs.GRID, grid.png_bytes(todo, settings, folder), overwrite=True, what="grid")
        if report is not None:
            for key in state.seconds:  # summed over the ranks
                state.seconds[key] = sum(r[1][key] for r in results)
            for key in state.counts:
                state.counts[key] = (max if key == "feature_store_bytes" else sum)(r[2][key] for r in results)
            extra = {"run": str(folder.resolve()), "jobs": len(todo), **{f"jobs_{s}": n for s, n in counts.items()},
                     "images_inverted": state.counts["images_inverted"],
                     "images_from_cache": state.counts["images_from_cache"],
                     "peak_rss_bytes": max(r[3] for r in results)}
            if size > 1:
                extra["ranks"] = size
            write_atomic(report, json.dumps(state.report(extra), indent=2).encode(),
                         overwrite=state.args.report_overwrite, what="--report")
        for job in todo:
            if job.status == "failed":
                sys.stderr.write(f"failed: {job.output}: {job.error}\n")
        state.log(f"wrote {folder}: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed")
    shard.stop()
    return EXIT_FAILED if counts["failed"] else 0


def write_index(folder: Path, settings: list, todo: list) -> None:
    data = jobs.index(folder.name, settings, todo)
    write_atomic(folder / jobs.INDEX, json.dumps(data, indent=2).encode(), overwrite=True, what="index")
