"""The recipe contract (uae.training.run.Recipe), on a toy recipe: a recipe missing a member is a
one-line error before anything loads; what `setup` returns (a `Setup`) is prepared by Run and
handed back through `attach` after the held-out evaluation has read the model (which must be a
UnifiedModel); the optimizer's steps are counted by Run itself (the EMA's cadence), however many a
recipe step takes; names are resolved by the config, not by Run."""

import pytest
import torch
from PIL import Image

from uae.errors import UAEError
from uae.training.evaluation import Evaluated
from uae.training.parts import Parts
from uae.training.run import Setup


class ToyModel:
    """The UnifiedModel protocol at its smallest: one caption, grey images."""

    name = "toy"

    def settings(self) -> dict:
        return {}

    def caption(self, images, seeds):
        return ["a toy"] * len(images)

    def generate(self, texts, seeds):
        return [Image.new("RGB", (16, 16), "grey") for _ in texts]


class ToyRecipe:
    """A linear layer regressing zeros: `steps_per_step` optimizer steps per run step."""

    trained_by = "tests"

    def __init__(self, run, steps_per_step=2, scheduler=False, dtype=torch.float32):
        self.run, self.steps_per_step, self.scheduler, self.dtype = run, steps_per_step, scheduler, dtype
        self.events = []

    @staticmethod
    def configure(model, cfg) -> Parts:
        model.requires_grad_(True)
        return Parts({"all": list(model.parameters())}, prepared={"layer": model})

    @staticmethod
    def fully_trained(cfg) -> set[str]:
        return set()

    def setup(self) -> Setup:
        self.events.append("setup")
        self.layer = torch.nn.Linear(4, 4).to(self.dtype)
        parts = self.configure(self.layer, None)
        opt = torch.optim.SGD(parts.trainable, lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1) if self.scheduler else None
        evaluated = Evaluated(ToyModel(), lambda text: {"input_ids": text.split()}, encoder_trains=False,
                              keep_conditioning=lambda captions: self.events.append(("evaluation", list(captions))))
        return Setup(parts, opt, evaluated, paths=None, lr_scheduler=sched)

    def attach(self, prepared):
        self.events.append("attach")
        self.layer, self.optimizer, self.lr = prepared.modules["layer"], prepared.optimizer, prepared.lr_scheduler

    def begin(self, start):
        pass

    def step(self, i):
        for _ in range(self.steps_per_step):
            self.optimizer.zero_grad()
            loss = self.layer(torch.ones(2, 4)).pow(2).mean()
            loss.backward()
            self.optimizer.step()
        return {"loss": loss.item()}

    def write_trained(self, final):
        pass

    def plot(self, records):
        pass

    def close(self):
        pass


def _run(tiny_ckpt, tmp_path, *extra):
    from uae.config import parse_config
    from uae.methods.sft import SFTConfig
    from uae.training.run import Run

    cfg = parse_config(SFTConfig, ["--data", "unused", "--checkpoint", str(tiny_ckpt), "--output_dir", str(tmp_path),
                                   "--report_to", "none", "--checkpointing_steps", "0", *map(str, extra)])
    return Run(cfg, "test")


def test_run_counts_the_optimizer_steps_itself(tiny_ckpt, tmp_path):
    run = _run(tiny_ckpt, tmp_path, "--use_ema", "--ema_every", 3)
    recipe = ToyRecipe(run, steps_per_step=2)
    run.train(recipe, 3, "toy")
    assert run.steps.count == 6                          # 3 run steps x 2 optimizer steps, no call from the recipe
    assert run.ema.optimization_step == 6                 # EMA updated at optimizer steps 3 and 6: warm-up counts steps


def test_the_setup_comes_back_prepared_after_the_evaluation_read_the_model(tiny_ckpt, tmp_path):
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler

    run = _run(tiny_ckpt, tmp_path, "--eval_steps", 1, "--eval_data", "sample", "--mixed_precision", "bf16")
    recipe = ToyRecipe(run, scheduler=True, dtype=torch.bfloat16)
    setup = run.set_up(recipe)
    # The held-out evaluation captioned its references (and the model kept their conditioning)
    # before the recipe got its prepared objects: stage 3 frees its encoder in attach.
    assert recipe.events == ["setup", ("evaluation", ["a toy"] * 6), "attach"]
    assert isinstance(recipe.optimizer, AcceleratedOptimizer) and recipe.optimizer.optimizer is setup.optimizer
    assert isinstance(recipe.lr, AcceleratedScheduler)
    # The trained weights in the precision policy's dtype: fp32 under bf16 mixed precision.
    assert run.trainable == setup.parts.trainable and {p.dtype for p in run.trainable} == {torch.float32}
    recipe.step(0)
    assert run.steps.count == 2                           # the hook sits on the prepared optimizer


def test_the_evaluated_model_must_be_a_unified_model(tiny_ckpt, tmp_path):
    class Raw(ToyRecipe):
        def setup(self):
            setup = super().setup()
            setup.evaluated.model = torch.nn.Linear(1, 1)  # not behind the UnifiedModel protocol
            return setup

    run = _run(tiny_ckpt, tmp_path, "--eval_steps", 1, "--eval_data", "sample")
    with pytest.raises(UAEError, match="needs a uae.unified.UnifiedModel, not Linear"):
        run.set_up(Raw(run))


@pytest.mark.parametrize("missing", ["attach", "write_trained", "configure", "trained_by"])
def test_a_recipe_missing_a_member_is_a_clear_error(tiny_ckpt, tmp_path, missing):
    run = _run(tiny_ckpt, tmp_path)
    partial = type("Partial", (), {k: v for k, v in vars(ToyRecipe).items()
                                   if k not in (missing, "__dict__", "__weakref__")})
    recipe = partial(run)
    with pytest.raises(UAEError, match=f"Partial does not implement the recipe contract .*missing {missing}$"):
        run.train(recipe, 1, "toy")
    assert recipe.events == []                            # refused before its setup ran


def test_names_are_resolved_by_the_config(tmp_path):
    """Run reads `cfg.resolved()`: scorer weights `auto` follow the checkpoint (official for a hub
    id), and a method's own fields are its own config's business (G4UConfig: --model)."""
    from uae.config import parse_config
    from uae.methods.g4u import G4UConfig
    from uae.methods.sft import SFTConfig

    cfg = parse_config(SFTConfig, ["--data", "x", "--checkpoint", "someone/uae"]).resolved()
    assert (cfg.checkpoint, cfg.scorer_weights) == ("someone/uae", "official")
    g4u = parse_config(G4UConfig, ["--data", "x", "--model", "pipeline", "--captioner", "someone/vlm",
                                   "--generator", str(tmp_path)]).resolved()
    assert (g4u.captioner, g4u.generator, g4u.scorer_weights) == ("someone/vlm", str(tmp_path), "official")
