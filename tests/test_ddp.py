"""Distributed training: two CPU processes on the gloo backend end with identical adapters, equal to
one process trained on the same global batches."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from denselora.training import TrainConfig, build_adapter_model, train
from denselora.training.data import Example, TokenizedDataset

from _tiny import char_llama, char_tokenizer

WORLD = 2
STEPS = 3


def examples() -> list[Example]:
    # Different lengths, so ranks see different token counts within a global batch.
    return [Example(f"Q: {i} " + "z" * (i % 4), " yes" if i % 3 else " no, not this one") for i in range(16)]


def run_training(micro_batch: int, accumulation: int, output_dir) -> dict[str, torch.Tensor]:
    tok = char_tokenizer()
    model = build_adapter_model(char_llama(), r=4, alpha=8, dropout=0.0)
    config = TrainConfig(lr=1e-2, max_steps=STEPS, micro_batch_size=micro_batch, gradient_accumulation_steps=accumulation,
                         warmup_steps=1, progress=False, plot=False, seed=3)
    train(model, tok, TokenizedDataset(examples(), tok), config, output_dir=output_dir)
    return {k: v.detach().clone() for k, v in model.adapter_state().items()}


def _fsdp_worker(rank: int, port: int, folder: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from denselora.training import fsdp_auto_wrap_policy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        tok = char_tokenizer()
        model = build_adapter_model(char_llama(), r=4, alpha=8, dropout=0.0)
        sharded = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True, device_id=torch.device("cpu"))
        config = TrainConfig(lr=1e-2, max_steps=STEPS, micro_batch_size=2, gradient_accumulation_steps=2,
                             warmup_steps=1, progress=False, plot=False, seed=3)
        train(sharded, tok, TokenizedDataset(examples(), tok), config, output_dir=os.path.join(folder, "fsdp"))
        with FSDP.summon_full_params(sharded, writeback=False):
            state = {k: v.detach().clone() for k, v in sharded.module.adapter_state().items()}
        torch.save(state, os.path.join(folder, f"fsdp{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        # Global batch 2 ranks x 2 micro-batches x 2 examples = 8.
        state = run_training(2, 2, os.path.join(folder, "ddp"))
        torch.save(state, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_gloo_ranks_match_one_process(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = run_training(8, 1, tmp_path / "single")
    moved = False
    for name, tensor in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks differ on {name}"
        torch.testing.assert_close(ranks[0][name], tensor, rtol=1e-4, atol=1e-6, msg=f"DDP differs from one process on {name}")
        moved |= name.endswith("decoder") and bool(tensor.abs().sum() > 0)
    assert moved  # training changed the adapter (the decoder starts at zero)
    # Only rank 0 wrote the outputs, and they hold the trained adapter.
    assert (tmp_path / "ddp" / "adapter" / "adapter.safetensors").is_file()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_fsdp_with_the_wrap_policy_matches_one_process(tmp_path):
    torch.multiprocessing.spawn(_fsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single = run_training(8, 1, tmp_path / "single")
    for rank in range(WORLD):
        state = torch.load(tmp_path / f"fsdp{rank}.pt")
        for name, tensor in single.items():
            torch.testing.assert_close(state[name], tensor, rtol=1e-4, atol=1e-6, msg=f"FSDP rank {rank} differs on {name}")
    # Rank 0 gathered the shards and wrote the whole adapter.
    from denselora.io import load_adapter

    _, saved = load_adapter(tmp_path / "fsdp" / "adapter")
    for name, tensor in single.items():
        torch.testing.assert_close(saved[name], tensor, rtol=1e-4, atol=1e-6)
