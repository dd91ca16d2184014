"""What every script shares: logging set-up and turning UAEError into one clear line + exit 2."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from typing import Callable, Sequence

from uae.errors import UAEError

logger = logging.getLogger("uae")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (not at set-up), so in-process
    callers that swap stderr (tests, notebooks) keep seeing the messages."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: str | int = "INFO") -> None:
    """Our loggers at `level`; everything else (libraries, the root logger some of them use
    directly) at WARNING."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("uae").setLevel(level)
    # Libraries' loading chatter is not the user's business at INFO.
    for name in ("transformers", "diffusers", "huggingface_hub", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def script_main(fn: Callable[..., int]) -> Callable[..., int]:
    """Wrap a script's `main(argv)`: UAEError -> 'error: message' on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(argv=None, **kwargs) -> int:
        setup_logging()
        try:
            return fn(argv, **kwargs)
        except UAEError as e:
            logger.error("%s", e)
            report_to_launcher(e)
            return 2
    return wrapper


def report_to_launcher(error: UAEError) -> None:
    """Under `accelerate launch` / torchrun, the error's one line also goes to the launcher's error
    file (TORCHELASTIC_ERROR_FILE), so that the launcher's ChildFailedError summary, the last thing
    the user reads, shows it as the root cause instead of a pointer to its docs."""
    import json
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": f"error: {error}", "timestamp": int(time.time())}, f)
        except OSError:
            pass  # the one line above still stands


def with_named_config(argv: Sequence[str], kind: str) -> list[str]:
    """`argv` with its --config value resolved: a path, or the name of a shipped config of `kind`
    ("grpo", "sft"; uae.paths.shipped_config), so that `--config tiny_u4g` works from any folder."""
    from uae.paths import shipped_config

    out = list(argv)
    for i, a in enumerate(out):
        if a == "--config" and i + 1 < len(out):
            out[i + 1] = str(shipped_config(out[i + 1], kind))
        elif a.startswith("--config="):
            out[i] = "--config=" + str(shipped_config(a.split("=", 1)[1], kind))
    return out
