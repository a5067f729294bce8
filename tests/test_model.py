"""DenseLoRA injection, forward math, gradients, switching and merging, checked against independent
re-computations (numpy / scipy) and against PEFT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import erf

import denselora as dl
from denselora.method.layer import DenseLoRALayer

from conftest import randomize_adapter, tiny_bert, tiny_gpt2, tiny_llama


def numpy_gelu(v: np.ndarray) -> np.ndarray:
    return 0.5 * v * (1.0 + erf(v / np.sqrt(2.0)))


def reference_layer_output(layer: DenseLoRALayer, x: torch.Tensor) -> np.ndarray:
    """base(x) + s * act(D M act(E x)), recomputed in float64 numpy from the raw parameters."""
    base = layer.base_layer
    xs = x.detach().double().numpy()
    weight = base.weight.detach().double().numpy()
    if type(base).__name__ == "Conv1D":
        weight = weight.T
    bias = base.bias.detach().double().numpy() if base.bias is not None else 0.0
    e = layer.shared.encoder.detach().double().numpy()
    d = layer.shared.decoder.detach().double().numpy()
    m = layer.m.detach().double().numpy()
    numpy_act = {"gelu": numpy_gelu, "identity": lambda v: v, "silu": lambda v: v / (1.0 + np.exp(-v))}
    act_e, act_d = numpy_act[layer.encoder_activation], numpy_act[layer.decoder_activation]
    branch = act_d(act_e(xs @ e.T) @ m.T @ d.T) * layer.scaling
    return xs @ weight.T + bias + branch


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_bert])
@pytest.mark.parametrize("activation", ["gelu", "identity", "silu", ("gelu", "identity")])
def test_every_adapted_layer_computes_the_formula(factory, activation):
    targets = {tiny_llama: None, tiny_gpt2: ["c_attn", "c_proj", "c_fc"], tiny_bert: ["query", "key", "value", "dense"]}
    if isinstance(activation, tuple):
        config = dl.DenseLoRAConfig(r=4, alpha=8, encoder_activation=activation[0], decoder_activation=activation[1])
    else:  # the paper preset applies one activation on both sides
        config = dl.DenseLoRAConfig.paper(r=4, alpha=8, activation=activation)
    if targets[factory]:
        config.target_modules = targets[factory]
    model = dl.get_denselora_model(factory(), config)
    randomize_adapter(model)
    generator = torch.Generator().manual_seed(7)
    for path, layer in model.adapter_layers():
        fan_in = layer.shared.in_features
        x = torch.randn(3, fan_in, generator=generator)
        np.testing.assert_allclose(layer(x).detach().double().numpy(), reference_layer_output(layer, x), rtol=1e-4, atol=1e-5, err_msg=path)


def test_groups_follow_module_name_and_shape():
    model = dl.get_denselora_model(tiny_gpt2(), dl.DenseLoRAConfig(r=4, target_modules=["c_attn", "c_proj"]))
    # c_proj appears in attention (32 -> 32) and in the MLP (128 -> 32): two groups.
    assert sorted(model.shared_modules) == ["c_attn", "c_proj_128x32", "c_proj_32x32"]
    llama = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4))
    assert sorted(llama.shared_modules) == sorted(dl.DEFAULT_TARGET_MODULES)
    # k_proj and v_proj are 32 -> 16 (grouped-query attention): dimensions come from the model.
    assert tuple(llama.shared_modules["k_proj"].decoder.shape) == (16, 4)


def test_shared_tensors_are_one_parameter_per_group():
    model = dl.get_denselora_model(tiny_llama(layers=3), dl.DenseLoRAConfig(r=4))
    for group, shared in model.shared_modules.items():
        layers = [layer for _, layer in model.adapter_layers() if layer.group == group]
        assert len(layers) == 3
        assert all(layer.shared.encoder is shared.encoder and layer.shared.decoder is shared.decoder for layer in layers)
    names = [name for name, _ in model.named_parameters() if "encoder" in name]
    assert len(names) == len(model.shared_modules)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_bert])
def test_output_equals_base_at_init_and_when_disabled(factory, tokens):
    base = factory()
    with torch.no_grad():
        reference = base(tokens).logits.clone()
    targets = {tiny_llama: dl.DEFAULT_TARGET_MODULES, tiny_gpt2: ["c_attn", "c_fc"], tiny_bert: ["query", "value"]}[factory]
    model = dl.get_denselora_model(base, dl.DenseLoRAConfig(r=4, target_modules=targets))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, reference, rtol=0, atol=0)
        randomize_adapter(model)
        assert not torch.allclose(model(tokens).logits, reference, atol=1e-4)
        with model.disable_adapter():
            torch.testing.assert_close(model(tokens).logits, reference, rtol=0, atol=0)
        assert not torch.allclose(model(tokens).logits, reference, atol=1e-4)


def test_dropout_acts_only_in_training(tokens):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4, dropout=0.3))
    randomize_adapter(model)
    model.eval()
    with torch.no_grad():
        a, b = model(tokens).logits, model(tokens).logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        model.train()
        c, d = model(tokens).logits, model(tokens).logits
    assert not torch.allclose(c, d)
    layer = next(layer for _, layer in model.adapter_layers())
    x = torch.randn(4, layer.shared.in_features)
    layer.eval()
    eval_out = layer.branch(x)
    layer.dropout = 0.0
    layer.train()
    torch.testing.assert_close(layer.branch(x), eval_out)


def test_gradients_reach_only_adapter_parameters_and_every_layer_feeds_the_encoder(tokens):
    model = dl.get_denselora_model(tiny_llama(layers=3), dl.DenseLoRAConfig(r=4, dropout=0.0))
    randomize_adapter(model)
    model.train()
    model(tokens, labels=tokens).loss.backward()
    adapter_ids = {id(t) for t in model.adapter_state().values()}
    for name, param in model.named_parameters():
        if id(param) in adapter_ids:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name
    # The shared encoder's gradient is the sum of each layer's contribution, and each is non-zero.
    generator = torch.Generator().manual_seed(0)
    q_layers = [layer for _, layer in model.adapter_layers() if layer.group == "q_proj"]
    encoder = q_layers[0].shared.encoder
    per_layer = []
    for layer in q_layers:
        x = torch.randn(2, encoder.shape[1], generator=generator)
        (grad,) = torch.autograd.grad(layer.branch(x).sum(), encoder)
        assert grad.abs().sum() > 0
        per_layer.append((x, grad))
    total = sum(layer.branch(x).sum() for layer, (x, _) in zip(q_layers, per_layer))
    (grad_total,) = torch.autograd.grad(total, encoder)
    torch.testing.assert_close(grad_total, sum(g for _, g in per_layer))


def test_trainable_parameter_counts_on_meta_match_the_paper():
    transformers = pytest.importorskip("transformers")
    llama2 = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000
    )
    llama3 = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
    )
    for config, expected, total_base in [(llama2, 917_504, 6_738_415_616), (llama3, 925_696, 8_030_261_248)]:
        with torch.device("meta"):
            base = transformers.LlamaForCausalLM(config)
        model = dl.get_denselora_model(base, dl.DenseLoRAConfig(r=16))
        trainable, total = model.get_nb_trainable_parameters()
        assert trainable == expected
        assert total == total_base + expected
        assert all(p.device.type == "meta" for p in model.parameters())
        assert model.denselora_config.init_fingerprint is None  # nothing to hash on meta


def test_print_trainable_parameters(capsys):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4))
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_keeps_a_float32_adapter(dtype, tokens):
    model = dl.get_denselora_model(tiny_llama().to(dtype), dl.DenseLoRAConfig(r=4))
    randomize_adapter(model)
    assert all(t.dtype == torch.float32 for t in model.adapter_state().values())
    layer = next(layer for _, layer in model.adapter_layers())
    x = torch.randn(3, layer.shared.in_features).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    np.testing.assert_allclose(out.double().detach().numpy(), reference_layer_output(layer, x), rtol=3e-2, atol=3e-2)
    model.train()
    model(tokens, labels=tokens).loss.backward()
    assert layer.m.grad is not None and layer.m.grad.dtype == torch.float32


def test_autocast_bf16_trains(tokens):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4))
    randomize_adapter(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens, labels=tokens).loss
    loss.backward()
    assert all(t.grad is not None for t in model.adapter_state().values())


def test_gradient_checkpointing_gives_the_same_gradients(tokens):
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        # Eager attention: some torch versions' SDPA backward differs in the last bits when recomputed.
        base = tiny_llama(attn_implementation="eager")
        model = dl.get_denselora_model(base, dl.DenseLoRAConfig(r=4, dropout=0.0))
        randomize_adapter(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(tokens, labels=tokens).loss.backward()
        return {k: t.grad.clone() for k, t in model.adapter_state().items()}

    plain, checkpointed = grads(False), grads(True)
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-7)


def test_a_few_optimizer_steps_lower_the_loss(tokens):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4, dropout=0.0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_target_selection_by_regex_and_layer_index():
    config = dl.DenseLoRAConfig(r=4, target_modules=r".*\.self_attn\.(q|v)_proj", layers_to_transform=[1])
    model = dl.get_denselora_model(tiny_llama(layers=3), config)
    assert sorted(model.groups) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_identity_merge_unmerge_and_unload(tokens):
    base = tiny_llama()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = dl.get_denselora_model(base, dl.DenseLoRAConfig(r=4, activation="identity"))
    randomize_adapter(model, std=0.1)
    with torch.no_grad():
        adapted = model(tokens).logits.clone()
        model.merge_adapter()
        torch.testing.assert_close(model(tokens).logits, adapted, rtol=1e-4, atol=1e-4)
        model.unmerge_adapter()
        torch.testing.assert_close(model(tokens).logits, adapted, rtol=1e-4, atol=1e-4)
    path = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(model.base_model.get_submodule(path).base_layer.weight, original[path + ".weight"], rtol=0, atol=1e-6)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, DenseLoRALayer) for m in merged.modules())
    assert not hasattr(merged, "denselora_shared")
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, adapted, rtol=1e-4, atol=1e-4)


def test_merging_a_gelu_adapter_is_refused_by_name():
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4, activation="gelu"))
    with pytest.raises(dl.NotMergeableError, match="gelu"):
        model.merge_and_unload()
    with pytest.raises(dl.NotMergeableError, match="gelu"):
        model.export_lora("unused")


@pytest.mark.parametrize("factory,targets", [(tiny_llama, None), (tiny_gpt2, ["c_attn", "c_fc", "c_proj"])])
def test_lora_export_loads_in_peft_and_reproduces_the_adapter(tmp_path, tokens, factory, targets):
    peft = pytest.importorskip("peft")
    config = dl.DenseLoRAConfig(r=4, alpha=8, activation="identity")
    if targets:
        config.target_modules = targets
    model = dl.get_denselora_model(factory(), config)
    randomize_adapter(model, std=0.1)
    with torch.no_grad():
        expected = model(tokens).logits
    model.export_lora(tmp_path / "lora")
    peft_model = peft.PeftModel.from_pretrained(factory(), tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, expected, rtol=1e-4, atol=1e-4)
        with peft_model.disable_adapter():
            assert not torch.allclose(peft_model(tokens).logits, expected, atol=1e-3)


def test_config_round_trips_through_json_and_rejects_bad_values():
    config = dl.DenseLoRAConfig(r=8, alpha=16, dropout=0.1, target_modules=["q_proj"], activation="identity", layers_to_transform=[0, 2])
    assert dl.DenseLoRAConfig.from_json(config.to_json()) == config
    for bad in [dict(r=0), dict(alpha=-1), dict(dropout=1.0), dict(activation="relu6"), dict(target_modules=[]), dict(target_modules="(")]:
        with pytest.raises(dl.ConfigError):
            dl.DenseLoRAConfig(**bad)
    with pytest.raises(dl.ConfigError, match="matches no"):
        dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(target_modules=["nonexistent"]))


def test_double_injection_is_refused():
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4))
    with pytest.raises(dl.ConfigError, match="already"):
        dl.get_denselora_model(model.base_model, dl.DenseLoRAConfig(r=4))


def test_wrapper_forwards_generate_and_attributes(tokens):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4))
    assert model.config.hidden_size == 32
    out = model.generate(tokens[:1, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layers_on_different_devices(tokens):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4))
    randomize_adapter(model)
    with torch.no_grad():
        expected = model(tokens).logits
    layer = model.base_model.model.layers[1]
    layer.to("cuda")
    hook = layer.register_forward_pre_hook(lambda m, args, kwargs: (tuple(a.cuda() if torch.is_tensor(a) else a for a in args), {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kwargs.items()}), with_kwargs=True)
    post = layer.register_forward_hook(lambda m, args, out: tuple(o.cpu() if torch.is_tensor(o) else o for o in out) if isinstance(out, tuple) else out.cpu())
    # Shared factors stay on the first layer's device (CPU); the CUDA layer gets differentiable copies.
    assert model.shared_modules["q_proj"].encoder.device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-4, atol=1e-4)
    model.train()
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    assert model.shared_modules["q_proj"].encoder.grad is not None
    hook.remove(), post.remove()
