"""Independent reference computations: each scorer's model called through its *own* processor
(transformers' image processors, open_clip's CLIP transform), one image at a time, as the official
scripts do. Used by the parity tests (tests/scoring/test_scoring.py) and as the "official-style loop" of
bench/bench_score_i2i.py; not part of the library, and never used by its scoring path."""

from __future__ import annotations

from pathlib import Path

import torch

from uae.scoring.scorers import load_specs


class ReferenceEncoder:
    """encode(pil_image) -> L2-normalised feature (1, D), for one scorer's checkpoint folder."""

    def __init__(self, name: str, folder: str | Path, device: str | torch.device = "cpu"):
        folder = Path(folder)
        self.name, self.device = name, torch.device(device)
        spec = load_specs()[name]
        if name == "longclip":
            import open_clip
            from open_clip.model import build_model_from_openai_state_dict

            state = torch.load(folder / spec["filename"], map_location="cpu", weights_only=True)
            res = state.pop("positional_embedding_res", None)
            if res is not None:  # LongCLIP's masks: original table below keep_positions, residual above
                mask = torch.zeros(state["positional_embedding"].shape[0], 1)
                mask[: spec.get("keep_positions", 20)] = 1
                state["positional_embedding"] = state["positional_embedding"] * mask + res * (1 - mask)
            self.model = build_model_from_openai_state_dict(state, cast_dtype=None).float().eval()
            p = spec["preprocess"]
            self.transform = open_clip.image_transform(p["crop"], is_train=False, mean=p["mean"], std=p["std"],
                                                       interpolation=p["interpolation"])
        else:
            from transformers import AutoImageProcessor, CLIPModel, Dinov2Model, DINOv3ViTModel

            cls = {"clip": CLIPModel, "dinov2": Dinov2Model, "dinov3": DINOv3ViTModel}[name]
            self.model = cls.from_pretrained(folder).eval()
            self.processor = AutoImageProcessor.from_pretrained(folder)
        self.model.to(self.device)

    @torch.no_grad()
    def encode(self, image) -> torch.Tensor:
        if self.name == "longclip":
            feats = self.model.encode_image(self.transform(image)[None].to(self.device))
        else:
            pix = self.processor(images=image, return_tensors="pt").pixel_values.to(self.device)
            if self.name == "clip":
                out = self.model.get_image_features(pixel_values=pix)
                feats = out if isinstance(out, torch.Tensor) else out.pooler_output
            else:
                feats = self.model(pixel_values=pix).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def similarity(self, a, b) -> float:
        return float((self.encode(a) * self.encode(b)).sum())
