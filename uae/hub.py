"""The Hugging Face hub when it cannot be reached: found out in seconds (not after a minute of
retries), the cached copy used when there is one, and an error that says what to do offline."""

from __future__ import annotations

import functools
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from uae.errors import UAEError

logger = logging.getLogger(__name__)

OFFLINE_HINT = ("offline, use the random tiny scorers (--weights tiny for Score_i2i, --scorer_weights tiny for the "
                "trainers and the runner), or set HF_HUB_OFFLINE=1 to read only the hub cache, or pass a local copy "
                "(--clip_checkpoint PATH, ...)")


def offline() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub reads it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub's endpoint accepts a connection within `timeout_s` (asked once per process)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s):
            return True
    except OSError:
        return False


def local_or_cached(name_or_path: str, what: str, hint: str = OFFLINE_HINT) -> str:
    """`name_or_path` unchanged when it is a local path, when HF_HUB_OFFLINE is set (the libraries
    then read the cache themselves) or when the hub answers; else the cached snapshot of that repo,
    or a one-line error at once, instead of the libraries' retries."""
    if os.path.exists(name_or_path) or offline() or hub_reachable():
        return name_or_path
    from huggingface_hub import snapshot_download

    try:
        cached = snapshot_download(repo_id=name_or_path, local_files_only=True)
    except Exception:
        raise UAEError(f"{what} {name_or_path!r}: the hub cannot be reached and it is not in the hub cache; "
                       f"{hint}") from None
    logger.warning("the hub cannot be reached: %s %s from the hub cache (%s)", what, name_or_path, cached)
    return str(Path(cached))
