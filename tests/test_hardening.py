"""Defects found by an outside review (issue 10), one test each; every one of them failed on the code before the fix."""

import copy
import json
import warnings

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import neuroada.bypass as bypass
from neuroada import AdapterLoadError, NeuroAdaConfig, NeuroAdaLayer, build_pattern, select_per_neuron
from neuroada.selection import selection_fingerprint
from conftest import tiny_llama


def neuroada_layers(model):
    return [m for m in model.modules() if isinstance(m, NeuroAdaLayer)]


def randomize_deltas(model, scale=0.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for layer in neuroada_layers(model):
        for delta in layer.neuroada_delta.values():
            delta.data = (torch.randn(delta.shape, generator=generator) * scale).to(delta.dtype)


def module_tree(model):
    return [(name, type(module).__name__) for name, module in model.named_modules()]


# ------------------------------------------------------------------ 1. the fused path and a subclass's own forward


class Scaled(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class ScaledConv1D(Conv1D):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("base_cls", [Scaled, ScaledConv1D])
@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_fused_path_never_replaces_a_subclass_forward(base_cls, backend):
    torch.manual_seed(0)
    model = nn.Sequential(base_cls(32, 32))
    m = get_peft_model(model, NeuroAdaConfig(k=2, target_modules=["0"], bypass_backend=backend))
    x = torch.randn(600, 32)  # above the fused path's token threshold
    with torch.no_grad():
        with m.disable_adapter():
            reference = m(x)
        torch.testing.assert_close(m(x), reference, atol=0, rtol=0)  # zero deltas: exactly the base model
        randomize_deltas(m)
        layer = neuroada_layers(m)[0]
        bypass_out = bypass.sparse_bypass_reference(x, layer.neuroada_delta["default"],
                                                    layer.neuroada_indices["default"])
        torch.testing.assert_close(m(x), reference + bypass_out, atol=1e-4, rtol=1e-5)


def test_fused_path_respects_global_forward_hooks():
    torch.manual_seed(0)
    m = get_peft_model(nn.Sequential(nn.Linear(32, 32)), NeuroAdaConfig(k=2, target_modules=["0"]))
    x = torch.randn(600, 32)
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: out * 2 if isinstance(module, nn.Linear) else out)
    try:
        with torch.no_grad():
            with m.disable_adapter():
                reference = m(x)
            torch.testing.assert_close(m(x), reference, atol=0, rtol=0)
    finally:
        handle.remove()


# ------------------------------------------------------------------ 2. unmerge after a dtype or device move


@pytest.mark.parametrize("move", ["half", "bfloat16", "to_float64"])
def test_unmerge_after_a_dtype_move_restores_the_moved_base(move, tokens):
    base_logits_model = tiny_llama()
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2))
    randomize_deltas(model, scale=0.3)
    model.merge_adapter()
    cast = {"half": lambda m: m.half(), "bfloat16": lambda m: m.to(torch.bfloat16),
            "to_float64": lambda m: m.to(torch.float64)}[move]
    model = cast(model)
    base_logits_model = cast(base_logits_model)
    with torch.no_grad(), model.disable_adapter():
        got = model(tokens).logits
    expected = base_logits_model(tokens).logits
    assert torch.equal(got, expected)
    for layer in neuroada_layers(model):
        assert not layer.merged


def test_merged_originals_follow_the_module_and_are_not_saved(tmp_path):
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2))
    randomize_deltas(model)
    model.merge_adapter()
    model = model.to(torch.bfloat16)
    layer = neuroada_layers(model)[0]
    assert all(t.dtype == torch.bfloat16 for t in layer._merged_originals.values())
    assert not any("merged_originals" in key for key in model.state_dict())


# ------------------------------------------------------------------ 3. a failed load leaves nothing behind


def test_refused_load_with_modules_to_save_leaves_the_model_as_it_was(tmp_path):
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    config = NeuroAdaConfig(k=2, target_modules=["0"], modules_to_save=["2"], save_indices=False)
    get_peft_model(trained, config).save_pretrained(tmp_path)
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    tree = module_tree(other)
    names = [name for name, _ in other.named_parameters()]
    with pytest.raises(AdapterLoadError, match="selection recomputed"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not isinstance(other[2], ModulesToSaveWrapper)
    assert module_tree(other) == tree
    assert [name for name, _ in other.named_parameters()] == names
    assert not hasattr(other, "peft_config")


def test_refused_second_adapter_with_modules_to_save_leaves_no_trace(tmp_path):
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    get_peft_model(source, NeuroAdaConfig(k=2, target_modules=["0"], modules_to_save=["2"],
                                          save_indices=False)).save_pretrained(tmp_path / "second")
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model = get_peft_model(other, NeuroAdaConfig(k=1, target_modules=["0"], modules_to_save=["2"]))
    tree = module_tree(model)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(AdapterLoadError):
        model.load_adapter(tmp_path / "second", adapter_name="second")
    assert module_tree(model) == tree
    assert set(model.peft_config) == {"default"}
    assert model.state_dict().keys() == state.keys()
    assert "second" not in model.base_model.model[2].modules_to_save


# ------------------------------------------------------------------ 4. adapters are not tied to the base's dtype


def tie_prone_model():
    """A tiny Llama whose weights have near-ties that bf16 rounding turns into exact ties."""
    model = tiny_llama()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                steps = torch.randint(-40, 40, module.weight.shape, generator=generator).float()
                module.weight.copy_(steps / 32 + torch.randn(module.weight.shape, generator=generator) * 1e-4)
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("save_indices", [True, False])
def test_adapter_trained_in_fp32_loads_on_the_same_base_in_lower_precision(tmp_path, tokens, dtype, save_indices):
    model = get_peft_model(tie_prone_model(), NeuroAdaConfig(k=3, save_indices=save_indices))
    randomize_deltas(model)
    # the premise: in this precision the base's own selection differs from the fp32 one on some layers
    assert any(not torch.equal(select_per_neuron(layer.full_weight_rows().to(dtype), 3),
                               layer.neuroada_indices["default"]) for layer in neuroada_layers(model))
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tie_prone_model().to(dtype), tmp_path)
    assert not [w for w in caught if "not the base" in str(w.message)]  # no false alarm
    for original, restored in zip(neuroada_layers(model), neuroada_layers(loaded)):
        assert torch.equal(original.neuroada_indices["default"], restored.neuroada_indices["default"])
        assert torch.equal(original.neuroada_delta["default"], restored.neuroada_delta["default"])


def test_adapter_without_indices_on_another_base_is_still_refused(tmp_path):
    get_peft_model(tie_prone_model(), NeuroAdaConfig(k=3, save_indices=False)).save_pretrained(tmp_path)
    other = tiny_llama(seed=4).to(torch.bfloat16)
    with pytest.raises(AdapterLoadError, match="selection recomputed"):
        PeftModel.from_pretrained(other, tmp_path)



@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_adapters_move_between_float64_and_float32_bases(tmp_path, tokens, low_cpu_mem_usage):
    """Deltas take the dtype of the base they are loaded onto (float64 on float64, else float32): a float64
    adapter on a float32 base computes what its deltas rounded to float32 do, a float32 adapter on a float64 base
    holds the same values, exactly, and runs in float64."""
    trained = get_peft_model(tiny_llama().double(), NeuroAdaConfig(k=2))
    randomize_deltas(trained)
    assert all(layer.neuroada_delta["default"].dtype == torch.float64 for layer in neuroada_layers(trained))
    trained.save_pretrained(tmp_path / "f64")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "f64", low_cpu_mem_usage=low_cpu_mem_usage)
    by_hand = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2))
    for source, target, manual in zip(neuroada_layers(trained), neuroada_layers(loaded), neuroada_layers(by_hand)):
        assert target.neuroada_delta["default"].dtype == torch.float32
        assert not target.neuroada_delta["default"].requires_grad
        assert torch.equal(target.neuroada_delta["default"], source.neuroada_delta["default"].float())
        with torch.no_grad():
            manual.neuroada_delta["default"].copy_(source.neuroada_delta["default"])
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, by_hand(tokens).logits)

    by_hand.save_pretrained(tmp_path / "f32")
    widened = PeftModel.from_pretrained(tiny_llama().double(), tmp_path / "f32", low_cpu_mem_usage=low_cpu_mem_usage)
    for source, target in zip(neuroada_layers(by_hand), neuroada_layers(widened)):
        assert target.neuroada_delta["default"].dtype == torch.float64
        assert torch.equal(target.neuroada_delta["default"], source.neuroada_delta["default"].double())
    with torch.no_grad():
        merged = copy.deepcopy(widened).merge_and_unload()
        torch.testing.assert_close(widened(tokens).logits, merged(tokens).logits, atol=1e-12, rtol=1e-12)

def test_float64_weights_are_ranked_in_float64():
    weight = torch.tensor([[1.0, 1.0 + 1e-12]], dtype=torch.float64)
    assert select_per_neuron(weight, 1).tolist() == [[1]]
    assert select_per_neuron(weight, 1, "smallest").tolist() == [[0]]


# ------------------------------------------------------------------ 5. a speed setting does not bind an adapter


def test_adapter_saved_with_the_triton_backend_loads_and_runs_where_triton_cannot(tmp_path, tokens, monkeypatch):
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2, bypass_backend="triton"))
    randomize_deltas(model)
    model.save_pretrained(tmp_path)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # this machine cannot run Triton now
    monkeypatch.setattr(bypass, "_warned", set())
    reference = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2, bypass_backend="gather"))
    for a, b in zip(neuroada_layers(model), neuroada_layers(reference)):
        b.neuroada_delta["default"].data.copy_(a.neuroada_delta["default"])
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.warns(UserWarning, match="triton") as record:
        got = loaded(tokens).logits
    assert len([w for w in record if "triton" in str(w.message)]) == 1  # one warning, not one per layer
    torch.testing.assert_close(got, reference(tokens).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ 6. selection always sees the base weight


def test_adapter_added_while_another_is_merged_selects_on_the_base(tmp_path, tokens):
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2))
    randomize_deltas(model, scale=5.0)  # large enough to change which connections are largest
    model.merge_adapter()
    model.add_adapter("q", NeuroAdaConfig(k=2))
    clean = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2))
    for merged_layer, clean_layer in zip(neuroada_layers(model), neuroada_layers(clean)):
        assert torch.equal(merged_layer.neuroada_indices["q"], clean_layer.neuroada_indices["default"])


# ------------------------------------------------------------------ 7. duplicate indices are refused


def test_build_pattern_refuses_duplicate_positions():
    with pytest.raises(ValueError, match="repeat"):
        build_pattern(torch.tensor([[1, 1], [0, 2]]), 8)


def test_build_pattern_refuses_unsorted_rows():
    with pytest.raises(ValueError, match="not sorted ascending"):
        build_pattern(torch.tensor([[2, 1], [0, 2]]), 8)


@pytest.mark.parametrize("damage", ["repeat", "not sorted"])
def test_loading_an_adapter_with_repeated_or_unsorted_positions_is_refused(tmp_path, damage):
    """Refused at load, before the model is touched, not at its first forward."""
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2))
    model.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("neuroada_indices"))
    row = tensors[key][0].clone()
    tensors[key][0] = row[[0, 0]] if damage == "repeat" else row.flip(0)
    save_file(tensors, file)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    name = key.removeprefix("base_model.model.").removesuffix(".neuroada_indices")
    config["selection_fingerprints"][name] = selection_fingerprint(tensors[key])  # only this check can catch it
    config_file.write_text(json.dumps(config))
    other = tiny_llama()
    tree = module_tree(other)
    with pytest.raises(AdapterLoadError, match=damage):
        PeftModel.from_pretrained(other, tmp_path)
    assert module_tree(other) == tree


def test_loading_an_adapter_with_repeated_positions_is_refused(tmp_path):
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2))
    model.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("neuroada_indices"))
    tensors[key][0, 1] = tensors[key][0, 0]
    save_file(tensors, file)
    other = tiny_llama()
    tree = module_tree(other)
    with pytest.raises(AdapterLoadError, match="repeat"):
        PeftModel.from_pretrained(other, tmp_path)
    assert module_tree(other) == tree


# ------------------------------------------------------------------ 8. PEFT sees the method's name


def test_peft_introspection_reports_neuroada(tmp_path):
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=1))
    assert model.get_model_status().peft_types == {"default": "NEUROADA"}
    assert str(model.peft_config["default"].peft_type).partition(".")[-1] == "NEUROADA"
    model.save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path).peft_type == "NEUROADA"
    assert '"peft_type": "NEUROADA"' in (tmp_path / "adapter_config.json").read_text()


# ------------------------------------------------------------------ the rest of the issue


def test_meta_device_base_is_refused_with_the_fix():
    with torch.device("meta"):
        model = tiny_llama()
    tree = module_tree(model)
    with pytest.raises(ValueError, match="meta device"):
        get_peft_model(model, NeuroAdaConfig(k=1))
    assert module_tree(model) == tree


def test_importing_neuroada_installs_no_global_warning_filter_and_needs_no_cli_packages():
    import subprocess
    import sys

    # (PEFT itself may import bitsandbytes and yaml; what counts is what importing neuroada adds)
    script = ("import sys, warnings; import torch, peft, transformers; before = list(warnings.filters); "
              "modules = set(sys.modules); import neuroada; "
              "assert warnings.filters == before, [f for f in warnings.filters if f not in before]; "
              "added = {'datasets', 'matplotlib', 'yaml', 'bitsandbytes', 'deepspeed'} & (set(sys.modules) - modules); "
              "assert not added, added")
    subprocess.run([sys.executable, "-c", script], check=True)


def test_library_requirements_leave_the_command_line_packages_to_its_extra():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("<")[0].split("=")[0].strip() for d in project["dependencies"]}
    assert names == {"torch", "transformers", "peft", "safetensors", "accelerate"}
    assert {"datasets", "matplotlib", "pyyaml"} <= {d.split(">")[0] for d in project["optional-dependencies"]["cli"]}


def test_index_layouts_are_int32_and_dropped_on_a_device_move():
    layer = get_peft_model(nn.Sequential(nn.Linear(300, 40)), NeuroAdaConfig(k=3, target_modules=["0"]))
    layer = neuroada_layers(layer)[0]
    pattern = layer.pattern("default")
    assert all(t.dtype == torch.int32 for t in pattern[:5])
    layer.to(torch.float64)
    assert layer._patterns == {}


def test_backend_is_decided_by_one_rule():
    cpu = torch.device("cpu")
    x_big, x_small = torch.empty(600, 64), torch.empty(8, 64)
    assert bypass.choose_backend("auto", x_big, k=1, fusable=True) == "fused"
    assert bypass.choose_backend("auto", x_small, k=1, fusable=True) == "gather"
    assert bypass.choose_backend("auto", x_big, k=8, fusable=False) == "dense"
    assert bypass.choose_backend("fused", x_big, k=1, fusable=False) == "gather"
    assert bypass.choose_backend("dense", x_small, k=1, fusable=True) == "dense"
    assert x_big.device == cpu


# ------------------------------------------------------------------ 4. an audit of silent failures (session 4)


def _trained_gpt2(config, seed=0):
    model = get_peft_model(tiny_gpt2_model(seed), config)
    randomize_deltas(model, seed=seed + 1)
    return model.eval()


def tiny_gpt2_model(seed=0):
    from conftest import tiny_gpt2

    return tiny_gpt2(seed)


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_refused_load_into_an_existing_adapter_keeps_that_adapter(tmp_path, tokens):
    """PEFT (and the Trainer resuming a checkpoint) loads into an adapter that exists already; a refusal there must
    leave it in place, not undo it as if the load had injected it."""
    get_peft_model(tiny_gpt2_model(), NeuroAdaConfig(k=3)).save_pretrained(tmp_path)  # another k
    model = _trained_gpt2(NeuroAdaConfig(k=2))
    before = _logits(model, tokens)
    layers = len(neuroada_layers(model))
    with pytest.raises(AdapterLoadError):
        model.load_adapter(tmp_path, adapter_name="default")
    assert list(model.peft_config) == ["default"] and len(neuroada_layers(model)) == layers
    assert torch.equal(_logits(model, tokens), before)


def test_refused_load_of_a_new_adapter_still_takes_it_back(tmp_path, tokens):
    get_peft_model(tiny_gpt2_model(seed=1), NeuroAdaConfig(k=2, save_indices=False)).save_pretrained(tmp_path)
    model = _trained_gpt2(NeuroAdaConfig(k=2))
    before = _logits(model, tokens)
    with pytest.raises(AdapterLoadError):  # another base: the recomputed selection differs
        model.load_adapter(tmp_path, adapter_name="other")
    assert list(model.peft_config) == ["default"]
    assert all(set(layer.neuroada_delta) == {"default"} for layer in neuroada_layers(model))
    assert torch.equal(_logits(model, tokens), before)


@pytest.mark.parametrize("save_indices", [True, False])
def test_load_into_an_existing_adapter_uses_the_files_selection(tmp_path, tokens, save_indices):
    """The live adapter's config (another selection) must not decide where the file's deltas land."""
    source = _trained_gpt2(NeuroAdaConfig(k=2, selection="random", seed=11, save_indices=save_indices))
    source.save_pretrained(tmp_path)
    expected = _logits(source, tokens)
    model = get_peft_model(tiny_gpt2_model(), NeuroAdaConfig(k=2, save_indices=not save_indices)).eval()
    if save_indices:  # the file holds its indices: they are the selection
        model.load_adapter(tmp_path, adapter_name="default")
        torch.testing.assert_close(_logits(model, tokens), expected)
    else:  # recomputed from the live config, which selects otherwise: refused, the model unchanged
        before = _logits(model, tokens)
        with pytest.raises(AdapterLoadError, match="selection"):
            model.load_adapter(tmp_path, adapter_name="default")
        assert torch.equal(_logits(model, tokens), before)


@pytest.mark.parametrize("write", ["assign", "in_place"])
def test_indices_written_directly_are_what_forward_and_merge_use(tokens, write):
    model = _trained_gpt2(NeuroAdaConfig(k=2))
    _logits(model, tokens)  # caches the index layouts
    for layer in neuroada_layers(model):
        old = layer.neuroada_indices["default"]
        new = select_per_neuron(layer.weight_rows(), 2, "smallest").to(old.dtype)
        if write == "assign":
            layer.neuroada_indices["default"] = new
        else:
            old.copy_(new)
    unmerged = _logits(model, tokens)
    reference = get_peft_model(tiny_gpt2_model(), NeuroAdaConfig(k=2, selection="smallest")).eval()
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(unmerged, _logits(reference, tokens))
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, tokens), unmerged, atol=1e-5, rtol=1e-5)


def test_training_after_a_forward_under_inference_mode(tokens):
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2))
    with torch.inference_mode():
        model(input_ids=tokens)
    model.train()
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert all(layer.neuroada_delta["default"].grad is not None for layer in neuroada_layers(model))


@pytest.mark.parametrize("factory", ["llama_untied", "gpt2"])
def test_merge_and_unload_with_trainable_tokens(tokens, factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    if factory == "gpt2":
        base = tiny_gpt2_model()
    else:
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    model = get_peft_model(base, NeuroAdaConfig(k=2, trainable_token_indices=[3, 7], init_weights=False)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "trainable_tokens_delta" in name:
                parameter.add_(torch.randn_like(parameter))
    expected = _logits(model, tokens)
    merged = model.merge_and_unload()
    assert not neuroada_layers(merged) and isinstance(merged.get_input_embeddings(), nn.Embedding)
    torch.testing.assert_close(_logits(merged, tokens), expected, atol=1e-5, rtol=1e-5)


def test_offloaded_model_computes_what_it_did_or_refuses(tokens):
    """accelerate's offload hooks onload a module's weights when its forward runs; the deltas must be onloaded too
    (NeuroAda reads them without calling a module), never used from the meta device."""
    from accelerate import cpu_offload

    for repeats in (1, 64):  # 18 tokens (the sparse bypass) and 1,152 (the fused layer, from 512 tokens)
        model = _trained_gpt2(NeuroAdaConfig(k=2))
        batch = tokens.repeat(repeats, 1)
        expected = _logits(model, batch)
        cpu_offload(model.base_model.model, execution_device="cpu")
        torch.testing.assert_close(_logits(model, batch), expected, atol=1e-5, rtol=1e-5)


def test_two_checkpointed_forwards_backpropagated_one_after_the_other(tokens):
    """The first backward must not change what the second forward's recomputation keeps (non-reentrant
    checkpointing, transformers' default)."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, NeuroAdaConfig(k=2, init_weights=False))
        model.train()
        for _ in range(2):  # the first step learns who shares an input, the second acts on it
            model.zero_grad()
            first = model(input_ids=tokens, labels=tokens).loss
            second = model(input_ids=tokens.flip(1), labels=tokens.flip(1)).loss
            first.backward()
            second.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_merge_into_an_output_layer_tied_to_the_embeddings_is_refused(tokens):
    """Writing the deltas into a tied lm_head would change the input embeddings too (SmolLM2, GPT-2 tie them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    assert base.lm_head.weight is base.get_input_embeddings().weight
    with pytest.warns(UserWarning):  # PEFT's own warning about tied target modules
        model = get_peft_model(base, NeuroAdaConfig(k=2, target_modules=["q_proj", "lm_head"], init_weights=False))
    embeddings = model.get_input_embeddings().weight.detach().clone()
    expected = _logits(model.eval(), tokens)
    with pytest.raises(ValueError, match="tied to the input embeddings"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="tied to the input embeddings"):
        model.merge_and_unload()
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    torch.testing.assert_close(_logits(model, tokens), expected)
    untied = get_peft_model(tiny_gpt2_model(), NeuroAdaConfig(k=2, init_weights=False)).eval()  # lm_head not adapted
    expected = _logits(untied, tokens)
    torch.testing.assert_close(_logits(untied.merge_and_unload(), tokens), expected, atol=1e-5, rtol=1e-5)


def test_an_adapter_without_indices_loaded_in_another_precision_saves_again_loadably(tmp_path):
    """Loaded on a bf16/fp16 copy of its base, the adapter's rows that the copy selects differently come from the
    file; saved again, it must store those rows with the loaded indices, not the copy's own selection."""
    from peft import PeftModel

    low = torch.bfloat16  # (fp16 keeps this tiny model's selection)

    from conftest import tiny_llama

    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2, save_indices=False, init_weights=False))
    model.save_pretrained(tmp_path / "first")
    expected = {name: layer.neuroada_indices["default"].long() for name, layer in
                model.base_model.model.named_modules() if isinstance(layer, NeuroAdaLayer)}
    copy_selects = get_peft_model(tiny_llama().to(low), NeuroAdaConfig(k=2))
    assert any(not torch.equal(layer.neuroada_indices["default"].long(), expected[name]) for name, layer in
               copy_selects.base_model.model.named_modules() if isinstance(layer, NeuroAdaLayer))  # (the case)
    loaded = PeftModel.from_pretrained(tiny_llama().to(low), tmp_path / "first", is_trainable=True)
    loaded.save_pretrained(tmp_path / "again")
    for base in (tiny_llama(), tiny_llama().to(low)):
        again = PeftModel.from_pretrained(base, tmp_path / "again")
        for name, layer in again.base_model.model.named_modules():
            if isinstance(layer, NeuroAdaLayer):
                assert torch.equal(layer.neuroada_indices["default"].long(), expected[name]), name


def test_torch_attention_and_transformer_layers_are_refused_not_silently_skipped():
    """nn.MultiheadAttention never calls out_proj, and nn.TransformerEncoderLayer in eval mode reads every weight in
    a native fast path: an adapter there would train to nothing or vanish at evaluation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True),
                          nn.Linear(16, 4))
    before = {name: type(module) for name, module in model.named_modules()}
    for targets in ("all-linear", ["out_proj"], ["linear1"]):
        with pytest.raises(TypeError, match="reads its weights directly.*exclude_modules"):
            get_peft_model(model, NeuroAdaConfig(k=2, target_modules=targets))
        assert {name: type(module) for name, module in model.named_modules()} == before  # nothing half-wrapped
    adapted = get_peft_model(model, NeuroAdaConfig(k=2, target_modules=["1"]))  # the plain Linear is fine
    assert isinstance(adapted.base_model.model[1], NeuroAdaLayer)


# ------------------------------------------------------------------ a second review of the library (session 8)


def _head_net(outputs, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, outputs)).eval()


def _state(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_a_load_whose_modules_to_save_do_not_fit_leaves_the_model_as_it_was(tmp_path):
    """A head of another class count (modules_to_save) is no NeuroAda layer: PEFT's load copied every key that fit
    before it raised on the head, leaving the base adapted (from_pretrained), a half-loaded second adapter
    (load_adapter of a new name) or an existing adapter overwritten (load_adapter of its name)."""
    config = NeuroAdaConfig(k=2, target_modules=["0"], modules_to_save=["2"])
    trained = get_peft_model(_head_net(3, 0), config)
    randomize_deltas(trained)
    trained.save_pretrained(tmp_path)
    x = torch.randn(4, 8)

    base = _head_net(4, 1)
    before, tree = base(x), module_tree(base)
    with pytest.raises(AdapterLoadError, match="'2.*shape"):
        PeftModel.from_pretrained(base, tmp_path)
    assert module_tree(base) == tree and torch.equal(base(x), before) and not hasattr(base, "peft_config")

    host = get_peft_model(_head_net(4, 1), NeuroAdaConfig(k=2, target_modules=["0"], modules_to_save=["2"]))
    randomize_deltas(host, seed=5)
    state, tree = _state(host), module_tree(host)
    for name in ("other", "default"):
        with pytest.raises(AdapterLoadError, match="shape"):
            host.load_adapter(tmp_path, adapter_name=name)
        assert list(host.peft_config) == ["default"] and module_tree(host) == tree
        assert _state(host).keys() == state.keys()
        assert all(torch.equal(value, state[key]) for key, value in _state(host).items()), name


@pytest.mark.parametrize("save_indices", [True, False])
def test_a_random_selection_on_another_base_is_told_apart(tmp_path, tokens, save_indices):
    """A random selection depends on the seed only, so the selection check could never tell the base: with indices
    the base values saved with them differed and were ignored; without them nothing of the base was saved."""
    source = _trained_gpt2(NeuroAdaConfig(k=2, selection="random", seed=3, save_indices=save_indices))
    source.save_pretrained(tmp_path)
    for seed, other in ((0, False), (5, True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            PeftModel.from_pretrained(tiny_gpt2_model(seed), tmp_path)
        told = [w for w in caught if "not the base" in str(w.message)]
        assert bool(told) == other, (seed, [str(w.message) for w in caught])


def test_a_magnitude_adapter_without_indices_on_a_nearby_base_is_told_apart(tmp_path):
    """A fine-tuned copy of the base can keep every neuron's largest weights where they were, so the recomputed
    selection matches; the weights there are still not the ones the deltas were trained on."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    get_peft_model(copy.deepcopy(base), NeuroAdaConfig(k=2, target_modules=["0"], save_indices=False)).save_pretrained(
        tmp_path)
    nearby = copy.deepcopy(base)
    with torch.no_grad():
        nearby[0].weight.mul_(1.1)  # every weight 10% larger: the same top-k everywhere
    for model, other in ((copy.deepcopy(base), False), (nearby, True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            PeftModel.from_pretrained(model, tmp_path)
        assert bool([w for w in caught if "not the base" in str(w.message)]) == other


def test_load_into_an_adapter_that_was_saved_before(tmp_path, tokens):
    """Saving writes the selection's fingerprint into the live adapter's config; a later load into that adapter's
    name compared the file's indices with it and refused two sound files."""
    source = _trained_gpt2(NeuroAdaConfig(k=2, selection="random", seed=11))
    source.save_pretrained(tmp_path / "source")
    expected = _logits(source, tokens)
    model = get_peft_model(tiny_gpt2_model(), NeuroAdaConfig(k=2)).eval()
    model.save_pretrained(tmp_path / "own")
    model.load_adapter(tmp_path / "source", adapter_name="default")
    torch.testing.assert_close(_logits(model, tokens), expected)


def test_merging_one_of_two_active_adapters_keeps_the_other_applied(tokens):
    """With [default, b] active, merging default alone put default in the weights and dropped b from the forward
    (PEFT's LoRA layers do the same): the model's output changed with a merge, which must not change it."""
    model = _trained_gpt2(NeuroAdaConfig(k=2))
    model.add_adapter("b", NeuroAdaConfig(k=2, selection="random", seed=4))
    randomize_deltas(model, seed=9)
    model.base_model.set_adapter(["default", "b"])
    both = _logits(model, tokens)
    model.merge_adapter(["default"])
    torch.testing.assert_close(_logits(model, tokens), both)
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(model, tokens), both)


def test_ignore_mismatched_sizes_leaves_a_head_of_another_shape_out_as_for_lora(tmp_path):
    """PEFT's flag for a head of another class count: the head stays the base's, the deltas load."""
    trained = get_peft_model(_head_net(3, 0), NeuroAdaConfig(k=2, target_modules=["0"], modules_to_save=["2"]))
    randomize_deltas(trained)
    trained.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes"):
        loaded = PeftModel.from_pretrained(_head_net(4, 1), tmp_path, ignore_mismatched_sizes=True)
    assert torch.equal(loaded.base_model.model[0].neuroada_delta["default"],
                       trained.base_model.model[0].neuroada_delta["default"])
    assert loaded.base_model.model[2].modules_to_save["default"].weight.shape == (4, 8)
