"""Model files by reference: a local path, or a file on the Hugging Face Hub, ``hf:OWNER/REPO/PATH.safetensors[@REV]``.

``resolve_model_file(ref)`` turns either into a local ``Path`` (the one function for checkpoints, VAEs and, later,
metric weights).  A Hub file is looked for in the local folder first (``weights/NAME`` by default), then fetched by
``huggingface_hub.hf_hub_download`` into the Hub's own cache, with its progress bar; ``HF_HOME``, ``HF_HUB_OFFLINE``,
``HF_ENDPOINT`` and the token of ``hf auth login`` (or ``HF_TOKEN``) work as for any Hub tool.  A pinned revision (a
commit hash) is served from the cache with no network access at all.

Only ``.safetensors`` is ever fetched (pickles can run code when loaded).  Every failure is a ``HubError`` with one
line that names the file and what to do; ``huggingface_hub`` downloads to a temporary file and renames it into the
cache only when complete, so an interrupted download leaves nothing a later run would take for a whole file.
"""
from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from pathlib import Path

from models.errors import CheckpointError, MagicStyleError, first_line

PREFIX = "hf:"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# With HF_HUB_OFFLINE set and the file not cached: what fetches it (the caller's command; this is the CLI's)
DOWNLOAD_ONLY_HINT = "fetch it once with network access (`magicstyle --download-only`)"
_REF = re.compile(r"hf:(?P<repo>[\w.-]+/[\w.-]+)/(?P<path>[^@]+?)(?:@(?P<revision>[^@]+))?")


class HubError(MagicStyleError):
    """A Hub reference that is malformed, or a file that could not be fetched (one line: what and what to do)."""


@dataclass(frozen=True)
class HubFile:
    """``hf:repo/path@revision``; ``revision`` None means the repository's default branch."""

    repo: str
    path: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{PREFIX}{self.repo}/{self.path}" + (f"@{self.revision}" if self.revision else "")


def is_hub_ref(ref: object) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIX)


def parse_ref(ref: str) -> HubFile:
    """``hf:OWNER/REPO/PATH/IN/REPO.safetensors[@REVISION]`` -> ``HubFile``; refuses anything but ``.safetensors``."""
    m = _REF.fullmatch(ref)
    if m is None:
        raise HubError(f"{ref!r} is not a Hub reference of the form hf:OWNER/REPO/PATH.safetensors[@REVISION]")
    hub = HubFile(m["repo"], m["path"].strip("/"), m["revision"])
    suffix = Path(hub.path).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise HubError(f"{ref} is a pickle file ({suffix}), which can run code when loaded and is never fetched; "
                       "use the repository's .safetensors file")
    if suffix != ".safetensors":
        what = suffix or "a file without suffix"
        raise HubError(f"{ref}: only .safetensors files are fetched from the Hub, not {what}")
    return hub


def resolve_model_file(ref: str | Path, *, local_dir: str | Path | None = "weights", what: str = "weights",
                       offline_hint: str = DOWNLOAD_ONLY_HINT) -> Path:
    """A model file as a local path: ``ref`` is a path (returned if it is a file) or an ``hf:`` reference.

    ``hf:`` references: ``local_dir / NAME`` is used if it exists (NAME: the file name in the repository), else the
    file is downloaded into (or found in) the Hugging Face cache.  ``what`` names the file in error messages;
    ``offline_hint`` says how to fetch it when HF_HUB_OFFLINE is set and it is not cached.
    """
    if not is_hub_ref(str(ref)):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"{what} file {path} not found; put the .safetensors file there, pass another path, or give a Hub "
                "reference hf:OWNER/REPO/FILE.safetensors (see weights/README.md)"
            )
        return path
    hub = parse_ref(str(ref))
    if local_dir is not None:
        local = Path(local_dir).expanduser() / Path(hub.path).name
        if local.is_file():
            return local
    return download(hub, what=what, local_dir=local_dir, offline_hint=offline_hint)


def download(hub: HubFile, *, what: str = "weights", local_dir: str | Path | None = "weights",
             offline_hint: str = DOWNLOAD_ONLY_HINT) -> Path:
    """``hf_hub_download`` with every failure turned into one ``HubError`` line (which names ``local_dir``, and
    ``offline_hint``, the caller's way to fetch the file, when HF_HUB_OFFLINE is set)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = Path(hub.path).name
    put_it = f"or put the file at {Path(local_dir) / name}" if local_dir is not None else "or give a local path"
    try:
        return Path(hf_hub_download(hub.repo, hub.path, revision=hub.revision))
    except GatedRepoError:
        raise HubError(f"{hub.repo} is gated: accept its terms on its Hub page, then log in (`hf auth login`) or set "
                       f"HF_TOKEN; {put_it}") from None
    except RepositoryNotFoundError:
        raise HubError(f"repository {hub.repo} not found on the Hub ({constants.ENDPOINT}) for {what} {hub.path}: "
                       "check the name; a private repository needs `hf auth login` or HF_TOKEN") from None
    except RevisionNotFoundError:
        raise HubError(f"revision {hub.revision} not found in repository {hub.repo} ({what} {hub.path})") from None
    except LocalEntryNotFoundError:
        cache = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"{what} {hub} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: "
                           f"{offline_hint}, {put_it} "
                           "(see weights/README.md)") from None
        raise HubError(f"cannot reach the Hub ({constants.ENDPOINT}) to download {what} {hub}, and it is not in the "
                       f"cache ({cache}): check the network (proxy, HF_ENDPOINT), {put_it} "
                       "(see weights/README.md)") from None
    except EntryNotFoundError:
        raise HubError(f"file {hub.path} not found in repository {hub.repo}"
                       f"{'@' + hub.revision if hub.revision else ''} ({what}): check the file name") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "error"
        raise HubError(f"the Hub answered HTTP {status} for {what} {hub}; try again later, {put_it}") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise HubError(f"no space left on the device while downloading {what} {hub} into "
                           f"{constants.HF_HUB_CACHE}: free some space or set HF_HOME to a larger disk") from None
        raise HubError(f"downloading {what} {hub} failed ({first_line(e)}); nothing was kept: run again") from None
    except Exception as e:  # the HTTP client's own errors (connection reset mid-file, timeouts) after its retries
        raise HubError(f"downloading {what} {hub} was interrupted ({first_line(e, typed=True)}); nothing "
                       "was kept: run again") from None


MODEL_FILES = {"model.weights": "weights", "model.vae": "VAE"}  # config key -> its name in messages
VAE_FT_MSE = ("hf:stabilityai/sd-vae-ft-mse-original/vae-ft-mse-840000-ema-pruned.safetensors"
              "@c1eba256520a04c72a0dedbf5a326209c576dbef")
# model.vae=auto: checkpoints released without their VAE (by file name) -> the VAE their authors recommend.
PAIRED_VAE = {
    "Realistic_Vision_V6.0_NV_B1_fp16.safetensors": VAE_FT_MSE,
    "Realistic_Vision_V6.0_NV_B1.safetensors": VAE_FT_MSE,
}


def file_name(ref: str) -> str:
    """The file name a path or ``hf:`` reference points at."""
    return Path(parse_ref(ref).path if is_hub_ref(ref) else ref).name


def model_refs(cfg) -> dict[str, str]:
    """The model files a run configuration names: config key -> reference; ``model.vae: auto`` looked up."""
    vae = cfg.model.vae
    if vae == "auto":
        vae = PAIRED_VAE.get(file_name(cfg.model.weights))
    return {key: ref for key, ref in (("model.weights", cfg.model.weights), ("model.vae", vae)) if ref}


def fetch_all(cfg) -> dict[str, Path]:
    """Every model file of a run configuration, resolved (fetched if needed): config key -> local path."""
    return {key: resolve_model_file(ref, local_dir=cfg.model.local_dir, what=MODEL_FILES[key])
            for key, ref in model_refs(cfg).items()}


def quiet_hub(progress: bool) -> None:
    """CLI: the Hub library's log warnings off (our one-line error says what failed); its progress bars if asked."""
    from huggingface_hub.utils import disable_progress_bars, logging

    logging.set_verbosity_error()
    if not progress:
        disable_progress_bars()
