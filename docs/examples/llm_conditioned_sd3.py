# llm_conditioned_sd3.py: a unified model of the paper's UMM-1 kind (UniWorld, MetaQuery, BLIP3-o: an
# LLM understands and conditions a diffusion generator), complete, for
#
#   train_grpo.py --stage g4u --model docs/examples/llm_conditioned_sd3.py:LLMConditionedSD3 \
#       --model_args '{"captioner": "Qwen/Qwen2.5-VL-3B-Instruct", "generator": "<an SD3 pipeline>",
#                      "projector": "<its trained projector>.safetensors"}' ...
#   run_unibench.py --model docs/examples/llm_conditioned_sd3.py:LLMConditionedSD3 --model_args ... \
#       --captioner_lora <run>/final/captioner_lora
#
# (docs/unified-grpo.md, "Stage 2 for a model whose generator reads the LLM"; `"captioner": "tiny",
# "generator": "tiny"` builds it from the toolkit's random-weight models, as the tests do.)
#
# The captioner is any transformers image-text-to-text model; its last hidden states (after the final
# norm) of a caption, through a projector, are the SD3 DiT's text conditioning (encoder_hidden_states,
# token by token; the pooled vector from their mean), as UAE's own decoder is conditioned. Stage 2
# trains a LoRA on the language model; the projector and the pipeline stay frozen, part of the reward.
# Because `generate` reads `self.captioner.model` when it is called, the reward's images follow the
# LoRA as it trains, and a LoRA loaded by the runner changes the images too.
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

from uae.random_weights.unified import resolve
from uae.unified.captioner import TransformersCaptioner

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


class LLMConditionedSD3:
    conditions_generator = True  # generate() reads captioner.model: stage 2's LoRA serves both sides

    def __init__(self, captioner: str, generator: str, settings, projector: str | None = None, seed: int = 0,
                 negative_prompt: str = ""):
        self.run = settings
        self.captioner = TransformersCaptioner(resolve(captioner, "captioner"), settings)
        self.name = f"{self.captioner.name}->sd3"
        dtype = self.captioner.dtype
        # The DiT and the VAE only: the conditioning is the LLM's, not the pipeline's text encoders'.
        self.pipe = StableDiffusion3Pipeline.from_pretrained(resolve(generator, "generator"), dtype=dtype,
                                                             **dict.fromkeys(TEXT_ENCODERS))
        self.pipe.to(settings.device)
        self.pipe.set_progress_bar_config(disable=True)
        dit = self.pipe.transformer.config
        hidden = self.captioner.model.get_input_embeddings().weight.shape[1]
        self.projector = Projector(hidden, dit.joint_attention_dim, dit.pooled_projection_dim)
        if projector:  # the trained projector (a safetensors file of this module's state dict)
            self.projector.load_state_dict(load_file(projector))
        else:  # a fixed random one (a toy; still a function of the LLM's states)
            torch.manual_seed(seed)
            self.projector.reset_parameters()
        self.projector.to(settings.device, dtype).requires_grad_(False).eval()
        self.sources = {"captioner": captioner, "generator": generator, "projector": projector or f"random({seed})"}
        self.negative_prompt = negative_prompt

    def settings(self) -> dict:
        return {**self.sources, "caption": self.captioner.settings_dict(), "steps": self.run.steps,
                "guidance_scale": self.run.guidance_scale, "size": [self.run.width, self.run.height],
                "negative_prompt": self.negative_prompt, "batch_invariant": not self.run.caption_batching}

    def caption(self, images, seeds):
        return self.captioner.caption(images, seeds)

    @torch.no_grad()
    def condition(self, text: str):
        """(negative, positive) text conditioning of `text`: the captioner's last hidden states of
        [negative prompt, text] as one chat turn each, right-padded together, projected."""
        side = self.captioner
        chats = [side.processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": t}]}],
                                                    tokenize=False, add_generation_prompt=False)
                 for t in (self.negative_prompt, text)]
        batch = side.processor.tokenizer(chats, padding=True, padding_side="right", return_tensors="pt")
        batch = batch.to(side.model.device)
        states = side.model(**batch, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]  # the LLM as it is now
        tokens, pooled = self.projector(states.to(self.projector.dtype), batch["attention_mask"])
        return (tokens[:1], pooled[:1]), (tokens[1:], pooled[1:])

    def generate(self, texts, seeds):
        images = []
        for text, seed in zip(texts, seeds):  # each image alone, from its own CPU generator
            (neg, neg_pooled), (pos, pooled) = self.condition(text)
            out = self.pipe(prompt_embeds=pos, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                            negative_pooled_prompt_embeds=neg_pooled, num_inference_steps=self.run.steps,
                            guidance_scale=self.run.guidance_scale, height=self.run.height, width=self.run.width,
                            generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")
            images.append(out.images[0])
        return images


class Projector(torch.nn.Module):
    """LLM hidden states -> the DiT's token conditioning (Linear, GELU, Linear, token by token) and
    its pooled vector (a Linear of the masked mean of the states)."""

    def __init__(self, hidden: int, joint: int, pooled: int):
        super().__init__()
        self.tokens = torch.nn.Sequential(torch.nn.Linear(hidden, 2 * joint), torch.nn.GELU(),
                                          torch.nn.Linear(2 * joint, joint))
        self.pooled = torch.nn.Linear(hidden, pooled)

    @property
    def dtype(self):
        return self.pooled.weight.dtype

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, torch.nn.Linear):
                m.reset_parameters()

    def forward(self, states, mask):
        mask = mask[..., None].to(states.dtype)
        mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.tokens(states), self.pooled(mean)
