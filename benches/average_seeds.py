"""Averaging and truncating real runs: SmolLM2-135M-Instruct + DenseLoRA on a BIG-bench task.

Five short runs are trained with `denselora.training.train`: three from one initial adapter with
different data orders (same init), and two more from other initial adapters and data orders, which
with the first make three different-seed runs. Reported: multiple-choice accuracy
(`denselora.training.evaluation.multiple_choice_accuracy`) on a held-out test split of the base model, of
each run, of the `linear` soup of the same-init runs, of the `aligned` (and, for contrast, the
`linear`) average of the different-seed runs, and of the first run truncated from r=32 to 16 and 8.

Usage: python benches/average_seeds.py [--steps 40] [--batch 8] [--lr 1e-3] [--test 100]
                                       [--task PATH/task.json] [--work DIR] [--preset default|paper]
Writes benches/results/average_seeds.json and prints a table. Runs on CUDA when available.
Resumable: every run, average and truncation is kept under --work (one folder each, with the
settings that made it in settings.json); a rerun with the same settings skips what is finished,
and refuses a work dir made with other settings.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import denselora as dl
from denselora.pretrained import load_model
from denselora.training import TrainConfig, build_adapter_model, train
from denselora.training.data import TokenizedDataset, load_examples, split_examples
from denselora.training.evaluation import multiple_choice_accuracy

HERE = Path(__file__).resolve().parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ADAPTER_FILE = "adapter.safetensors"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work: Path = args.work
        self.base, self.tokenizer = load_model(device=DEVICE)
        examples = load_examples(args.task)
        # The test split depends only on (seed, size): every run and average is scored on the same one.
        self.splits = split_examples(examples, seed=args.split_seed, validation=args.validation, test=args.test)
        self.train_data = TokenizedDataset(self.splits.train, self.tokenizer, cutoff_len=args.cutoff)
        self.val_data = (
            TokenizedDataset(self.splits.validation, self.tokenizer, cutoff_len=args.cutoff) if args.validation else None
        )
        self.scores_path = self.work / "accuracy.json"
        self.scores: dict[str, dict] = json.loads(self.scores_path.read_text()) if self.scores_path.is_file() else {}

    def fresh_base(self):
        return copy.deepcopy(self.base)

    def run(self, init_seed: int, data_seed: int) -> Path:
        """Train (or reuse) the run whose initial adapter comes from ``init_seed`` and whose data
        order comes from ``data_seed``; returns its adapter directory."""
        out = self.work / f"init{init_seed}_data{data_seed}"
        adapter = out / "adapter"
        if (adapter / ADAPTER_FILE).is_file():
            print(f"{out.name}: already trained", flush=True)
            return adapter
        a = self.args
        torch.manual_seed(init_seed)  # the initial adapter is a function of init_seed alone
        model = build_adapter_model(self.fresh_base(), r=a.r, alpha=a.alpha, preset=a.preset)
        config = TrainConfig(
            lr=a.lr, max_steps=a.steps, micro_batch_size=a.batch, warmup_steps=max(1, a.steps // 10),
            schedule="linear", seed=data_seed, eval_batch_size=16, progress=False, plot=False,
            log_every=max(1, a.steps // 4),
        )
        t0 = time.time()
        result = train(model, self.tokenizer, self.train_data, config, val_data=self.val_data, output_dir=out)
        print(
            f"{out.name}: {result.steps} steps in {time.time() - t0:.0f} s, train loss "
            f"{result.history[0]['loss']:.3f} -> {result.final_train_loss:.3f}",
            flush=True,
        )
        return adapter

    def accuracy(self, name: str, adapter: Path | None) -> float:
        """Test accuracy of the base model (``adapter`` None) or of it with ``adapter``; cached."""
        if name not in self.scores:
            t0 = time.time()
            model = self.base if adapter is None else dl.DenseLoRAModel.from_pretrained(self.fresh_base(), adapter)
            result = multiple_choice_accuracy(model, self.tokenizer, self.splits.test, batch_size=self.args.eval_batch)
            self.scores[name] = {"accuracy": result.accuracy, "correct": result.correct, "total": result.total}
            dl._core.write_text_atomic(str(self.scores_path), json.dumps(self.scores, indent=2) + "\n")
            print(f"{name}: {result.accuracy:.3f} ({result.correct}/{result.total}, {time.time() - t0:.0f} s)", flush=True)
        return self.scores[name]["accuracy"]


def settings_of(args: argparse.Namespace) -> dict:
    keys = ("task", "steps", "batch", "lr", "r", "alpha", "preset", "test", "validation", "split_seed", "cutoff")
    return {k: str(getattr(args, k)) if isinstance(getattr(args, k), Path) else getattr(args, k) for k in keys}


def check_work_dir(args: argparse.Namespace) -> None:
    """A work dir holds the runs of one setting: refuse to mix settings."""
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / "settings.json"
    settings = settings_of(args)
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise SystemExit(f"{args.work} holds runs made with other settings ({', '.join(changed)}); use another --work")
    else:
        dl._core.write_text_atomic(str(path), json.dumps(settings, indent=2) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=HERE.parent.parent / "shared" / "data" / "bigbench" / "social_iqa" / "task.json")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=None, help="default: 2 * r")
    parser.add_argument("--preset", default="default", choices=("default", "paper"))
    parser.add_argument("--test", type=int, default=100, help="held-out test examples")
    parser.add_argument("--validation", type=int, default=0, help="validation examples (0: keep the last step)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only-base-and-one-run", action="store_true", help="time one run and stop")
    parser.add_argument("--work", type=Path, default=Path("/tmp/denselora_average_seeds"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "average_seeds.json")
    args = parser.parse_args(argv)
    if args.alpha is None:
        args.alpha = 2.0 * args.r
    if args.threads:
        torch.set_num_threads(args.threads)
    check_work_dir(args)
    t0 = time.time()
    bench = Bench(args)
    print(
        f"{args.task.parent.name}: {len(bench.splits.train)} train, {len(bench.splits.validation)} validation, "
        f"{len(bench.splits.test)} test examples; device {DEVICE}",
        flush=True,
    )
    acc: dict[str, float] = {}
    acc["base model"] = bench.accuracy("base model", None)

    # Each run is scored as soon as it is trained, so a stopped invocation still leaves results.
    def run_and_score(init_seed: int, data_seed: int) -> Path:
        adapter = bench.run(init_seed, data_seed)
        acc[f"run {adapter.parent.name}"] = bench.accuracy(f"run {adapter.parent.name}", adapter)
        return adapter

    same = [run_and_score(0, 0)]
    if args.only_base_and_one_run:
        print(f"{time.time() - t0:.0f} s", flush=True)
        return 0
    same += [run_and_score(0, d) for d in (1, 2)]  # one initial adapter, three data orders
    different = [same[0]] + [run_and_score(s, s) for s in (1, 2)]  # initial adapter and data order both differ

    w = args.work
    soup = dl.average(same, w / "linear_same_init")  # auto: equal init fingerprints -> linear
    if soup.mode != "linear":
        raise SystemExit(f"expected auto to pick linear for same-init runs, got {soup.mode}")
    acc["linear soup of same-init runs"] = bench.accuracy("linear soup of same-init runs", w / "linear_same_init")
    aligned = dl.average(different, w / "aligned_different_init")  # auto: different fingerprints -> aligned
    if aligned.mode != "aligned":
        raise SystemExit(f"expected auto to pick aligned for different-seed runs, got {aligned.mode}")
    print(aligned, flush=True)
    acc["aligned average of different-seed runs"] = bench.accuracy(
        "aligned average of different-seed runs", w / "aligned_different_init"
    )
    dl.average(different, w / "linear_different_init", mode="linear")
    acc["linear average of different-seed runs"] = bench.accuracy(
        "linear average of different-seed runs", w / "linear_different_init"
    )

    truncation = {}
    for rank in (16, 8):
        name = f"run init0_data0 truncated r={args.r} -> {rank}"
        report = dl.truncate(same[0], w / f"truncated_r{rank}", rank=rank)
        acc[name] = bench.accuracy(name, w / f"truncated_r{rank}")
        truncation[rank] = {g.group: round(g.relative_error, 4) for g in report.groups}

    results = {
        "model": "SmolLM2-135M-Instruct",
        "task": f"BIG-bench {args.task.parent.name}",
        "device": DEVICE,
        "settings": settings_of(args),
        "train_examples": len(bench.splits.train),
        "test_examples": len(bench.splits.test),
        "accuracy": acc,
        "correct": {k: bench.scores[k]["correct"] for k in acc},
        "aligned_report": str(aligned),
        "truncation_relative_error": truncation,
        "seconds_this_invocation": round(time.time() - t0, 1),
    }
    print(f"\n| adapter ({len(bench.splits.test)} test examples) | accuracy |\n|---|---|")
    for k, v in acc.items():
        print(f"| {k} | {v:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    dl._core.write_text_atomic(str(args.out), json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
