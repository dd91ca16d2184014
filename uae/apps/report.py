"""Results people look at: markdown tables, bar plots and HTML pages; and their command line,
uae-report (python -m uae.apps.report):

  uae-report RUN_DIR                              a training run's plots of every logged value against
                                                  the step, and its HTML page (index.html)
  uae-report compare RUN_DIR... --output_dir DIR  Unified-Bench runs side by side (uae/apps/compare.py;
                                                  `uae-report compare --help`); a training run folder
                                                  named `compare` is given as ./compare
  uae-report judge RUN_A RUN_B... --judge JUDGE --output_dir DIR
                                                  Protocol 2: which run's captions a judge model prefers
                                                  (uae/apps/judge.py; `uae-report judge --help`)
"""

from __future__ import annotations

import html
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from uae.apps import compare, judge
from uae.apps.pages import PAGE_STYLE, html_table, image_data_uri, img_tag, png_data_uri, save_figure
from uae.cli import script_main
from uae.config import field, parse_config
from uae.errors import UAEError
from uae.files import atomic_write_bytes, atomic_write_chunks, atomic_write_text

SUMMARY_KEYS = ("average", "min", "max")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def markdown_table(result: dict, scorers: list[str]) -> str:
    rows = ["| scorer | average | min | max |", "| --- | --- | --- | --- |"]
    rows += [f"| {s} | {_fmt(result[s]['average'])} | {_fmt(result[s]['min'])} | {_fmt(result[s]['max'])} |"
             for s in scorers]
    s = result["summary"]
    rows += ["", f"**overall** (mean of the scorer averages): {_fmt(result['overall'])} over {s['valid']} "
                 f"valid pair(s), {s['failed']} failed."]
    faith = result.get("caption_faithfulness") or {}
    if faith:
        rows += ["", "| caption faithfulness (text vs reference) | average |", "| --- | --- |"]
        rows += [f"| {k} | {_fmt(v['average'])} |" for k, v in faith.items()]
    return "\n".join(rows) + "\n"


def bar_plot(result: dict, scorers: list[str], path: Path, title: str) -> None:
    # matplotlib is heavy (about a second to import): loaded when a plot is drawn, on the file backend.
    import matplotlib

    matplotlib.use("Agg")

    import matplotlib.pyplot as plt

    vals = [result[s]["average"] or 0.0 for s in scorers]
    fig, ax = plt.subplots(figsize=(1.6 * len(scorers) + 2, 3.2))
    bars = ax.bar(scorers, vals, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in vals])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean cosine similarity")
    ax.set_title(title)
    save_figure(fig, path, dpi=110)


def summary_html(result: dict, scorers: list[str]) -> str:
    """results.md's tables as HTML tables."""
    rows = [[html.escape(s), *(_fmt(result[s][k]) for k in SUMMARY_KEYS)] for s in scorers]
    s = result["summary"]
    parts = [html_table(["scorer", *SUMMARY_KEYS], rows, numeric={1, 2, 3}),
             f"<p><b>overall</b> (mean of the scorer averages): {_fmt(result['overall'])} over {s['valid']} valid "
             f"pair(s), {s['failed']} failed.</p>"]
    faith = result.get("caption_faithfulness") or {}
    if faith:
        parts.append(html_table(["caption faithfulness (text vs reference)", "average"],
                                [[html.escape(k), _fmt(v["average"])] for k, v in faith.items()], numeric={1}))
    return "\n".join(parts)


def html_report(result: dict, scorers: list[str], rows, path: Path, title: str) -> None:
    """The runner's report.html. rows: {name, reference, reconstruction, caption} with file paths
    (an iterable: one row is made at a time). Self-contained: the summary tables, the bar plot
    (scores.png beside the page) and each reference beside its reconstruction as embedded
    thumbnails, so the page shows the same after its folder, or the page alone, is copied
    anywhere. Written row by row, never held whole (a run of thousands of references)."""
    def page():
        yield (f'<!doctype html><meta charset="utf-8"><title>{html.escape(title)}</title>\n{PAGE_STYLE}\n'
               f"<h1>{html.escape(title)}</h1>\n{summary_html(result, scorers)}\n")
        plot = png_data_uri(path.parent / "scores.png")
        if plot:
            yield img_tag(plot, "scores", "max-width:640px;max-height:none") + "\n"
        head = "".join(f'<th class="num">{html.escape(s)}</th>' for s in scorers)
        yield f"<table>\n<tr><th>image</th><th>reference</th><th>reconstruction</th><th>caption</th>{head}</tr>\n"
        for r in rows:
            name = r["name"]
            cells = "".join(f'<td class="num">{_fmt(result[s].get(name))}</td>' for s in scorers)
            err = result["errors"].get(name)
            recon = img_tag(image_data_uri(r.get("reconstruction")), "reconstruction") if r.get("reconstruction") else ""
            yield (f'<tr class="image"><td>{html.escape(name)}</td><td>{img_tag(image_data_uri(r["reference"]), "reference")}'
                   f"</td><td>{recon}</td><td class=cap>{html.escape(r.get('caption') or '')}"
                   f"{'<br><b>error:</b> ' + html.escape(err) if err else ''}</td>{cells}</tr>\n")
        yield "</table>\n"

    atomic_write_chunks(path, page())


def loss_curve(records: list[dict], path: Path, title: str, keys: tuple[str, ...] = ("loss",)) -> dict[str, int]:
    """Plot logged values against the step (one point per logged step), with a running mean.
    Returns the number of points drawn per key."""
    # matplotlib is heavy (about a second to import): loaded when a plot is drawn, on the file backend.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.2), squeeze=False)
    drawn = {}
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in records if key in r]
        drawn[key] = len(pts)
        if pts:
            steps, vals = zip(*pts)
            ax.plot(steps, vals, ".", alpha=0.4, label=key)
            w = max(1, len(vals) // 20)
            smooth = [sum(vals[max(0, i - w + 1):i + 1]) / len(vals[max(0, i - w + 1):i + 1]) for i in range(len(vals))]
            ax.plot(steps, smooth, "-", label=f"running mean ({w})")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel(key)
    fig.suptitle(title)
    save_figure(fig, path, dpi=100)
    return drawn


def eval_curves(records: list[dict], path: Path, scorers: list[str]) -> dict[str, int]:
    """eval.png: the held-out Unified-Bench (overall and per scorer) and the caption length against
    the step, from the records that hold an evaluation."""
    keys = ("eval/overall", *(f"eval/{s}" for s in scorers), "eval/caption_words")
    return loss_curve([r for r in records if "eval/overall" in r], path, "held-out Unified-Bench", keys=keys)


def image_grid(images: list, labels: list[str], path: Path, columns: int = 4, label_chars: int = 60):
    """A grid of PIL images with a short label under each (e.g. prompts, rewards), written to
    `path` and returned."""
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    pad = 14
    grid = Image.new("RGB", (cols * w, rows * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, label) in enumerate(zip(images, labels)):
        x, y = (i % cols) * w, (i // cols) * (h + pad)
        grid.paste(im, (x, y))
        draw.text((x + 2, y + h + 1), str(label)[:min(label_chars, max(4, w // 6))], fill="black")  # ~6 px a glyph
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return grid


def run_page(run_dir: str | os.PathLike) -> Path:
    """A training run at a glance: the curves, then the logged grids over time with the sampled
    captions (samples.jsonl) under each, then the held-out evaluations (eval.png, each grid with its
    captions). Written to <run_dir>/index.html."""
    run = Path(run_dir)
    samples, evals = {}, {}
    if (run / "samples.jsonl").exists():
        for line in (run / "samples.jsonl").read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if "captions" in rec:  # a group's sampled captions (stage 2)
                    samples[rec["step"]] = rec
                if "eval_captions" in rec:  # a held-out evaluation's captions
                    evals[rec["step"]] = rec["eval_captions"]
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(run.name)}</title>",
             "<style>body{font-family:sans-serif} img{max-width:100%} li{font-size:12px}</style>",
             f"<h1>{html.escape(run.name)}</h1>"]
    for png in ("curves.png", "loss.png"):
        if (run / png).exists():
            parts.append(f"<img src='{png}' style='max-width:900px'>")
    for grid in sorted((run / "grids").glob("*.png")) if (run / "grids").exists() else []:
        step = int(grid.stem.split("_")[-1])
        parts.append(f"<h3>step {step}</h3><img src='grids/{html.escape(grid.name)}'>")
        rec = samples.get(step)
        if rec:
            items = "".join(f"<li>r={r:.4f}: {html.escape(c)}</li>" for c, r in zip(rec["captions"], rec["rewards"]))
            parts.append(f"<p>{html.escape(str(rec['image']))}</p><ol>{items}</ol>")
    if (run / "eval.png").exists():
        parts.append("<h2>held-out Unified-Bench</h2><img src='eval.png' style='max-width:900px'>")
    for grid in sorted((run / "eval").glob("step_*.png")) if (run / "eval").exists() else []:
        step = int(grid.stem.split("_")[-1])
        parts.append(f"<h3>evaluation at step {step}</h3><img src='eval/{html.escape(grid.name)}'>")
        items = "".join(f"<li>{html.escape(k)}: {html.escape(c)}</li>" for k, c in evals.get(step, {}).items())
        parts.append(f"<ul>{items}</ul>")
    out = run / "index.html"
    atomic_write_text(out, "\n".join(parts) + "\n")
    return out


@dataclass
class ReportConfig:
    """uae-report RUN_DIR: a training run's curves and page."""

    run_dir: str = field(positional=True, metavar="RUN_DIR", help="a training run folder (its metrics.jsonl)")


@script_main
def main(argv=None) -> int:
    """uae-report: a training run's report, or (`uae-report compare ...`) the comparison of
    Unified-Bench runs, or (`uae-report judge ...`) their captions' win rates, each form on its own
    config."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        return compare.main(argv[1:])
    if argv[:1] == ["judge"]:
        return judge.main(argv[1:])
    cfg = parse_config(ReportConfig, argv, description=__doc__, prog="uae-report")
    run = Path(cfg.run_dir)
    path = run / "metrics.jsonl"
    if not path.exists():
        raise UAEError(f"{path} does not exist: give a training run folder")
    records = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    keys = [k for k in ("loss", "reward_mean", "caption_len_mean", "kl") if any(k in r for r in records)]
    drawn = loss_curve(records, run / "curves.png", run.name, keys=tuple(keys))
    sys.stdout.write(f"{run_page(run)}\n" + ", ".join(f"{k}: {n} points" for k, n in drawn.items()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
