"""A character-level tokenizer and a tiny LLaMA sized for it, for training tests (no downloads)."""

from __future__ import annotations

import string

SPECIALS = ["<pad>", "</s>", "<unk>"]
VOCAB = SPECIALS + list(string.printable)


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


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
