"""What Unified-Bench needs of a model under test (the paper's protocol 1: each model captions
every reference with its own understanding side, with the release's caption instruction, and
regenerates it with its own generator).

    name                      a short name for reports ("uae", "janus-pro-7b", ...)
    settings() -> dict        what a report should record to reproduce the run (ids, sizes, steps)
    caption(images, seeds)    PIL images -> one caption each; caption i sampled with seeds[i]
    generate(texts, seeds)    captions -> one PIL image each; image i generated with seeds[i]

Seeds are per item so that outputs do not depend on batching or on how many processes share the
references. An adapter that cannot honour that (a library that only batches) says so in its
`settings()` under "batch_invariant": False.

The runner builds every model with the run's settings (`RunSettings`: device, dtype, caption
instruction and sampling, image size, steps, guidance). The adapters shipped here take them as
their first argument; a user's class (`--model module:Class`) gets them as the keyword argument
`settings` when its constructor declares a parameter of that name, and the `--model_args`
mapping as further keyword arguments (see uae/unified/loading.py).

What stage 2 (train_grpo.py --stage g4u --model janus|pipeline|module:Class) trains, and what the
runner's --captioner_lora loads a trained LoRA onto, is the model's captioning side
(`CaptioningSide`): Janus is its own, a pipeline's (and a user class's) is its `captioner`
attribute. Stage 2 replaces `side.model` with the model that trains (LoRA-wrapped or fully
trained); the adapter must read `side.model` at call time, not keep its own reference.

A model whose generator is conditioned on that same language model (the paper's UMM-1: UniWorld,
MetaQuery, BLIP3-o; UAE itself) says so with `conditions_generator = True`, and its `generate` reads
the conditioning from `captioner.model` when it is called: the reward's images then come from the
policy's current conditioning, the LoRA it trains serves both sides (the run's manifest records
`lora_sides: ["caption", "image"]`), and the runner's --captioner_lora changes its images too. A
complete example: docs/examples/llm_conditioned_sd3.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from uae.errors import UAEError
from uae.models.encoder import RELEASE_CAPTION_INSTRUCTION


@runtime_checkable
class UnifiedModel(Protocol):
    name: str

    def settings(self) -> dict:
        """Everything needed to reproduce this model's outputs (JSON-serialisable)."""

    def caption(self, images: Sequence, seeds: Sequence[int]) -> list[str]:
        """One caption per image, with the caption instruction of the release."""

    def generate(self, texts: Sequence[str], seeds: Sequence[int]) -> list:
        """One PIL image per text."""


@runtime_checkable
class CaptioningSide(Protocol):
    """A transformers captioner that stage 2 can train (and --captioner_lora load onto)."""

    model: Any                  # the transformers model (PreTrainedModel); stage 2 puts the trained one here
    processor: Any              # its processor (the tokenizer at processor.tokenizer)

    def inputs(self, images: Sequence) -> Mapping:
        """The caption prompts of `images` (the caption instruction and the image), left-padded when
        more than one, on the model's device: what model.generate(**inputs) captions."""


# Optional members of a model under test (read with getattr): `captioner` (its CaptioningSide,
# when it is not one itself), `conditions_generator` (bool; see the module's docstring), and on
# the captioning side `text_kwargs` (a dict generate() needs to write text; Janus: its mode).
CAPTIONING_SIDE_MEMBERS = ("model", "processor", "inputs")


# The generation settings a model may take from its own defaults when the user leaves them unset.
MODEL_DEFAULTS = ("steps", "guidance_scale")


@dataclass(frozen=True)
class RunSettings:
    """The run's inference settings, as every model under test is built with them.

    device / dtype             where and in what precision to load ("cuda:1", "bfloat16"; resolved)
    caption_instruction        the release's instruction (uae.models.encoder.RELEASE_CAPTION_INSTRUCTION)
    max_new_tokens, temperature, top_k, top_p, repetition_penalty
                               caption sampling (None: the checkpoint's generation_config.json)
    do_sample                  sample captions (True), or decode them greedily (False: temperature,
                               top_k and top_p unused, the same caption for any seed)
    caption_batching           caption a batch in one generate() call (faster; not batch-invariant)
    steps, guidance_scale, height, width
                               image generation (a model that cannot honour one records so in settings());
                               steps and guidance default to UAE's release values (40, 5.0)
    model_defaults             the generation settings the user left unset ("steps", "guidance_scale"):
                               a model with defaults of its own uses those instead of the values above
                               and records so in settings() (a diffusers pipeline: its __call__'s
                               defaults); a model without (UAE, Janus) uses the values above
    dit_batching               generate a batch's images together (faster; see each adapter)
    caption_progress           show a bar of each caption's tokens while it is generated (the
                               runner turns it on for each node's first process; no effect on outputs)
    """

    device: str = "cpu"
    dtype: str = "float32"
    caption_instruction: str = ""
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    do_sample: bool = True
    caption_batching: bool = False
    steps: int = 40
    guidance_scale: float = 5.0
    height: int = 1024
    width: int = 1024
    dit_batching: bool = False
    caption_progress: bool = False
    model_defaults: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = sorted(set(self.model_defaults) - set(MODEL_DEFAULTS))
        if unknown:
            raise UAEError(f"RunSettings: model_defaults {unknown}: only {list(MODEL_DEFAULTS)} can be left to a model")
        if not self.do_sample and (self.top_k is not None or self.top_p is not None):
            raise UAEError(f"RunSettings: top_k {self.top_k} / top_p {self.top_p} apply to sampling, and "
                           "do_sample=False decodes greedily: leave them None")

    @classmethod
    def from_config(cls, cfg, device, dtype, caption_progress: bool = False) -> "RunSettings":
        """From an InferenceConfig (the runner's flags) and the resolved device and dtype; the flags
        left unset (None) among MODEL_DEFAULTS are UAE's release values here and named in
        model_defaults."""
        unset = tuple(k for k in MODEL_DEFAULTS if getattr(cfg, k) is None)
        release = {f.name: f.default for f in fields(cls) if f.name in unset}
        generation = {k: release.get(k, getattr(cfg, k)) for k in MODEL_DEFAULTS}
        return cls(device=str(device), dtype=str(dtype).removeprefix("torch."),
                   caption_instruction=RELEASE_CAPTION_INSTRUCTION, max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   repetition_penalty=cfg.repetition_penalty, do_sample=cfg.do_sample,
                   caption_batching=cfg.caption_batching, **generation, height=cfg.height, width=cfg.width,
                   dit_batching=cfg.dit_batching, caption_progress=caption_progress, model_defaults=unset)

    def to_dict(self) -> dict:
        return asdict(self)


def check_model(model, setting: str) -> None:
    """A one-line error naming `setting` when `model` lacks a member of the protocol."""
    missing = [m for m in ("name", "settings", "caption", "generate") if not hasattr(model, m)]
    missing += [m for m in ("settings", "caption", "generate") if m not in missing and not callable(getattr(model, m))]
    if missing:
        raise UAEError(f"{setting}: {type(model).__name__} does not implement uae.unified.UnifiedModel: missing "
                       f"{', '.join(missing)}")


def check_outputs(outputs, n: int, kind: str, model, setting: str) -> list:
    """`outputs` of `model.caption` (kind "caption": strings) or `model.generate` (kind "image":
    PIL images), one per input, or a one-line error naming `setting`."""
    name = getattr(model, "name", type(model).__name__)
    try:
        outputs = list(outputs)
    except TypeError:
        raise UAEError(f"{setting}: {name}.{'caption' if kind == 'caption' else 'generate'} returned "
                       f"{type(outputs).__name__}, not a list") from None
    if len(outputs) != n:
        raise UAEError(f"{setting}: {name} returned {len(outputs)} {kind}(s) for {n} input(s)")
    if kind == "caption":
        bad = [type(o).__name__ for o in outputs if not isinstance(o, str)]
        if bad:
            raise UAEError(f"{setting}: {name}.caption returned {bad[0]}, not str")
    else:
        from PIL import Image

        bad = [type(o).__name__ for o in outputs if not isinstance(o, Image.Image)]
        if bad:
            raise UAEError(f"{setting}: {name}.generate returned {bad[0]}, not a PIL image")
    return outputs
