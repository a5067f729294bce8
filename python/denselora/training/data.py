"""Training and evaluation data: instruction files in the Alpaca / LLM-Adapters JSON format
(``instruction``, ``input``, ``output``) and BIG-bench ``task.json`` files (multiple choice through
``target_scores``), prompt templates, tokenisation with label masking, seeded splits and padding.

Prompt and answer are tokenised separately and concatenated, so the prompt's tokens are the same in
training and in scoring, and the label mask falls exactly on the prompt/answer boundary.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch

from ..errors import ArgumentError, FormatError
from ..io.sources import PathLike

IGNORE_INDEX = -100
# BIG-bench slices shipped inside the package (see ``denselora/tasks/README.md``).
_TASKS = Path(__file__).resolve().parent.parent / "tasks" / "bigbench"

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# Short on purpose: on a CPU every prompt token is paid for in training and in scoring.
CHOICE_PROMPT = "Question: {question}\nOptions:\n{options}\nAnswer:"


@dataclass
class Example:
    """One prompt and its reference answer. Multiple-choice examples also carry their ``options``
    and the index of the right one; ``answer`` is then that option's text."""

    prompt: str
    answer: str
    options: Optional[list[str]] = None
    label: Optional[int] = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_multiple_choice(self) -> bool:
        return self.options is not None and self.label is not None


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text and input_text.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def choice_prompt(question: str, options: Sequence[str]) -> str:
    listed = "\n".join(f"- {option}" for option in options)
    return CHOICE_PROMPT.format(question=question.strip(), options=listed)


# -- loading ----------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not UTF-8 text ({exc})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc


def load_examples(path: PathLike) -> list[Example]:
    """Examples from ``path``: a BIG-bench ``task.json`` (an object with ``examples``) or an
    Alpaca / LLM-Adapters file (a list of objects, or JSON lines)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise FormatError(f"{path}: invalid JSON on line {number}: {exc.msg}") from exc
        return parse_instruction_records(records, str(path))
    data = _read_json(path)
    if isinstance(data, dict) and "examples" in data:
        return parse_bigbench_task(data, str(path))
    if isinstance(data, list):
        return parse_instruction_records(data, str(path))
    raise FormatError(f"{path}: expected a BIG-bench task (an object with 'examples') or a list of instruction records")


def parse_instruction_records(records: Iterable[Any], source: str = "data") -> list[Example]:
    """Alpaca / LLM-Adapters records: ``instruction`` (required), ``input`` (optional), ``output``
    (required). LLM-Adapters test files also have ``answer`` (the bare answer, kept in ``meta``)."""
    examples = []
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise FormatError(f"{source}: example {i} is a {type(record).__name__}, not an object")
        instruction = record.get("instruction")
        output = record.get("output", record.get("answer"))
        if not isinstance(instruction, str):
            raise FormatError(f"{source}: example {i} has no string 'instruction'")
        if not isinstance(output, str):
            raise FormatError(f"{source}: example {i} has no string 'output'")
        input_text = record.get("input") or ""
        if not isinstance(input_text, str):
            raise FormatError(f"{source}: example {i} has a non-string 'input'")
        meta = {"index": i}
        if isinstance(record.get("answer"), str):
            meta["answer"] = record["answer"]
        examples.append(Example(alpaca_prompt(instruction, input_text), output, meta=meta))
    if not examples:
        raise FormatError(f"{source}: no examples")
    return examples


def parse_bigbench_task(task: Mapping[str, Any], source: str = "task.json") -> list[Example]:
    """Multiple-choice examples of a BIG-bench task: each ``target_scores`` option becomes an
    option, and the best-scored one the answer."""
    raw = task.get("examples")
    if not isinstance(raw, list):
        raise FormatError(f"{source}: 'examples' is not a list")
    examples = []
    for i, record in enumerate(raw):
        if not isinstance(record, Mapping):
            raise FormatError(f"{source}: example {i} is a {type(record).__name__}, not an object")
        question = record.get("input")
        scores = record.get("target_scores")
        if not isinstance(question, str):
            raise FormatError(f"{source}: example {i} has no string 'input'")
        if not isinstance(scores, Mapping) or len(scores) < 2:
            raise FormatError(f"{source}: example {i} has no 'target_scores' with at least two options")
        options = [str(option) for option in scores]
        values = list(scores.values())
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise FormatError(f"{source}: example {i} has non-numeric target_scores")
        best = max(values)
        if values.count(best) != 1:
            raise FormatError(f"{source}: example {i} has no single best option in target_scores")
        label = values.index(best)
        examples.append(
            Example(choice_prompt(question, options), " " + options[label], [" " + o for o in options], label, {"index": i})
        )
    if not examples:
        raise FormatError(f"{source}: no examples")
    return examples


# -- splits -----------------------------------------------------------------------------------


def _count(size: Union[int, float], total: int, name: str) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size < 0:
        raise ArgumentError(f"{name} must be a non-negative count or fraction, got {size!r}")
    if isinstance(size, float) and size < 1:
        return int(round(size * total))
    if float(size) != int(size):
        raise ArgumentError(f"{name} must be a whole count or a fraction below 1, got {size!r}")
    return int(size)


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]


def split_examples(
    examples: Sequence[Example],
    *,
    seed: int = 0,
    validation: Union[int, float] = 0.1,
    test: Union[int, float] = 0.2,
) -> Splits:
    """Disjoint train/validation/test splits from one seeded shuffle. Sizes are counts or fractions;
    the test split is taken first, so it depends only on the seed and its size, never on
    ``validation``."""
    total = len(examples)
    n_test = _count(test, total, "test")
    n_val = _count(validation, total, "validation")
    if n_test + n_val >= total:
        raise ArgumentError(f"test ({n_test}) + validation ({n_val}) leave no training examples out of {total}")
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return Splits(
        train=[examples[i] for i in order[n_test + n_val :]],
        validation=[examples[i] for i in order[n_test : n_test + n_val]],
        test=[examples[i] for i in order[:n_test]],
    )


def subsample(examples: Sequence[Example], fraction: float, *, seed: int = 0) -> list[Example]:
    """A seeded ``fraction`` of ``examples`` (at least one)."""
    if not 0 < fraction <= 1:
        raise ArgumentError(f"fraction must be in (0, 1], got {fraction!r}")
    order = list(range(len(examples)))
    random.Random(seed + 7919).shuffle(order)
    keep = max(1, int(round(fraction * len(examples))))
    return [examples[i] for i in sorted(order[:keep])]


# -- tokenisation -----------------------------------------------------------------------------


def encode_text(tokenizer: Any, text: str, *, special: bool = False) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def encode_example(
    tokenizer: Any, example: Example, *, cutoff_len: int = 256, train_on_inputs: bool = False, add_eos: bool = True
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` for causal-LM training: prompt + answer (+ EOS), cut to
    ``cutoff_len``; with ``train_on_inputs=False`` the prompt's labels are ``-100``."""
    if cutoff_len < 2:
        raise ArgumentError(f"cutoff_len must be at least 2, got {cutoff_len}")
    prompt_ids = encode_text(tokenizer, example.prompt, special=True)
    answer_ids = encode_text(tokenizer, example.answer)
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None:
        answer_ids = answer_ids + [int(eos)]
    ids = (prompt_ids + answer_ids)[:cutoff_len]
    labels = list(ids)
    if not train_on_inputs:
        masked = min(len(prompt_ids), len(ids))
        labels[:masked] = [IGNORE_INDEX] * masked
    return {"input_ids": ids, "labels": labels}


class TokenizedDataset(torch.utils.data.Dataset):
    """Examples tokenised once, up front."""

    def __init__(
        self, examples: Sequence[Example], tokenizer: Any, *, cutoff_len: int = 256, train_on_inputs: bool = False
    ) -> None:
        self.examples = list(examples)
        self.items = [
            encode_example(tokenizer, e, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs) for e in self.examples
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]

    def label_tokens(self, index: int) -> int:
        """Tokens of item ``index`` that count towards the loss (labels are shifted by one)."""
        return sum(1 for label in self.items[index]["labels"][1:] if label != IGNORE_INDEX)


def pad_id_of(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad) if pad is not None else 0


class Collator:
    """Right-pads ``input_ids`` (with the pad id), ``labels`` (with -100) and builds
    ``attention_mask``."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[Mapping[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(item["labels"], dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# -- the packaged demo task -------------------------------------------------------------------


def packaged_task_path(name: str = "social_iqa") -> Path:
    """A slice of a BIG-bench task shipped inside the package (see ``denselora/tasks/README.md``)."""
    path = _TASKS / name / "task.json"
    if not path.is_file():
        available = sorted(p.name for p in _TASKS.glob("*") if p.is_dir())
        raise ArgumentError(f"no packaged task {name!r}; available: {available}")
    return path


__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "CHOICE_PROMPT",
    "IGNORE_INDEX",
    "Collator",
    "Example",
    "Splits",
    "TokenizedDataset",
    "alpaca_prompt",
    "choice_prompt",
    "encode_example",
    "encode_text",
    "load_examples",
    "packaged_task_path",
    "pad_id_of",
    "parse_bigbench_task",
    "parse_instruction_records",
    "split_examples",
    "subsample",
]
