"""train_sft.py in-process on the tiny checkpoint: smoke, learning, exact resume, output, bad data."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data

import demo
import train_sft

CAPTIONS = {"astronaut": "an astronaut in a white suit", "chelsea": "an orange cat", "coffee": "a cup of coffee",
            "rocket": "a rocket on a launch pad"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pairs")
    for name in CAPTIONS:
        Image.fromarray(getattr(data, name)()).save(d / f"{name}.jpg")
    (d / "pairs.jsonl").write_text("".join(json.dumps({"image": f"{n}.jpg", "caption": c}) + "\n" for n, c in CAPTIONS.items()))
    (d / "one.jsonl").write_text(json.dumps({"image": "astronaut.jpg", "caption": CAPTIONS["astronaut"]}) + "\n")
    return d


def sft(tiny_ckpt, data_path, out, *extra):
    return train_sft.main(["--config", "configs/sft/tiny.yaml", "--checkpoint", str(tiny_ckpt), "--data", str(data_path),
                           "--output_dir", str(out), *map(str, extra)])


def _losses(out):
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_smoke_three_steps_validation_images_and_output_in_demo(tiny_ckpt, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    assert sft(tiny_ckpt, pairs / "pairs.jsonl", out, "--max_train_steps", 3, "--validation_steps", 3,
               "--checkpointing_steps", 0) == 0
    assert len(_losses(out)) == 3
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_000000.png", "step_000003.png"]
    assert Image.open(out / "loss.png").format == "PNG"
    assert (out / "config.yaml").exists() and (out / "checkpoint-3" / "uae_state.json").exists()
    final = out / "final"
    assert (final / "dit_lora" / "adapter_model.safetensors").exists() and (final / "llm" / "projector.safetensors").exists()
    img = tmp_path / "from_sft.png"
    code = demo.main(["--checkpoint", str(final), "--input_text", "a cat", "--output_path", str(img),
                      "--steps", "2", "--height", "32", "--width", "48"])
    assert code == 0, capsys.readouterr().err
    assert Image.open(img).size == (48, 32)


def test_trained_parameters_change_and_frozen_ones_do_not(tiny_ckpt, pairs, tmp_path):
    out = tmp_path / "run"
    assert sft(tiny_ckpt, pairs / "pairs.jsonl", out, "--max_train_steps", 2, "--validation_steps", 0,
               "--dit_mode", "full", "--checkpointing_steps", 0) == 0
    before = load_file(str(tiny_ckpt / "dit" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(out / "final" / "dit" / "diffusion_pytorch_model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.8 * len(before)
    proj_new = load_file(str(out / "final" / "llm" / "projector.safetensors"))
    assert any(not torch.equal(v, proj_new[k]) for k, v in _release_projector(tiny_ckpt).items())
    assert json.loads((out / "final" / "uae_checkpoint.json").read_text())["dit_lora"] is None
    # The source's llm_lora shards hold a projector too, which the loader applies last (as the
    # release's strict=False load did): final/ must carry the trained one there as well.
    from uae.models.uae import UAE

    loaded = UAE.from_pretrained(str(out / "final"), device="cpu", load_decoder=False).encoder.projector.state_dict()
    assert all(torch.equal(loaded[k.removeprefix("projector.")], v) for k, v in proj_new.items())
    # The LLM itself is frozen: its files in final/ are the originals (linked).
    assert (out / "final" / "llm" / "model-00001-of-00002.safetensors").resolve() == \
        (tiny_ckpt / "llm" / "model-00001-of-00002.safetensors").resolve()


def _release_projector(ckpt):
    out = {}
    for f in (ckpt / "llm").glob("*.safetensors"):
        out.update({k: v for k, v in load_file(str(f)).items() if k.startswith("projector.")})
    return out


def test_loss_falls_on_one_image(tiny_ckpt, pairs, tmp_path):
    out = tmp_path / "run"
    assert sft(tiny_ckpt, pairs / "one.jsonl", out, "--max_train_steps", 30, "--train_batch_size", 1,
               "--dit_mode", "full", "--learning_rate", 3e-3, "--latent_sampling", "mode", "--caption_dropout", 0,
               "--validation_steps", 0, "--checkpointing_steps", 0) == 0
    losses = _losses(out)
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.85 * first, (first, last)


def test_interrupted_and_resumed_run_is_bit_identical(tiny_ckpt, pairs, interrupt_and_resume):
    common = ["--max_train_steps", 6, "--checkpointing_steps", 2, "--validation_steps", 0, "--use_ema",
              "--gradient_accumulation_steps", 2, "--link_unchanged", "false"]
    a, b = interrupt_and_resume(lambda out, *more: sft(tiny_ckpt, pairs / "pairs.jsonl", out, *common, *more),
                                crash_at=4, compare=["dit_lora/adapter_model.safetensors", "llm/projector.safetensors"])
    assert _losses(a) == _losses(b)
    # configs/sft/tiny.yaml keeps the 2 newest checkpoints
    assert sorted(p.name for p in b.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


@pytest.fixture()
def bad_pairs(pairs, tmp_path):
    (tmp_path / "corrupt.jpg").write_text("not a jpeg")
    lines = [{"image": str(pairs / "astronaut.jpg"), "caption": "an astronaut"},
             {"image": str(pairs / "chelsea.jpg"), "caption": "a cat"},
             {"image": str(tmp_path / "missing.jpg"), "caption": "gone"},
             {"image": str(tmp_path / "corrupt.jpg"), "caption": "broken"},
             {"image": str(pairs / "coffee.jpg"), "caption": "   "}]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_validate_data_reports_counts(bad_pairs, capsys):
    assert train_sft.main(["--data", str(bad_pairs), "--validate_data"]) == 1
    err = capsys.readouterr().err
    assert "2 usable item(s); 1 missing image(s), 1 unreadable image(s), 1 without a caption" in err
    assert "missing.jpg" in err and "corrupt.jpg" in err


def test_bad_data_stops_or_is_skipped(tiny_ckpt, bad_pairs, tmp_path, capsys):
    assert sft(tiny_ckpt, bad_pairs, tmp_path / "stop", "--max_train_steps", 1) == 2
    assert "--on_bad_data skip" in capsys.readouterr().err
    assert sft(tiny_ckpt, bad_pairs, tmp_path / "skip", "--max_train_steps", 2, "--on_bad_data", "skip",
               "--validation_steps", 0) == 0
    assert "skipping 3 bad item(s)" in capsys.readouterr().err


def test_folder_with_txt_captions(tiny_ckpt, pairs, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, cap in CAPTIONS.items():
        (folder / f"{name}.jpg").write_bytes((pairs / f"{name}.jpg").read_bytes())
        (folder / f"{name}.txt").write_text(cap)
    assert sft(tiny_ckpt, folder, tmp_path / "run", "--max_train_steps", 2, "--validation_steps", 0) == 0


def test_bad_settings(capsys):
    assert train_sft.main(["--data", "x.jsonl", "--dit_mode", "half"]) == 2
    assert train_sft.main(["--data", "x.jsonl", "--resolution", "50"]) == 2
    assert train_sft.main([]) == 2
    err = capsys.readouterr().err
    assert "--dit_mode" in err and "multiple of 16" in err and "--data is required" in err


def test_datasets_folder_source(tiny_ckpt, pairs, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"image": [Image.open(pairs / f"{n}.jpg") for n in CAPTIONS],
                                     "caption": list(CAPTIONS.values())},
                                    features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    assert sft(tiny_ckpt, tmp_path / "ds", tmp_path / "run", "--max_train_steps", 2, "--validation_steps", 0) == 0
    assert len(_losses(tmp_path / "run")) == 2


def test_caches_give_the_same_training_and_skip_the_models(tiny_ckpt, pairs, tmp_path, monkeypatch):
    common = ["--max_train_steps", 3, "--validation_steps", 0, "--checkpointing_steps", 0, "--text_padding", "max_length",
              "--max_caption_tokens", 64, "--caption_dropout", 0.5]
    assert sft(tiny_ckpt, pairs / "pairs.jsonl", tmp_path / "plain", *common) == 0
    args = [*common, "--cache_latents", "--cache_text", "--cache_dir", tmp_path / "cache"]
    assert sft(tiny_ckpt, pairs / "pairs.jsonl", tmp_path / "cached", *args) == 0
    plain, cached = _losses(tmp_path / "plain"), _losses(tmp_path / "cached")
    assert all(abs(a - b) < 1e-5 for a, b in zip(plain, cached)), (plain, cached)
    entries = sorted(p.parent.name.split("-")[0] for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert entries.count("latents") == 4 and entries.count("text") == 5          # 4 captions + the empty prompt
    # A second run reads the caches: no image is decoded and no caption goes through the LLM.
    import uae.data
    from uae.methods.sft import SFTRecipe

    monkeypatch.setattr(uae.data, "load_image", lambda *a: pytest.fail("image decoded"))
    monkeypatch.setattr(SFTRecipe, "_hidden", lambda *a: pytest.fail("LLM called"))
    monkeypatch.setattr(uae.methods.sft, "validate", lambda items: uae.data.Validation(ok=items))
    assert sft(tiny_ckpt, pairs / "pairs.jsonl", tmp_path / "again", *args) == 0
    assert _losses(tmp_path / "again") == cached


def test_long_caption_is_an_error_not_a_cut(tiny_ckpt, pairs, tmp_path, capsys):
    assert sft(tiny_ckpt, pairs / "pairs.jsonl", tmp_path / "r", "--max_train_steps", 1, "--text_padding", "max_length",
               "--max_caption_tokens", 20, "--validation_steps", 0) == 2
    assert "--max_caption_tokens 20" in capsys.readouterr().err


def test_buckets_and_grouped_sampler():
    from uae.data import Item, assign_buckets, buckets_for
    from uae.training.seeding import StepSampler

    buckets = buckets_for(256, 64, 2.0)
    assert (256, 256) in buckets
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 256 * 256 and 0.5 <= h / w <= 2 for h, w in buckets)

    class Sized(Item):
        def size(self):
            return self.image  # (width, height)

    items = [Sized((400, 200), "c", "wide"), Sized((200, 400), "c", "tall"), Sized((300, 300), "c", "square")]
    got = assign_buckets(items, buckets)
    assert got[0][1] > got[0][0] and got[1][0] > got[1][1] and got[2][0] == got[2][1]

    groups = ["a"] * 5 + ["b"] * 7
    sampler = StepSampler(12, 2, 1, 0, seed=3, start=0, total=10, groups=groups)
    assert sampler.per_epoch == 5                                                 # 2 + 3 full batches
    flat = list(sampler)
    batches = [flat[i:i + 2] for i in range(0, len(flat), 2)]
    assert all(len({groups[i] for i in b}) == 1 for b in batches)
    assert list(StepSampler(12, 2, 1, 0, seed=3, start=4, total=10, groups=groups)) == flat[8:]   # resume position


def test_bucketed_training_on_mixed_aspect_ratios(tiny_ckpt, pairs, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    img = data.astronaut()
    for i, (h, w) in enumerate([(200, 400), (210, 420), (400, 200), (420, 210)]):
        Image.fromarray(img[:h, :w] if h <= 512 and w <= 512 else img).resize((w, h)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"photo {i}")
    assert sft(tiny_ckpt, folder, tmp_path / "run", "--max_train_steps", 4, "--bucketing", "--resolution", 64,
               "--bucket_step", 16, "--validation_steps", 0) == 0
    err = capsys.readouterr().err
    assert "aspect-ratio buckets in use" in err and "x" in err
    assert len(_losses(tmp_path / "run")) == 4


def test_webdataset_shards(tiny_ckpt, pairs, tmp_path):
    import io
    import tarfile

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, (name, cap) in enumerate(CAPTIONS.items()):
            for ext, payload in (("jpg", (pairs / f"{name}.jpg").read_bytes()), ("txt", cap.encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    assert sft(tiny_ckpt, shard, tmp_path / "run", "--max_train_steps", 2, "--validation_steps", 0) == 0
    assert sft(tiny_ckpt, str(tmp_path / "shard-*.tar"), tmp_path / "run2", "--max_train_steps", 1,
               "--validation_steps", 0) == 0


def test_gradient_checkpointing_and_bf16_autocast_run(tiny_ckpt, pairs, tmp_path):
    out = tmp_path / "run"
    assert sft(tiny_ckpt, pairs / "pairs.jsonl", out, "--max_train_steps", 2, "--gradient_checkpointing",
               "--mixed_precision", "bf16", "--validation_steps", 0, "--checkpointing_steps", 0) == 0
    losses = _losses(out)
    assert len(losses) == 2 and all(l == l and l > 0 for l in losses)
