"""Data loading, the training loop (accumulation, resume, best model), evaluation and the train/eval
CLI, on a tiny LLaMA with a character-level tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch

import denselora as dl
from denselora.errors import ArgumentError, ConfigError, FormatError
from denselora.training import (
    TrainConfig,
    batch_indices,
    build_adapter_model,
    fsdp_auto_wrap_policy,
    latest_checkpoint,
    lr_lambda,
    token_loss_sum,
    train,
)
from denselora.training.data import (
    IGNORE_INDEX,
    Collator,
    Example,
    TokenizedDataset,
    encode_example,
    load_examples,
    packaged_task_path,
    split_examples,
    subsample,
)
from denselora.training.evaluation import dataset_kind, extract_answer, multiple_choice_accuracy, option_scores

from _study import methods as study_methods
from _tiny import char_llama, char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def choice_examples(n: int = 24) -> list[Example]:
    """A learnable multiple-choice task: the prompt's last letter decides the answer."""
    options = [" yes", " no"]
    return [Example(f"Q: {i} {'ab'[i % 2]}", options[i % 2], list(options), i % 2) for i in range(n)]


def quiet(**kw) -> TrainConfig:
    kw.setdefault("progress", False)
    kw.setdefault("plot", False)
    return TrainConfig(**kw)


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.adapter_state().items()}


# -- data ---------------------------------------------------------------------------------------


def write_bigbench(path, examples):
    path.write_text(json.dumps({"canary": "x", "name": "t", "examples": examples}))
    return path


def test_bigbench_task_becomes_multiple_choice(tmp_path):
    path = write_bigbench(tmp_path / "task.json", [{"input": "Sky?", "target_scores": {"green": 0, "blue": 1, "red": 0}}])
    [example] = load_examples(path)
    assert example.options == [" green", " blue", " red"]
    assert example.label == 1 and example.answer == " blue"
    assert "Sky?" in example.prompt and "- green\n- blue\n- red" in example.prompt


def test_alpaca_records_and_jsonl(tmp_path):
    records = [{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Say hi", "output": "hi", "answer": "hi"}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for name in ("a.json", "a.jsonl"):
        first, second = load_examples(tmp_path / name)
        assert "### Input:\n1 2" in first.prompt and first.answer == "3"
        assert "### Input" not in second.prompt and second.meta["answer"] == "hi"


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "invalid JSON"),
        ('{"examples": [{"input": "q", "target_scores": {"a": 1}}]}', "example 0"),
        ('{"examples": [{"input": "q", "target_scores": {"a": 1, "b": 1}}]}', "single best"),
        ('{"examples": [{"target_scores": {"a": 1, "b": 0}}]}', "'input'"),
        ('[{"instruction": "x", "output": "y"}, {"instruction": "x"}]', "example 1 has no string 'output'"),
        ('[{"instruction": 3, "output": "y"}]', "example 0"),
        ('"just a string"', "expected a BIG-bench task"),
        ("[]", "no examples"),
    ],
)
def test_bad_data_files_name_file_and_example(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(FormatError, match=message) as info:
        load_examples(path)
    assert "bad.json" in str(info.value)


def test_missing_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_examples(tmp_path / "nope.json")


def test_label_masking_and_cutoff(tok):
    example = Example("Q: 1?\nA:", " yes")
    masked = encode_example(tok, example, cutoff_len=64)
    prompt_len = len(tok.encode(example.prompt))
    assert masked["input_ids"] == tok.encode(example.prompt) + tok.encode(" yes", add_special_tokens=False) + [tok.eos_token_id]
    assert masked["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert masked["labels"][prompt_len:] == masked["input_ids"][prompt_len:]
    full = encode_example(tok, example, cutoff_len=64, train_on_inputs=True)
    assert full["labels"] == full["input_ids"]
    cut = encode_example(tok, example, cutoff_len=5)
    assert len(cut["input_ids"]) == 5 and set(cut["labels"]) == {IGNORE_INDEX}


def test_collator_pads_right():
    batch = Collator(pad_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_splits_are_disjoint_seeded_and_test_ignores_validation_size():
    examples = [Example(str(i), "a") for i in range(50)]
    a = split_examples(examples, seed=3, validation=5, test=0.2)
    b = split_examples(examples, seed=3, validation=10, test=10)
    prompts = lambda xs: [x.prompt for x in xs]  # noqa: E731
    assert prompts(a.test) == prompts(b.test) and len(a.test) == 10
    assert len(set(prompts(a.train)) | set(prompts(a.validation)) | set(prompts(a.test))) == 50
    assert not set(prompts(a.train)) & set(prompts(a.test))
    assert prompts(split_examples(examples, seed=4, test=10).test) != prompts(a.test)
    with pytest.raises(ArgumentError):
        split_examples(examples, validation=25, test=25)
    assert len(subsample(a.train, 0.1)) == 4


def test_packaged_tasks_carry_the_canary():
    for name in ("strategyqa", "social_iqa"):
        path = packaged_task_path(name)
        task = json.loads(path.read_text())
        assert "canary GUID" in task["canary"]
        assert all(e.is_multiple_choice for e in load_examples(path))
    with pytest.raises(ArgumentError, match="available"):
        packaged_task_path("nope")


def test_batch_order_is_a_seeded_stream_over_epochs():
    seen = [i for step in range(5) for i in batch_indices(10, 4, step, seed=1)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert batch_indices(10, 4, 3, seed=1) == batch_indices(10, 4, 3, seed=1)
    assert seen[:10] != [i for step in range(3) for i in batch_indices(10, 4, step, seed=2)][:10]


def test_schedule_shapes():
    linear, cosine = lr_lambda("linear", 2, 10), lr_lambda("cosine", 2, 10)
    assert linear(0) == pytest.approx(1 / 3) and linear(1) == pytest.approx(2 / 3)
    assert linear(2) == 1.0 and linear(6) == pytest.approx(0.5) and linear(10) == 0.0
    assert cosine(6) == pytest.approx(0.5) and cosine(4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


# -- training -----------------------------------------------------------------------------------


def make_data(tok, n=24, **kw):
    return TokenizedDataset(choice_examples(n), tok, cutoff_len=64, **kw)


def test_loss_decreases_and_outputs_are_written(tok, tmp_path):
    model = build_adapter_model(char_llama(), r=8, alpha=16, dropout=0.0)
    data = make_data(tok)
    result = train(model, tok, data, quiet(lr=3e-2, max_steps=20, micro_batch_size=8, plot=True), val_data=make_data(tok, 6), output_dir=tmp_path)
    first = sum(h["loss"] for h in result.history[:3]) / 3
    last = sum(h["loss"] for h in result.history[-3:]) / 3
    assert last < 0.5 * first
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["steps"] == 20 and len(log["history"]) == 20
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("adapter", "final"):
        assert (tmp_path / name / "adapter.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_gradient_accumulation_equals_a_bigger_batch(tok):
    # Examples of different lengths: the loss is normalised by the global batch's token count, so
    # 4 micro-batches of 2 give the gradient of one batch of 8.
    examples = [Example(f"Q{i}: " + "x" * (i % 5), " a" * (1 + i % 3)) for i in range(16)]
    data = TokenizedDataset(examples, tok, cutoff_len=64)
    runs = []
    for micro, accum in ((8, 1), (2, 4)):
        model = build_adapter_model(char_llama(), r=4, alpha=8, dropout=0.0)
        train(model, tok, data, quiet(lr=1e-2, max_steps=3, micro_batch_size=micro, gradient_accumulation_steps=accum))
        runs.append(adapter_tensors(model))
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["denselora", "lora"])
def test_loss_on_labelled_positions_equals_the_full_vocabulary_loss(tok, method):
    # The loss computes logits only where the next token is labelled; transformers' own loss over
    # the full logits is the reference (mean over labelled tokens), and so are its gradients. The
    # loop trains any adapter-wrapped model: the PEFT LoRA baseline of the benchmarks too.
    examples = [Example(f"Q{i}: " + "x" * (i % 5), " a" * (1 + i % 3)) for i in range(6)]
    batch = Collator(0)([TokenizedDataset(examples, tok, cutoff_len=64)[i] for i in range(6)])
    model = study_methods.build_adapter_model(char_llama(), method, r=4, alpha=8, dropout=0.0)
    loss_sum, count = token_loss_sum(model, batch)
    loss_sum.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    reference = model(**batch).loss
    (reference * count).backward()
    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss_sum / count, reference)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6)


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tok, tmp_path):
    data = make_data(tok)
    val = make_data(tok, 6)
    config = quiet(lr=1e-2, max_steps=6, micro_batch_size=4, save_every=2, eval_every=3, warmup_steps=2, seed=5)

    full = build_adapter_model(char_llama(), r=4, alpha=8, dropout=0.1)  # dropout: the RNG state matters
    train(full, tok, data, config, val_data=val, output_dir=tmp_path / "full")

    class Stop(Exception):
        pass

    def interrupt(step, record):
        if step == 5:
            raise Stop

    first = build_adapter_model(char_llama(), r=4, alpha=8, dropout=0.1)
    with pytest.raises(Stop):
        train(first, tok, data, config, val_data=val, output_dir=tmp_path / "cut", callback=interrupt)
    checkpoint = latest_checkpoint(tmp_path / "cut")
    assert checkpoint.name == "step-4"
    # The adapter is in the checkpoint once, as an adapter directory; the trainer state has the rest.
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    assert set(state) == {
        "step", "optimizer", "scheduler", "scaler", "rng", "history", "evals", "best_loss", "best_step", "global_batch", "seed", "config",
    }
    assert sorted(p.name for p in checkpoint.iterdir()) == ["adapter", "trainer_state.pt"]
    assert set(dl.load_adapter(checkpoint / "adapter")[1]) == set(first.adapter_state())

    base = char_llama()
    torch.manual_seed(9)  # another adapter init: all the state must come from the checkpoint
    resumed = build_adapter_model(base, r=4, alpha=8, dropout=0.1)
    result = train(resumed, tok, data, config, val_data=val, output_dir=tmp_path / "cut", resume_from="latest")
    assert result.steps == 6
    expected = adapter_tensors(full)
    for name, tensor in adapter_tensors(resumed).items():
        assert torch.equal(tensor, expected[name]), name
    assert json.loads((tmp_path / "cut" / "train_log.json").read_text())["evals"] == json.loads((tmp_path / "full" / "train_log.json").read_text())["evals"]


def test_resume_refuses_a_different_batch_or_a_missing_checkpoint(tok, tmp_path):
    data = make_data(tok, 8)
    model = build_adapter_model(char_llama(), r=4, alpha=8)
    train(model, tok, data, quiet(lr=1e-3, max_steps=2, micro_batch_size=2, save_every=1), output_dir=tmp_path)
    with pytest.raises(ConfigError, match="global batch"):
        train(model, tok, data, quiet(lr=1e-3, max_steps=3, micro_batch_size=4), output_dir=tmp_path, resume_from="latest")
    with pytest.raises(FileNotFoundError, match="trainer state"):
        train(model, tok, data, quiet(lr=1e-3, max_steps=3, micro_batch_size=2), resume_from=tmp_path / "adapter")


def test_best_model_is_the_lowest_validation_loss(tok, tmp_path):
    from denselora.io import load_adapter

    model = build_adapter_model(char_llama(), r=8, alpha=16, dropout=0.0)
    snapshots = {}

    def remember(step, record):
        snapshots[step] = adapter_tensors(model)

    # A learning rate far too high makes validation loss go up again after the first steps.
    result = train(
        model, tok, make_data(tok), quiet(lr=0.3, max_steps=8, micro_batch_size=8, eval_every=1, schedule="constant"),
        val_data=make_data(tok, 6), output_dir=tmp_path, callback=remember,
    )
    losses = {e["step"]: e["val_loss"] for e in result.evals}
    best = min(losses, key=losses.get)
    assert result.best_step == best and result.best_val_loss == losses[best]
    _, saved = load_adapter(tmp_path / "adapter")
    for name, tensor in snapshots[best].items():
        assert torch.equal(saved[name], tensor), name


def test_bad_train_configs(tok):
    model = build_adapter_model(char_llama(), r=4, alpha=8)
    for bad in (dict(lr=0), dict(micro_batch_size=0), dict(schedule="step"), dict(precision="fp8"), dict(max_steps=0), dict(epochs=-1.0)):
        with pytest.raises(ConfigError):
            train(model, tok, make_data(tok, 4), quiet(**bad))
    with pytest.raises(ArgumentError, match="no trainable"):
        train(char_llama().requires_grad_(False), tok, make_data(tok, 4), quiet())


def test_fsdp_policy_keeps_shared_factors_in_the_root_unit(tok):
    model = build_adapter_model(char_llama(layers=3), r=4, alpha=8)
    policy = fsdp_auto_wrap_policy(model)
    shared = model.base_model.denselora_shared
    wrapped = [m for m in model.modules() if policy(module=m, recurse=False, nonwrapped_numel=0)]
    assert [type(m).__name__ for m in wrapped] == ["LlamaDecoderLayer"] * 3
    inside_shared = {id(m) for m in shared.modules()}
    assert not any(id(m) in inside_shared for m in wrapped)
    # Every shared tensor is outside all block units; every M is inside exactly one.
    in_blocks = [{id(p) for p in m.parameters()} for m in wrapped]
    for name, tensor in model.adapter_state().items():
        owners = sum(id(tensor) in ids for ids in in_blocks)
        assert owners == (0 if name.startswith("shared.") else 1), name
    assert not policy(module=shared, recurse=True, nonwrapped_numel=0) and policy(module=model, recurse=True, nonwrapped_numel=0)
    with pytest.raises(ArgumentError):
        fsdp_auto_wrap_policy(char_llama())


# -- evaluation ---------------------------------------------------------------------------------


def test_option_scores_match_a_direct_computation(tok):
    model = char_llama()
    examples = [Example("Q: 3?\nA:", " odd", [" even", " odd", " no"], 1), Example("Q: 12?\nA:", " even", [" even", " odd", " no"], 0)]
    scores = option_scores(model, tok, examples, batch_size=2)
    for example, row in zip(examples, scores):
        prompt = tok.encode(example.prompt)
        for option, score in zip(example.options, row):
            ids = prompt + tok.encode(option, add_special_tokens=False)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            expected = sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt), len(ids)))
            assert score == pytest.approx(expected, abs=1e-4)
    # Single-token options take the one-pass path; it must agree with the general one.
    single = [Example("Q: 5?\nA: ", "y", ["y", "n"], 0), Example("Q: 55?\nA: ", "n", ["y", "n"], 1)]
    fast = option_scores(model, tok, single, batch_size=2)
    for example, row in zip(single, fast):
        ids = tok.encode(example.prompt)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
        assert row == pytest.approx([float(logp[tok.encode(o, add_special_tokens=False)[0]]) for o in example.options], abs=1e-4)


def test_training_raises_multiple_choice_accuracy(tok):
    examples = choice_examples(40)
    model = build_adapter_model(char_llama(), r=8, alpha=16, dropout=0.0)
    assert multiple_choice_accuracy(model, tok, examples).accuracy < 0.6
    # The default configuration steps like LoRA, so it trains at LoRA-like learning rates.
    train(model, tok, TokenizedDataset(examples, tok), quiet(lr=3e-3, max_steps=40, micro_batch_size=8))
    assert multiple_choice_accuracy(model, tok, examples).accuracy == 1.0


def test_answer_extraction_formats():
    assert extract_answer("boolq", "the correct answer is True") == "true"
    assert extract_answer("piqa", "solution2 because") == "solution2"
    assert extract_answer("hellaswag", "ending4") == "ending4"
    assert extract_answer("winogrande", "no idea") is None
    assert dataset_kind("data/ARC-Easy/test.json") == "ARC-Easy"
    assert dataset_kind("x/social_i_qa/test.json") == "social_i_qa"
    with pytest.raises(ArgumentError):
        dataset_kind("mystery.json")


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("model")
    char_llama().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_cli_train_then_eval(model_dir, tmp_path, capsys):
    from denselora.cli import main

    task = write_bigbench(
        tmp_path / "task.json",
        [{"input": f"{i} is?", "target_scores": {"even": int(i % 2 == 0), "odd": int(i % 2 == 1)}} for i in range(40)],
    )
    out = tmp_path / "run"
    args = ["--model", str(model_dir), "--data", str(task), "--test-size", "8", "--val-size", "4"]
    assert main(["train", *args, "--output", str(out), "--steps", "30", "--lr", "2e-2", "--r", "8", "--micro-batch-size", "8", "--no-progress", "--save-every", "10"]) == 0
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed and "28 train, 4 validation, 8 test" in printed
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "checkpoints").is_dir()
    report = tmp_path / "eval.json"
    assert main(["eval", *args, "--adapter", str(out / "adapter"), "--output", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["examples"] == 8 and result["split"] == "test"
    # The same adapter through the Python API gives the same answers.
    from denselora.cli.train import attach_adapter
    from denselora.pretrained import load_model

    base, tokenizer = load_model(str(model_dir))
    splits = split_examples(load_examples(task), seed=0, validation=4, test=8)
    direct = multiple_choice_accuracy(attach_adapter(base, str(out / "adapter")), tokenizer, splits.test)
    assert result["predictions"] == direct.predictions and result["accuracy"] == direct.accuracy
    assert main(["eval", *args]) == 0  # the base model alone


def test_cli_train_a_tenant_on_a_frozen_basis(model_dir, tmp_path, capsys):
    from denselora.cli import main
    from denselora.io import basis
    from denselora.io.adapter import load_adapter

    task = write_bigbench(
        tmp_path / "task.json",
        [{"input": f"{i} is?", "target_scores": {"even": int(i % 2 == 0), "odd": int(i % 2 == 1)}} for i in range(24)],
    )
    args = ["--model", str(model_dir), "--data", str(task), "--test-size", "4", "--val-size", "4"]
    train = ["--steps", "3", "--lr", "2e-2", "--r", "4", "--micro-batch-size", "4", "--no-progress"]
    assert main(["train", *args, "--output", str(tmp_path / "basis"), *train]) == 0
    basis_dir = tmp_path / "basis" / "adapter"
    assert main(["train", *args, "--output", str(tmp_path / "tenant"), "--basis", str(basis_dir), *train]) == 0
    printed = capsys.readouterr().out
    config, tensors = load_adapter(tmp_path / "tenant" / "adapter")
    assert basis.is_tenant(config) and all(name.endswith(".m") for name in tensors)
    assert f"denselora: {sum(t.numel() for t in tensors.values()):,d} trainable parameters" in printed
    assert config["basis"]["fingerprint"] == basis.fingerprint(*load_adapter(basis_dir))
    report = tmp_path / "eval.json"
    assert main(["eval", *args, "--adapter", str(tmp_path / "tenant" / "adapter"), "--basis", str(basis_dir), "--output", str(report)]) == 0
    assert json.loads(report.read_text())["examples"] == 4


def test_cli_errors_are_one_line(model_dir, tmp_path, capsys):
    from denselora.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "x"}]')
    assert main(["train", "--model", str(model_dir), "--data", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "bad.json: example 0" in capsys.readouterr().err
    assert main(["train", "--model", str(tmp_path / "none"), "--data", str(bad), "--output", str(tmp_path / "o"), "--lr", "-1"]) == 2
    assert "lr must be" in capsys.readouterr().err
    task = write_bigbench(tmp_path / "t.json", [{"input": "q", "target_scores": {"a": 1, "b": 0}}] * 10)
    assert main(["eval", "--model", str(tmp_path / "none"), "--data", str(task)]) == 2
    assert "no such model folder" in capsys.readouterr().err


def test_demo_pipeline_end_to_end_on_a_tiny_model(model_dir, tmp_path):
    import io

    from denselora.demo import run

    out = io.StringIO()
    summary = run(task="strategyqa", output=tmp_path / "demo", steps=2, batch_size=4, test_size=12, model=str(model_dir), out=out)
    text = out.getvalue()
    assert "[7/7]" in text and "the same answers as before saving" in text
    assert summary["test_examples"] == 12 and 0 <= summary["accuracy_after"] <= 1
    assert (tmp_path / "demo" / "adapter" / "adapter.safetensors").is_file()
    assert (tmp_path / "demo" / "run" / "loss_curve.png").is_file()


def test_generation_matches_a_manual_greedy_loop_and_scores_answers(tok):
    from denselora.training.evaluation import generate, generation_accuracy

    model = char_llama()
    prompts = ["Q: 1", "Question: longer 22"]  # different lengths: left padding must not change the result
    texts = generate(model, tok, prompts, max_new_tokens=5, batch_size=2)
    for prompt, text in zip(prompts, texts):
        ids = tok.encode(prompt)
        new = []
        with torch.no_grad():
            for _ in range(5):
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        assert text == tok.decode(new, skip_special_tokens=True)
    examples = [Example(p, "x", meta={"answer": "true"}) for p in prompts]
    result = generation_accuracy(model, tok, examples, "boolq", max_new_tokens=5)
    expected = sum(extract_answer("boolq", t) == "true" for t in texts)
    assert result.correct == expected and result.outputs == texts
    with pytest.raises(ArgumentError, match="answer"):
        generation_accuracy(model, tok, [Example("q", "a")], "boolq")


def test_one_default_learning_rate_everywhere():
    """The Python API, `denselora train` and the demo share one default rate per preset."""
    import denselora.optim as optim
    from denselora.cli import build_parser
    from denselora.demo import DEFAULTS
    from denselora.training import TrainConfig

    assert TrainConfig().lr == optim.DEFAULT_LR == DEFAULTS["lr"] == optim.PRESET_LRS["default"]
    assert optim.PRESET_LRS["paper"] == optim.PAPER_LR > optim.DEFAULT_LR
    args = build_parser("train").parse_args(["train", "--model", "m", "--data", "d", "--output", "o"])
    assert args.lr is None  # resolved from the preset when the run starts
