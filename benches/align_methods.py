"""Which decoder-side alignment merges independent runs best? A test-sized experiment.

A tiny LLaMA (random base) is given a teacher function: the base plus a random DenseLoRA adapter.
Several student adapters are trained to match the teacher's next-token distribution (KL), from
different initial adapters (seeds) and from one shared initial adapter with different data order.
Their averages are scored by held-out KL to the teacher:

    linear soup | aligned, decoder by orthogonal Procrustes | aligned, decoder by products D M_l

Usage: python benches/align_methods.py [--steps 150] [--runs 3]   (writes benches/results/align_methods.json)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

import denselora as dl
from denselora.training.optim import create_optimizer

HERE = Path(__file__).resolve().parent


def base_model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def batch(generator: torch.Generator, n: int = 16, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=generator)


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1), log_target=True, reduction="batchmean")


def adapter_config(r: int, activation: str) -> dl.DenseLoRAConfig:
    return dl.DenseLoRAConfig(r=r, alpha=2.0 * r, dropout=0.0, activation=activation)


def teacher_logits_fn(r: int, activation: str):
    torch.manual_seed(1234)
    teacher = dl.get_denselora_model(base_model(), adapter_config(r, activation))
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for t in teacher.adapter_state().values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.25)
    teacher.eval()

    def fn(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return teacher(tokens).logits

    return fn


def train(init_seed: int, data_seed: int, steps: int, r: int, activation: str, teacher, out: Path) -> Path:
    base = base_model()
    torch.manual_seed(init_seed)
    model = dl.get_denselora_model(base, adapter_config(r, activation))
    model.train()
    opt = create_optimizer(model, lr=3e-3)
    g = torch.Generator().manual_seed(data_seed)
    for _ in range(steps):
        tokens = batch(g)
        loss = kl(model(tokens).logits, teacher(tokens))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    return out


def evaluate(path, teacher, tokens: torch.Tensor) -> float:
    model = dl.DenseLoRAModel.from_pretrained(base_model(), path)
    with torch.no_grad():
        return float(kl(model(tokens).logits, teacher(tokens)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--activations", default="gelu,identity")
    parser.add_argument("--work", default="/tmp/denselora_align_methods")
    args = parser.parse_args(argv)
    work = Path(args.work)
    held_out = batch(torch.Generator().manual_seed(7), n=64)
    results = {"steps": args.steps, "runs": args.runs, "r": args.r, "metric": "held-out KL(teacher || model)", "by_activation": {}}
    for activation in args.activations.split(","):
        teacher = teacher_logits_fn(args.r, activation)
        base_kl = evaluate_base(teacher, held_out)
        row: dict = {"base_model": base_kl}
        t0 = time.time()
        seeds = [train(100 + i, 200 + i, args.steps, args.r, activation, teacher, work / activation / f"seed{i}") for i in range(args.runs)]
        same = [train(100, 300 + i, args.steps, args.r, activation, teacher, work / activation / f"same{i}") for i in range(args.runs)]
        row["train_seconds"] = round(time.time() - t0, 1)
        row["runs_different_init"] = [evaluate(p, teacher, held_out) for p in seeds]
        row["runs_same_init"] = [evaluate(p, teacher, held_out) for p in same]
        for label, paths in (("different_init", seeds), ("same_init", same)):
            for mode, method in (("linear", "product"), ("aligned", "procrustes"), ("aligned", "product")):
                out = work / activation / f"{label}_{mode}_{method}"
                report = dl.average(paths, out, mode=mode, decoder_alignment=method)
                key = f"{label}: {mode}" + (f" ({method})" if mode == "aligned" else "")
                row[key] = evaluate(out, teacher, held_out)
                if mode == "aligned":
                    row[key + " refactor error"] = [g.refactor_error for g in report.groups]
        results["by_activation"][activation] = row
        print(f"\n== activation {activation}: held-out KL to the teacher (lower is better)")
        for k, v in row.items():
            print(f"  {k:<48} {v}")
    out = HERE / "results" / "align_methods.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def evaluate_base(teacher, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return float(kl(base_model()(tokens).logits, teacher(tokens)))


if __name__ == "__main__":
    sys.exit(main())
