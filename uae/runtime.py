"""Device, dtype and attention backend: chosen automatically, overridable by the user; the dtype
weights are stored in."""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

import torch

from uae.errors import UAEError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UAEError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UAEError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU, unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UAEError(f"--dtype {dtype!r} is not supported: use auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def attention_backend(device: torch.device, requested: str | None = None) -> str:
    """flash_attention_2 only when flash-attn is installed and the GPU supports it (Ampere+);
    otherwise PyTorch's sdpa."""
    if requested not in (None, "auto"):
        return requested
    if (device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
            and torch.cuda.get_device_capability(device)[0] >= 8):
        return "flash_attention_2"
    return "sdpa"


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None on other C libraries."""
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand memory that Python/torch have freed back to the OS (glibc `malloc_trim`; a no-op on
    other C libraries). Long CPU loops of large, short-lived activations otherwise fragment
    glibc's heap so that resident memory creeps up with the number of batches (the measurements,
    with and without a trim per batch: bench/RESULTS.md, "Score_i2i")."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def stored_dtype(folder: str | Path) -> torch.dtype | None:
    """The floating dtype of the first tensor stored in a folder's safetensors (None: none found)."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                t = h.get_slice(key)
                dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(t.get_dtype())
                if dtype is not None:
                    return dtype
    return None
