"""Evaluation: multiple-choice accuracy by the log-likelihood of each option given the prompt, and
generation with answer extraction in the LLM-Adapters style for their commonsense test files."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ArgumentError
from .data import Example, encode_text, pad_id_of


@dataclass
class ChoiceResult:
    accuracy: float
    correct: int
    total: int
    predictions: list[int] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


@torch.no_grad()
def option_scores(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    normalize: bool = False,
    cutoff_len: int = 512,
) -> list[list[float]]:
    """For each example, the log-probability of each option's tokens after the prompt (summed, or
    averaged per token with ``normalize``). Options are tokenised on their own, as in training.

    When every option of every example is a single token, one forward pass per prompt is enough
    (the scores are read from the last prompt position); otherwise each prompt+option sequence is
    scored, in length-sorted batches."""
    for i, example in enumerate(examples):
        if not example.options:
            raise ArgumentError(f"example {i} has no options (not a multiple-choice example)")
    was_training = model.training
    model.eval()
    device = model_device(model)
    pad = pad_id_of(tokenizer)
    prompts = [encode_text(tokenizer, e.prompt, special=True) for e in examples]
    options = [[encode_text(tokenizer, o) for o in e.options or []] for e in examples]
    for i, opts in enumerate(options):
        for j, ids in enumerate(opts):
            if not ids:
                raise ArgumentError(f"example {i}: option {j} encodes to no tokens")
    scores: list[list[float]] = [[0.0] * len(o) for o in options]

    if all(len(ids) == 1 for opts in options for ids in opts):
        order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            seqs = [prompts[i][-cutoff_len:] for i in rows]
            logits = _forward(model, seqs, pad, device)
            last = torch.tensor([len(s) - 1 for s in seqs], device=device)
            logp = F.log_softmax(logits[torch.arange(len(rows), device=device), last].float(), dim=-1)
            for r, i in enumerate(rows):
                scores[i] = [float(logp[r, ids[0]]) for ids in options[i]]
    else:
        # The prompt runs once; its key/value cache is shared by all of its options.
        order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            for i, row in zip(rows, _score_with_shared_prompt(model, [prompts[i][-cutoff_len:] for i in rows], [options[i] for i in rows], pad, device)):
                scores[i] = [total / (len(opt) if normalize else 1) for total, opt in zip(row, options[i])]
    model.train(was_training)
    return scores


def _right_padded(seqs: Sequence[Sequence[int]], width: int, pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded to ``width`` with ``pad``, and the attention mask, on ``device``."""
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _score_with_shared_prompt(
    model: nn.Module, prompts: list[list[int]], options: list[list[list[int]]], pad: int, device: torch.device
) -> list[list[float]]:
    """Summed log-probabilities of each option after its prompt: one pass over the (right-padded)
    prompts with a cache, then one pass over all options, each reading its prompt's cache rows."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    ids, mask = _right_padded(prompts, width, pad, device)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    first = F.log_softmax(out.logits[torch.arange(len(prompts), device=device), lengths - 1].float(), dim=-1)
    owner = [r for r, opts in enumerate(options) for _ in opts]
    flat = [opt for opts in options for opt in opts]
    span = max(len(o) for o in flat)
    opt_ids, opt_mask = _right_padded(flat, span, pad, device)
    index = torch.tensor(owner, device=device)
    cache_arg = _cache_argument(model)
    cache = getattr(out, cache_arg)
    cache.batch_select_indices(index)
    positions = lengths[index][:, None] + torch.arange(span, device=device)[None, :]
    logits = model(
        input_ids=opt_ids,
        attention_mask=torch.cat([mask[index], opt_mask], dim=1),
        position_ids=positions,
        use_cache=False,
        **{cache_arg: cache},
    ).logits
    logp = F.log_softmax(logits.float(), dim=-1)
    totals: list[list[float]] = [[] for _ in prompts]
    for k, opt in enumerate(flat):
        r = owner[k]
        total = first[r, opt[0]]
        if len(opt) > 1:
            targets = opt_ids[k, 1 : len(opt)]
            total = total + logp[k, : len(opt) - 1].gather(1, targets[:, None]).sum()
        totals[r].append(float(total))
    return totals


def _cache_argument(model: nn.Module) -> str:
    """The name transformers uses for the key/value cache: ``cache`` in recent releases,
    ``past_key_values`` before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        names = inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in names else "past_key_values"


def _forward(model: nn.Module, seqs: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits


def multiple_choice_accuracy(
    model: nn.Module, tokenizer: Any, examples: Sequence[Example], *, batch_size: int = 16, normalize: bool = False
) -> ChoiceResult:
    """Accuracy of picking the highest-scored option (see `option_scores`)."""
    if not examples:
        raise ArgumentError("no examples to evaluate")
    for i, example in enumerate(examples):
        if not example.is_multiple_choice:
            raise ArgumentError(f"example {i} is not multiple choice (no options and label)")
    scores = option_scores(model, tokenizer, examples, batch_size=batch_size, normalize=normalize)
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    correct = sum(int(p == e.label) for p, e in zip(predictions, examples))
    return ChoiceResult(correct / len(examples), correct, len(examples), predictions, scores)


# -- generation and answer extraction (LLM-Adapters commonsense test files) ---------------------

# What each dataset's answers look like in LLM-Adapters' commonsense data.
ANSWER_PATTERNS: dict[str, str] = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3",
    "siqa": r"answer1|answer2|answer3",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}


def dataset_kind(name: str) -> str:
    """The answer format for a dataset name or file path (``.../boolq/test.json`` -> ``boolq``)."""
    lowered = name.lower()
    for key in sorted(ANSWER_PATTERNS, key=len, reverse=True):
        if key.lower() in lowered:
            return key
    if "obqa" in lowered:
        return "openbookqa"
    if "arc" in lowered:
        return "ARC-Challenge"
    raise ArgumentError(f"cannot tell the answer format of {name!r}; pass one of {sorted(ANSWER_PATTERNS)}")


def extract_answer(kind: str, text: str) -> Optional[str]:
    """The first answer token of ``kind``'s format in generated ``text`` (None when absent)."""
    if kind not in ANSWER_PATTERNS:
        raise ArgumentError(f"unknown answer format {kind!r}; known: {sorted(ANSWER_PATTERNS)}")
    found = re.findall(ANSWER_PATTERNS[kind], text.strip().lower() if kind == "boolq" else text.strip())
    return found[0] if found else None


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 8
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without the prompt."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    pad = pad_id_of(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_text(tokenizer, p, special=True) for p in prompts[start : start + batch_size]]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for r, e in enumerate(encoded):
            ids[r, width - len(e) :] = torch.tensor(e, dtype=torch.long)
            mask[r, width - len(e) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for row in out[:, width:].tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return outputs


@dataclass
class GenerationResult:
    accuracy: float
    correct: int
    total: int
    outputs: list[str]
    extracted: list[Optional[str]]


def generation_accuracy(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    kind: str,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> GenerationResult:
    """LLM-Adapters style: generate, extract the first answer token of the dataset's format, and
    compare it with the example's ``answer`` (``meta['answer']``)."""
    if not examples:
        raise ArgumentError("no examples to evaluate")
    references = []
    for i, example in enumerate(examples):
        answer = example.meta.get("answer")
        if not isinstance(answer, str):
            raise ArgumentError(f"example {i} has no 'answer' field (LLM-Adapters test files carry one)")
        references.append(answer.strip())
    outputs = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens, batch_size=batch_size)
    extracted = [extract_answer(kind, text) for text in outputs]
    correct = sum(int(x is not None and x == ref) for x, ref in zip(extracted, references))
    return GenerationResult(correct / len(examples), correct, len(examples), outputs, extracted)


__all__ = [
    "ANSWER_PATTERNS",
    "ChoiceResult",
    "GenerationResult",
    "dataset_kind",
    "extract_answer",
    "generate",
    "generation_accuracy",
    "model_device",
    "multiple_choice_accuracy",
    "option_scores",
]
