"""Training-step measurements shared by the benchmarks: random LLaMA-shaped models built without a
download, adapter variants that share one frozen base, and CUDA's synchronised step peak."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn

from _study.methods import build_adapter_model

# Decoder-layer shapes of the published models (the vocabulary is set per use: a small one keeps the
# head from dominating a stack of layers).
LLAMA2_7B: dict[str, Any] = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32}
LLAMA3_8B: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}


def random_llama(layers: int, *, device: Any = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, **config: Any) -> nn.Module:
    """A ``LlamaForCausalLM`` of ``layers`` decoder layers with ``config``'s sizes, its weights drawn
    from N(0, 0.02) (norms 1) directly on ``device`` in ``dtype``: billions of parameters take no
    host memory and no per-module initialisation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {"max_position_embeddings": 4096, **config, "num_hidden_layers": layers}
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**settings))
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    # The rotary frequencies are a buffer computed at construction (left empty on the meta device),
    # kept in float32 as a loaded model keeps them.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(model.config).to(device)
    return model.eval()


def share_base(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are the original tensors (no new memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def make_variant(base: nn.Module, variant: str, *, r: int = 16, dropout: float = 0.05) -> nn.Module:
    """``"peft-lora"`` or ``"<preset>-<branch path>"`` (e.g. ``"paper-efficient"``) on a copy of
    ``base`` that shares its frozen weights, in training mode; alpha = 2r for every method."""
    model = share_base(base)
    if variant == "peft-lora":
        wrapped = build_adapter_model(model, "lora", r=r, alpha=2 * r, dropout=dropout)
    else:
        preset, path = variant.split("-", 1)
        wrapped = build_adapter_model(model, "denselora", r=r, alpha=2 * r, dropout=dropout, preset=preset)
        wrapped.set_branch_path(path)
    wrapped.train()
    return wrapped


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_step(model: nn.Module, tokens: torch.Tensor, autocast: bool) -> Callable[[], None]:
    """One training step of ``model`` on ``tokens`` (language-model loss on the tokens themselves):
    forward under bf16 autocast when asked, backward, AdamW step, ``zero_grad``."""
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)
    device_type = tokens.device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_step_peak(step: Callable[[], None], device: torch.device) -> tuple[int, int]:
    """(peak bytes allocated during ``step``, that peak above the bytes allocated before it): the
    peak counter is reset for this step alone."""
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak, peak - before
