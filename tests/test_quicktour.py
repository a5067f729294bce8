"""The README's quick tour runs as written, on a tiny LLaMA and tokenizer built here instead of a
model read from disk, and what it shows is what the library does."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import denselora as dl

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from _tiny import char_llama, char_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE_LINE = 'base = AutoModelForCausalLM.from_pretrained("path/to/llama")'
TOKENIZER_LINE = 'tokenizer = AutoTokenizer.from_pretrained("path/to/llama")'


def tour_code() -> str:
    """The python blocks of the README's "A short tour" section, joined."""
    readme = (ROOT / "README.md").read_text()
    assert "\n## A short tour\n" in readme, "README.md has no '## A short tour' section"
    section = readme.split("\n## A short tour\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's tour has no python block"
    return "\n".join(blocks)


def run_tour(directory: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    code = tour_code()
    for line in (BASE_LINE, TOKENIZER_LINE):
        assert code.count(line) == 1, f"the tour no longer has the line {line!r} that this test replaces"
    code = code.replace(BASE_LINE, "base = char_llama()").replace(TOKENIZER_LINE, "tokenizer = char_tokenizer()")
    monkeypatch.chdir(directory)  # the tour saves under relative paths
    namespace = {"__name__": "quicktour", "char_llama": char_llama, "char_tokenizer": char_tokenizer}
    exec(compile(code, "README.md (A short tour)", "exec"), namespace)
    return namespace


def test_quicktour_runs_and_does_what_it_says(tmp_path, monkeypatch, capsys):
    safetensors = pytest.importorskip("safetensors.torch")
    tour = run_tour(tmp_path, monkeypatch)

    printed = capsys.readouterr().out
    assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+", printed)
    assert math.isfinite(tour["loss"].item())

    # The saved adapter holds the trained step (decoders start at zero) and is what was reloaded.
    saved = safetensors.load_file(tmp_path / "adapters" / "task-a" / "adapter.safetensors")
    decoders = [name for name in saved if name.endswith(".decoder")]
    assert decoders and all(saved[name].abs().sum() > 0 for name in decoders)
    model = tour["model"]
    assert isinstance(model, dl.DenseLoRAModel)
    loaded = model.adapter_state()
    assert set(loaded) == set(saved)
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)

    # The exported LoRA, loaded by PEFT onto the same base weights, computes what the adapter does.
    peft = pytest.importorskip("peft")
    ids = tour["ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        lora = peft.PeftModel.from_pretrained(char_llama(), str(tmp_path / "lora" / "task-a")).eval()
        torch.testing.assert_close(lora(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=ids).logits, expected)


def test_the_tour_prints_what_llama2_7b_gives(capsys):
    """The output shown in the tour is LLaMA2-7B's, counted on the meta device (no weights)."""
    shown = re.search(r"# (trainable params: .*?)\s+\(LLaMA2-7B\)", tour_code())
    assert shown, "the tour no longer shows print_trainable_parameters()'s output for LLaMA2-7B"
    config = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000
    )
    with torch.device("meta"):
        base = transformers.LlamaForCausalLM(config)
    dl.get_denselora_model(base, dl.DenseLoRAConfig(r=16, alpha=32)).print_trainable_parameters()
    assert capsys.readouterr().out.strip() == shown.group(1)
