"""Stage 2 over two CPU processes (torchrun, gloo) trains the weights of one process: each caption
is sampled from a generator of its own, seeded by its global index in the iteration (and Janus's
image tokens likewise), so the rollouts, rewards and advantages do not depend on the number of
processes; each step's loss is normalised over the whole global batch."""

import pytest
import torch

from training.test_multiprocess import _max_diff, launch, pairs  # noqa: F401  (pairs: the module's fixture)

pytestmark = pytest.mark.slow  # two processes (torchrun, gloo) per test


@pytest.mark.parametrize("model", [
    ["--checkpoint", "{tiny_ckpt}"],                    # UAE: the encoder's LoRA
    ["--checkpoint", "tiny", "--model", "janus"],       # Janus end to end: caption and image tokens
])
def test_two_processes_train_the_weights_of_one(model, tiny_ckpt, pairs, tmp_path):  # noqa: F811
    model = [str(tiny_ckpt) if a == "{tiny_ckpt}" else a for a in model]
    extra = ["--max_iterations", 2, "--prompts_per_iteration", 2, "--group_size", 2, "--max_new_tokens", 6,
             "--learning_rate", 0.05, "--adam_epsilon", 1e-4, *model[2:]]
    # A reward of whole numbers (caption words): the tiny models' image rewards differ by ~1e-5 within a
    # group, so the rounding of the decoder's batches (4 captions a call against 2 and 2: ~1e-7) would
    # move a group-normalised advantage by ~1e-3, and the weights with it.
    env = {"UAE_TEST_REWARD": "caption_words"}
    one = launch(1, "g4u", tmp_path / "one", model[1], pairs, *extra, env=env)[0]
    two = launch(2, "g4u", tmp_path / "two", model[1], pairs, *extra, env=env)
    # The same captions in every iteration: the same rewards and advantages, exactly.
    assert len(one["advantages"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(one["advantages"], two[0]["advantages"])), \
        (one["advantages"], two[0]["advantages"])
    assert torch.equal(two[0]["advantages"][0], two[1]["advantages"][0])
    assert _max_diff(two[0]["params"], two[1]["params"]) == 0
    # The captions of a group differ (their lengths do): there was a signal to train on.
    assert all(float(a.abs().max()) > 0 for a in one["advantages"]), one["advantages"]
    # The weights after two iterations: float noise of batching and all-reduce order only.
    diff = _max_diff(one["params"], two[0]["params"])
    assert diff < 2e-5, diff
