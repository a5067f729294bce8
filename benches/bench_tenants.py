"""Mixed-tenant batches against one adapter, PEFT LoRA's mixed batch and running tenants in turn.

A SmolLM2-135M-shaped LLaMA with random weights (hidden 576, intermediate 1536, 9 heads, 3 KV heads;
``--layers`` of them, 30 in SmolLM2) and a DenseLoRA basis (r = 16, the library's default
configuration, q/k/v/up/down). Side by side, greedy generation of ``--new-tokens`` tokens after a
``--prompt``-token prompt, for batches of B rows, B in ``--batches``:

- tenants: B distinct tenants (random cores) routed one per row (`DenseLoRAModel.route`);
- one adapter: the same batch on the model's own adapter (the single-adapter path);
- PEFT LoRA: LoRA r = 16 on the same modules, B distinct adapters through PEFT's mixed-batch
  ``generate(adapter_names=...)``;
- in turn: the B tenants one after another, a batch of one row each.

Then: the memory of ``--tenants`` resident tenants (their core stacks), and the time to bring a
tenant into a resident batch from a ``.dl`` bundle (`add_tenant_source`, a routed miss), median.
Tokens/s count generated tokens of every row. Writes benches/results/tenants.json.

    python benches/bench_tenants.py [--layers 30] [--batches 1,8,32,64] [--tenants 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

import denselora
from denselora import DenseLoRAConfig, DenseLoRAModel, get_denselora_model
from denselora.io.bundle import pack
from denselora.kernels import isa

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
RANK = 16


def base_model(layers: int, vocab: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=512, tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


def random_tensors(model: DenseLoRAModel, seed: int, cores_only: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.adapter_state().items():
        if cores_only and not name.endswith(".m"):
            continue
        out[name] = torch.randn(t.shape, generator=generator) * (0.02 if name.startswith("shared.") else 0.3)
    return out


def timed_generate(model, input_ids, new_tokens: int, repeats: int, **kw) -> float:
    """Median seconds of one greedy generation, after one untimed generation: each side is timed
    warm (its first call at a batch shape allocates its buffers; timed cold, whichever side ran
    first at a shape paid for it)."""
    mask = torch.ones_like(input_ids)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0, **kw)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tenants.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    biggest = max(batches)

    config = DenseLoRAConfig(r=RANK, alpha=2 * RANK, dropout=0.0, target_modules=TARGETS)
    model = get_denselora_model(base_model(args.layers, args.vocab), config)
    model.load_adapter_state({**model.adapter_state(), **random_tensors(model, 1, cores_only=False)})
    model.eval()
    work = Path(tempfile.mkdtemp(prefix="bench_tenants_"))
    model.save_pretrained(work / "basis")
    model = DenseLoRAModel.from_pretrained(base_model(args.layers, args.vocab), work / "basis")
    tenant_config = None
    names = [f"t{i}" for i in range(biggest)]
    carrier = DenseLoRAModel.from_pretrained(base_model(args.layers, args.vocab), work / "basis", freeze_shared=True)
    for i, name in enumerate(names):
        carrier.load_adapter_state({**carrier.adapter_state(), **random_tensors(carrier, 100 + i, cores_only=True)})
        carrier.save_pretrained(work / name)
        model.load_adapter(work / name, adapter_name=name)
    tenant_config = json.loads((work / names[0] / "adapter_config.json").read_text())
    del carrier

    # Many residents: a bundle of --tenants tenants as the source, each brought in by a routed miss.
    generator = torch.Generator().manual_seed(7)
    shapes = {f"{p}.m": tuple(layer.m.shape) for p, layer in model.adapter_layers()}
    entries = {f"r{i}": (tenant_config, {n: torch.randn(s, generator=generator) * 0.3 for n, s in shapes.items()})
               for i in range(args.tenants)}
    pack(work / "family.dl", entries)
    del entries
    for name in names:  # measured alone; loaded again for generation
        model.delete_adapter(name)
    model.add_tenant_source(work / "family.dl")
    bring_in = []
    x = torch.randint(2, args.vocab, (1, 1))
    for i in range(args.tenants):
        start = time.perf_counter()
        with model.route([f"r{i}"]):
            pass
        bring_in.append(time.perf_counter() - start)
    with model.route([f"r{args.tenants - 1}"]), torch.no_grad():
        model(x)  # the routed batch runs with the tenant brought in last
    stacks = model.tenants.stacks.values()
    per_tenant = sum(s.cores[0].numel() * s.cores.element_size() for s in stacks)
    allocated = sum(s.cores.numel() * s.cores.element_size() for s in stacks)
    resident = {
        "tenants": len(model.tenants),
        "bytes_per_tenant": per_tenant,
        "stack_bytes": allocated,
        "stack_mib": allocated / 2**20,
        "bring_in_from_bundle_ms_median": 1e3 * statistics.median(bring_in),
        "bring_in_from_bundle_ms_p90": 1e3 * float(np.percentile(bring_in, 90)),
    }
    print(json.dumps(resident))
    write(args, config, [], resident)
    for name in list(model.tenants.names()):
        model.delete_adapter(name)
    for name in names:
        model.load_adapter(work / name, adapter_name=name)

    rng = np.random.default_rng(0)
    rows = []
    peft_model = None
    if not args.skip_peft:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0)
        peft_model = get_peft_model(base_model(args.layers, args.vocab), lora, adapter_name="a0")
        for i in range(1, biggest):
            peft_model.add_adapter(f"a{i}", lora)
        peft_model.eval()
    for b in batches:
        input_ids = torch.tensor(rng.integers(2, args.vocab, (b, args.prompt)))
        tokens = b * args.new_tokens
        row = {"batch": b}
        with model.route(names[:b]):
            row["tenants_s"] = timed_generate(model, input_ids, args.new_tokens, args.repeats)
        row["one_adapter_s"] = timed_generate(model, input_ids, args.new_tokens, args.repeats)
        in_turn = 0.0
        for i in range(b):
            with model.route([names[i]]):
                in_turn += timed_generate(model, input_ids[i : i + 1], args.new_tokens, 1)
        row["in_turn_s"] = in_turn
        if peft_model is not None:
            row["peft_lora_mixed_s"] = timed_generate(peft_model, input_ids, args.new_tokens, args.repeats,
                                                      adapter_names=[f"a{i}" for i in range(b)])
        for key in [k for k in row if k.endswith("_s")]:
            row[key.replace("_s", "_tokens_per_s")] = tokens / row[key]
        row["tenants_vs_one_adapter"] = row["one_adapter_s"] / row["tenants_s"]
        if peft_model is not None:
            row["tenants_vs_peft_lora_mixed"] = row["peft_lora_mixed_s"] / row["tenants_s"]
        row["tenants_vs_in_turn"] = row["in_turn_s"] / row["tenants_s"]
        rows.append(row)
        print(json.dumps(row))
        write(args, config, rows, resident)
    del peft_model

    write(args, config, rows, resident)
    print(f"wrote {args.out}")


def write(args: argparse.Namespace, config: DenseLoRAConfig, rows: list, resident: dict) -> None:
    """The results so far (written after every measurement, so that a stopped run keeps them)."""
    result = {
        "command": "python benches/bench_tenants.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                             if k not in ("out", "skip_peft")) + (" --skip-peft" if args.skip_peft else ""),
        "model": f"SmolLM2-135M-shaped LLaMA, random weights, {args.layers} layers, vocab {args.vocab}",
        "adapter": f"DenseLoRA r={RANK}, {config.activation}, {', '.join(TARGETS)}; PEFT LoRA r={RANK} on the same modules",
        "generation": {"prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": rows},
        "resident": resident,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads, "kernel_isa": isa(),
                    "load_average_1min": os.getloadavg()[0], "denselora": denselora.__version__, "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
