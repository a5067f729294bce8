"""Accuracy kept when trained adapters are compressed into a family (one shared basis, a tenant of
cores per adapter), on the real model: each tenant, loaded from the family bundle, against its
original adapter on the original's own task and test split.

The adapters are runs of ``benches/replicate.py`` (kept under benches/results/replicate/adapters/),
named by their run name; the family is built at each rank of ``--ranks`` (``full``: the joint rank,
exact for linear adapters). Writes benches/results/<name>.json and .md.

    python benches/family_quality.py \\
        --runs logical_fallacy_detection-denselora-r16-default-lr0.003-s0-f1-n120-t200,logical_fallacy_detection-denselora-r16-default-lr0.003-s1-f1-n120-t200,hyperbaton-denselora-r16-default-lr0.003-s1-f1-n120-t200 \\
        --ranks 16,32,full --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE))

from replicate import ADAPTERS, RESULTS, RUNS  # noqa: E402


def evaluate(base: Any, tokenizer: Any, source: str, run: dict[str, Any]) -> float:
    """Test accuracy of the adapter ``source`` (a directory or ``bundle.dl:name``) on ``run``'s task
    and test split, attached to ``base`` and detached again."""
    from denselora import DenseLoRAModel
    from denselora.training.data import load_examples, split_examples
    from denselora.training.evaluation import multiple_choice_accuracy

    splits = split_examples(load_examples(run["data"]), seed=run["split_seed"], validation=run["val_size"], test=run["test_size"])
    model = DenseLoRAModel.from_pretrained(base, source)
    try:
        return multiple_choice_accuracy(model, tokenizer, splits.test).accuracy
    finally:
        model.unload()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="comma-separated run names of benches/replicate.py (their adapters are the family)")
    parser.add_argument("--ranks", default="16,full", help="family ranks to build: integers and/or 'full' (the joint rank)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default="family_quality")
    args = parser.parse_args()

    import torch

    import denselora as dl
    from denselora.pretrained import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.runs.split(",")
    runs = {n: json.loads((RUNS / f"{n}.json").read_text()) for n in names}
    for n in names:
        if not (ADAPTERS / n / "adapter_config.json").is_file():
            raise SystemExit(f"{ADAPTERS / n}: no adapter kept for run {n}; run it with benches/replicate.py first")
    base, tokenizer = load_model(device="cpu")
    tenants = [f"t{i}" for i in range(len(names))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in args.ranks.split(","):
            path = os.path.join(tmp, f"family-{rank}.dl")
            report = dl.build_family([str(ADAPTERS / n) for n in names], path, rank=None if rank == "full" else int(rank), names=tenants)
            for tenant, n in zip(tenants, names):
                errors = list(report.errors[tenant].values())
                accuracy = evaluate(base, tokenizer, f"{path}:{tenant}", runs[n])
                rows.append(
                    {
                        "run": n, "task": runs[n]["task"], "seed": runs[n]["seed"], "family_rank": rank,
                        "basis_ranks": sorted(set(report.ranks.values())), "original_accuracy": runs[n]["test_accuracy"],
                        "tenant_accuracy": accuracy, "max_relative_error": max(errors), "mean_relative_error": statistics.fmean(errors),
                        "tenant_core_numbers": sum(t.numel() for t in report.tenants[tenant][1].values()),
                    }
                )
                print(f"rank {rank} {n}: original {runs[n]['test_accuracy']:.3f}, tenant {accuracy:.3f}, "
                      f"update error max {max(errors):.3g}", flush=True)
    lines = ["| family rank | adapter (task, seed) | basis ranks (enc x dec) | cores per tenant | mean / max update error | original accuracy | tenant accuracy |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['family_rank']} | {r['task']}, seed {r['seed']} | {', '.join(f'{e}x{d}' for e, d in r['basis_ranks'])} | "
                     f"{r['tenant_core_numbers']:,d} | {r['mean_relative_error']:.3f} / {r['max_relative_error']:.3f} | "
                     f"{r['original_accuracy']:.3f} | {r['tenant_accuracy']:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    summary = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "rows": rows}
    for name, text in ((f"{args.name}.json", json.dumps(summary, indent=2) + "\n"), (f"{args.name}.md", table)):
        staging = RESULTS / f"{name}.tmp"
        staging.write_text(text)
        os.replace(staging, RESULTS / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
