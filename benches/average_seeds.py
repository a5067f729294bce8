"""Averaging and truncating real runs: SmolLM2-135M-Instruct + DenseLoRA on BIG-bench social_iqa.

Five short runs are trained: three from one initial adapter with different data orders (same
init), and two more from other initial adapters and data orders, which with the first make three
different-seed runs. Reported: multiple-choice accuracy on a held-out split of the base model, of
each run, of the `linear` soup of the same-init runs, of the `aligned` (and, for contrast, the
`linear`) average of the different-seed runs, and of one run truncated from r=32 to 16 and 8.

Usage: python benches/average_seeds.py [--steps 25] [--test 100]   (writes benches/results/average_seeds.json)
Runs on CUDA when available; on a small shared CPU it takes hours.
The task file defaults to /work/shared/data/bigbench/social_iqa/task.json (--task to change).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import denselora as dl
from denselora.models import load_model
from denselora.optim import create_optimizer

HERE = Path(__file__).resolve().parent
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_task(path: Path, n_test: int, seed: int = 0):
    examples = []
    for record in json.loads(path.read_text())["examples"]:
        options = list(record["target_scores"])
        label = max(range(len(options)), key=lambda i: record["target_scores"][options[i]])
        prompt = f"Question: {record['input'].strip()}\nAnswer:"
        examples.append((prompt, [" " + o for o in options], label))
    random.Random(seed).shuffle(examples)
    return examples[n_test:], examples[:n_test]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


@functools.lru_cache(maxsize=1)
def _pristine():
    return load_model()


def fresh_model():
    """(a fresh copy of the base model, tokenizer): loaded once, copied for every run."""
    base, tokenizer = _pristine()
    return copy.deepcopy(base).to(DEVICE), tokenizer


def causal_lm(model):
    """The transformers causal LM inside a DenseLoRA wrapper (adapted in place) or itself."""
    return model.get_base_model() if isinstance(model, dl.DenseLoRAModel) else model


def train_run(init_seed: int, data_seed: int, train, args, out: Path) -> Path:
    if (out / "adapter.safetensors").is_file():
        return out
    base, tokenizer = fresh_model()
    torch.manual_seed(init_seed)
    config = dl.DenseLoRAConfig(r=args.r, alpha=2.0 * args.r, dropout=0.05)
    model = dl.get_denselora_model(base, config)
    model.train()
    optimizer = create_optimizer(model, lr=args.lr)
    order = random.Random(data_seed)
    pad = tokenizer.pad_token_id
    for step in range(args.steps):
        batch = order.sample(train, args.batch)
        seqs, labels = [], []
        for prompt, options, label in batch:
            p, a = encode(tokenizer, prompt), encode(tokenizer, options[label]) + [tokenizer.eos_token_id]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        ids, mask = (t.to(DEVICE) for t in padded(seqs, pad))
        hidden = causal_lm(model).model(input_ids=ids, attention_mask=mask).last_hidden_state
        rows, cols, targets = [], [], []
        for i, lab in enumerate(labels):
            for t in range(1, len(lab)):
                if lab[t] != -100:
                    rows.append(i), cols.append(t - 1), targets.append(lab[t])
        logits = causal_lm(model).lm_head(hidden[rows, cols])
        loss = F.cross_entropy(logits.float(), torch.tensor(targets, device=DEVICE))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  init {init_seed} data {data_seed} step {step:3d} loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)
    return out


@torch.no_grad()
def accuracy(model, tokenizer, test, batch: int = 32) -> float:
    """Multiple-choice accuracy: the option with the highest total log-probability wins."""
    model.eval()
    pad = tokenizer.pad_token_id
    items = []  # (example index, option index, prompt length, sequence)
    for e, (prompt, options, _) in enumerate(test):
        p = encode(tokenizer, prompt)
        for o, option in enumerate(options):
            items.append((e, o, len(p), p + encode(tokenizer, option)))
    scores = [[0.0] * len(ex[1]) for ex in test]
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        ids, mask = (t.to(DEVICE) for t in padded([s for *_, s in chunk], pad))
        hidden = causal_lm(model).model(input_ids=ids, attention_mask=mask).last_hidden_state
        for row, (e, o, plen, seq) in enumerate(chunk):
            # Only the positions that predict the option's tokens go through the vocabulary head.
            logp = F.log_softmax(causal_lm(model).lm_head(hidden[row, plen - 1 : len(seq) - 1]).float(), dim=-1)
            targets = torch.tensor(seq[plen:], device=DEVICE)
            scores[e][o] = float(logp.gather(1, targets[:, None]).sum())
    right = sum(max(range(len(s)), key=s.__getitem__) == ex[2] for s, ex in zip(scores, test))
    return right / len(test)


def adapter_accuracy(path, test) -> float:
    base, tokenizer = fresh_model()
    model = dl.DenseLoRAModel.from_pretrained(base, path)
    return accuracy(model, tokenizer, test)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=Path("/work/shared/data/bigbench/social_iqa/task.json"))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--work", type=Path, default=Path("/tmp/denselora_average_seeds"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train, test = load_task(args.task, args.test)
    t0 = time.time()
    results: dict = {"model": "SmolLM2-135M-Instruct", "task": "BIG-bench social_iqa", "test_examples": len(test),
                     "r": args.r, "steps": args.steps, "batch": args.batch, "lr": args.lr, "accuracy": {}}
    acc = results["accuracy"]
    base, tokenizer = fresh_model()
    acc["base model"] = accuracy(base, tokenizer, test)
    print(f"base model: {acc['base model']:.3f}", flush=True)

    w = args.work
    same = [train_run(0, d, train, args, w / f"init0_data{d}") for d in range(3)]
    different = [same[0]] + [train_run(s, s, train, args, w / f"init{s}_data{s}") for s in (1, 2)]
    for path in same + different[1:]:
        acc[f"run {path.name}"] = adapter_accuracy(path, test)
        print(f"{path.name}: {acc[f'run {path.name}']:.3f}", flush=True)

    soup = dl.average(same, w / "soup_same_init")  # auto: equal init fingerprints -> linear
    assert soup.mode == "linear"
    acc["linear soup of same-init runs"] = adapter_accuracy(w / "soup_same_init", test)
    aligned = dl.average(different, w / "aligned_different_seeds")  # auto -> aligned
    assert aligned.mode == "aligned"
    acc["aligned average of different-seed runs"] = adapter_accuracy(w / "aligned_different_seeds", test)
    dl.average(different, w / "linear_different_seeds", mode="linear")
    acc["linear average of different-seed runs (wrong)"] = adapter_accuracy(w / "linear_different_seeds", test)
    results["aligned_report"] = aligned.table()
    print(aligned.table(), flush=True)

    truncation = {}
    for rank in (16, 8):
        report = dl.truncate(same[0], w / f"truncated_r{rank}", rank=rank)
        acc[f"run {same[0].name} truncated to r={rank}"] = adapter_accuracy(w / f"truncated_r{rank}", test)
        truncation[rank] = {g.group: round(g.relative_error, 4) for g in report.groups}
    results["truncation_relative_error"] = truncation
    results["seconds"] = round(time.time() - t0, 1)
    print("\n| adapter | accuracy |\n|---|---|")
    for k, v in acc.items():
        print(f"| {k} | {v:.3f} |")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "average_seeds.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {HERE / 'results' / 'average_seeds.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
