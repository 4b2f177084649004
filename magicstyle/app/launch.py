"""``python app.py``: check the options, load the model once, serve the page.  Errors in the options print one line
and exit with status 2 before the model is loaded, and before gradio is imported (so that they come first whether or
not the ``[app]`` extra is installed)."""
from __future__ import annotations

import math
import signal
import socket
import sys
import threading

from models.errors import CheckpointError, MagicStyleError

from ..config import ConfigError, load_config
from models.hub import MODEL_FILES, fetch_all, is_hub_ref, model_refs, quiet_hub, resolve_model_file

EXIT_USAGE = 2


def check_address(host: str, port: int) -> None:
    """Fail now, before the model loads, if the server could not listen on host:port."""
    if not 0 <= port < 65536:
        raise ConfigError(f"--port must be a port number (0-65535), not {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, port))
    except (OSError, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ConfigError(f"cannot listen on {host}:{port} ({reason}); choose another --port or --host") from None


def check_numbers(keep_inversions: int, cache_gib: float) -> None:
    """The cache's bounds: at least one inversion, a positive (finite) number of GiB."""
    if keep_inversions < 1:
        raise ConfigError(f"--keep-inversions must be at least 1 (the newest inversion is always kept), "
                          f"not {keep_inversions}")
    if not (math.isfinite(cache_gib) and cache_gib > 0):
        raise ConfigError(f"--cache-gib must be a number of GiB more than 0, not {cache_gib:g}")


def check_model_files(cfg) -> None:
    """Local model files exist and Hub references are well formed (nothing is downloaded here)."""
    for key, ref in model_refs(cfg).items():
        if not is_hub_ref(ref):  # (load_config has checked the form of hf: references)
            resolve_model_file(ref, local_dir=cfg.model.local_dir, what=MODEL_FILES[key])


def stop_on_sigterm():
    """SIGTERM (``kill``, a service manager) stops the demo as Ctrl-C does: Gradio closes the server, the process
    exits normally and its exit handlers run (the engine's removes the demo's temporary folder).  Python's default
    for SIGTERM ends the process at once, without them.  Returns the handler it replaced (None: none replaced)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # signal handlers belong to the main thread
        return signal.signal(signal.SIGTERM, interrupt)
    return None


def launch(args) -> int:
    """``args``: app.py's parsed arguments."""
    previous = stop_on_sigterm()
    try:
        check_numbers(args.keep_inversions, args.cache_gib)
        model = {"weights": args.weights, "vae": args.vae, "device": args.device, "dtype": args.dtype}
        overrides = {"model": {k: v for k, v in model.items() if v is not None}}
        cfg = load_config(args.config, overrides, args.overrides)
        check_address(args.host, args.port)
        check_model_files(cfg)
        try:  # after the options' checks: their errors come first, with or without gradio
            from . import ui
        except ImportError as e:
            raise ConfigError(f"the demo needs gradio ({e}); install it with: pip install -e '.[app]'") from None
        quiet_hub(progress=True)
        files = fetch_all(cfg)  # local paths, or Hub files (downloaded now if not in the cache)
        from .engine import Demo, InversionCache

        print(f"loading {files['model.weights'].name} ...", file=sys.stderr)
        cache = InversionCache(items=args.keep_inversions, max_bytes=int(args.cache_gib * 2**30))
        try:
            demo = Demo(cfg, files=files, cache=cache)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (see weights/README.md)") from None
        ui.serve(demo, host=args.host, port=args.port, share=args.share)
        return 0
    except MagicStyleError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_USAGE
    except OSError as e:  # the port is taken, or the host is not an address of this machine
        sys.stderr.write(f"error: cannot serve on {args.host}:{args.port} ({e}); choose another --port or --host\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    finally:
        if previous is not None:  # a caller's own handler (a test's process, say) comes back
            signal.signal(signal.SIGTERM, previous)
