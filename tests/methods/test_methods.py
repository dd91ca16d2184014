"""A training method is one config and one recipe behind the registry (uae.methods): a toy method,
registered from the outside as a user would, runs through train_grpo.py's command line with Run
doing the rest: final/ and the logs written, its parameters trained, its optimizer steps counted
(the EMA's cadence), and an interrupted run resumed exactly."""

from dataclasses import dataclass

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import read_metrics
from uae.config import field
from uae.methods import METHODS, Method, register
from uae.models.layout import MANIFEST
from uae.rl.grpo import GRPOConfig
from uae.training.evaluation import Evaluated
from uae.training.parts import Parts
from uae.training.run import Prepared, Setup
from uae.training.seeding import generator_for


@dataclass
class ToyConfig(GRPOConfig):
    """A toy method: two numbers fitted to a target."""

    stage: str = field("toy", choices=("toy",), help="this stage")
    target: float = field(1.0, help="what the two numbers learn")


class Grey:
    """The UnifiedModel protocol at its smallest (the toy has nothing to caption or draw)."""

    name = "grey"

    def settings(self) -> dict:
        return {}

    def caption(self, images, seeds):
        return ["grey"] * len(images)

    def generate(self, texts, seeds):
        return [Image.new("RGB", (16, 16), "grey") for _ in texts]


class ToyRecipe:
    """Two numbers w regress `target` from noisy inputs: loss = mean((w * x - target)^2), x drawn
    from (seed, step); two optimizer steps per run step."""

    trained_by = "train_grpo.py --stage toy"

    def __init__(self, run):
        self.run, self.cfg = run, run.cfg

    @staticmethod
    def configure(model, cfg) -> Parts:
        model.requires_grad_(True)
        return Parts({"toy": list(model.parameters())}, prepared={"toy": model})

    @staticmethod
    def fully_trained(cfg) -> set[str]:
        return {"toy"}

    def setup(self) -> Setup:
        self.model = torch.nn.Module()
        self.model.w = torch.nn.Parameter(torch.zeros(2))
        parts = self.configure(self.model, self.cfg)
        evaluated = Evaluated(Grey(), lambda text: {"input_ids": text.split()}, encoder_trains=False)
        return Setup(parts, torch.optim.SGD(parts.trainable, lr=self.cfg.learning_rate), evaluated, paths=None,
                     manifest={"toy": "toy.safetensors"})

    def attach(self, prepared: Prepared) -> None:
        self.optimizer = prepared.optimizer

    def begin(self, start: int) -> None:
        self.start = start

    def step(self, i: int) -> dict:
        x = 1 + torch.rand(2, 2, generator=generator_for(self.cfg.seed, i))
        for row in x:
            self.optimizer.zero_grad()
            loss = (self.model.w * row - self.cfg.target).pow(2).mean()
            loss.backward()
            self.optimizer.step()
        return {"loss": loss.item()}

    def write_trained(self, final) -> None:
        save_file({"w": self.model.w.detach().clone()}, str(final / "toy.safetensors"))

    def plot(self, records: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def toy():
    """The toy method registered for the test, the registry restored after it."""
    before = dict(METHODS)
    register(Method("toy", ToyConfig, ToyRecipe, "train_grpo.py", "two numbers fitted to a target"))
    yield
    METHODS.clear()
    METHODS.update(before)


def _train(out, *extra):
    from uae.train import grpo_main

    argv = ["--stage", "toy", "--data", "sample", "--checkpoint", "toy", "--output_dir", out, "--report_to", "none",
            "--scorer_weights", "tiny", "--max_steps", 4, "--learning_rate", 0.1, "--checkpointing_steps", 2,
            "--use_ema", "--ema_every", 2, "--ema_decay", 0.5, "--link_unchanged", "false", *extra]
    return grpo_main([str(a) for a in argv])


def test_a_registered_method_trains_through_the_command_line(toy, tmp_path, monkeypatch):
    import json

    from uae.training.run import Run

    runs = []
    real = Run.train
    monkeypatch.setattr(Run, "train", lambda self, *a, **k: (runs.append(self), real(self, *a, **k))[1])
    assert _train(tmp_path / "run") == 0
    final = tmp_path / "run" / "final"
    w = load_file(str(final / "toy.safetensors"))["w"]
    assert not torch.equal(w, torch.zeros(2))                      # trained (final/ holds the EMA of w)
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["trained_by"] == "train_grpo.py --stage toy" and manifest["toy"] == "toy.safetensors"
    assert manifest["config"]["stage"] == "toy" and manifest["config"]["target"] == 1.0
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    run = runs[0]
    assert run.steps.count == 8                                   # 4 steps x 2 optimizer steps, counted by Run
    assert run.ema.optimization_step == 8                         # EMA at optimizer steps 2, 4, 6, 8
    assert torch.equal(w, run.ema.shadow_params[0].cpu())


def test_a_registered_method_resumes_exactly(toy, interrupt_and_resume):
    interrupt_and_resume(_train, crash_at=2, compare=["toy.safetensors"])


def test_the_registry_refuses_a_second_method_of_one_name(toy):
    from uae.errors import UAEError

    with pytest.raises(UAEError, match="'toy' is already registered"):
        register(Method("toy", ToyConfig, ToyRecipe, "train_grpo.py", "again"))
