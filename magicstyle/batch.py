"""Running many jobs with shared work: each image inverted once, many pairs per UNet call, an inversion cache on disk.

For each group of settings that share an inversion (``inversion_key``): a group of at most ``INVERT_BATCH`` images
is inverted (CSDI) in one batch; a larger one inverts every style image once and keeps it, and the content images
``batch.pairs`` at a time.  Then per setting FFF runs the pairs of those contents with every style, ``batch.pairs``
pairs per UNet batch (``fff(..., pairs=...)``), and each result is decoded, then written in a background thread
while the next batch runs (``magicstyle/writer.py``).  Memory: the features of all
style images plus one batch of contents (``store.mode=recompute`` keeps only latents).  With ``batch.cache=DIR``, an
image's inversion is read from the cache when it is there and written to it when it is computed.
"""
from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from models.errors import MagicStyleError, first_line

from . import cache, pipeline
from .images import save_png, to_image
from .model import device_of
from .progress import Progress, end_line
from .writer import Writer

INVERT_BATCH = 4  # images per CSDI batch (a group with no more images is inverted in one batch)
# batch.pairs=auto: 1 on the CPU and MPS (a larger batch is no faster there); on CUDA, where the UNet is launch-bound
# at batch 2 (H100), as many pairs as the free memory holds by the estimate below, at most MAX_AUTO_PAIRS.
MAX_AUTO_PAIRS = 16  # 32 UNet rows: past the launch-bound regime, a larger batch gains nothing
UNET_BYTES_PER_TOKEN = 24576  # one UNet row's activations per latent token and byte of dtype (bench/README.md: peak
# RSS grows by 0.18 GiB per row of batch at 64x64 in bfloat16 on the CPU; not measured on a GPU)
VAE_BYTES_PER_PIXEL = 768  # the VAE decoder's working set per output pixel and byte of dtype (estimate)


OUT_OF_MEMORY = (MemoryError, torch.cuda.OutOfMemoryError)  # (torch.OutOfMemoryError since torch 2.5: the same class)


def runtime_failure(e: Exception) -> str | None:
    """One line for a run that failed at run time (out of memory, an operating-system error such as a file that
    cannot be read), naming what failed and what to do; None for any other exception (a bug)."""
    if isinstance(e, OUT_OF_MEMORY) or (isinstance(e, RuntimeError) and "out of memory" in str(e)):  # MPS's
        said = ". ".join(first_line(e).split(". ")[:2])  # CUDA's: what it tried to allocate; not the totals after
        return (f"out of memory ({said}); try a smaller --size, --dtype float16 or bfloat16, store.mode=recompute, "
                "batch.pairs=1 or another --device (finished outputs are kept, nothing half-written)")
    if isinstance(e, OSError):
        return (f"{first_line(e, typed=True)}; check that file and the free space, then run again (finished outputs "
                "are kept, nothing half-written)")
    return None


def auto_pairs(free: int, size: int, image_bytes: int, rows: int, unet_bytes: int, vae_bytes: int) -> int:
    """How many pairs fit in ``free`` bytes (less a 20% margin), 1 to MAX_AUTO_PAIRS.  A pair holds its content
    image's inversion (``image_bytes``: the features in memory mode, with the step's features stacked for the pair),
    ``rows`` UNet rows (2 guidance rows, plus up to 2 reference rows in recompute mode) and one VAE decode;
    ``unet_bytes``/``vae_bytes``: their dtypes' sizes."""
    unet = rows * UNET_BYTES_PER_TOKEN * unet_bytes * (size // 8) ** 2
    vae = VAE_BYTES_PER_PIXEL * vae_bytes * size * size
    return max(1, min(MAX_AUTO_PAIRS, int(0.8 * free) // (image_bytes + unet + vae)))


def pairs_per_batch(cfg: DictConfig, sd, kept=None) -> int:
    """``batch.pairs``: the number given, or ``auto`` (``kept``: the inversion held for the whole group, whose
    per-image size estimates a content image's)."""
    if cfg.batch.pairs != "auto":
        return cfg.batch.pairs
    device = device_of(sd)
    if device.type != "cuda":
        return 1
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    rows = 2 + (2 if cfg.store.mode == "recompute" else 0)
    image_bytes = kept.store.nbytes // len(kept) if kept is not None else 0
    if kept is not None and cfg.store.mode == "memory":  # + this step's features of its content and style, stacked
        image_bytes += 2 * image_bytes // max(1, len(kept.store.timesteps or kept.timesteps))  # per pair by ``step``
    return auto_pairs(free, cfg.size, image_bytes, rows, next(sd.unet.parameters()).element_size(),
                      next(sd.vae.parameters()).element_size())


def chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def invert(run, paths: list[Path], cfg: DictConfig, batch: int = INVERT_BATCH):
    """Encode and invert these images (CSDI, ``batch`` at a time; from the cache when there) -> one Inversion, rows
    in the order of ``paths``.  Cutting and merging inversions copies no features (attention/store.py)."""
    entries = {path: cache.entry(path, cfg, run.files) for path in paths} if cache.enabled(cfg) else {}  # hashed once
    parts = {}
    for path, entry in entries.items():
        if (inv := cache.load(entry, device_of(run.sd))) is not None:
            parts[path] = inv
    run.counts["images_from_cache"] += len(parts)
    for chunk in chunks([p for p in paths if p not in parts], batch):
        inv = csdi(run, chunk, cfg)
        for i, path in enumerate(chunk):
            parts[path] = inv.select([i])
            if entries:  # a cache entry holds one image
                cache.save(entries[path], parts[path])
    return pipeline.Inversion.cat([parts[p] for p in paths])


def csdi(run, paths: list[Path], cfg: DictConfig):
    """Encode and invert one batch of images, counting the time and UNet work."""
    start = pipeline.clock(run.sd)
    images = torch.cat([pipeline.load_image(path, cfg.size) for path in paths])  # (n, 3, size, size)
    z0 = pipeline.encode_images(run.sd, images, cfg.seed if cfg.inversion.sample_posterior else None)
    run.seconds["encode"] += pipeline.clock(run.sd) - start
    start, counts = pipeline.clock(run.sd), {}
    inv = pipeline.csdi(run.sd, z0, cfg, progress=run.phases, stats=counts)
    run.seconds["invert"] += pipeline.clock(run.sd) - start
    run.counts["unet_evals"] += counts["invert_unet_calls"]
    run.counts["unet_rows"] += counts["invert_unet_rows"]
    run.counts["images_inverted"] += len(paths)
    return inv


def alone(cfg: DictConfig) -> bool:
    """Whether a job under ``cfg`` shares no inversion: the small-face pass (``face.refine``) inverts a crop."""
    return bool(OmegaConf.select(cfg, "face.refine", default=False))


def run_jobs(run, todo: list, settings: list, folder: Path, *, strict: bool = False,
             progress: Progress | None = None) -> None:
    """Run the jobs (``magicstyle.jobs.Job``); a failure is recorded on the jobs it concerns and the rest go on
    (``strict``: the error is raised instead, as a run of one job wants).  ``progress``: the run's bar (torchrun:
    the whole run's, ``shard.RunProgress``), else one for these jobs."""
    progress = progress or Progress(enabled=not run.quiet and len(todo) > 1)  # one bar: jobs done / total, ETA
    progress.begin("jobs", len(todo))
    run.phases = Progress(enabled=not run.quiet) if len(todo) == 1 else None  # one job: a bar per phase
    finished = 0

    bugs: set[str] = set()

    def fail(jobs: list, e: Exception) -> None:
        """Record the failure on the jobs not yet written.  A bug (not bad input, not a failure at run time such as
        out of memory) is recorded too, so that the other jobs still run, and its traceback printed once."""
        nonlocal finished
        if strict:
            raise e
        message = first_line(e, typed=True)
        if not isinstance(e, MagicStyleError) and runtime_failure(e) is None:
            if message not in bugs:  # the same bug in every job: one traceback
                end_line()
                traceback.print_exception(e, file=sys.stderr)
                bugs.add(message)
            message += " (a bug: its traceback is printed on stderr; please report it)"
        for job in jobs:
            if job.status != "done":
                job.fail(message)
        finished += len(jobs)
        progress.update(finished)

    def written(jobs: list, seconds: float) -> None:
        nonlocal finished
        run.seconds["write"] += seconds
        for job in jobs:
            job.seconds += seconds / len(jobs)
        finished += len(jobs)
        progress.update(finished)

    groups: dict[str, list] = {}
    for job in todo:
        cfg = settings[job.setting].cfg
        if alone(cfg):
            try:
                run_alone(run, job, cfg, folder)
            except Exception as e:  # noqa: BLE001
                fail([job], e)
                continue
            finished += 1
            progress.update(finished)
            continue
        groups.setdefault(pipeline.inversion_key(cfg), []).append(job)
    with Writer(written, fail) as writer:  # each batch's PNGs are written while the next batch runs
        for group in groups.values():
            run_group(run, group, settings, folder, writer, fail)


def run_group(run, group: list, settings: list, folder: Path, writer: Writer, fail) -> None:
    """The jobs of one ``inversion_key`` group: invert its images, then FFF batch by batch (module docstring)."""
    cfg = settings[group[0].setting].cfg
    contents = list(dict.fromkeys(j.content.path for j in group))
    styles = list(dict.fromkeys(j.style.path for j in group))
    images = list(dict.fromkeys(contents + styles))
    together = len(images) <= INVERT_BATCH  # a small run: all its images in one CSDI batch
    known = images if together else styles  # kept for the whole group; contents otherwise k at a time
    try:
        kept = invert(run, known, cfg)
    except Exception as e:  # noqa: BLE001 - recorded per job; the other groups still run
        fail(group, e)
        return
    k = pairs_per_batch(cfg, run.sd, kept)
    for chunk in [contents] if together else chunks(contents, k):
        mine = [j for j in group if j.content.path in chunk]
        fresh = [c for c in chunk if c not in known]  # a content that is also a style is inverted once
        try:
            # the same tensors, not copies (attention/store.py): the kept style features are held once
            inv = pipeline.Inversion.cat([invert(run, fresh, cfg, k), kept]) if fresh else kept
        except Exception as e:  # noqa: BLE001
            fail(mine, e)
            continue
        row = {**{p: len(fresh) + i for i, p in enumerate(known)}, **{c: i for i, c in enumerate(fresh)}}
        run.counts["feature_store_bytes"] = max(run.counts["feature_store_bytes"], inv.store.nbytes)
        for setting in dict.fromkeys(j.setting for j in mine):
            for batch in chunks([j for j in mine if j.setting == setting], k):
                try:
                    write = run_batch(run, batch, settings[setting].cfg, inv, row, folder)
                except Exception as e:  # noqa: BLE001
                    fail(batch, e)
                    continue
                writer.submit(batch, write)


def run_batch(run, batch: list, cfg: DictConfig, inv, row: dict, folder: Path) -> Callable[[], None]:
    """FFF for these jobs' pairs in one UNet batch and the decode; returns what writes one PNG each (and its attention
    diagnostics first, with ``--diagnostics``: a PNG that exists has them, so a resumed run needs nothing else) and
    marks each job done once its PNG is in place."""
    diagnostics = None
    if run.args.diagnostics:
        from .diagnostics import AttentionDiagnostics, write_diagnostics
        diagnostics = AttentionDiagnostics.from_config(cfg)
    start, counts = pipeline.clock(run.sd), {}
    pairs = [(row[j.content.path], row[j.style.path]) for j in batch]
    z = pipeline.fff(run.sd, inv, cfg, pairs=pairs, diagnostics=diagnostics, progress=run.phases, stats=counts)
    run.counts["unet_evals"] += counts["generate_unet_calls"]
    run.counts["unet_rows"] += counts["generate_unet_rows"]
    middle = pipeline.clock(run.sd)
    run.seconds["generate"] += middle - start
    images = [to_image(image) for image in pipeline.decode_latents(run.sd, z).split(1)]
    parameters = [run.parameters(cfg, job.content.path, job.style.path) for job in batch]
    end = pipeline.clock(run.sd)
    run.seconds["decode"] += end - middle
    for job in batch:
        job.seconds = (end - start) / len(batch)  # the writer adds the writing's share

    def write() -> None:
        for i, job in enumerate(batch):
            if diagnostics is not None:
                write_diagnostics(diagnostics, folder / job.output, i, overwrite=run.overwrite_extras)
            save_png(images[i], folder / job.output, parameters[i], overwrite=run.args.overwrite)
            job.status = "done"  # written: a later job's failure in this batch does not undo it

    return write


def run_alone(run, job, cfg: DictConfig, folder: Path) -> None:
    """A job that shares nothing (``stylize``: its own inversion), e.g. with the small-face pass of ``face.refine``."""
    start, stats = time.perf_counter(), {}
    image = pipeline.stylize(job.content.path, job.style.path, cfg, sd=run.sd, progress=run.phases, stats=stats)
    save_png(image, folder / job.output, run.parameters(cfg, job.content.path, job.style.path),
             overwrite=run.args.overwrite)
    for key in run.seconds:  # the run's phases (its compile time is counted once, by compile_report)
        run.seconds[key] += stats["seconds"].get(key, 0.0)
    run.counts["unet_evals"] += stats["unet_evals"]
    run.counts["unet_rows"] += stats["unet_rows"]
    run.counts["images_inverted"] += 2
    run.counts["feature_store_bytes"] = max(run.counts["feature_store_bytes"], stats["feature_store_bytes"])
    if "face_refine" in stats:
        run.extra["face_refine"] = stats["face_refine"]  # the report of a run of one job says whether it ran
    job.status, job.seconds = "done", time.perf_counter() - start
