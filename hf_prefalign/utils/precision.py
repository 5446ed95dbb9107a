"""Which precision the frozen base runs in: bf16 where the hardware computes it natively, fp32 elsewhere.

A frozen base in bf16 makes CLaP's forward + backward ~1.7x and encoding ~3x faster on CPUs with AVX512-BF16/AMX
(measured on SmolLM2-135M, 2 cores); without native support bf16 is emulated and slower than fp32. The latent
modules and every log-density stay in fp32 whatever the base's dtype.
"""

from __future__ import annotations

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """True when `device` computes bf16 matrix products natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device = "cpu") -> torch.dtype | None:
    """`"auto"` -> bf16 where supported, else fp32; bf16 where it is not supported -> fp32 with a warning.

    Strings name torch dtypes (`"bfloat16"`, `"float32"`, ...); `None` stays `None` (the checkpoint's own dtype).
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype == "auto":
            return torch.bfloat16 if bf16_supported(device) else torch.float32
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"Unknown dtype {dtype!r}; use 'auto', 'bfloat16', 'float16' or 'float32'.")
        dtype = resolved
    if dtype == torch.bfloat16 and not bf16_supported(device):
        logger.warning(
            f"bf16 was requested but this {torch.device(device).type} has no native bf16 support (it would be "
            "emulated, slower than fp32): falling back to float32."
        )
        return torch.float32
    return dtype


__all__ = ["bf16_supported", "resolve_dtype"]
