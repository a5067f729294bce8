"""transformers' Trainer trains a DenseLoRAModel unchanged, and its checkpoints hold the adapter only."""

from __future__ import annotations

import pytest
import torch

import denselora as dl

from conftest import tiny_llama

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, length: int = 8) -> None:
        generator = torch.Generator().manual_seed(0)
        self.rows = torch.randint(0, 96, (n, length), generator=generator)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def test_trainer_trains_and_checkpoints_only_the_adapter(tmp_path):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4, dropout=0.0))
    before = {k: v.detach().clone() for k, v in model.adapter_state().items()}
    base_before = {k: v.detach().clone() for k, v in model.base_model.named_parameters() if not v.requires_grad}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset())
    result = trainer.train()
    assert result.global_step == 4
    after = model.adapter_state()
    assert any(not torch.equal(before[k], after[k].detach()) for k in before)
    for name, param in model.base_model.named_parameters():
        if name in base_before:
            assert torch.equal(param, base_before[name]), name

    checkpoint = tmp_path / "checkpoint-2" / "model.safetensors"
    saved = safetensors_torch.load_file(checkpoint)
    adapter_names = {f"base_model.{name}" for name, p in model.base_model.named_parameters() if p.requires_grad}
    assert set(saved) == adapter_names
    assert checkpoint.stat().st_size < 64 * 1024  # the tiny base model alone is far larger

    # Resuming from the checkpoint restores the adapter and finishes the run.
    resumed = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4, dropout=0.0))
    trainer = transformers.Trainer(model=resumed, args=args, train_dataset=TokenDataset())
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for name, value in model.adapter_state().items():
        torch.testing.assert_close(resumed.adapter_state()[name], value, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trips_strictly():
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4))
    state = model.state_dict()
    assert set(state) == {f"base_model.{k}" for k, p in model.base_model.named_parameters() if p.requires_grad}
    other = dl.get_denselora_model(tiny_llama(seed=5), dl.DenseLoRAConfig(r=4))
    other.load_state_dict(state)  # strict: base entries are not expected
    for key in state:
        torch.testing.assert_close(other.state_dict()[key], state[key])
