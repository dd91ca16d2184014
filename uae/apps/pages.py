"""What pages and figures share: a matplotlib figure written as PNG, and self-contained HTML.

Pages carry their images with them: small JPEG thumbnails (and the PNG plots) embedded as base64
data: URIs. One file that shows the same wherever it is copied, alone or with its folder: no
thumbnail folder to keep in step with it, no path out of its folder. Thumbnails keep it small
(a 160-pixel JPEG is a few KB; base64 adds a third).
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from uae.errors import UAEError
from uae.files import atomic_write_bytes
from uae.images import load_image


def save_figure(fig, path: Path, dpi: int) -> None:
    """A matplotlib figure to PNG, written atomically, and closed."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


THUMBNAIL_PX = 160  # longest side of an embedded image
PAGE_STYLE = """<style>body{font-family:sans-serif;margin:16px} img{max-width:256px;max-height:256px}
td,th{vertical-align:top;padding:4px 6px;text-align:left} td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.cap{max-width:360px;font-size:12px} table{border-collapse:collapse;margin:8px 0} tr{border-bottom:1px solid #ddd}
caption{text-align:left;font-weight:bold;padding:4px 0} .published td{color:#555;font-style:italic}
.note{font-size:13px;color:#444} .warn{color:#a40}</style>"""


def image_data_uri(path: str | os.PathLike | None, max_side: int = THUMBNAIL_PX) -> str | None:
    """A JPEG thumbnail (longest side at most `max_side`, never enlarged) of an image file as a
    data: URI; None when there is no file or it cannot be read."""
    import base64
    import io

    if path is None:
        return None
    try:
        im = load_image(path)
    except UAEError:
        return None
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_data_uri(path: str | os.PathLike) -> str | None:
    """A PNG file (a plot) as a data: URI, None when it does not exist."""
    import base64

    path = Path(path)
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else None


def img_tag(uri: str | None, alt: str = "", style: str = "") -> str:
    """<img> of a data: URI; "<alt> not available" in italics when there is none."""
    if uri is None:
        return f"<i>{html.escape(alt)} not available</i>" if alt else ""
    return f'<img src="{uri}" alt="{html.escape(alt)}"' + (f' style="{style}"' if style else "") + ">"


def html_table(header: list[str], rows: list[list[str]], *, numeric: set[int] = frozenset(), caption: str = "",
               row_class: list[str] | None = None) -> str:
    """An HTML table. `header` is plain text (escaped here); row cells are HTML (escape text with
    html.escape). Columns in `numeric` are right-aligned."""
    def cls(i):
        return ' class="num"' if i in numeric else ""

    out = ["<table>", f"<caption>{caption}</caption>" if caption else "",
           "<tr>" + "".join(f"<th{cls(i)}>{html.escape(h)}</th>" for i, h in enumerate(header)) + "</tr>"]
    for j, row in enumerate(rows):
        rc = f' class="{row_class[j]}"' if row_class and row_class[j] else ""
        out.append(f"<tr{rc}>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "\n".join(x for x in out if x)
