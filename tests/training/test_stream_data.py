"""Training from webdataset shards, streamed (uae/stream.py): the split across ranks and workers,
mixed image formats, bad samples skipped and counted, the bad-share threshold as a one-line error,
train_sft.py from shards with exact resume after SIGKILL, and a stage-2 run on shard references."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

import train_sft
from conftest import read_metrics, timeless, train_g4u
from uae.apps.caption_data import main as caption_data
from uae.data import center_crop_tensor, load_references, read_items, validate
from uae.errors import UAEError
from uae.stream import BadCounter, ShardStream, decode_sample, part_samples, raw_samples, shard_files

ROOT = Path(__file__).resolve().parents[2]
FORMATS = ("jpg", "png", "webp", "jpeg")


def image_bytes(seed: int, fmt: str, size=(24, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(fmt, fmt.upper()))
    return buf.getvalue()


def write_shards(folder: Path, shards: int, per_shard: int, extra: dict | None = None) -> list[str]:
    """`shards` shards of `per_shard` samples, the formats mixed within each shard and the sizes
    too (two aspect ratios); `extra`: {shard index: [raw samples]} appended to those shards."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:06d}.tar")) as tar:
            for i in range(per_shard):
                n = s * per_shard + i
                fmt = FORMATS[n % len(FORMATS)]
                size = (24, 16) if n % 3 else (16, 32)
                tar.write({"__key__": f"{n:06d}", fmt: image_bytes(n, fmt, size),
                           **({"txt": f"sample {n}".encode()} if n % 2 else
                              {"json": json.dumps({"caption": f"sample {n}"}).encode()})})
            for sample in (extra or {}).get(s, []):
                tar.write(sample)
    return sorted(str(p) for p in folder.glob("*.tar"))


BAD = [{"__key__": "corrupt", "jpg": b"not a jpeg", "txt": b"broken"},
       {"__key__": "nocaption", "png": image_bytes(1, "png"), "txt": b"   "},
       {"__key__": "noimage", "bin": b"\x00\x01", "txt": b"no image here"}]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shards")
    write_shards(d, 6, 5)
    return d


def test_sources_brace_glob_folder(shards):
    files = shard_files(shards)
    assert len(files) == 6
    assert shard_files(f"{shards}/{{000000..000005}}.tar") == files
    assert shard_files(f"{shards}/00000[0-2].tar") == files[:3]
    with pytest.raises(UAEError, match="no webdataset shard"):
        shard_files(f"{shards}/{{000010..000011}}.tar")


def test_every_sample_once_per_epoch_over_two_ranks_and_two_workers(shards):
    files = shard_files(shards)
    for epoch in (0, 1):
        seen = Counter()
        for rank in range(2):
            for worker in range(2):
                part = rank * 2 + worker
                samples = list(part_samples(files, seed=3, part=part, parts=4, shuffle_buffer=4, epochs=epoch + 1))
                seen.update(s["__key__"] for e, s in samples if e == epoch)
        assert seen == Counter(f"{n:06d}" for n in range(30))
    # The shuffle buffer changes the order within a part; the same seed gives the same order.
    first = [s["__key__"] for _, s in part_samples(files, seed=3, part=0, parts=1, shuffle_buffer=8, epochs=1)]
    again = [s["__key__"] for _, s in part_samples(files, seed=3, part=0, parts=1, shuffle_buffer=8, epochs=1)]
    plain = [s["__key__"] for _, s in part_samples(files, seed=3, part=0, parts=1, shuffle_buffer=1, epochs=1)]
    assert first == again and first != plain and sorted(first) == sorted(plain)


def stream(files, **kw):
    args = dict(batch_size=2, buckets=[(16, 16), (32, 16), (16, 32)], pixels=center_crop_tensor, seed=5,
                shuffle_buffer=4, bad_check_after=10**6)
    return ShardStream(files, "test", **{**args, **kw})


def batches(ds, n, workers=0):
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_two_workers_take_turns_and_resume_skips_the_consumed_batches(shards):
    files = shard_files(shards)
    # Import torchvision here once, not in each forked worker (in training, diffusers has imported it).
    center_crop_tensor(Image.new("RGB", (4, 4)), 2, 2)
    ds = stream(files, rank=1, world=2)
    # Micro-step m of rank 1 (of 2) with 2 workers: batch m // 2 of part 2 + m % 2 (of 4).
    parts = [ds.part_batches(2 + w, 4) for w in range(2)]
    expected = [[d.caption for d in next(parts[m % 2])[0]] for m in range(12)]
    full = batches(ds, 12, workers=2)
    assert [b["caption"] for b in full] == expected
    assert {tuple(b["pixels"].shape[2:]) for b in full} <= {(16, 16), (32, 16), (16, 32)}  # one bucket a batch
    resumed = batches(stream(files, rank=1, world=2, skip=5), 7, workers=2)
    assert [b["caption"] for b in resumed] == expected[5:]
    assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(resumed, full[5:]))
    rank0 = [[d.caption for d in next(ds.part_batches(w, 4))[0]] for w in range(2)]
    assert not {c for b in rank0 for c in b} & {c for b in expected[:2] for c in b}


def test_mixed_formats_and_bad_members_are_skipped_and_counted(tmp_path):
    files = write_shards(tmp_path, 1, 8, extra={0: BAD})
    decoded = [decode_sample(s) for s in raw_samples(files)]
    assert Counter(d.problem for d in decoded) == {None: 8, "undecodable image": 1, "empty caption": 1,
                                                   "no image member": 1}
    assert {d.image.size for d in decoded if d.problem is None} == {(24, 16), (16, 32)}
    counter = BadCounter("x", 0.5, check_after=1)
    for d in decoded:
        counter.add(d)
    assert counter.summary() == "3 bad of 11 sample(s) seen (1 undecodable image, 1 empty caption, 1 no image member)"
    assert counter.error() is None
    got = batches(stream(files, shuffle_buffer=1, buckets=[(16, 16)]), 8)
    assert sorted(c for b in got[:4] for c in b["caption"]) == sorted(f"sample {n}" for n in range(8))
    assert got[3]["bad"] == [8, 0] and got[4]["bad"] == [13, 3]  # the 3 bad ones close the first epoch
    # Map-style reading of shards (the cold start, --validate_data) sees the same.
    v = validate(read_items(files[0]))
    assert (len(v.ok), len(v.missing), len(v.unreadable), len(v.no_caption)) == (8, 1, 1, 1)


def test_bad_share_past_the_threshold_is_one_line_naming_data_count_and_setting(tmp_path):
    files = write_shards(tmp_path, 1, 3, extra={0: BAD})
    got = batches(stream(files, batch_size=1, shuffle_buffer=1, bad_check_after=5, max_bad_fraction=0.2), 4)
    err = next(b["error"] for b in got if "error" in b)
    assert "\n" not in err and err.startswith("data test: 2 bad of 5 sample(s) seen")
    assert "--max_bad_fraction" in err and "share over 0.2" in err


def test_the_shards_uae_caption_data_writes_stream(tmp_path):
    fake = f"{ROOT / 'tests' / 'apps' / 'test_caption_data.py'}:FakeCaptioner"  # words from the pixels' hash
    for i, fmt in enumerate(["jpg", "png", "webp", "jpg", "png"]):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "images" / f"im{i}.{fmt}").write_bytes(image_bytes(i, fmt, (24, 16) if i % 2 else (16, 24)))
    assert caption_data(["--input", str(tmp_path / "images"), "--output_dir", str(tmp_path / "shards"),
                         "--captioner", fake, "--shard_size", "2", "--progress", "false"]) == 0
    files = shard_files(tmp_path / "shards")
    assert len(files) == 3
    decoded = [decode_sample(s) for _, s in part_samples(files, seed=0, part=0, parts=1, shuffle_buffer=1, epochs=1)]
    assert len(decoded) == 5 and all(d.problem is None and d.caption.startswith("w") for d in decoded)
    got = batches(stream(files, batch_size=1, buckets=[(16, 16)]), 5)
    assert sorted(b["caption"][0] for b in got) == sorted(d.caption for d in decoded)
    assert len(load_references(str(tmp_path / "shards"))) == 5


def test_a_shard_that_does_not_read_is_an_error_naming_it(tmp_path):
    (tmp_path / "000000.tar").write_bytes(b"not a tar archive")
    with pytest.raises(UAEError, match=r"webdataset shard .*000000.tar cannot be read \(.+\): rewrite or remove it"):
        list(raw_samples(shard_files(tmp_path)))


def sft(ckpt, data, out, *extra):
    return train_sft.main([str(a) for a in ["--config", "configs/sft/tiny.yaml", "--checkpoint", ckpt, "--data", data,
                                            "--output_dir", out, "--validation_steps", 0, *extra]])


def test_train_sft_trains_from_shards(tiny_ckpt, tmp_path, capsys):
    write_shards(tmp_path / "data", 2, 4)
    out = tmp_path / "run"
    assert sft(tiny_ckpt, tmp_path / "data" / "{000000..000001}.tar", out, "--max_train_steps", 2, "--bucketing",
               "--bucket_step", 16, "--checkpointing_steps", 0, "--dit_mode", "full") == 0
    name = "dit/diffusion_pytorch_model.safetensors"
    before, after = load_file(str(tiny_ckpt / name)), load_file(str(out / "final" / name))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, changed
    assert read_metrics(out)[-1]["samples_read"] >= 4
    # Streamed, the worker count decides the order: a resume with another one is refused.
    assert sft(tiny_ckpt, tmp_path / "data" / "{000000..000001}.tar", out, "--max_train_steps", 3, "--bucketing",
               "--bucket_step", 16, "--checkpointing_steps", 0, "--dit_mode", "full", "--resume_from_checkpoint",
               "latest", "--dataloader_num_workers", 1) != 0
    assert "dataloader_num_workers 0 -> 1" in capsys.readouterr().err.strip().splitlines()[-1]


def test_train_sft_stops_with_one_line_when_bad_share_passes(tiny_ckpt, tmp_path, capsys):
    write_shards(tmp_path / "data", 1, 2, extra={0: BAD})
    code = sft(tiny_ckpt, tmp_path / "data", tmp_path / "run", "--max_train_steps", 3, "--bad_check_after", 4,
               "--shuffle_buffer", 1)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = next(l for l in err.splitlines() if "bad of" in l)
    assert f"data {tmp_path / 'data'}: " in line and "--max_bad_fraction" in line


def test_too_few_shards_for_the_workers_and_caches_are_errors(tiny_ckpt, tmp_path, capsys):
    write_shards(tmp_path / "data", 1, 4)
    assert sft(tiny_ckpt, tmp_path / "data", tmp_path / "a", "--dataloader_num_workers", 2) == 2
    assert "1 shard(s) for 1 process(es) x 2 dataloader worker(s)" in capsys.readouterr().err
    assert sft(tiny_ckpt, tmp_path / "data", tmp_path / "b", "--cache_latents") == 2
    assert "need map-style data" in capsys.readouterr().err


def test_references_from_mixed_shards_skip_bad_ones(tmp_path):
    write_shards(tmp_path, 2, 60, extra={1: BAD[:1]})  # 1 bad of 121: under the 1% default
    refs = load_references(f"{tmp_path}/*.tar")
    assert len(refs) == 120 and len({r.key for r in refs}) == 120
    assert refs[0].caption == "sample 0"
    write_shards(tmp_path / "worse", 1, 4, extra={0: BAD})
    with pytest.raises(UAEError, match=r"2 bad of 7 sample\(s\) seen \(1 undecodable image, 1 no image member\)"):
        load_references(str(tmp_path / "worse"))


@pytest.mark.slow
def test_stage_2_reads_its_images_from_shards(tmp_path):
    write_shards(tmp_path / "refs", 2, 3)
    out = tmp_path / "g4u"
    assert train_g4u(out, "--data", tmp_path / "refs" / "{000000..000001}.tar", "--max_iterations", 1,
                     "--prompts_per_iteration", 2, "--group_size", 2) == 0
    assert len(read_metrics(out)) == 1


@pytest.mark.slow
def test_two_processes_stream_their_own_shards_and_end_with_identical_weights(tiny_ckpt, tmp_path):
    """torchrun, 2 CPU processes (gloo) x 2 dataloader workers, buckets: each rank's batches are of
    its own parts (and may be of another bucket than the other rank's); DDP keeps the weights equal."""
    write_shards(tmp_path / "data", 4, 4)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), ROOT / "tests" / "ddp_worker.py", "sft", out, tiny_ckpt,
           tmp_path / "data" / "*.tar", "--max_train_steps", 2, "--train_batch_size", 1,
           "--dataloader_num_workers", 2, "--bucketing", "--bucket_step", 16]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True)["params"] for r in range(2))
    assert r0 and all(torch.equal(x, y) for x, y in zip(r0, r1))
    assert read_metrics(out)[-1]["samples_read"] >= 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sft_process(ckpt, data, out, log: Path, *extra) -> subprocess.Popen:
    """train_sft.py in its own process (to be killed), its stderr in `log`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    argv = ["--config", "configs/sft/tiny.yaml", "--checkpoint", ckpt, "--data", data, "--output_dir", out,
            "--validation_steps", 0, *extra]
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "train_sft.py", *map(str, argv)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=f)


@pytest.mark.slow
def test_sigkill_mid_epoch_and_resume_is_bit_identical(tiny_ckpt, tmp_path):
    write_shards(tmp_path / "data", 4, 6, extra={2: BAD[:1]})
    data = tmp_path / "data" / "*.tar"
    common = ["--max_train_steps", 6, "--checkpointing_steps", 2, "--gradient_accumulation_steps", 2, "--bucketing",
              "--bucket_step", 16, "--dataloader_num_workers", 2, "--shuffle_buffer", 3, "--link_unchanged", "false",
              "--bad_check_after", 10**6]
    a, b = tmp_path / "a", tmp_path / "b"
    log = tmp_path / "log.txt"
    # Both runs in processes of the same settings (one thread: the same float reductions).
    assert _sft_process(tiny_ckpt, data, a, log, *common).wait(timeout=120) == 0, log.read_text()[-3000:]
    proc = _sft_process(tiny_ckpt, data, b, log, *common)
    deadline = time.monotonic() + 120
    while not (b / "checkpoint-2" / "uae_state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b / "final").exists()  # killed mid-run
    resumed = _sft_process(tiny_ckpt, data, b, log, *common, "--resume_from_checkpoint", "latest")
    assert resumed.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert "resumed from" in log.read_text()
    assert timeless(read_metrics(a)) == timeless(read_metrics(b))
    for rel in ("dit_lora/adapter_model.safetensors", "llm/projector.safetensors"):
        x, y = load_file(str(a / "final" / rel)), load_file(str(b / "final" / rel))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), rel
