"""`uae-report compare RUN_DIR... --output_dir DIR`: Unified-Bench runs side by side.

The inputs are runner folders (Unified-Bench/run_unibench.py's --output_dir: ours, or another
system's outputs scored with --recon_from / --captions_from). Writes into --output_dir:

  compare.md    the paper's Tab. 2 shape (CLIP, LongCLIP, DINO-v2, DINO-v3, Overall; x100; Overall =
                the plain mean of the four scorer averages) with the mean caption words per run,
                then per-image scores; with --paper, the paper's published rows in their own
                table, marked published, not measured
  compare.png   the same as bars (published rows hatched and labelled as such)
  compare.html  all of it in one self-contained page: real HTML tables, and each reference beside
                every run's reconstruction with its caption, as embedded thumbnails

With --judge DIR/judge.json (`uae-report judge`, Protocol 2), both pages add the caption win rates.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from uae.apps.pages import PAGE_STYLE, html_table, image_data_uri, img_tag, png_data_uri, save_figure
from uae.config import check_fields, field, parse_config
from uae.errors import UAEError
from uae.files import atomic_write_chunks
from uae.hashing import content_key
from uae.images import IMAGE_EXTENSIONS
from uae.paths import CONFIG_DIR

COLUMNS = (("clip", "CLIP"), ("longclip", "LongCLIP"), ("dinov2", "DINO-v2"), ("dinov3", "DINO-v3"))
HEADER = [label for _, label in COLUMNS] + ["Overall"]
PUBLISHED = "published, not measured"
PAPER_FILE = ("paper", "unified_bench.yaml")  # under uae.paths.CONFIG_DIR


@dataclass
class CompareConfig:
    """uae-report compare RUN_DIR... --output_dir DIR: Unified-Bench runs side by side."""

    run_dirs: list[str] = field(positional=True, metavar="RUN_DIR",
                                help="Unified-Bench run folders (the runner's --output_dir)")
    output_dir: str = field(help="where compare.md, compare.png and compare.html go")
    paper: bool = field(False, help="add the paper's published rows (Tab. 2 and Tab. 3, marked published, "
                                    "not measured)")
    labels: list[str] | None = field(None, help="a name per run (default: the folder names)")
    max_images: int = field(100, min=0, help="references shown side by side (Unified-Bench has 100)")
    judge: str | None = field(None, help="a judge.json of `uae-report judge` (Protocol 2): its caption win rates "
                                         "as a section of both pages")

    def __post_init__(self):
        check_fields(self)


@dataclass
class BenchRun:
    """One runner folder's results, as the comparison needs them."""

    path: Path
    label: str
    result: dict
    scores: dict[str, float | None]                 # scorer -> average (x1), None when not scored
    per_image: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # scorer -> image -> score
    reference_folder: Path | None = None
    reconstruction_folder: Path | None = None

    @property
    def overall(self) -> float | None:
        """The plain mean of the four scorer averages (None unless the run has all four)."""
        vals = [self.scores[k] for k, _ in COLUMNS]
        return None if any(v is None for v in vals) else sum(vals) / len(vals)

    @property
    def caption_words(self) -> float | None:
        caps = [c for c in (self.result.get("captions") or {}).values() if isinstance(c, str)]
        return sum(len(c.split()) for c in caps) / len(caps) if caps else None

    def image_overall(self, name: str) -> float | None:
        vals = [self.per_image.get(k, {}).get(name) for k, _ in COLUMNS]
        return None if any(v is None for v in vals) else sum(vals) / len(vals)


def _folder(run_dir: Path, recorded, fallback: str | None = None) -> Path | None:
    """A folder the runner recorded (as it was given: maybe relative to where it ran), found from
    here, else beside the run folder; `fallback` (a sub-folder of the run) last."""
    cands = []
    if recorded:
        p = Path(recorded)
        cands += [p] if p.is_absolute() else [p, run_dir / p, run_dir.parent / p]
    if fallback:
        cands.append(run_dir / fallback)
    return next((c for c in cands if c.is_dir()), None)


def load_run(path: str | os.PathLike, label: str | None = None) -> BenchRun:
    """A runner folder, or a UAEError saying why it is not one."""
    run_dir = Path(path)
    if not run_dir.exists():
        raise UAEError(f"run folder {path} does not exist")
    if not run_dir.is_dir():
        raise UAEError(f"{path} is not a folder: give Unified-Bench run folders (the runner's --output_dir)")
    rj = run_dir / "results.json"
    if not rj.is_file():
        raise UAEError(f"{path} is not a Unified-Bench run folder (no results.json): give the runner's --output_dir")
    try:
        result = json.loads(rj.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UAEError(f"{rj} is not valid JSON ({e})") from None
    if not isinstance(result, dict) or not isinstance(result.get("summary"), dict) or \
            not any(isinstance(result.get(k), dict) for k, _ in COLUMNS):
        raise UAEError(f"{rj} is not a Unified-Bench results.json (no scorer averages and summary)")
    scores, per_image = {}, {}
    for k, _ in COLUMNS:
        block = result.get(k)
        avg = block.get("average") if isinstance(block, dict) else None
        if avg is not None and not isinstance(avg, (int, float)):
            raise UAEError(f"{rj}: {k}.average is {avg!r}, not a number")
        scores[k] = avg
        per_image[k] = {n: v for n, v in (block or {}).items() if n not in ("average", "min", "max")}
    meta = result.get("meta") or {}
    return BenchRun(run_dir, label or run_dir.name, result, scores, per_image,
               reference_folder=_folder(run_dir, meta.get("reference_folder")),
               reconstruction_folder=_folder(run_dir, meta.get("reconstruction_folder"), "recon"))


def _unique_labels(runs: list[Path]) -> list[str]:
    """Each run's folder name, with as many parent folders as it takes to tell them apart."""
    depth = 1
    while True:
        labels = ["/".join(p.resolve().parts[-depth:]) for p in runs]
        if len(set(labels)) == len(labels) or depth > max(len(p.resolve().parts) for p in runs):
            return labels
        depth += 1


# ---------------------------------------------------------------------------- the paper's rows

def load_paper(path: Path | None = None) -> list[dict]:
    """The shipped published rows: [{table, citation, rows: [{name, values: [5 floats]}]}]."""
    path = Path(path) if path else CONFIG_DIR.joinpath(*PAPER_FILE)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UAEError(f"cannot read the published rows {path} ({e})") from None
    if not isinstance(data, dict):
        raise UAEError(f"{path}: expected a mapping with `tables`")
    if data.get("columns", HEADER) != HEADER:
        raise UAEError(f"{path}: columns must be {HEADER}, not {data.get('columns')}")
    tables = []
    for t in data.get("tables") or []:
        rows = []
        for name, values in (t.get("rows") or {}).items():
            if not (isinstance(values, list) and len(values) == len(HEADER)
                    and all(isinstance(v, (int, float)) for v in values)):
                raise UAEError(f"{path}: row {name!r} needs {len(HEADER)} numbers ({', '.join(HEADER)})")
            rows.append({"name": str(name), "values": [float(v) for v in values]})
        tables.append({"table": str(t.get("table", "")), "citation": str(t.get("citation", "")), "rows": rows})
    if not tables:
        raise UAEError(f"{path}: no tables of published rows")
    return tables


def overall_mismatch(values: list[float]) -> float | None:
    """The mean of a published row's four columns when its published Overall is not that mean
    (beyond the rounding of two decimals), else None."""
    mean = sum(values[:4]) / 4
    return mean if abs(mean - values[4]) > 0.01 else None


# ---------------------------------------------------------------------------- Protocol 2's tables

JUDGE_HEADER = ["run A", "run B", "A wins / ties / B wins", "unparsable", "win rate of A (95% CI)",
                "length-controlled", "position consistency", "words A / B"]
RANKING_HEADER = ["rank", "run", "Bradley-Terry strength (95% CI)"]
JUDGE_INTRO = ("Each reference judged with both runs' captions in both orders; win rate = (wins + ties / 2) / "
               "parsed verdicts, x100; the interval a bootstrap over references; length-controlled: the win rate at "
               "zero caption-length difference (a logistic regression of the verdict on it); position consistency: "
               "the references whose two orders gave the same verdict. Strength: the probability of beating a run "
               "of average strength.")


def load_judge(path: str | os.PathLike) -> dict:
    """A judge.json of `uae-report judge`, or a one-line error."""
    p = Path(path)
    if p.is_dir():
        p = p / "judge.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UAEError(f"--judge {path}: cannot read a judge.json ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("pairs"), list):
        raise UAEError(f"--judge {path}: not a judge.json of uae-report judge (no pairs)")
    return data


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def judge_rows(result: dict) -> list[list[str]]:
    return [[p["a"], p["b"], f"{p['wins']} / {p['ties']} / {p['losses']}", str(p["unparsable"]),
             _pct(p["win_rate"]) + (f" ({_pct(p['win_rate_ci'][0])}-{_pct(p['win_rate_ci'][1])})"
                                    if p.get("win_rate_ci") else ""),
             _pct(p["length_controlled_win_rate"]), _pct(p["position_consistency"]),
             f"{p['words_a']:.1f} / {p['words_b']:.1f}"] for p in result["pairs"]]


def ranking_rows(result: dict) -> list[list[str]]:
    return [[str(r["rank"]), r["run"], f"{_pct(r['strength'])} ({_pct(r['strength_ci'][0])}-{_pct(r['strength_ci'][1])})"]
            for r in result.get("ranking") or []]


def judge_markdown(result: dict) -> str:
    """Protocol 2's tables in markdown: the pairs, then (more than two runs) the ranking."""
    out = [f"{JUDGE_INTRO}\n", *_md_table(JUDGE_HEADER, judge_rows(result), numeric_from=2)]
    if result.get("ranking"):
        out += ["", *_md_table(RANKING_HEADER, ranking_rows(result), numeric_from=2)]
    return "\n".join(out) + "\n"


def judge_html(result: dict) -> str:
    """Protocol 2's tables as HTML."""
    esc = [[html.escape(c) for c in row] for row in judge_rows(result)]
    out = [f"<p class=note>{html.escape(JUDGE_INTRO)}</p>",
           html_table(JUDGE_HEADER, esc, numeric=set(range(2, len(JUDGE_HEADER))), caption="Caption win rate")]
    if result.get("ranking"):
        out.append(html_table(RANKING_HEADER, [[html.escape(c) for c in row] for row in ranking_rows(result)],
                              numeric={0, 2}, caption="Ranking"))
    return "\n".join(out)


def judge_summary(result: dict) -> str:
    """Who judged, as one line under the section's title."""
    j = result.get("judge") or {}
    return (f"Judge {j.get('judge')} ({result.get('mode')} mode), prompt {(result.get('prompt') or {}).get('path')}, "
            f"{len(result.get('references') or [])} references.")


# ---------------------------------------------------------------------------- the outputs

def _x100(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _words(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def measured_rows(runs: list[BenchRun]) -> list[list[str]]:
    return [[r.label, *(_x100(r.scores[k]) for k, _ in COLUMNS), _x100(r.overall), _words(r.caption_words),
             f"{r.result['summary'].get('valid', 'n/a')} / {r.result['summary'].get('failed', 'n/a')}"]
            for r in runs]


MEASURED_HEADER = ["run", *HEADER, "caption words", "valid / failed pairs"]


def differing_references(runs: list[BenchRun], images: list[str]) -> list[str]:
    """The images whose reference file is not the same in every run that has one (runs scored
    against different reference folders holding different files of the same name)."""
    folders = {r.reference_folder.resolve() for r in runs if r.reference_folder}
    if len(folders) < 2:
        return []
    out = []
    for name in images:
        digests = {content_key((f / name).read_bytes()) for f in folders if (f / name).is_file()}
        if len(digests) > 1:
            out.append(name)
    return out


def notes(runs: list[BenchRun], differing: list[str] = ()) -> list[str]:
    """What a reader must know before comparing the numbers."""
    out = []
    if differing:
        out.append(f"{len(differing)} reference(s) are different files of the same name in the runs' reference "
                   f"folders ({', '.join(differing[:5])}{', ...' if len(differing) > 5 else ''}): the per-image view "
                   "shows the first run's")
    sets = {r.label: frozenset(n for k, _ in COLUMNS for n in r.per_image[k]) for r in runs}
    if len(set(sets.values())) > 1:
        out.append("the runs were scored on different sets of references: their means are not directly comparable ("
                   + "; ".join(f"{k}: {len(v)} images" for k, v in sets.items()) + ")")
    tiny = [r.label for r in runs if (r.result.get("meta") or {}).get("scorer_weights") == "tiny"]
    if tiny:
        out.append(f"{', '.join(tiny)}: scored with tiny RANDOM scorer weights (a pipeline check, not image "
                   "similarity); not comparable with published numbers")
    partial = [r.label for r in runs if r.overall is None]
    if partial:
        out.append(f"{', '.join(partial)}: not scored with all four scorers, so no Overall")
    return out


def _md_table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> list[str]:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(map(cell, header)) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(map(cell, r)) + " |" for r in rows)]


def images_of(runs: list[BenchRun]) -> list[str]:
    """Every reference name any run scored or captioned, in order of first appearance."""
    names: dict[str, None] = {}
    for r in runs:
        names.update(dict.fromkeys(r.result.get("captions") or {}))
        for k, _ in COLUMNS:
            names.update(dict.fromkeys(r.per_image[k]))
        names.update(dict.fromkeys((r.result.get("errors") or {})))
    return list(names)


INTRO = ("Values x100: the mean cosine similarity of (reconstruction, reference) image features per scorer; "
         "Overall = the plain mean of the four scorer averages. Caption words: mean words per caption.")


def run_details(run: BenchRun) -> str:
    """What a run measured: its model (or checkpoint), scorer weights and folders."""
    meta = run.result.get("meta") or {}
    model = meta.get("model_label") if meta.get("model", "uae") != "uae" or meta.get("captioner") else None
    what = f"model {model}" if model else f"checkpoint {meta.get('checkpoint')}"
    return (f"{what}, scorer weights {meta.get('scorer_weights')}, references {meta.get('reference_folder')}, "
            f"reconstructions {meta.get('reconstruction_folder')}")


def published_rows(table: dict) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """A published table's rows as (system, cells) and its footnotes: an Overall that is not the
    mean of its four columns is marked * and explained, shown as published."""
    rows, foot = [], []
    for row in table["rows"]:
        values, mean = row["values"], overall_mismatch(row["values"])
        overall = f"{values[4]:.2f}" + (" *" if mean is not None else "")
        rows.append((row["name"], [*(f"{v:.2f}" for v in values[:4]), overall]))
        if mean is not None:
            foot.append(f"{row['name']}: the published Overall {values[4]:.2f} is not the mean of its four columns "
                        f"({mean:.2f}); shown as published")
    return rows, foot


def write_markdown(path: Path, runs: list[BenchRun], paper: list[dict] | None, images: list[str], shown: int,
                   differing: list[str] = (), judged: dict | None = None) -> None:
    def lines():
        yield f"# Unified-Bench comparison\n\n{INTRO}\n\n"
        yield "## Measured\n\n" + "\n".join(_md_table(MEASURED_HEADER, measured_rows(runs))) + "\n\n"
        for r in runs:
            yield f"- **{r.label}**: `{r.path}` ({run_details(r)})\n"
        for n in notes(runs, differing):
            yield f"\n**Note:** {n}.\n"
        if paper:
            yield f"\n## Published, not measured\n\nCopied from the paper; **{PUBLISHED}** by this toolkit.\n"
            for t in paper:
                published, foot = published_rows(t)
                rows = [[f"{name} ({PUBLISHED})", *cells] for name, cells in published]
                yield f"\n{t['citation']} ({PUBLISHED}):\n\n" + "\n".join(_md_table(["system", *HEADER], rows)) + "\n"
                for f in foot:
                    yield f"\n\\* {f}.\n"
        if judged:
            yield f"\n## Caption win rate (Protocol 2)\n\n{judge_summary(judged)}\n\n{judge_markdown(judged)}"
        yield (f"\n## Per image\n\nMean of the four scorers x100 per image and run"
               f"{f' (the first {shown} of {len(images)} images)' if shown < len(images) else ''}.\n\n")
        rows = [[name, *(_x100(r.image_overall(name)) for r in runs)] for name in images[:shown]]
        yield "\n".join(_md_table(["image", *(r.label for r in runs)], rows)) + "\n"

    atomic_write_chunks(path, lines())


def write_plot(path: Path, runs: list[BenchRun], paper: list[dict] | None) -> None:
    # matplotlib is heavy (about a second to import): loaded when a plot is drawn, on the file backend.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    published = [(f"{row['name']} ({t['table']}, published)", row["values"][4]) for t in (paper or []) for row in t["rows"]]
    ncols = 2 if published else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7 + 5 * (ncols - 1), max(3.4, 0.28 * (len(published) + len(runs)) + 1)),
                             squeeze=False, gridspec_kw={"width_ratios": [1.4, 1][:ncols]})
    ax = axes[0][0]
    width = 0.8 / max(len(runs), 1)
    for i, r in enumerate(runs):
        vals = [100 * (r.scores[k] or 0.0) for k, _ in COLUMNS] + [100 * (r.overall or 0.0)]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(HEADER))]
        ax.bar(xs, vals, width, label=r.label)
    ax.set_xticks(range(len(HEADER)), HEADER)
    ax.set_ylabel("x100 mean cosine similarity")
    ax.set_ylim(0, 100 * 1.18)
    ax.set_title("measured")
    ax.legend(fontsize=8, ncol=min(len(runs), 3), loc="upper center")
    if published:
        ax2 = axes[0][1]
        labels = [f"{r.label} (measured)" for r in runs] + [p[0] for p in published]
        vals = [100 * (r.overall or 0.0) for r in runs] + [p[1] for p in published]
        bars = ax2.barh(range(len(labels)), vals, color=["#4c72b0"] * len(runs) + ["#bbbbbb"] * len(published))
        for b in bars[len(runs):]:
            b.set_hatch("//")
        ax2.set_yticks(range(len(labels)), labels, fontsize=7)
        ax2.invert_yaxis()
        ax2.set_xlabel("Overall x100")
        ax2.set_title(f"Overall: measured vs {PUBLISHED} (hatched)", fontsize=9)
    save_figure(fig, path, dpi=100)


def write_html(path: Path, runs: list[BenchRun], paper: list[dict] | None, images: list[str], shown: int,
               differing: list[str] = (), judged: dict | None = None) -> None:
    numeric = set(range(1, len(HEADER) + 2))

    def page():
        yield (f'<!doctype html><meta charset="utf-8"><title>Unified-Bench comparison</title>\n{PAGE_STYLE}\n'
               f"<h1>Unified-Bench comparison</h1>\n<p class=note>{html.escape(INTRO)}</p>\n")
        rows = [[html.escape(c) for c in row] for row in measured_rows(runs)]
        yield html_table(MEASURED_HEADER, rows, numeric=numeric, caption="Measured") + "\n<ul class=note>"
        for r in runs:
            yield f"<li><b>{html.escape(r.label)}</b>: {html.escape(str(r.path))} ({html.escape(run_details(r))})</li>"
        yield "</ul>\n" + "".join(f"<p class='note warn'><b>Note:</b> {html.escape(n)}.</p>\n" for n in notes(runs, differing))
        for t in paper or []:
            published, foot = published_rows(t)
            rows = [[f"{html.escape(name)} <small>({PUBLISHED})</small>", *cells] for name, cells in published]
            yield html_table(["system", *HEADER], rows, numeric=set(range(1, len(HEADER) + 1)),
                             caption=f"Published, not measured: {html.escape(t['citation'])}",
                             row_class=["published"] * len(rows)) + "\n"
            yield "".join(f"<p class=note>* {html.escape(f)}.</p>\n" for f in foot)
        if judged:
            yield (f"<h2>Caption win rate (Protocol 2)</h2>\n<p class=note>{html.escape(judge_summary(judged))}</p>\n"
                   f"{judge_html(judged)}\n")
        plot = png_data_uri(path.parent / "compare.png")
        if plot:
            yield img_tag(plot, "compare.png", "max-width:1000px;max-height:none") + "\n"
        more = f" (the first {shown} of {len(images)} images; --max_images)" if shown < len(images) else ""
        yield (f"<h2>Per image{more}</h2>\n<p class=note>Each reference beside every run's reconstruction, with the "
               "mean of the four scorers x100 and the run's caption.</p>\n<table>\n<tr><th>image</th><th>reference</th>"
               + "".join(f"<th>{html.escape(r.label)}</th>" for r in runs) + "</tr>\n")
        recon_index = [_index(r.reconstruction_folder) for r in runs]
        for name in images[:shown]:
            ref = next((r.reference_folder / name for r in runs
                        if r.reference_folder and (r.reference_folder / name).is_file()), None)
            warn = "<br><span class=warn>differs between runs</span>" if name in differing else ""
            cells = [f"<td>{html.escape(name)}{warn}</td><td>{img_tag(image_data_uri(ref), 'reference')}</td>"]
            for r, index in zip(runs, recon_index):
                cap = (r.result.get("captions") or {}).get(name)
                err = (r.result.get("errors") or {}).get(name)
                cells.append(f"<td class=cap>{img_tag(image_data_uri(index.get(Path(name).stem)), 'reconstruction')}"
                             f"<br><b>{_x100(r.image_overall(name))}</b>"
                             + (f"<br><span class=warn>error: {html.escape(err)}</span>" if err else "")
                             + (f"<br>{html.escape(cap)}" if isinstance(cap, str) else "") + "</td>")
            yield '<tr class="image">' + "".join(cells) + "</tr>\n"
        yield "</table>\n"

    atomic_write_chunks(path, page())


def _index(folder: Path | None) -> dict[str, Path]:
    """{reference stem: reconstruction} of a folder, named as the runner matches them (stem or recon_<stem>)."""
    if folder is None:
        return {}
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            out.setdefault(p.stem.removeprefix("recon_"), p)
    return out


def compare(run_dirs: list[str], output_dir: str, *, paper: bool = False, labels: list[str] | None = None,
            max_images: int = 100, judge: str | None = None) -> dict:
    """Write compare.md, compare.png and compare.html; return the table as numbers (x100)."""
    if labels is not None and len(labels) != len(run_dirs):
        raise UAEError(f"--labels: {len(labels)} label(s) for {len(run_dirs)} run folder(s)")
    seen: dict[Path, str] = {}
    for p in run_dirs:
        if Path(p).resolve() in seen:
            raise UAEError(f"run folder {p} is given twice (as {seen[Path(p).resolve()]})")
        seen[Path(p).resolve()] = p
    auto = _unique_labels([Path(p) for p in run_dirs])
    runs = [load_run(p, labels[i] if labels else auto[i]) for i, p in enumerate(run_dirs)]
    published = load_paper() if paper else None
    judged = load_judge(judge) if judge else None
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UAEError(f"--output_dir {out} exists and is not a folder")
    images = images_of(runs)
    shown = min(len(images), max_images)
    write_plot(out / "compare.png", runs, published)
    differing = differing_references(runs, images)
    write_markdown(out / "compare.md", runs, published, images, shown, differing, judged)
    write_html(out / "compare.html", runs, published, images, shown, differing, judged)
    return {"runs": {r.label: {**{lab: None if r.scores[k] is None else 100 * r.scores[k] for k, lab in COLUMNS},
                               "Overall": None if r.overall is None else 100 * r.overall,
                               "caption_words": r.caption_words} for r in runs},
            "published": published, "output_dir": str(out)}


def main(argv=None) -> int:
    """`uae-report compare RUN_DIR... --output_dir DIR` (uae/apps/report.py's main dispatches here and
    turns a UAEError into one line, exit code 2): Unified-Bench runs side by side (the paper's Tab. 2
    shape), with the paper's published rows (--paper) and every reference beside each run's
    reconstruction."""
    cfg = parse_config(CompareConfig, argv, description=__doc__, prog="uae-report compare")
    res = compare(cfg.run_dirs, cfg.output_dir, paper=cfg.paper, labels=cfg.labels, max_images=cfg.max_images,
                  judge=cfg.judge)
    out = Path(cfg.output_dir)
    sys.stdout.write(f"{out / 'compare.md'}\n{out / 'compare.png'}\n{out / 'compare.html'}\n")
    for label, row in res["runs"].items():
        overall = row["Overall"]
        sys.stdout.write(f"{label}: Overall {'n/a' if overall is None else f'{overall:.2f}'} (x100)\n")
    return 0
