"""Random-weight scorer checkpoints in the official formats (CLIP, DINOv2, DINOv3 as transformers
folders with their image processors; LongCLIP as an OpenAI-layout state dict), of any size in
configs/scorers.yaml: `tiny` for offline tests, `full` for speed and memory measurements."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from uae.files import atomic_folder
from uae.random_weights.checkpoint import build_clip_tokenizer
from uae.scoring.scorers import load_specs


def build_scorer_model(name: str, size: str = "tiny", specs: dict | None = None):
    """A random-weight scorer backbone of a size in configs/scorers.yaml (with its CLIP tokenizer for
    clip): the library's own model classes. LongCLIP's image side is a CLIP ViT-L/14 (only its text
    positions differ), built here as a transformers CLIPModel with its 248 positions."""
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, DINOv3ViTConfig, DINOv3ViTModel

    specs = specs or load_specs()
    spec = specs[name]
    if spec["kind"] == "dinov2":
        return Dinov2Model(Dinov2Config(**spec[size])), None
    if spec["kind"] == "dinov3":
        return DINOv3ViTModel(DINOv3ViTConfig(**spec[size])), None
    cfg = specs["clip"][size] if spec["kind"] == "longclip" else spec[size]
    positions = spec.get("context_length", cfg["text_config"]["max_position_embeddings"])
    tok = build_clip_tokenizer(positions)
    text = {**cfg["text_config"], "max_position_embeddings": positions, "vocab_size": len(tok), "bos_token_id": 0,
            "eos_token_id": 1, "pad_token_id": 1}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=cfg["vision_config"],
                                projection_dim=cfg["projection_dim"])), tok


def build_scorer_checkpoints(out_dir: str | os.PathLike, size: str = "tiny", seed: int = 0,
                             specs: dict | None = None) -> Path:
    """Random-weight scorer checkpoints in the official formats: clip/ dinov2/ dinov3/ (transformers
    folders with their image processors) and longclip/longclip-L.pt (OpenAI-layout state dict)."""
    import torch
    from transformers import BitImageProcessor, CLIPImageProcessor, DINOv3ViTImageProcessor

    specs = specs or load_specs()
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(out)

    def processor_kwargs(spec, shortest: bool):
        p = spec["preprocess"]
        resample = {"bicubic": 3, "bilinear": 2}[p["interpolation"]]
        size_ = {"shortest_edge": p["resize"]} if shortest else {"height": p["resize"][0], "width": p["resize"][1]}
        kw = dict(size=size_, resample=resample, image_mean=p["mean"], image_std=p["std"], do_resize=True,
                  do_normalize=True, do_rescale=True)
        if p["crop"]:
            kw.update(do_center_crop=True, crop_size={"height": p["crop"], "width": p["crop"]})
        else:
            kw.update(do_center_crop=False)
        return kw

    with atomic_folder(out) as tmp:
        processors = {"clip": (CLIPImageProcessor, True), "dinov2": (BitImageProcessor, True),
                      "dinov3": (DINOv3ViTImageProcessor, False)}
        for i, name in enumerate(("clip", "dinov2", "dinov3")):
            torch.manual_seed(seed + i)
            model, tok = build_scorer_model(name, size, specs)
            model.save_pretrained(tmp / name)
            if tok is not None:
                tok.save_pretrained(tmp / name)
            cls, shortest = processors[name]
            cls(**processor_kwargs(specs[name], shortest)).save_pretrained(tmp / name)
        torch.manual_seed(seed + 3)
        spec = specs["longclip"]
        (tmp / "longclip").mkdir()
        torch.save(longclip_random_state(spec[size], spec.get("keep_positions", 20)),
                   tmp / "longclip" / spec["filename"])
    return out


def longclip_random_state(cfg: dict[str, Any], keep_positions: int):
    """A random LongCLIP state dict in the OpenAI layout (with `positional_embedding_res`)."""
    import torch
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(cfg["embed_dim"],
                 vision_cfg=CLIPVisionCfg(layers=cfg["vision_layers"], width=cfg["vision_width"],
                                          patch_size=cfg["patch_size"], image_size=cfg["image_size"]),
                 text_cfg=CLIPTextCfg(context_length=cfg["context_length"], vocab_size=cfg["vocab_size"],
                                      width=cfg["text_width"], heads=cfg["text_width"] // 64,
                                      layers=cfg["text_layers"]),
                 quick_gelu=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["positional_embedding_res"] = torch.randn_like(state["positional_embedding"]) * 0.01
    return state
