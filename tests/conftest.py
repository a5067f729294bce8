"""Shared fixtures: tiny models built from configs (no downloads), seeded."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0, layers: int = 2, **config_overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    config = transformers.LlamaConfig(**{**settings, **config_overrides})
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, num_labels=3
    )
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def tokens():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (2, 7), generator=generator)


def randomize_adapter(model, std: float = 0.2, seed: int = 3) -> None:
    """Give every adapter tensor non-zero values (the decoder starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.adapter_state().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
