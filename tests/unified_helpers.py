"""Small classes implementing uae.unified.UnifiedModel for the runner's `--model module:Class` tests
(loaded by file path: `--model tests/unified_helpers.py:EchoModel`)."""

import hashlib
import random

from PIL import Image, ImageStat

WORDS = ["red", "green", "blue", "cat", "sky", "tree", "house", "light", "water", "stone"]


class EchoModel:
    """Captions name an image's mean colour plus `words` seeded random words; an image is a solid
    colour drawn from its text and its seed, of the run's --height x --width."""

    def __init__(self, settings=None, words: int = 3, prefix: str = "an image"):
        self.name = "echo"
        self.words, self.prefix = words, prefix
        self.size = (settings.width, settings.height) if settings is not None else (32, 32)
        self.run_device = settings.device if settings is not None else None

    def settings(self) -> dict:
        return {"words": self.words, "prefix": self.prefix, "size": list(self.size), "device": self.run_device,
                "batch_invariant": True}

    def caption(self, images, seeds):
        out = []
        for im, seed in zip(images, seeds):
            mean = [round(v) for v in ImageStat.Stat(im.convert("RGB")).mean]
            rng = random.Random(seed)
            words = " ".join(rng.choice(WORDS) for _ in range(self.words))
            out.append(f"{self.prefix} of mean colour {mean}: {words}")
        return out

    def generate(self, texts, seeds):
        out = []
        for text, seed in zip(texts, seeds):
            h = hashlib.sha256(f"{seed}:{text}".encode()).digest()
            out.append(Image.new("RGB", self.size, tuple(h[:3])))
        return out


class NoCaption:
    """A generator only: not a UnifiedModel."""

    name = "no-caption"

    def settings(self):
        return {}

    def generate(self, texts, seeds):
        return [Image.new("RGB", (8, 8)) for _ in texts]


class WrongCount(EchoModel):
    """Returns one caption too few."""

    def caption(self, images, seeds):
        return super().caption(images, seeds)[:-1]
