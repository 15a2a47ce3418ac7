"""Loading an adapter saved with its indices costs O(out * k) per layer: the selection is not computed (the file's
indices are loaded instead), and the base is recognised by the base weights stored at the selected positions."""

import copy
import warnings

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import neuroada.layer
from neuroada import AdapterLoadError, NeuroAdaConfig, NeuroAdaLayer, select_per_neuron
from conftest import MODEL_FACTORIES, tiny_llama


def neuroada_layers(model):
    return [m for m in model.modules() if isinstance(m, NeuroAdaLayer)]


def saved_adapter(factory, folder, **config):
    model = get_peft_model(factory(), NeuroAdaConfig(k=2, **config))
    generator = torch.Generator().manual_seed(0)
    for layer in neuroada_layers(model):
        layer.neuroada_delta["default"].data = torch.randn(layer.neuroada_delta["default"].shape,
                                                           generator=generator)
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture
def count_selections(monkeypatch):
    calls = []
    real = neuroada.layer.select_per_neuron
    monkeypatch.setattr(neuroada.layer, "select_per_neuron", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def without_base_values(folder):
    file = folder / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(file).items() if not k.endswith("neuroada_base_values")}, file)


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def no_other_base_warning(caught):
    return not [w for w in caught if "not the base" in str(w.message)]


@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_load_with_stored_indices_selects_nothing(tmp_path, count_selections, family, dtype):
    factory = MODEL_FACTORIES[family]
    trained = saved_adapter(factory, tmp_path)
    tokens = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    count_selections.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(factory().to(dtype), tmp_path)
        loaded.load_adapter(tmp_path, adapter_name="again")
    assert count_selections == [] and no_other_base_warning(caught)
    for original, restored in zip(neuroada_layers(trained), neuroada_layers(loaded)):
        for name in ("default", "again"):
            assert torch.equal(restored.neuroada_indices[name], original.neuroada_indices["default"])
    assert count_selections == []  # reading the loaded indices selects nothing either
    if dtype == torch.float32:
        torch.testing.assert_close(logits(loaded, tokens), logits(trained, tokens))


def test_load_on_another_base_still_warns_and_uses_the_stored_indices(tmp_path, count_selections):
    trained = saved_adapter(tiny_llama, tmp_path)
    count_selections.clear()
    with pytest.warns(UserWarning, match="not the base the adapter was trained on"):
        loaded = PeftModel.from_pretrained(tiny_llama(seed=5), tmp_path)
    assert not count_selections  # the base values did not match, which tells another base without selecting
    for original, restored in zip(neuroada_layers(trained), neuroada_layers(loaded)):
        assert torch.equal(restored.neuroada_indices["default"], original.neuroada_indices["default"])


@pytest.mark.parametrize("base", ["same", "other"])
def test_file_without_base_values_is_checked_by_the_selection_as_before(tmp_path, count_selections, base):
    saved_adapter(tiny_llama, tmp_path)
    without_base_values(tmp_path)
    count_selections.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(tiny_llama(seed=0 if base == "same" else 5), tmp_path)
    assert count_selections
    assert no_other_base_warning(caught) == (base == "same")


def test_base_differing_at_the_selected_positions_is_another_base(tmp_path):
    """The base values are the weights the deltas were trained against: where they differ it is another base, even
    when its selection is the same (here the selected weights grew, so they are still the top-k). Until session 8
    the selection decided then, which could never tell a random selection's base."""
    trained = saved_adapter(tiny_llama, tmp_path)
    base = tiny_llama()
    grown = get_peft_model(base, NeuroAdaConfig(k=2))
    with torch.no_grad():
        for original, layer in zip(neuroada_layers(trained), neuroada_layers(grown)):
            rows = layer.weight_rows()
            columns = original.neuroada_indices["default"].long()
            rows.scatter_(1, columns, rows.gather(1, columns) * 1.5)
    base = grown.unload()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(base, tmp_path)
    assert not no_other_base_warning(caught)


def test_base_values_of_the_wrong_shape_are_refused(tmp_path):
    saved_adapter(tiny_llama, tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("neuroada_base_values"))
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, file)
    with pytest.raises(AdapterLoadError, match="base values have shape"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_a_deferred_selection_is_computed_by_its_first_reader(tmp_path, count_selections):
    """A config read from a save with indices defers the selection; used without a load, the adapter selects on the
    first read of its indices, as if it had selected at injection (the state dict included)."""
    saved_adapter(tiny_llama, tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2))
    count_selections.clear()
    model.add_adapter("deferred", config)
    assert count_selections == []
    state = model.state_dict()  # computes every deferred selection
    assert len(count_selections) == len(neuroada_layers(model))
    for name, layer in model.named_modules():
        if isinstance(layer, NeuroAdaLayer):
            assert torch.equal(layer.neuroada_indices["deferred"], layer.neuroada_indices["default"])
            assert torch.equal(state[f"{name}.neuroada_indices.deferred"], layer.neuroada_indices["default"])


def test_a_deferred_selection_in_a_deep_copy_reads_the_copy(tmp_path):
    saved_adapter(tiny_llama, tmp_path)
    model = get_peft_model(tiny_llama(), PeftConfig.from_pretrained(tmp_path))
    twin = copy.deepcopy(model)
    twin_layer = neuroada_layers(twin)[0]
    with torch.no_grad():
        twin_layer.weight_rows().neg_().mul_(torch.rand(twin_layer.weight_rows().shape) + 0.5)  # another ranking
    assert torch.equal(twin_layer.neuroada_indices["default"], select_per_neuron(twin_layer.weight_rows(), 2))
    layer = neuroada_layers(model)[0]
    assert torch.equal(layer.neuroada_indices["default"], select_per_neuron(layer.weight_rows(), 2))
    assert not torch.equal(layer.neuroada_indices["default"], twin_layer.neuroada_indices["default"])
