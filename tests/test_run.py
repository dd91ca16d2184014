"""The recipe contract (uae.training.run.Recipe), enforced by Run on a toy recipe: a missing member
is a one-line error before anything loads, a recipe that does not hand its optimizer to
`run.prepare` is refused after its setup, and the optimizer's steps are counted by Run itself
(the EMA's cadence), however many a recipe step takes."""

import pytest
import torch

from uae.errors import UAEError


class ToyRecipe:
    """A linear layer regressing zeros: `steps_per_step` optimizer steps per run step."""

    trained_by = "tests"
    linked_parts = ()
    manifest: dict = {}
    paths = None

    def __init__(self, run, steps_per_step=2, use_prepare=True):
        self.run, self.steps_per_step, self.use_prepare = run, steps_per_step, use_prepare

    def setup(self):
        from uae.training.parts import Parts

        self.layer = torch.nn.Linear(4, 4)
        self.trainable = list(self.layer.parameters())
        opt = torch.optim.SGD(self.trainable, lr=0.1)
        if self.use_prepare:
            modules, self.optimizer = self.run.prepare(Parts({"all": self.trainable}, prepared={"layer": self.layer}), opt)
            self.layer = modules["layer"]
        else:
            self.optimizer = opt
        self.run.prepare_evaluation(None, encoder_trains=False)

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


@pytest.mark.parametrize("missing", ["write_trained", "close", "trained_by"])
def test_a_recipe_missing_a_member_is_a_clear_error(tiny_ckpt, tmp_path, missing):
    run = _run(tiny_ckpt, tmp_path)
    recipe = type("Partial", (ToyRecipe,), {missing: property(lambda self: (_ for _ in ()).throw(AttributeError))})(run)
    with pytest.raises(UAEError, match=f"Partial does not implement the recipe contract .*missing {missing}"):
        run.train(recipe, 1, "toy")
    assert not hasattr(recipe, "layer")                   # refused before its setup ran


def test_a_recipe_that_skips_run_prepare_is_refused(tiny_ckpt, tmp_path):
    run = _run(tiny_ckpt, tmp_path)
    with pytest.raises(UAEError, match="did not hand its parts and optimizer to run.prepare"):
        run.train(ToyRecipe(run, use_prepare=False), 1, "toy")
