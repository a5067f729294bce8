"""A character-level tokenizer and a tiny LLaMA sized for it, for training tests (no downloads)."""

from __future__ import annotations

from _study.tiny import SPECIALS, VOCAB, char_tokenizer

__all__ = ["SPECIALS", "VOCAB", "char_llama", "char_tokenizer"]


def char_llama(seed: int = 0, layers: int = 2):
    """`conftest.tiny_llama` with a vocabulary and special tokens matching `char_tokenizer`."""
    from conftest import tiny_llama

    return tiny_llama(
        seed,
        layers,
        vocab_size=len(VOCAB),
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        initializer_range=0.3,  # large enough that the frozen head can express confident predictions
    )
