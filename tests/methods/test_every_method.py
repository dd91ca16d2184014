"""Every registered training method, through its command line (`main(argv)` of the script that runs
it), on the tiny checkpoint: two steps, and every parameter it trains has moved. A method whose
parameter never receives a gradient (a LoRA factor left out of the graph, a group missing from the
optimizer) fails here."""

import pytest
import torch

from uae.methods import METHODS
from uae.train import grpo_main, sft_main
from uae.training.run import Run

MAIN = {"train_sft.py": sft_main, "train_grpo.py": grpo_main}
CONFIG = {"sft": "configs/sft/tiny.yaml", "cold_start": "configs/grpo/tiny_cold_start.yaml",
          "g4u": "configs/grpo/tiny_g4u.yaml", "u4g": "configs/grpo/tiny_u4g.yaml"}
# Two steps: a new LoRA's B starts at zero, so its A receives a gradient from the second step on.
# No weight decay: it would move every weight whatever its gradient.
COMMON = ["--max_steps", "2", "--weight_decay", "0", "--checkpointing_steps", "0", "--report_to", "none",
          "--scorer_weights", "tiny"]
EXTRA = {"sft": ["--validation_steps", "0"], "cold_start": [], "g4u": ["--image_log_steps", "0"],
         "u4g": ["--image_log_steps", "0"]}


def test_every_registered_method_is_covered_here():
    assert set(CONFIG) == set(METHODS), "a new method needs its tiny config here"


@pytest.mark.parametrize("name", list(CONFIG))
def test_two_steps_through_the_command_line_move_every_trained_parameter(name, tiny_ckpt, tmp_path, monkeypatch,
                                                                         capsys):
    runs, before = [], []
    real = Run.set_up

    def set_up(run, recipe):
        setup = real(run, recipe)
        runs.append(run)
        before.extend(p.detach().clone() for p in run.trainable)
        return setup

    monkeypatch.setattr(Run, "set_up", set_up)
    method = METHODS[name]
    argv = ["--config", CONFIG[name], "--checkpoint", str(tiny_ckpt), "--output_dir", str(tmp_path / "run"),
            *COMMON, *EXTRA[name]]
    if method.command == "train_grpo.py":
        argv = ["--stage", name, *argv]
    assert MAIN[method.command](argv) == 0, capsys.readouterr().err
    [run] = runs
    assert (tmp_path / "run" / "final" / "uae_checkpoint.json").is_file()
    after = run.trainable
    assert len(after) == len(before) > 0
    still = [i for i, (a, b) in enumerate(zip(before, after)) if torch.equal(a, b.detach().to(a.dtype))]
    assert not still, f"{name}: {len(still)} of {len(after)} trained tensors did not move (indices {still[:10]})"
