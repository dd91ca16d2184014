# my_model.py: a complete UnifiedModel for `run_unibench.py --model docs/examples/my_model.py:EchoModel`
# (docs/unified-bench.md, "Your own model"; tests/unified_helpers.py holds the same class for the tests).
import hashlib
import random

from PIL import Image, ImageStat


class EchoModel:
    """Captions name an image's mean colour plus `words` seeded random words; images are a solid
    colour drawn from the caption and the seed, at the run's --width x --height."""

    def __init__(self, settings=None, words: int = 3, prefix: str = "an image"):
        self.name = "echo"                                  # the name in reports
        self.words, self.prefix = words, prefix
        self.size = (settings.width, settings.height) if settings else (32, 32)

    def settings(self) -> dict:                             # written to model.json
        return {"words": self.words, "prefix": self.prefix, "size": list(self.size), "batch_invariant": True}

    def caption(self, images, seeds):                       # one caption per image, caption i with seeds[i]
        out = []
        for im, seed in zip(images, seeds):
            mean = [round(v) for v in ImageStat.Stat(im.convert("RGB")).mean]
            rng = random.Random(seed)                       # this caption's own random stream
            words = " ".join(rng.choice(["red", "cat", "sky", "tree"]) for _ in range(self.words))
            out.append(f"{self.prefix} of mean colour {mean}: {words}")
        return out

    def generate(self, texts, seeds):                       # one PIL image per text, image i with seeds[i]
        return [Image.new("RGB", self.size, tuple(hashlib.sha256(f"{s}:{t}".encode()).digest()[:3]))
                for t, s in zip(texts, seeds)]
