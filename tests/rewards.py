"""Rewards used by the tests only."""

import torch

from uae.images import to_uint8


class TargetImageReward:
    """Toy reward for learning tests: 1 - mean |image - target| over pixels in [0, 1], the target
    resized to each image's size (a fixed target image)."""

    def __init__(self, target: torch.Tensor):
        self.target = target.float() / 255 if target.dtype == torch.uint8 else target.float()

    def __call__(self, images, keys=None, references=None, prompts=None) -> list[float]:
        import torch.nn.functional as F

        x = torch.stack([t.float() / 255 for t in to_uint8(images)])
        tgt = F.interpolate(self.target[None], size=x.shape[-2:], mode="bilinear", align_corners=False)
        return (1 - (x - tgt).abs().flatten(1).mean(1)).tolist()


def caption_words(images, keys, references, prompts) -> list[float]:
    """Caption length in words (the aha effect in miniature); importable as tests.rewards:caption_words."""
    return [float(len(p.split())) for p in prompts]
