"""`uae-report judge RUN_A RUN_B [RUN ...] --judge JUDGE --output_dir DIR`: Unified-Bench's Protocol 2,
the pairwise caption win rate. For each reference every pair of runs captioned, a judge model reads
both captions (and, in image mode, the reference image) and says which is better.

JUDGE is a transformers image-text-to-text model (hub id or folder; `tiny`: the embedded random one),
`openai:URL` (an OpenAI-compatible server: vLLM, SGLang, TGI, `transformers serve`; uae/remote.py),
or `module:Class` (a user's class: `judge(items) -> list[str]`, the answers; `sees_images` True if it
reads `item.image`; optional `settings()`, what its answers depend on).

The protocol (docs/unified-bench.md, "Protocol 2"): each pair is asked in both orders (position
bias cancels); an answer's verdict (A / B / tie) and its short reason are parsed, an answer without
one is asked once more and then counted as unparsable, never guessed; per pair of runs: win / tie /
loss, the win rate with a seeded bootstrap 95% interval over references, the position-consistency
rate, the mean caption words and a length-controlled win rate; more than two runs: a Bradley-Terry
ranking with intervals. Verdicts are cached (DIR/cache/) keyed by everything an answer depends on, so a
rerun, or one with a run added, asks only new questions. Writes judge.json (every verdict), judge.md
and a self-contained judge.html into DIR.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import itertools
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from uae.apps.compare import judge_html, judge_markdown, load_run
from uae.apps.pages import PAGE_STYLE, image_data_uri, img_tag
from uae.cli import setup_logging
from uae.config import check_fields, field, parse_config, save_config
from uae.data import read_items
from uae.errors import UAEError
from uae.files import atomic_write_chunks, atomic_write_json, writable_dir
from uae.hashing import content_key
from uae.images import load_image
from uae.paths import CONFIG_DIR
from uae.random_weights.unified import resolve as resolve_tiny
from uae.remote import ChatClient, RemoteError, image_part, text_part
from uae.runtime import resolve_device, resolve_dtype
from uae.unified.common import load_config, load_pretrained, to_device
from uae.unified.loading import import_class, read_model_args

logger = logging.getLogger(__name__)

VERDICTS = ("A", "B", "tie")
PROTOCOL = "Unified-Bench Protocol 2: pairwise caption win rate (ours; the paper publishes no judge prompt)"


@dataclass
class JudgeConfig:
    """uae-report judge RUN_A RUN_B [RUN ...] --judge JUDGE --output_dir DIR: which run's captions a judge prefers."""

    run_dirs: list[str] = field(positional=True, metavar="RUN", help="two or more Unified-Bench run folders "
                                                                     "(the runner's --output_dir)")
    judge: str = field(help="a transformers image-text-to-text model (hub id, folder, or 'tiny': the embedded random "
                            "one), openai:URL (an OpenAI-compatible server, e.g. openai:http://127.0.0.1:8000/v1), or "
                            "module:Class (a user's class; a module name or path/to/file.py)")
    output_dir: str = field(help="where judge.json, judge.md, judge.html and the verdict cache (cache/) go")
    mode: str = field("image", choices=("image", "text"), help="image: the judge sees the reference image and both "
                                                               "captions; text: the captions only (and "
                                                               "--reference_captions where given)")
    reference_captions: str | None = field(None, help="text mode: a reference caption per image, shown to the judge "
                                                      "(a .jsonl of {image, caption} or a folder of images with .txt "
                                                      "captions; 'sample': the sample photos' captions)")
    prompt: str = field("default", help="the judge prompt: a shipped name (configs/judge/) or a YAML file")
    labels: list[str] | None = field(None, help="a name per run (default: the folder names)")
    judge_args: str | None = field(None, help="module:Class: its constructor's keyword arguments (inline JSON / YAML, "
                                              "or a .json / .yaml file)")
    remote_model: str | None = field(None, help="openai:URL: the served model's name (default: the server's only "
                                                "model)")
    concurrency: int = field(8, min=1, help="openai:URL: requests in flight")
    timeout_s: float = field(120.0, min=0.001, help="openai:URL: seconds before a request is given up and retried")
    retries: int = field(3, min=0, help="openai:URL: retries of a failed request (exponential backoff)")
    backoff_s: float = field(1.0, min=0, help="openai:URL: the first retry's wait in seconds (doubled each retry)")
    max_new_tokens: int | None = field(None, min=1, help="the judge's answer length (default: the prompt config's)")
    do_sample: bool = field(False, help="sample the judge's answers (default: greedy)")
    temperature: float = field(1.0, min=0, help="--do_sample true: the sampling temperature")
    seed: int = field(0, help="seed of the bootstrap, and of a sampling judge")
    bootstrap: int = field(1000, min=1, help="bootstrap resamples of the references for the 95%% intervals")
    max_images: int = field(100, min=0, help="references shown in judge.html")
    device: str = field("auto", help="a local judge's device: auto (GPU if present), cpu, cuda, cuda:N")
    dtype: str = field("auto", help="a local judge's dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    log_level: str = field("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level")

    def __post_init__(self):
        check_fields(self)
        if len(self.run_dirs) < 2:
            raise UAEError(f"give two or more run folders to judge (got {len(self.run_dirs)})")
        if self.labels is not None and len(self.labels) != len(self.run_dirs):
            raise UAEError(f"--labels: {len(self.labels)} label(s) for {len(self.run_dirs)} run folder(s)")
        if self.reference_captions and self.mode != "text":
            raise UAEError("--reference_captions applies to --mode text (in image mode the judge sees the image)")
        if self.judge_args not in (None, "") and judge_kind(self.judge) != "module":
            raise UAEError(f"--judge_args applies to --judge module:Class, not --judge {self.judge}")
        read_model_args(self.judge_args)

    def sampling(self, max_new_tokens: int) -> dict:
        return {"do_sample": self.do_sample, "max_new_tokens": max_new_tokens,
                **({"temperature": self.temperature} if self.do_sample else {"decoding": "greedy"})}


def judge_kind(spec: str) -> str:
    if spec.startswith("openai:"):
        return "remote"
    if ":" in spec and not re.match(r"^[A-Za-z]:[\\/]", spec):  # not a Windows drive
        return "module"
    return "transformers"


# ---------------------------------------------------------------------------- the prompt and the verdicts

PROMPT_KEYS = ("image_prompt", "text_prompt", "reference_block", "retry_suffix", "max_new_tokens", "image_max_side")


def load_prompt(spec: str) -> dict:
    """The judge prompt config (configs/judge/<name>.yaml or a file), with `sha256` of its text."""
    path = Path(spec)
    if not path.is_file():
        path = CONFIG_DIR / "judge" / f"{spec}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "judge").glob("*.yaml"))
        raise UAEError(f"--prompt {spec}: no such file, and not a shipped judge prompt ({', '.join(known)})")
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    missing = [k for k in PROMPT_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise UAEError(f"--prompt {path}: missing {', '.join(missing)}")
    return {**{k: data[k] for k in PROMPT_KEYS}, "name": spec, "path": str(path),
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


# The letters in capitals only ("Verdict: a tie" is no verdict A); the words in any case.
_VERDICT_LINE = re.compile(r"(?i:verdict)\W{0,6}(?:(?i:caption|a)\s+)?(A|B|(?i:tie|draw|equal|neither|both))\b")
_BARE = re.compile(r"^\W*(?:caption\s+)?(A|B|tie)\W*$", re.IGNORECASE)
_BETTER = re.compile(r"\bcaption\s+(A|B)\s+is\s+(?:better|more accurate|more faithful|preferred)", re.IGNORECASE)
_REASON = re.compile(r"^\W*reason\W{0,6}(.+)", re.IGNORECASE | re.MULTILINE)  # a line "Reason: ..."


def _norm(word: str) -> str:
    w = word.lower()
    return "A" if w == "a" else "B" if w == "b" else "tie"


def parse_verdict(answer: str) -> tuple[str | None, str]:
    """(A / B / tie, or None when the answer holds no verdict; the judge's short reason). The last
    `Verdict: X` line wins; else a bare answer (`B`, `Caption A.`, `tie`); else one unambiguous
    `Caption X is better`. Nothing else is read as a verdict."""
    text = answer or ""
    found = _VERDICT_LINE.findall(text)
    verdict = _norm(found[-1]) if found else None
    if verdict is None and _BARE.match(text.strip()):
        verdict = _norm(_BARE.match(text.strip()).group(1))
    if verdict is None:
        better = {m.upper() for m in _BETTER.findall(text)}
        verdict = better.pop() if len(better) == 1 else None
    reason = _REASON.search(text)
    why = reason.group(1) if reason else _VERDICT_LINE.sub("", text)
    return verdict, " ".join(why.split())[:300]


# ---------------------------------------------------------------------------- judges

@dataclass
class JudgeItem:
    """One question: `prompt` (the full text), the two captions as shown (A = first), the reference's
    name, its image (image mode) and the reference caption (text mode, when given)."""

    reference: str
    first: str
    second: str
    prompt: str
    image: object = None
    reference_caption: str | None = None


class TransformersJudge:
    """A transformers model as the judge: image-text-to-text (image or text mode) or a causal LM
    (text mode), prompted through its own chat template, one question per generate() call."""

    def __init__(self, source: str, cfg: JudgeConfig, max_new_tokens: int, device):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

        path = resolve_tiny(source, "captioner")
        config = load_config(path, "--judge", "a transformers model")
        self.sees_images = type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
        if cfg.mode == "image" and not self.sees_images:
            raise UAEError(f"--judge {source} holds a {config.model_type!r} model, which cannot see images: use "
                           "--mode text, or an image-text-to-text judge")
        dtype = resolve_dtype(cfg.dtype, device)
        if self.sees_images:
            self.processor, self.model = load_pretrained(AutoModelForImageTextToText, path, "--judge", "the judge", dtype)
        else:
            self.processor, self.model = load_pretrained(AutoModelForCausalLM, path, "--judge", "the judge", dtype)
            self.processor = AutoTokenizer.from_pretrained(path)
        if getattr(self.processor, "chat_template", None) is None:
            raise UAEError(f"--judge {source}: its processor has no chat template to put the question in")
        self.model.to(device).eval()
        self.device, self.dtype, self.cfg = device, dtype, cfg
        self.kwargs = {"max_new_tokens": max_new_tokens, "do_sample": cfg.do_sample,
                       **({"temperature": cfg.temperature} if cfg.do_sample else {})}
        self.name = Path(path).name if source == "tiny" else source

    def judge(self, items: list[JudgeItem]) -> list[str]:
        out = []
        for it in items:
            content = ([{"type": "image"}] if it.image is not None else []) + [{"type": "text", "text": it.prompt}]
            chat = [{"role": "user", "content": content if self.sees_images else it.prompt}]
            text = self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            if self.sees_images:
                batch = self.processor(text=[text], images=[[it.image]] if it.image is not None else None,
                                       return_tensors="pt")
            else:
                batch = self.processor([text], return_tensors="pt")
            batch = to_device(batch, self.device, self.dtype)
            # A sampled answer depends on its question only (not on the order or the process).
            torch.manual_seed(self.cfg.seed + int(content_key(it.prompt.encode())[:8], 16))
            with torch.no_grad():
                ids = self.model.generate(**batch, **self.kwargs)
            tok = getattr(self.processor, "tokenizer", self.processor)
            out.append(tok.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True))
        return out

    def settings(self) -> dict:
        return {"model": self.name, "class": type(self.model).__name__, "dtype": str(self.dtype), **self.kwargs}


class RemoteJudge:
    """An OpenAI-compatible server as the judge (uae.remote.ChatClient): the image as a data: URL."""

    sees_images = True  # the server says otherwise by refusing the request

    def __init__(self, url: str, cfg: JudgeConfig, max_new_tokens: int, image_max_side: int):
        sampling = {"max_tokens": max_new_tokens, "temperature": cfg.temperature if cfg.do_sample else 0.0,
                    "seed": cfg.seed}
        self.client = ChatClient(url, cfg.remote_model, sampling=sampling, concurrency=cfg.concurrency,
                                 timeout_s=cfg.timeout_s, retries=cfg.retries, backoff_s=cfg.backoff_s)
        self.image_max_side = image_max_side

    def judge(self, items: list[JudgeItem]) -> list[str]:
        convs = [[{"role": "user", "content": ([image_part(it.image, self.image_max_side)] if it.image is not None
                                               else []) + [text_part(it.prompt)]}] for it in items]
        return self.client.complete_many(convs)

    def settings(self) -> dict:
        # Not the server's address: the same model reached elsewhere (a restarted server) answers the same.
        own = {k: v for k, v in self.client.settings().items() if k != "server"}
        return {**own, "image_max_side": self.image_max_side}


def make_judge(cfg: JudgeConfig, prompt: dict, device):
    """The judge of `cfg.judge` and its id (part of every cache key)."""
    kind = judge_kind(cfg.judge)
    max_new = cfg.max_new_tokens or int(prompt["max_new_tokens"])
    if kind == "remote":
        judge = RemoteJudge(cfg.judge.removeprefix("openai:"), cfg, max_new, int(prompt["image_max_side"]))
    elif kind == "module":
        cls = import_class(cfg.judge, "--judge")
        try:
            judge = cls(**read_model_args(cfg.judge_args))
        except TypeError as e:
            raise UAEError(f"--judge_args: {cfg.judge} cannot be constructed with them ({e})") from None
        if not callable(getattr(judge, "judge", None)):
            raise UAEError(f"--judge {cfg.judge}: the class has no judge(items) method")
    else:
        judge = TransformersJudge(cfg.judge, cfg, max_new, device)
    if cfg.mode == "image" and not getattr(judge, "sees_images", False):
        raise UAEError(f"--judge {cfg.judge} cannot see images (its sees_images is not True): use --mode text")
    settings = judge.settings() if callable(getattr(judge, "settings", None)) else {}
    name = f"openai:{judge.client.model}" if kind == "remote" else cfg.judge
    return judge, {"judge": name, "settings": settings, "sampling": cfg.sampling(max_new)}


# ---------------------------------------------------------------------------- runs, questions and the cache

@dataclass
class Run:
    label: str
    path: Path
    captions: dict[str, str]        # reference name -> caption
    reference_folder: Path | None


def read_runs(cfg: JudgeConfig) -> tuple[list[Run], list[str]]:
    """The runs (the runner's results.json, read as `uae-report compare` reads it) and the
    references they all captioned; a one-line error for a run without captions or runs over
    different references."""
    labels = cfg.labels or [Path(p).resolve().name for p in cfg.run_dirs]
    if len(set(labels)) < len(labels):
        labels = [str(Path(p)) for p in cfg.run_dirs]
    runs = []
    for p, label in zip(cfg.run_dirs, labels):
        r = load_run(p, label)
        caps = {n: c for n, c in (r.result.get("captions") or {}).items() if isinstance(c, str) and c.strip()}
        if not caps:
            raise UAEError(f"run folder {p} holds no captions (results.json has none): judge runs that captioned "
                           "their references (not --recon_from without --captions_from)")
        runs.append(Run(label, Path(p), caps, r.reference_folder))
    names = sorted(runs[0].captions)
    for r in runs[1:]:
        lack, extra = sorted(set(names) - set(r.captions)), sorted(set(r.captions) - set(names))
        if lack or extra:
            def few(xs):
                return ", ".join(xs[:5]) + (f" and {len(xs) - 5} more" if len(xs) > 5 else "")
            said = [f"{r.label} lacks {few(lack)}" if lack else "", f"{runs[0].label} lacks {few(extra)}" if extra else ""]
            raise UAEError(f"the runs captioned different references: {'; '.join(s for s in said if s)} (judge runs "
                           "over the same references)")
    return runs, names


def reference_path(runs: list[Run], name: str) -> Path | None:
    return next((r.reference_folder / name for r in runs if r.reference_folder and (r.reference_folder / name).is_file()),
                None)


def read_reference_captions(source: str | None) -> dict[str, str]:
    if not source:
        return {}
    return {it.image.name: it.caption for it in read_items(source) if it.image is not None and it.caption}


class Cache:
    """Verdicts by question key, one JSON line each in <folder>/verdicts-<process>.jsonl, appended
    and flushed as they arrive (a line is whole or, after a crash mid-write, skipped on reading)."""

    def __init__(self, folder: Path, rank: int = 0):
        self.folder = folder
        self.path = folder / f"verdicts-{rank}.jsonl"

    def read(self) -> dict[str, dict]:
        out = {}
        for p in sorted(self.folder.glob("verdicts-*.jsonl")) if self.folder.is_dir() else []:
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    rec = json.loads(line)
                    out[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    logger.warning("%s line %d is not a whole verdict (an interrupted write): asked again", p, i)
        return out

    def add(self, records: list[dict]) -> None:
        if not records:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())


def question_key(depends: dict, mode: str, reference: str, first: str, second: str, ref_caption: str | None) -> str:
    """What a verdict depends on: the judge and its settings, the prompt (its file's SHA-256), the
    sampling, the mode, the reference (its image's content in image mode), both captions in order."""
    blob = json.dumps({**depends, "mode": mode, "reference": reference, "reference_caption": ref_caption,
                       "first": first, "second": second}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_prompt(prompt: dict, mode: str, first: str, second: str, ref_caption: str | None) -> str:
    if mode == "image":
        return prompt["image_prompt"].format(first=first, second=second)
    block = prompt["reference_block"].format(reference_caption=ref_caption) if ref_caption else ""
    return prompt["text_prompt"].format(first=first, second=second, reference=block)


def ask(judge, items: list[JudgeItem], keys: list[str], depends: dict, prompt: dict, cache: Cache,
        bar) -> tuple[int, RemoteError | None]:
    """Ask `items`; answers without a verdict once more (with the prompt's retry_suffix); cache each
    final verdict. Returns how many were cached and the server's error, if it failed mid-way (what
    it answered before is cached all the same)."""
    def call(batch: list[JudgeItem]) -> tuple[list[str | None], Exception | None]:
        try:
            answers = judge.judge(batch)
        except RemoteError as e:
            return [e.done.get(i) for i in range(len(batch))], e
        if not isinstance(answers, (list, tuple)) or len(answers) != len(batch):
            raise UAEError(f"--judge {depends['judge']}: judge() returned {type(answers).__name__} of "
                           f"{len(answers) if isinstance(answers, (list, tuple)) else '?'} answers for {len(batch)} "
                           "questions (a list of strings, one per item)")
        return [str(a) for a in answers], None

    first, error = call(items)
    parsed = [parse_verdict(a) if a is not None else None for a in first]
    again = [i for i, p in enumerate(parsed) if p is not None and p[0] is None]
    second: list[str | None] = []
    if again and error is None:
        retry = [dataclasses.replace(items[i], prompt=items[i].prompt + prompt["retry_suffix"]) for i in again]
        second, error = call(retry)
    records = []
    for i, it in enumerate(items):
        if first[i] is None:
            continue
        answers = [first[i]]
        verdict, reason = parsed[i]
        if i in again:
            j = again.index(i)
            if j >= len(second) or second[j] is None:
                continue  # the retry did not happen: asked again next time
            answers.append(second[j])
            verdict, reason = parse_verdict(second[j])
        records.append({"key": keys[i], "reference": it.reference, "first": it.first, "second": it.second,
                        "verdict": verdict, "reason": reason, "answers": answers, "depends": depends})
    cache.add(records)
    bar.update(len(records))
    return len(records), error


def questions(runs: list[Run], names: list[str], cfg: JudgeConfig, prompt: dict, depends: dict,
              ref_captions: dict[str, str]) -> list[tuple[str, int, int, str]]:
    """(reference, first run, second run, key) of every question: each pair of runs in both orders."""
    out = []
    for name in names:
        if cfg.mode == "image":
            ref = reference_path(runs, name)
            if ref is None:
                raise UAEError(f"reference {name} is in none of the runs' reference folders "
                               f"({', '.join(str(r.reference_folder) for r in runs)}): --mode image needs the image")
            reference = content_key(ref.read_bytes())
        else:
            reference = name
        for i, j in itertools.combinations(range(len(runs)), 2):
            for a, b in ((i, j), (j, i)):
                out.append((name, a, b, question_key(depends, cfg.mode, reference, runs[a].captions[name],
                                                     runs[b].captions[name], ref_captions.get(name))))
    return out


# ---------------------------------------------------------------------------- statistics

def outcome(verdict: str | None, x_first: bool) -> float | None:
    """A verdict as run x's score: 1 a win, 0.5 a tie, 0 a loss, None unparsable."""
    if verdict is None:
        return None
    if verdict == "tie":
        return 0.5
    return 1.0 if (verdict == "A") == x_first else 0.0


def words(text: str) -> int:
    return len(text.split())


def length_controlled(scores: list[float], diffs: list[float], l2: float = 0.1) -> float | None:
    """The win rate at zero length difference (AlpacaEval 2.0's idea): a logistic regression
    P(x wins) = sigmoid(theta + beta * d) of the scores (ties 0.5) on d = tanh(word difference / the
    captions' word standard deviation), fitted by Newton's method with an L2 penalty `l2` on beta
    (finite under perfect separation); sigmoid(theta)."""
    if not scores:
        return None
    if len(set(scores)) == 1:  # unanimous: the regression's intercept has no finite optimum
        return float(scores[0])
    y, d = np.asarray(scores, float), np.asarray(diffs, float)
    X = np.stack([np.ones_like(d), d], 1)
    w = np.zeros(2)
    pen = np.diag([0.0, l2])
    for _ in range(100):
        p = 1 / (1 + np.exp(-X @ w))
        grad = X.T @ (p - y) + pen @ w
        hess = X.T @ (X * (p * (1 - p))[:, None]) + pen + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + math.exp(-w[0])))


def pair_summary(x: Run, y: Run, names: list[str], verdicts: dict, cfg: JudgeConfig, sd: float) -> dict:
    """Run x against run y. `verdicts[(name, first label, second label)]`: the record."""
    per: dict[str, list[float]] = {}
    consistent = both = 0
    counts = {"wins": 0, "ties": 0, "losses": 0, "unparsable": 0}
    scores, diffs = [], []
    for n in names:
        s1 = outcome(verdicts[(n, x.label, y.label)]["verdict"], True)
        s2 = outcome(verdicts[(n, y.label, x.label)]["verdict"], False)
        for s in (s1, s2):
            counts[{None: "unparsable", 1.0: "wins", 0.5: "ties", 0.0: "losses"}[s]] += 1
            if s is not None:
                scores.append(s)
                diffs.append(math.tanh((words(x.captions[n]) - words(y.captions[n])) / sd) if sd else 0.0)
        per[n] = [s for s in (s1, s2) if s is not None]
        if s1 is not None and s2 is not None:
            both += 1
            consistent += s1 == s2
    judged = [n for n in names if per[n]]
    rate = sum(scores) / len(scores) if scores else None
    ci = None
    if judged:
        rng = np.random.default_rng(cfg.seed)
        sums = np.array([sum(per[n]) for n in judged])
        ns = np.array([len(per[n]) for n in judged])
        idx = rng.integers(0, len(judged), size=(cfg.bootstrap, len(judged)))
        boots = sums[idx].sum(1) / ns[idx].sum(1)
        ci = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]
    return {"a": x.label, "b": y.label, **counts, "win_rate": rate, "win_rate_ci": ci,
            "position_consistency": consistent / both if both else None, "consistent_references": consistent,
            "references_judged_both_ways": both,
            "words_a": sum(words(x.captions[n]) for n in names) / len(names),
            "words_b": sum(words(y.captions[n]) for n in names) / len(names),
            "length_controlled_win_rate": length_controlled(scores, diffs)}


def bradley_terry(wins: np.ndarray, prior: float = 0.5, iters: int = 1000) -> np.ndarray:
    """Bradley-Terry strengths (geometric mean 1) from wins[i, j] = i's wins over j (ties counted
    half to each), by Hunter's (2004) MM updates; `prior` pseudo-wins each way between every pair
    keep an unbeaten run finite."""
    k = len(wins)
    w = wins + prior * (1 - np.eye(k))
    n = w + w.T
    p = np.ones(k)
    for _ in range(iters):
        new = w.sum(1) / (n / (p[:, None] + p[None, :])).sum(1)
        new /= np.exp(np.log(new).mean())
        if np.abs(new - p).max() < 1e-12:
            return new
        p = new
    return p


def ranking(runs: list[Run], names: list[str], verdicts: dict, cfg: JudgeConfig) -> list[dict]:
    """More than two runs: Bradley-Terry strength as the probability of beating a run of average
    strength (p / (p + 1)), with a bootstrap 95% interval over references."""
    idx = {r.label: i for i, r in enumerate(runs)}
    per_ref = np.zeros((len(names), len(runs), len(runs)))
    for (n, a, b), rec in verdicts.items():
        s = outcome(rec["verdict"], True)
        if s is not None and n in names:
            per_ref[names.index(n), idx[a], idx[b]] += s
            per_ref[names.index(n), idx[b], idx[a]] += 1 - s
    strength = bradley_terry(per_ref.sum(0))
    rng = np.random.default_rng(cfg.seed)
    boots = np.array([bradley_terry(per_ref[rng.integers(0, len(names), len(names))].sum(0))
                      for _ in range(cfg.bootstrap)])
    lo, hi = np.percentile(boots / (boots + 1), [2.5, 97.5], axis=0)
    order = np.argsort(-strength, kind="stable")
    return [{"rank": k + 1, "run": runs[i].label, "strength": float(strength[i] / (strength[i] + 1)),
             "strength_ci": [float(lo[i]), float(hi[i])]} for k, i in enumerate(order)]


# ---------------------------------------------------------------------------- the whole protocol

def run_judge(cfg: JudgeConfig) -> dict | None:
    """Ask every question not cached (the references dealt over the processes of a torchrun /
    accelerate launch), then summarise on the main process. Returns judge.json's content there,
    None elsewhere."""
    from accelerate import PartialState

    out = writable_dir(cfg.output_dir, "--output_dir")
    runs, names = read_runs(cfg)
    prompt = load_prompt(cfg.prompt)
    ref_captions = read_reference_captions(cfg.reference_captions)
    if cfg.reference_captions:
        lacking = [n for n in names if n not in ref_captions]
        if lacking:
            raise UAEError(f"--reference_captions {cfg.reference_captions} has no caption for {', '.join(lacking[:5])}")
    device = resolve_device(cfg.device)
    state = PartialState(cpu=device.type == "cpu")
    world, rank = state.num_processes, state.process_index
    judge, depends = make_judge(cfg, prompt, state.device if world > 1 else device)
    depends = {**depends, "prompt_sha256": prompt["sha256"]}
    cache = Cache(out / "cache", rank)
    qs = questions(runs, names, cfg, prompt, depends, ref_captions)
    known = cache.read()
    mine = set(names[rank::world])
    todo = list({k: (n, a, b, k) for n, a, b, k in qs if k not in known and n in mine}.values())
    logger.info("%d question(s) (%d reference(s), %d run(s), both orders); %d cached, %d to ask%s", len(qs), len(names),
                len(runs), len(qs) - sum(1 for q in qs if q[3] not in known), len(todo),
                f" by process {rank}/{world}" if world > 1 else "")
    chunk = cfg.concurrency * 4 if judge_kind(cfg.judge) == "remote" else 8
    images: dict[str, object] = {}
    done = 0
    with tqdm(total=len(todo), desc="judging", unit="verdict", disable=not state.is_local_main_process) as bar:
        for i in range(0, len(todo), chunk):
            items, keys = [], []
            for n, a, b, key in todo[i:i + chunk]:
                if cfg.mode == "image" and n not in images:
                    images[n] = load_image(reference_path(runs, n))
                items.append(JudgeItem(n, runs[a].captions[n], runs[b].captions[n],
                                       build_prompt(prompt, cfg.mode, runs[a].captions[n], runs[b].captions[n],
                                                    ref_captions.get(n)),
                                       images.get(n), ref_captions.get(n)))
                keys.append(key)
            n, error = ask(judge, items, keys, depends, prompt, cache, bar)
            done += n
            if error is not None:
                raise UAEError(f"{error}; {done} of {len(todo)} question(s) answered and cached in {cache.folder}: "
                               "rerun the same command to ask only the rest")
    if world > 1:
        state.wait_for_everyone()
        state.destroy_process_group()
        if not state.is_main_process:
            return None
    known = cache.read()
    verdicts = {(n, runs[a].label, runs[b].label): known[k] for n, a, b, k in qs}
    all_words = [words(r.captions[n]) for r in runs for n in names]
    sd = float(np.std(all_words)) if len(all_words) > 1 else 0.0
    pairs = [pair_summary(runs[i], runs[j], names, verdicts, cfg, sd)
             for i, j in itertools.combinations(range(len(runs)), 2)]
    result = {
        "protocol": PROTOCOL, "mode": cfg.mode, "judge": depends, "judge_given": cfg.judge,
        "prompt": {"name": prompt["name"], "path": prompt["path"], "sha256": prompt["sha256"],
                   "text": prompt["image_prompt" if cfg.mode == "image" else "text_prompt"],
                   "retry_suffix": prompt["retry_suffix"]},
        "seed": cfg.seed, "bootstrap": cfg.bootstrap, "reference_captions": cfg.reference_captions,
        "runs": [{"label": r.label, "path": str(r.path), "words": sum(words(r.captions[n]) for n in names) / len(names)}
                 for r in runs],
        "references": names, "pairs": pairs,
        "ranking": ranking(runs, names, verdicts, cfg) if len(runs) > 2 and any(p["win_rate"] is not None
                                                                                 for p in pairs) else None,
        "verdicts": [{"reference": n, "first": runs[a].label, "second": runs[b].label,
                      "winner": {"A": runs[a].label, "B": runs[b].label, "tie": "tie", None: None}[known[k]["verdict"]],
                      **{f: known[k][f] for f in ("verdict", "reason", "answers")}} for n, a, b, k in qs],
    }
    write_outputs(out, result, runs, names, cfg.max_images)
    return result


def write_outputs(out: Path, result: dict, runs: list[Run], names: list[str], max_images: int) -> None:
    atomic_write_json(out / "judge.json", result)
    unparsable = sum(v["verdict"] is None for v in result["verdicts"])
    about = (f"{PROTOCOL}. Judge {result['judge']['judge']}, {result['mode']} mode, prompt {result['prompt']['name']} "
             f"(sha256 {result['prompt']['sha256'][:12]}), sampling {json.dumps(result['judge']['sampling'])}, seed "
             f"{result['seed']}.")
    note = (f"{unparsable} of {len(result['verdicts'])} answers had no verdict, asked twice: counted as unparsable, "
            "never guessed." if unparsable else "")
    head = f"# Caption win rate\n\n{about}\n\n" + (f"**Note:** {note}\n\n" if note else "")
    atomic_write_chunks(out / "judge.md", [head, judge_markdown(result)])
    by: dict[str, list[dict]] = {}
    for v in result["verdicts"]:
        by.setdefault(v["reference"], []).append(v)

    def page():
        yield (f'<!doctype html><meta charset="utf-8"><title>Caption win rate</title>\n{PAGE_STYLE}\n'
               f"<h1>Caption win rate</h1>\n<p class=note>{html.escape(about)}</p>\n"
               + (f"<p class='note warn'><b>Note:</b> {html.escape(note)}</p>\n" if note else "") + f"{judge_html(result)}\n")
        shown = names[:max_images]
        more = f" (the first {len(shown)} of {len(names)})" if len(shown) < len(names) else ""
        yield (f"<h2>Per reference{more}</h2>\n<table>\n<tr><th>reference</th><th>captions</th>"
               "<th>verdicts (first vs second: winner, reason)</th></tr>\n")
        for n in shown:
            caps = "".join(f"<p><b>{html.escape(r.label)}</b> ({words(r.captions[n])} words): "
                           f"{html.escape(r.captions[n])}</p>" for r in runs)
            vs = "".join(f"<p>{html.escape(v['first'])} vs {html.escape(v['second'])}: "
                         f"<b>{html.escape(str(v['winner'] or 'unparsable'))}</b>. {html.escape(v['reason'])}</p>"
                         for v in by.get(n, []))
            yield (f'<tr class="image"><td>{html.escape(n)}<br>{img_tag(image_data_uri(reference_path(runs, n)), "reference")}'
                   f"</td><td class=cap>{caps}</td><td class=cap>{vs}</td></tr>\n")
        yield "</table>\n"

    atomic_write_chunks(out / "judge.html", page())


def main(argv=None) -> int:
    """`uae-report judge RUN_A RUN_B [RUN ...] --judge JUDGE --output_dir DIR` (uae/apps/report.py's main
    dispatches here and turns a UAEError into one line, exit code 2)."""
    cfg = parse_config(JudgeConfig, argv, description=__doc__, prog="uae-report judge")
    setup_logging(cfg.log_level)
    result = run_judge(cfg)
    if result is None:
        return 0
    save_config(cfg, Path(cfg.output_dir) / "judge_config.yaml")
    out = Path(cfg.output_dir)
    sys.stdout.write(f"{out / 'judge.json'}\n{out / 'judge.md'}\n{out / 'judge.html'}\n")
    for p in result["pairs"]:
        rate = "n/a" if p["win_rate"] is None else f"{100 * p['win_rate']:.1f}%"
        sys.stdout.write(f"{p['a']} vs {p['b']}: win rate {rate} ({p['wins']} / {p['ties']} / {p['losses']}, "
                         f"{p['unparsable']} unparsable)\n")
    return 0
