"""Benchmark: captioning throughput, the ways uae-caption-data can caption, side by side in one run.

  local   the transformers captioner (uae.unified.captioner.TransformersCaptioner, loaded as
          `uae-caption-data --captioner ID` loads it): the images sorted by pixel count and
          captioned --batch at a time, each batch one left-padded generate() call (its
          caption_batching setting), against one image per generate() call (its default, and
          uae-caption-data's).
  server  uae.remote.ChatClient (uae-caption-data's `openai:` captioner; its --remote_concurrency)
          against a local `transformers serve` of the same model on the same device, at 1, 4 and 16
          requests in flight. Each request carries its image as a PNG data: URL; the server's
          usage.completion_tokens give tokens/s.

Sizes, random weights (uae.random_weights.unified.build_captioner):
  tiny  the tests' Qwen2.5-VL (configs/models/tiny.yaml: LLM hidden 64, 2 layers; vision 32, 2 blocks)
  mid   tiny.yaml with the LLM at hidden 512, 8 layers and the vision tower at 256, 4 blocks (MID below)

Images: photographs from skimage.data, each at a few longest sides (SIDES), so that batches mix sizes
as real data does; the processor caps them at tiny.yaml's max_pixels (65,536). Greedy decoding, at
most --max_new_tokens tokens. Each local side and the server get a warm-up call first; one timed
run each.

    python bench/caption_throughput.py                       # tiny and mid, local and server
    python bench/caption_throughput.py --sizes tiny --json bench/results/cpu/caption_throughput.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
import time
from pathlib import Path

from common import machine, peak_memory_mb, sync, write_json

import torch
import yaml

from uae.cli import setup_logging
from uae.paths import preset_path
from uae.random_weights.checkpoint import load_preset
from uae.random_weights.unified import build_captioner
from uae.remote import ChatClient, image_part, text_part, transformers_serve
from uae.unified.captioner import TransformersCaptioner
from uae.unified.protocol import RunSettings

logger = logging.getLogger("uae.bench.caption_throughput")

# Overrides of tiny.yaml's llm for the mid size (head_dim 64: mrope_section sums to 32; the vision
# tower's output width is the LLM's).
MID = {"text_config": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
                       "num_attention_heads": 8, "num_key_value_heads": 2,
                       "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                           "mrope_section": [8, 12, 12]}},
       "vision_config": {"depth": 4, "hidden_size": 256, "intermediate_size": 512, "num_heads": 4,
                         "out_hidden_size": 512, "fullatt_block_indexes": [1, 3]}}
SIZES = {"tiny": {}, "mid": MID}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
SIDES = (96, 160, 224, 320)
INSTRUCTION = "Describe this image in detail."


def build(size: str, folder: Path) -> Path:
    """The size's random captioner, saved as a checkpoint folder."""
    cfg = load_preset("tiny")
    for part, values in SIZES[size].items():
        cfg["llm"][part].update(copy.deepcopy(values))
    preset = folder / f"{size}.yaml"
    preset.write_text(yaml.safe_dump(cfg))
    return build_captioner(folder / size, seed=0, preset=str(preset_path(str(preset))))


def photos(n: int) -> list:
    """n RGB images: the PHOTOS in turn, each at the next of SIDES (longest side)."""
    from PIL import Image
    from skimage import data

    out = []
    for i in range(n):
        im = Image.fromarray(getattr(data, PHOTOS[i % len(PHOTOS)])()).convert("RGB")
        im.thumbnail((SIDES[i % len(SIDES)],) * 2)
        out.append(im)
    return out


def local(path: Path, images: list, args) -> dict:
    """images/s one per generate() call and --batch per call (sorted by pixel count), and how many
    captions came out the same both ways (greedy: they differ only where left padding changes the
    arithmetic)."""
    rates, captions = {}, {}
    order = sorted(range(len(images)), key=lambda i: images[i].size[0] * images[i].size[1])
    for name, batched in (("single", False), ("batched", True)):
        run = RunSettings(device=args.device, caption_instruction=INSTRUCTION, max_new_tokens=args.max_new_tokens,
                          do_sample=False, caption_batching=batched)
        cap = TransformersCaptioner(str(path), run)
        per_call = args.batch if batched else 1
        cap.caption(images[:per_call], list(range(per_call)))  # warm-up
        sync()
        t0 = time.perf_counter()
        out = [""] * len(images)
        for start in range(0, len(order), per_call):
            idx = order[start:start + per_call]
            for i, text in zip(idx, cap.caption([images[i] for i in idx], idx)):
                out[i] = text
        sync()
        rates[name] = len(images) / (time.perf_counter() - t0)
        captions[name] = out
        params = sum(p.numel() for p in cap.model.parameters())
        del cap
    same = sum(a == b for a, b in zip(captions["single"], captions["batched"]))
    return {"parameters": params, "images_per_s": rates, "ratio_batched_over_single": rates["batched"] / rates["single"],
            "same_captions": same}


def server(path: Path, images: list, args, log: Path) -> dict:
    """images/s and completion tokens/s through ChatClient at each --concurrency."""
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    out = {}
    convs = [[{"role": "user", "content": [text_part(INSTRUCTION), image_part(im)]}] for im in images]
    with transformers_serve(path, log, device=args.device, env=env) as url:
        for c in args.concurrency:
            client = ChatClient(url, str(path), sampling={"max_tokens": args.max_new_tokens, "temperature": 0.0},
                                concurrency=c, timeout_s=600, retries=0, setting="--captioner")
            if not out:
                client.chat(convs[0])  # warm-up: the server's first request loads the model
            t0 = time.perf_counter()
            got = client.chat_many(convs)
            seconds = time.perf_counter() - t0
            tokens = sum(g.tokens or 0 for g in got)
            out[str(c)] = {"images_per_s": len(images) / seconds, "tokens_per_s": tokens / seconds,
                           "tokens": tokens}
            logger.info("server, %d in flight: %.3f images/s", c, len(images) / seconds)
    first = out[str(args.concurrency[0])]["images_per_s"]
    return {"by_concurrency": out,
            "ratio_over_first": {c: v["images_per_s"] / first for c, v in out.items()}}


def table(res: dict) -> str:
    s = res["settings"]
    lines = [f"Captioning throughput ({res['machine']}); random-weight Qwen2.5-VL, greedy, at most "
             f"{s['max_new_tokens']} new tokens; local: {s['images']} images, {s['batch']} per batched call; "
             f"server: {s['server_images']} images", "",
             f"| size | parameters | 1 per generate() | {s['batch']} per generate() (sorted) | ratio | same captions |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["runs"]:
        if "local" in r:
            loc = r["local"]
            lines.append(f"| {r['size']} | {loc['parameters'] / 1e6:.2f} M | {loc['images_per_s']['single']:.3f} img/s "
                         f"| {loc['images_per_s']['batched']:.3f} img/s | {loc['ratio_batched_over_single']:.2f}x "
                         f"| {loc['same_captions']} / {s['images']} |")
    conc = [str(c) for c in s["concurrency"]]
    if any("server" in r for r in res["runs"]):
        lines += ["", "| size | " + " | ".join(f"{c} in flight" for c in conc) + " | "
                  + " | ".join(f"ratio {c}/{conc[0]}" for c in conc[1:]) + " |",
                  "| --- |" + " ---: |" * (2 * len(conc) - 1)]
        for r in res["runs"]:
            if "server" in r:
                by, ratio = r["server"]["by_concurrency"], r["server"]["ratio_over_first"]
                lines.append(f"| {r['size']} | " + " | ".join(f"{by[c]['images_per_s']:.3f} img/s "
                                                               f"({by[c]['tokens_per_s']:.0f} tok/s)" for c in conc)
                             + " | " + " | ".join(f"{ratio[c]:.2f}x" for c in conc[1:]) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(SIZES), help="model sizes")
    ap.add_argument("--images", type=int, default=16, help="images captioned by each local side")
    ap.add_argument("--batch", type=int, default=8, help="images per generate() call on the batched local side")
    ap.add_argument("--server_images", type=int, default=16, help="images sent to the server at each concurrency")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16],
                    help="requests in flight (none: skip the server)")
    ap.add_argument("--max_new_tokens", type=int, default=32, help="caption length limit in tokens")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads here and in the server (on a shared 2-core machine 1 ran small models faster)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no_local", action="store_true", help="skip the local batched / single measurement")
    ap.add_argument("--json", default=None, help="also write the measurements here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup_logging("INFO")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    runs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for size in args.sizes:
                logger.info("%s: building a random Qwen2.5-VL", size)
                path = build(size, Path(tmp))
                run: dict = {"size": size}
                if not args.no_local:
                    run["local"] = local(path, photos(args.images), args)
                if args.concurrency:
                    run["server"] = server(path, photos(args.server_images), args, Path(tmp) / f"serve-{size}.log")
                runs.append(run)
        desc = machine()
    finally:
        torch.set_num_threads(threads)  # main() also runs inside the tests' process
    res = {"machine": desc, "settings": {k: getattr(args, k) for k in
                                              ("images", "batch", "server_images", "concurrency", "max_new_tokens",
                                               "threads", "device")},
           "runs": runs, **peak_memory_mb()}
    res["table"] = table(res)
    print(res["table"])
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
