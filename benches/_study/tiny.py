"""A character-level tokenizer built offline (no downloads), for tiny random models in the tests
and in the benchmarks that train through the command line."""

from __future__ import annotations

import string

SPECIALS = ["<pad>", "</s>", "<unk>"]
VOCAB = SPECIALS + list(string.printable)


def char_tokenizer():
    """A fast tokenizer with one token per printable character; ``<pad>`` is 0, ``</s>`` 1."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
