"""The Python API on the embedded tiny checkpoint (random weights, CPU, seconds): docs/python-api.md.
With the real weights, pass "zhiyuanyan1/UAE" (or a folder) to UAE.from_pretrained and drop the small sizes."""

from PIL import Image

from uae.models.uae import UAE
from uae.random_weights import embedded_checkpoint

model = UAE.from_pretrained(str(embedded_checkpoint()), device="cpu")
image = Image.open("Unified-Bench/UniBench/sample/astronaut.jpg")
captions = model.caption([image], max_new_tokens=16)             # PIL images -> captions (seed 42, each alone)
images = model.generate(["a red cube"], height=64, width=64, num_inference_steps=4, guidance_scale=5.0)
captions, recons = model.reconstruct([image], caption_kwargs={"max_new_tokens": 16}, height=64, width=64,
                                     num_inference_steps=4)
pos, neg = model.encoder.embed_pair("a red cube")                # the release's conditioning: (1, T, D) each
print(f"caption: {captions[0]!r}; image {images[0].size}; reconstruction {recons[0].size}; "
      f"conditioning {tuple(pos.shape)} and {tuple(neg.shape)}")
