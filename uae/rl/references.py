"""The reference images of an RL stage: a folder of images, a folder with .txt captions, or a
.jsonl / datasets / webdataset source (uae.data); unreadable images are skipped with a warning."""

from __future__ import annotations

import logging
from typing import NamedTuple

from uae.errors import UAEError

logger = logging.getLogger(__name__)


class Reference(NamedTuple):
    key: str
    image: object          # PIL RGB
    caption: str | None    # the caption that came with the data, if any


def load_references(data: str) -> list[Reference]:
    """A folder of images (captions from the encoder), a folder with .txt captions, or a .jsonl /
    datasets / webdataset source; unreadable images are skipped with a warning."""
    from uae.data import read_items

    refs = []
    for it in read_items(data):
        try:
            refs.append(Reference(it.image.name if it.image is not None else it.source, it.open(), it.caption))
        except Exception as e:
            logger.warning("skipping reference %s: %s", it.source, e)
    if not refs:
        raise UAEError(f"--data {data}: no readable reference image")
    return refs
