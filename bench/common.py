"""What every benchmark script shares: the machine's description, peak memory, the JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    """CPU model, cores, torch and threads, and the GPU when one is used."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        desc = f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB), " + desc
    return desc


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> dict:
    """Peak GPU memory allocated by torch (when a GPU is used) and the process's peak RSS, in MB.
    Each benchmark runs in its own process under bench/run_all.py, so the RSS peak is its own."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def write_json(path: str | os.PathLike | None, result: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def sync() -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
