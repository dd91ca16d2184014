"""Benchmark: what demo.py does, against bare diffusers, on random weights.

  text-to-image  ours (UAEDecoder.generate, as demo.py calls it) vs a bare diffusers
                 StableDiffusion3Pipeline given the same prompt embeddings, the same DiT (LoRA
                 included), VAE, scheduler, size, steps and seed; the largest difference of the
                 outputs is reported.
                 The prompt-embedding time (LLM + projector, which the bare pipeline is handed)
                 is reported beside it. Target: ours at most 1.05x the bare pipeline.
  captioning     tokens per second of UAEEncoder.caption at a fixed caption length.

Timed runs alternate ours / bare after a warm-up of each; medians are reported.

    python bench/bench_demo.py --preset mid --size 256 --steps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import machine, peak_memory_mb, reset_peak_memory, sync, write_json

import torch

from uae.cli import setup_logging
from uae.models.uae import UAE
from uae.random_weights import build_checkpoint

PROMPT = ("A wide photograph of a red-brick lighthouse on a rocky shore at dusk; waves break on dark stones in "
          "the foreground, a wooden boat rests on the sand to the left, gulls circle the lamp, and the sky shades "
          "from orange near the horizon to deep blue above, with a thin crescent moon over the sea.")


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mid", help="model preset to build (tiny, mid, full, or a YAML path)")
    ap.add_argument("--checkpoint", default=None, help="use this checkpoint folder instead of building --preset")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps")
    ap.add_argument("--guidance_scale", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each (after one warm-up)")
    ap.add_argument("--caption_tokens", type=int, default=64, help="caption length for tokens per second")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    # Read by huggingface_hub when it first loads (setup_logging, below): no module imported above loads it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup_logging("WARNING")
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image
    from skimage import data

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else build_checkpoint(Path(tmp) / "ckpt", args.preset)
        reset_peak_memory()
        model = UAE.from_pretrained(str(ckpt), device=args.device, dtype=args.dtype)
    dev, dec = model.device, model.decoder
    parts = dec.pipe.components
    bare = StableDiffusion3Pipeline(transformer=parts["transformer"], vae=parts["vae"], scheduler=parts["scheduler"],
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    bare.set_progress_bar_config(disable=True)
    kw = dict(height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
              output_type="np")
    t_embed = []
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            t_embed.append(timed(lambda: model.encoder.encode_prompts([PROMPT])))
        [(pos, neg)] = model.encoder.encode_prompts([PROMPT])
        pooled = dec.pooled.to(pos.dtype)
        out = {}

        def ours():
            out["ours"] = dec.generate(pos, neg, generator=[torch.Generator(dev).manual_seed(0)], progress=False, **kw)

        def plain():
            out["bare"] = bare(prompt_embeds=pos, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                               negative_pooled_prompt_embeds=pooled, generator=torch.Generator(dev).manual_seed(0),
                               **kw).images

        times = {"ours": [], "bare": []}
        for i in range(args.repeats + 1):
            for name, fn in (("ours", ours), ("bare", plain)) if i % 2 else (("bare", plain), ("ours", ours)):
                times[name].append(timed(fn))
        diff = float(abs(out["ours"].astype("float64") - out["bare"].astype("float64")).max())

        image = Image.fromarray(data.astronaut()).resize((448, 448))
        n_tok = args.caption_tokens
        t_cap = [timed(lambda: model.caption([image], max_new_tokens=n_tok, min_new_tokens=n_tok, seed=0))
                 for _ in range(args.repeats + 1)]
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    res = {"machine": machine(), "preset": args.checkpoint or args.preset, "size": args.size, "steps": args.steps,
           "device": str(dev), "dtype": str(model.dtype).removeprefix("torch."),
           "seconds": {"ours_decode": med["ours"], "bare_pipeline": med["bare"],
                       "prompt_embedding": statistics.median(t_embed[1:])},
           "ratio_ours_over_bare": med["ours"] / med["bare"], "max_abs_pixel_diff": diff,
           "caption_tokens_per_second": n_tok / statistics.median(t_cap[1:]), "caption_tokens": n_tok,
           **peak_memory_mb()}
    s = res["seconds"]
    print(f"demo benchmark ({res['machine']}); {res['preset']}, {args.size}px, {args.steps} steps, {res['dtype']}")
    print(f"text-to-image: ours {s['ours_decode']:.3f} s, bare diffusers {s['bare_pipeline']:.3f} s, "
          f"ours / bare {res['ratio_ours_over_bare']:.3f}x (target <= 1.05x), max pixel diff {diff:.1e}; "
          f"prompt embedding {s['prompt_embedding']:.3f} s")
    print(f"captioning: {res['caption_tokens_per_second']:.1f} tokens/s ({n_tok} tokens)")
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
