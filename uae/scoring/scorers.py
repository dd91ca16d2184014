"""One scorer interface for CLIP, DINOv2, DINOv3 and LongCLIP image (and text) features.

A scorer preprocesses image tensors as its spec in `configs/scorers.yaml` says (resize, centre
crop, normalisation), encodes them with the library's own model (transformers or open_clip) and
returns L2-normalised features; similarity is their dot product (cosine). The same objects serve
the benchmark and the RL reward: batched tensors in, features out, differentiable when called
outside `torch.no_grad()` on float images.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml
from torch import nn

from uae.errors import UAEError
from uae.hashing import fingerprint
from uae.hub import OFFLINE_HINT, local_or_cached
from uae.paths import CONFIG_DIR

logger = logging.getLogger(__name__)

SCORERS = ("clip", "dinov2", "dinov3", "longclip")
WEIGHTS = ("official", "tiny")


def resolve_scorer_weights(setting: str, tiny_model: bool) -> str:
    """`auto`: the tiny random scorers when every model of the run is an embedded random one
    (`tiny_model`: offline tests), the official checkpoints otherwise; `official` / `tiny` as given."""
    if setting not in ("auto",) + WEIGHTS:
        raise UAEError(f"scorer weights {setting!r}: choose from auto, {', '.join(WEIGHTS)}")
    return setting if setting != "auto" else ("tiny" if tiny_model else "official")


def load_specs(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    with open(path or CONFIG_DIR / "scorers.yaml") as f:
        return yaml.safe_load(f)


@dataclass
class Preprocess:
    """A scorer's preprocessing, matching the reference implementation's numerics:
    `rescale_first` scales to [0, 1] before resizing (DINOv3's processor), `backend: pil` resizes
    uint8 images with PIL (the CLIP-style transform LongCLIP's code uses); otherwise uint8 images
    are resized as uint8 with torchvision (transformers' CLIP and DINOv2 processors). Float input in
    [0, 1] is always resized in float with torchvision, so it stays differentiable (RL rewards)."""

    resize: int | list[int]
    crop: int | None
    interpolation: str
    mean: list[float]
    std: list[float]
    rescale_first: bool = False
    backend: str = "torch"
    crop_offset: str = "round"  # "floor": transformers' processors; "round": torchvision's CenterCrop

    def __call__(self, image) -> torch.Tensor:
        """One image (3, H, W), uint8 or float in [0, 1], or an RGB PIL image -> (3, S, S)
        normalised float."""
        return self.normalize(self.geometry(image))

    def geometry(self, image) -> torch.Tensor:
        """Resize and crop only: (3, S, S), uint8 where the reference keeps uint8 through resizing
        (a quarter of the bytes to ship from a DataLoader worker), else float in [0, 1]. A PIL
        image goes straight to the PIL backend, saving a conversion."""
        import torchvision.transforms.v2.functional as TF
        from PIL import Image
        from torchvision.transforms import InterpolationMode

        mode = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[self.interpolation]
        size = list(self.resize) if isinstance(self.resize, (list, tuple)) else [self.resize]
        if isinstance(image, Image.Image):
            if self.backend != "pil":
                return self.geometry(TF.pil_to_tensor(image.convert("RGB")))
            x = image.convert("RGB")
        elif image.dtype == torch.uint8 and self.backend == "pil":
            x = TF.to_pil_image(image.cpu())
        elif image.dtype == torch.uint8 and self.rescale_first:
            x = image.float() / 255.0
        else:
            x = image
        x = TF.resize(x, size, interpolation=mode, antialias=True)
        if self.crop and self.crop_offset == "floor":
            h, w = x.shape[-2:] if isinstance(x, torch.Tensor) else x.size[::-1]
            x = TF.crop(x, max((h - self.crop) // 2, 0), max((w - self.crop) // 2, 0), self.crop, self.crop)
        elif self.crop:
            x = TF.center_crop(x, [self.crop, self.crop])
        if not isinstance(x, torch.Tensor):
            x = TF.pil_to_tensor(x)
            if isinstance(image, torch.Tensor):
                x = x.to(image.device)
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Output of `geometry` (one image or a batch) -> mean/std-normalised float."""
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std


class Scorer(nn.Module):
    """Image features (and text features for CLIP / LongCLIP) of one backbone."""

    def __init__(self, name: str, kind: str, model: nn.Module, preprocess: Preprocess, fingerprint: str,
                 tokenizer=None, context_length: int | None = None):
        super().__init__()
        self.name, self.kind, self.model = name, kind, model
        self.preprocess, self.fingerprint = preprocess, fingerprint
        self.tokenizer, self.context_length = tokenizer, context_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def has_text(self) -> bool:
        return self.tokenizer is not None

    def pixel_values(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float images (a list of (3, H, W) of any sizes, or a (B, 3, H, W) batch)."""
        return torch.stack([self.preprocess(im) for im in images]).to(self.device, self.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(KINDS[self.kind].image(self.model, pixel_values).float(), dim=-1)

    def encode_images(self, images) -> torch.Tensor:
        return self(self.pixel_values(images))

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        if not self.has_text:
            raise UAEError(f"scorer {self.name} has no text encoder (only clip and longclip score captions)")
        feats = KINDS[self.kind].text(self.model, self.tokenizer, list(texts), self.context_length, self.device)
        return nn.functional.normalize(feats.float(), dim=-1)

    def similarity(self, a, b) -> torch.Tensor:
        """Pairwise cosine similarity of two equally long image batches."""
        return (self.encode_images(a) * self.encode_images(b)).sum(-1)


# ---------------------------------------------------------------------------- the kinds

def _pooled(out) -> torch.Tensor:
    """transformers 5 returns an output object whose pooler_output is the projected feature (4.x: a tensor)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _load_clip(checkpoint: str, spec: dict, dtype):
    from transformers import CLIPModel, CLIPTokenizer

    return CLIPModel.from_pretrained(checkpoint, dtype=dtype), CLIPTokenizer.from_pretrained(checkpoint), \
        _local_files(checkpoint)


def _load_hf(cls_name: str):
    def load(checkpoint: str, spec: dict, dtype):
        import transformers

        return getattr(transformers, cls_name).from_pretrained(checkpoint, dtype=dtype), None, _local_files(checkpoint)
    return load


def _load_longclip(checkpoint: str, spec: dict, dtype):
    import open_clip
    from open_clip.model import build_model_from_openai_state_dict

    path = _fetch_longclip(checkpoint, spec["filename"])
    state = torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary unpickling
    if not isinstance(state, dict):
        raise UAEError(f"{path} is not a state dict of tensors")
    state = longclip_state_to_openai(state.get("state_dict", state), spec.get("keep_positions", 20))
    model = build_model_from_openai_state_dict(state, cast_dtype=None).to(dtype)
    return model, open_clip.get_tokenizer("ViT-L-14", context_length=spec["context_length"]), [path]


def _clip_text(model, tokenizer, texts, context_length, device):
    tok = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
    return _pooled(model.get_text_features(**tok))


def _open_clip_text(model, tokenizer, texts, context_length, device):
    return model.encode_text(tokenizer(texts, context_length=context_length).to(device))


@dataclass(frozen=True)
class Kind:
    """How a kind of scorer loads (-> model, tokenizer or None, files for the fingerprint) and
    what its image (and text) feature is."""

    load: Callable
    image: Callable
    text: Callable | None = None


KINDS = {
    "clip": Kind(_load_clip, lambda m, px: _pooled(m.get_image_features(pixel_values=px)), _clip_text),
    "dinov2": Kind(_load_hf("Dinov2Model"), lambda m, px: m(pixel_values=px).last_hidden_state[:, 0]),
    "dinov3": Kind(_load_hf("DINOv3ViTModel"), lambda m, px: m(pixel_values=px).last_hidden_state[:, 0]),
    "longclip": Kind(_load_longclip, lambda m, px: m.encode_image(px), _open_clip_text),
}


# ---------------------------------------------------------------------------- loading

def _local_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    return [f for f in p.glob("*") if f.suffix in (".safetensors", ".bin", ".pt", ".json")] if p.is_dir() else []


def _fetch_longclip(checkpoint: str, filename: str) -> Path:
    p = Path(checkpoint)
    if p.is_file():
        return p
    if p.is_dir():
        if not (p / filename).is_file():
            raise UAEError(f"longclip checkpoint folder {p} has no {filename}")
        return p / filename
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(checkpoint, filename))
    except Exception as e:
        raise UAEError(f"could not download {filename} from {checkpoint!r} ({type(e).__name__}: {e}); pass a "
                       "local path with --longclip_checkpoint") from None


def longclip_state_to_openai(state: dict[str, torch.Tensor], keep_positions: int) -> dict[str, torch.Tensor]:
    """LongCLIP adds `positional_embedding_res`: positions < keep_positions use the original
    table, the others the residual one (LongCLIP's knowledge-preserving stretch). Folding them into
    one table gives a plain OpenAI-layout CLIP with 248 text positions."""
    state = dict(state)
    res = state.pop("positional_embedding_res", None)
    if res is not None:
        pos = state["positional_embedding"].clone()
        pos[keep_positions:] = res[keep_positions:]
        state["positional_embedding"] = pos
    for key in ("mask1", "mask2"):
        state.pop(key, None)
    return state


def load_scorer(name: str, checkpoint: str | None = None, *, device="cpu", dtype: torch.dtype = torch.float32,
                specs: dict | None = None) -> Scorer:
    """A scorer by name, from `checkpoint` (hub id or local folder; default: configs/scorers.yaml's,
    the official weights). The random `tiny` weights: uae.random_weights.scorer_checkpoint."""
    specs = specs or load_specs()
    if name not in specs:
        raise UAEError(f"unknown scorer {name!r}: choose from {list(specs)}")
    spec = specs[name]
    checkpoint = checkpoint or spec["checkpoint"]
    pre = Preprocess(**spec["preprocess"])
    kind = spec["kind"]
    if kind not in KINDS:
        raise UAEError(f"scorer {name}: unknown kind {kind!r} in configs/scorers.yaml; known: {list(KINDS)}")
    source = local_or_cached(checkpoint, f"scorer {name}")
    try:
        model, tokenizer, files = KINDS[kind].load(source, spec, dtype)
    except UAEError:
        raise
    except Exception as e:
        why = " ".join(str(e).split()).rstrip(".")  # one line
        hint = "" if os.path.exists(checkpoint) else f"; {OFFLINE_HINT}"
        raise UAEError(f"could not load scorer {name} from {checkpoint!r}: {type(e).__name__}: {why}{hint}") from None
    fp = fingerprint(name, kind, checkpoint, spec["preprocess"], str(dtype), files=files)
    scorer = Scorer(name, kind, model.eval().requires_grad_(False), pre, fp, tokenizer,
                    spec.get("context_length"))
    return scorer.to(device)
