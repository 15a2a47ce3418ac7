"""NeuroAda through PEFT's public API on tiny random Llama and GPT-2 models."""

import json
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from neuroada import AdapterLoadError, NeuroAdaConfig, NeuroAdaLayer
from conftest import sample_tokens, tiny_llama


def train_steps(model, tokens, steps=3, lr=5e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def neuroada_layers(model):
    return [m for m in model.modules() if isinstance(m, NeuroAdaLayer)]


def snapshot(model):
    """Everything that a failed operation must leave untouched: module types, weights, trainability."""
    return (
        [(name, type(module).__name__) for name, module in model.named_modules()],
        {name: p.detach().clone() for name, p in model.named_parameters()},
        {name: p.requires_grad for name, p in model.named_parameters()},
    )


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[0] == before[0]
    assert after[2] == before[2]
    assert before[1].keys() == after[1].keys()
    for name in before[1]:
        assert torch.equal(before[1][name], after[1][name]), name


@pytest.fixture(scope="module")
def trained(model_factory, tmp_path_factory):
    """A model trained for a few steps and its adapter saved, once per model kind; returns (peft_model, base_logits,
    path). Shared by the tests of this module: a test that changes the files works on a copy (copied_adapter), one
    that merges unmerges again."""
    tokens = sample_tokens()
    base_logits = logits(model_factory(), tokens)
    model = get_peft_model(model_factory(), NeuroAdaConfig(k=2))
    train_steps(model, tokens)
    path = tmp_path_factory.mktemp("trained") / "adapter"
    model.save_pretrained(path)
    return model, base_logits, path


def copied_adapter(path, tmp_path):
    return shutil.copytree(path, tmp_path / "adapter")


def test_identity_at_init(model_factory, tokens):
    expected = logits(model_factory(), tokens)
    model = get_peft_model(model_factory(), NeuroAdaConfig(k=3))
    assert torch.equal(logits(model, tokens), expected)


def test_training_changes_only_deltas_and_merge_matches(model_factory, tokens):
    model = get_peft_model(model_factory(), NeuroAdaConfig(k=2))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".neuroada_delta." in n for n in trainable)
    base_logits = logits(model, tokens)
    train_steps(model, tokens)
    adapted = logits(model, tokens)
    assert not torch.allclose(adapted, base_logits)
    for name, before in frozen_before.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    merged = model.merge_and_unload()
    assert not neuroada_layers(merged)
    torch.testing.assert_close(logits(merged, tokens), adapted, atol=1e-5, rtol=1e-5)


def test_trainable_parameter_count(model_factory):
    model = get_peft_model(model_factory(), NeuroAdaConfig(k=3))
    layers = neuroada_layers(model)
    expected = sum(layer.out_features * 3 for layer in layers)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected
    # all-linear: every projection, never the output head
    assert len(layers) == (14 if model_factory is tiny_llama else 8)


@pytest.mark.parametrize("save_indices", [True, False])
def test_save_load_round_trip(model_factory, tokens, tmp_path, save_indices):
    model = get_peft_model(model_factory(), NeuroAdaConfig(k=2, save_indices=save_indices))
    train_steps(model, tokens)
    expected = logits(model, tokens)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    kinds = {key.rsplit(".", 1)[-1] for key in tensors}
    # with indices: the base weights at them, which a load checks its base by; without indices: only the few rows
    # that a bf16/fp16 copy of the base could select differently are stored, the selection's fingerprint and the base
    # weights at the selection of a few rows
    pinned = {"neuroada_pinned_rows", "neuroada_pinned_indices", "neuroada_selection_fingerprint",
              "neuroada_base_sample"}
    assert kinds == ({"neuroada_delta", "neuroada_indices", "neuroada_base_values"} if save_indices
                     else {"neuroada_delta"} | pinned)
    layers = neuroada_layers(model)
    assert len(tensors) == len(layers) * len(kinds)
    dtypes = {"neuroada_delta": torch.float32, "neuroada_indices": torch.uint8, "neuroada_pinned_rows": torch.int32,
              "neuroada_pinned_indices": torch.uint8, "neuroada_base_values": torch.float16,
              "neuroada_selection_fingerprint": torch.uint8, "neuroada_base_sample": torch.float16}
    for key, value in tensors.items():
        assert value.dtype == dtypes[key.rsplit(".", 1)[-1]]
    if not save_indices:
        stored_rows = sum(v.numel() for k, v in tensors.items() if k.endswith("pinned_rows"))
        assert stored_rows < sum(layer.out_features for layer in layers) // 4
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "NEUROADA" and len(saved_config["selection_fingerprints"]) == len(layers)
    loaded = PeftModel.from_pretrained(model_factory(), tmp_path)
    assert torch.equal(logits(loaded, tokens), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(model_factory(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_merge_unmerge_and_disable(trained, tokens):
    model, base_logits, _ = trained
    adapted = logits(model, tokens)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.merge_adapter()
    torch.testing.assert_close(logits(model, tokens), adapted, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    torch.testing.assert_close(logits(model, tokens), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for name, value in model.named_parameters():
        if name in weights:
            assert torch.equal(value, weights[name]), name
    with pytest.warns(UserWarning, match="nothing to unmerge"):
        model.unmerge_adapter()
    with model.disable_adapter():
        assert torch.equal(logits(model, tokens), base_logits)
    assert torch.equal(logits(model, tokens), adapted)


def test_several_named_adapters(model_factory, tokens, tmp_path):
    model = get_peft_model(model_factory(), NeuroAdaConfig(k=1))
    train_steps(model, tokens)
    first = logits(model, tokens)
    model.add_adapter("second", NeuroAdaConfig(k=4, selection="random", seed=7))
    model.set_adapter("second")
    assert torch.equal(logits(model, tokens), logits(model_factory(), tokens))  # zero-initialised
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".second") for n in trainable)
    train_steps(model, tokens)
    second = logits(model, tokens)
    model.set_adapter("default")
    assert torch.equal(logits(model, tokens), first)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "second" / "adapter_model.safetensors").exists()
    model.delete_adapter("second")
    assert all("second" not in n for n, _ in model.named_parameters())
    reloaded = PeftModel.from_pretrained(model_factory(), tmp_path)
    reloaded.load_adapter(tmp_path / "second", adapter_name="second")
    reloaded.set_adapter("second")
    assert torch.equal(logits(reloaded, tokens), second)


def test_modules_to_save_and_targets(tokens, tmp_path):
    config = NeuroAdaConfig(k=1, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(tiny_llama(), config)
    assert len(neuroada_layers(model)) == 4
    train_steps(model, tokens)
    expected = logits(model, tokens)
    model.save_pretrained(tmp_path)
    assert any("lm_head" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path), tokens), expected)


def test_exclude_modules_and_regex_targets():
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(target_modules=r".*\.mlp\..*_proj", exclude_modules=["down_proj"]))
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, NeuroAdaLayer)}
    assert names == {"gate_proj", "up_proj"}


# ----------------------------------------------------------------------------------------- bad input


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        NeuroAdaConfig(k=0)
    with pytest.raises(ValueError, match="selection='biggest' is unknown"):
        NeuroAdaConfig(selection="biggest")


def test_targets_that_match_nothing_leave_the_model_alone():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(model, NeuroAdaConfig(target_modules=["no_such_proj"]))
    assert_unchanged(model, before)


def test_unsupported_module_is_named_and_injection_is_undone():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(TypeError, match="embed_tokens.*is a Embedding"):
        get_peft_model(model, NeuroAdaConfig(target_modules=["q_proj", "embed_tokens"]))
    assert_unchanged(model, before)


def test_k_larger_than_a_layer_is_capped_with_a_warning():
    with pytest.warns(UserWarning, match="k=40 is larger than the input size of 12 layer"):
        model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=40))
    shapes = {name.rsplit(".", 1)[-1]: tuple(m.neuroada_delta["default"].shape)
              for name, m in model.named_modules() if isinstance(m, NeuroAdaLayer)}
    assert shapes["q_proj"] == (32, 32) and shapes["gate_proj"] == (48, 32) and shapes["down_proj"] == (32, 40)


def test_adapter_for_other_shapes_is_refused_and_model_left_alone(tmp_path, tokens):
    get_peft_model(tiny_llama(), NeuroAdaConfig(k=2)).save_pretrained(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    before = snapshot(other)
    with pytest.raises(AdapterLoadError, match=r"gate_proj.*other shapes"):
        PeftModel.from_pretrained(other, tmp_path)
    assert_unchanged(other, before)


def test_adapter_without_indices_on_other_weights_is_refused(tmp_path, tokens):
    model = get_peft_model(tiny_llama(seed=0), NeuroAdaConfig(k=2, save_indices=False))
    train_steps(model, tokens)
    model.save_pretrained(tmp_path)
    other = tiny_llama(seed=1)
    before = snapshot(other)
    with pytest.raises(AdapterLoadError, match="selection recomputed from this base model's weights differs"):
        PeftModel.from_pretrained(other, tmp_path)
    assert_unchanged(other, before)


def test_adapter_with_indices_on_other_weights_warns_and_uses_stored_indices(trained, model_factory):
    model, _, path = trained
    with pytest.warns(UserWarning, match="not the base the adapter was trained on"):
        loaded = PeftModel.from_pretrained(model_factory(seed=5), path)
    for original, restored in zip(neuroada_layers(model), neuroada_layers(loaded)):
        assert torch.equal(original.neuroada_indices["default"], restored.neuroada_indices["default"])


def test_loading_indices_into_a_used_layer_updates_what_the_op_uses(trained, model_factory, tokens):
    from peft import set_peft_model_state_dict

    model, _, path = trained
    other = get_peft_model(model_factory(seed=5), NeuroAdaConfig(k=2))
    logits(other, tokens)  # builds the op's index layouts from this base's own selection
    with pytest.warns(UserWarning, match="not the base the adapter was trained on"):
        set_peft_model_state_dict(other, load_file(path / "adapter_model.safetensors"))
    for original, restored in zip(neuroada_layers(model), neuroada_layers(other)):
        assert torch.equal(restored.pattern("default").columns, original.neuroada_indices["default"].long())


def test_indices_that_disagree_with_the_config_fingerprint_are_refused(trained, model_factory, tmp_path):
    path = copied_adapter(trained[2], tmp_path)
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("neuroada_indices"))
    tensors[key] = tensors[key].flip(0).contiguous()
    from safetensors.torch import save_file
    save_file(tensors, file)
    base = model_factory()
    before = snapshot(base)
    with pytest.raises(AdapterLoadError, match="do not match the fingerprint"):
        PeftModel.from_pretrained(base, path)
    assert_unchanged(base, before)


@pytest.mark.parametrize("damage", ["truncate", "garble_header"])
def test_damaged_file_is_refused_before_the_model_is_touched(trained, model_factory, damage, tmp_path):
    path = copied_adapter(trained[2], tmp_path)
    file = path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 40] if damage == "truncate" else b"\x10\x00" + data[2:])
    base = model_factory()
    before = snapshot(base)
    with pytest.raises(ValueError, match="damaged or truncated"):
        PeftModel.from_pretrained(base, path)
    assert_unchanged(base, before)


def test_saving_nan_deltas_is_refused_and_writes_nothing(model_factory, tmp_path):
    model = get_peft_model(model_factory(), NeuroAdaConfig(k=1))
    neuroada_layers(model)[0].neuroada_delta["default"].data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf deltas"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_backends_train_alike(model_factory):
    tokens = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(2))
    results = {}
    for backend in ("auto", "fused", "gather", "dense"):
        model = get_peft_model(model_factory(), NeuroAdaConfig(k=2, bypass_backend=backend))
        train_steps(model, tokens)
        results[backend] = logits(model, tokens)
    for backend, value in results.items():
        torch.testing.assert_close(value, results["gather"], atol=2e-4, rtol=2e-4, msg=backend)
