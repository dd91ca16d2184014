"""What every script shares: logging set-up and turning UAEError into one clear line + exit 2."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from typing import Callable, Sequence

from uae.errors import UAEError
from uae.paths import shipped_config

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


# Library messages that say nothing a user of this toolkit can act on, matched narrowly (logger or
# warning category, and the message's start), so that any other message of the same source shows.
# torchao 0.18 registers two enums with torch's pytree (imported by transformers' and diffusers'
# quantizer modules, and by --optimizer adamw8bit): torch 2.14 answers each with a deprecation
# warning addressed to torchao's developers.
QUIET_LOG_MESSAGES = {"torch.utils._pytree": ("%s is an Enum subclass and is now natively supported",)}
QUIET_WARNINGS = (  # (category, message regex)
    # torchao's 8-bit optimizer state under torch.compile's cache (--optimizer adamw8bit): a note to
    # torchao's developers, no effect on the step.
    (UserWarning, r"OptimState8bit does not implement _stable_hash_for_caching"),
)


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def local_rank() -> int:
    """This process's rank on its node, as `accelerate launch` and torchrun set it (LOCAL_RANK); 0
    for a plain `python` run. Read from the environment, so logging is set up before accelerate's
    state exists."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def setup_logging(level: str | int = "INFO") -> None:
    """Our loggers at `level`; everything else (libraries, the root logger some of them use
    directly) at WARNING. Under `accelerate launch` / torchrun only each node's first process
    (LOCAL_RANK 0) logs at `level`: the others log warnings and errors only, tagged with their
    rank, so that a line is printed once per node, not once per GPU."""
    rank = local_rank()
    tag = "" if rank == 0 else f"[rank {os.environ.get('RANK', rank)}] "
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    if rank != 0:
        level = max(logging.getLevelName(level) if isinstance(level, str) else level, logging.WARNING)
    logging.getLogger("uae").setLevel(level)
    # Libraries' loading chatter is not the user's business at INFO.
    for name in ("transformers", "diffusers", "huggingface_hub", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, starts in QUIET_LOG_MESSAGES.items():
        lib = logging.getLogger(name)
        lib.filters = [f for f in lib.filters if not isinstance(f, _DropMessages)]  # once, however often called
        lib.addFilter(_DropMessages(starts))
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
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
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--config" and i + 1 < len(out):
            out[i + 1] = str(shipped_config(out[i + 1], kind))
        elif a.startswith("--config="):
            out[i] = "--config=" + str(shipped_config(a.split("=", 1)[1], kind))
    return out
