"""Many adapters on one base: mixed-adapter batches (PEFT's ``adapter_names=``) and switching adapters cheaply."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from neuroada import NeuroAdaConfig, NeuroAdaLayer
from conftest import MODEL_FACTORIES

BACKENDS = ("auto", "gather", "dense", "fused", "triton")


def with_adapters(factory, backend="auto", **extra):
    """A model holding four adapters with random (non-zero) deltas, three selections and three k."""
    model = get_peft_model(factory(), NeuroAdaConfig(k=2, init_weights=False, bypass_backend=backend, **extra), "math")
    model.add_adapter("chat", NeuroAdaConfig(k=3, selection="random", seed=5, init_weights=False, bypass_backend=backend,
                                          **extra))
    model.add_adapter("code", NeuroAdaConfig(k=1, init_weights=False, bypass_backend=backend, **extra))
    # the same selection as "math" (same k and criterion on the same base), other deltas
    model.add_adapter("sums", NeuroAdaConfig(k=2, init_weights=False, bypass_backend=backend, **extra))
    with torch.no_grad():  # larger than the 0.02 initialisation, so that each adapter moves the logits visibly
        for layer in layers(model):
            for delta in layer.neuroada_delta.values():
                delta.mul_(10)
    return model.eval()


def layers(model):
    return [m for m in model.modules() if isinstance(m, NeuroAdaLayer)]


def alone(model, name, run):
    """``run()`` with only ``name`` active ("__base__": with the adapters disabled)."""
    if name == "__base__":
        with model.disable_adapter():
            return run()
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        return run()
    finally:
        model.set_adapter(previous)


NAMES = ["chat", "__base__", "math", "sums", "chat", "code", "math"]


@pytest.fixture
def batch():
    return torch.randint(0, 96, (len(NAMES), 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture(params=["shared", "per-adapter"])
def shared_gather(request, monkeypatch):
    """Both ways of computing adapters that share a selection: one gather for all (small batches), or one op call
    per adapter (large ones)."""
    if request.param == "per-adapter":
        monkeypatch.setattr("neuroada.layer._SHARED_GATHER_MAX_ENTRIES", 0)
    return request.param


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_equals_each_sample_alone(model_factory, batch, backend, monkeypatch):
    monkeypatch.setattr("neuroada.layer._SHARED_GATHER_MAX_ENTRIES", 0)  # one op call per adapter, in this backend
    assert_mixed_batch_equals_each_sample_alone(with_adapters(model_factory, backend), batch)


def test_mixed_batch_with_shared_selections_equals_each_sample_alone(model_factory, batch):
    # "math" and "sums" computed together by one gather (backend-independent)
    assert_mixed_batch_equals_each_sample_alone(with_adapters(model_factory), batch)


def assert_mixed_batch_equals_each_sample_alone(model, batch):
    with torch.no_grad():
        mixed = model(input_ids=batch, adapter_names=NAMES).logits
        expected = [alone(model, name, lambda: model(input_ids=batch[i : i + 1]).logits[0])
                    for i, name in enumerate(NAMES)]
    # the adapters differ from each other and from the base, so a mixed batch that ignored the names would fail
    assert (expected[0] - expected[1]).abs().max() > 1e-2
    assert (expected[1] - expected[2]).abs().max() > 1e-2
    assert (expected[2] - expected[3]).abs().max() > 1e-2  # "math" and "sums" share a selection, not the deltas
    for i, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[i], expected[i], atol=1e-5, rtol=1e-5, msg=f"sample {i} ({name})")


def test_a_selection_loaded_after_a_mixed_batch_is_not_taken_for_a_shared_one(batch):
    model = with_adapters(MODEL_FACTORIES["llama"])
    with torch.no_grad():
        model(input_ids=batch, adapter_names=NAMES)  # "math" and "sums" computed together
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, layer in model.named_modules():
        if isinstance(layer, NeuroAdaLayer):
            rows = [torch.randperm(layer.in_features, generator=generator)[:2].sort().values
                    for _ in range(layer.out_features)]
            state[f"{name}.neuroada_indices.sums"] = torch.stack(rows).to(layer.neuroada_indices["sums"].dtype)
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        mixed = model(input_ids=batch, adapter_names=NAMES).logits
        for i, name in enumerate(NAMES):
            expected = alone(model, name, lambda: model(input_ids=batch[i : i + 1]).logits[0])
            torch.testing.assert_close(mixed[i], expected, atol=1e-5, rtol=1e-5, msg=f"sample {i} ({name})")


def test_mixed_batch_greedy_generation_equals_each_sample_alone(model_factory, batch, shared_gather):
    model = with_adapters(model_factory)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    mask = torch.ones_like(batch)
    mixed = model.generate(input_ids=batch, attention_mask=mask, adapter_names=NAMES, **settings)
    for i, name in enumerate(NAMES):
        expected = alone(model, name, lambda: model.generate(input_ids=batch[i : i + 1], attention_mask=mask[i : i + 1],
                                                             **settings))
        assert torch.equal(mixed[i], expected[0]), f"sample {i} ({name})"


def test_mixed_batch_beam_search_repeats_names_per_beam(batch):
    model = with_adapters(MODEL_FACTORIES["llama"])
    settings = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    mixed = model.generate(input_ids=batch[:3], adapter_names=NAMES[:3], **settings)
    for i, name in enumerate(NAMES[:3]):
        expected = alone(model, name, lambda: model.generate(input_ids=batch[i : i + 1], **settings))
        assert torch.equal(mixed[i], expected[0]), f"sample {i} ({name})"


def test_one_name_for_the_whole_batch_equals_setting_it_active(batch):
    model = with_adapters(MODEL_FACTORIES["gpt2"])
    with torch.no_grad():
        mixed = model(input_ids=batch, adapter_names=["code"] * len(batch)).logits
        base = model(input_ids=batch, adapter_names=["__base__"] * len(batch)).logits
        expected = alone(model, "code", lambda: model(input_ids=batch).logits)
        expected_base = alone(model, "__base__", lambda: model(input_ids=batch).logits)
    torch.testing.assert_close(mixed, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(base, expected_base, atol=1e-6, rtol=1e-6)


def test_modules_to_save_follow_the_names_too(batch):
    model = with_adapters(MODEL_FACTORIES["llama"], target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["chat"].weight.mul_(2)  # make "chat"'s copy differ
        mixed = model(input_ids=batch, adapter_names=NAMES).logits
        for i, name in enumerate(NAMES):
            expected = alone(model, name, lambda: model(input_ids=batch[i : i + 1]).logits[0])
            torch.testing.assert_close(mixed[i], expected, atol=1e-5, rtol=1e-5, msg=f"sample {i} ({name})")


def test_unknown_adapter_name_is_refused(batch):
    model = with_adapters(MODEL_FACTORIES["llama"])
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter\\(s\\): nope, nope2"):
        model(input_ids=batch[:3], adapter_names=["math", "nope2", "nope"])


def test_adapter_names_of_the_wrong_length_are_refused(batch):
    model = with_adapters(MODEL_FACTORIES["llama"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs, but "
                                         "got 2 and 7 respectively"):
        model(input_ids=batch, adapter_names=["math", "chat"])


def test_adapter_names_on_a_merged_model_are_refused(batch):
    model = with_adapters(MODEL_FACTORIES["gpt2"])
    model.merge_adapter(["math"])
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters, please call "
                                         "`unmerge_adapter` first"):
        model(input_ids=batch, adapter_names=NAMES)


def test_adapter_names_in_training_mode_are_refused(batch):
    model = with_adapters(MODEL_FACTORIES["llama"]).train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        model(input_ids=batch, adapter_names=NAMES)


def test_peft_model_calls_the_forward_hooks_we_provide():
    # PeftModel strips adapter_names from the kwargs and hands them to the tuner's _enable_peft_forward_hooks only;
    # if a PEFT release stops calling it, mixed batches would silently get the active adapter again.
    import inspect

    from peft import PeftModel, PeftModelForCausalLM

    for method in (PeftModel.forward, PeftModel.generate, PeftModelForCausalLM.forward, PeftModelForCausalLM.generate):
        assert "_enable_peft_forward_hooks" in inspect.getsource(method), method.__qualname__


# ---------------------------------------------------------------------------------------------- switching adapters


class NewStorages(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of every tensor an op allocates (outputs that share no storage with an input)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.numel())
        return out

    @property
    def largest(self):
        return max(self.sizes, default=0)


def base_weights(model):
    return {name: layer.get_base_layer().weight for name, layer in model.named_modules()
            if isinstance(layer, NeuroAdaLayer)}


def selected_mask(layer, names):
    """Where the adapters ``names`` select entries of the layer's base weight (in the weight's own layout)."""
    mask = torch.zeros(layer.out_features, layer.in_features, dtype=torch.bool)
    for name in names:
        mask.scatter_(1, layer.neuroada_indices[name].long(), True)
    return mask.T if layer.is_conv1d else mask


def test_switching_the_merged_adapter_writes_only_the_selected_entries(model_factory, batch):
    model = with_adapters(model_factory)
    model.set_adapter("math")
    model.merge_adapter()
    before = {name: w.detach().clone() for name, w in base_weights(model).items()}
    pointers = {name: w.data_ptr() for name, w in base_weights(model).items()}
    smallest_weight = min(w.numel() for w in before.values())
    largest_adapter = max(d.numel() for layer in layers(model) for d in layer.neuroada_delta.values())
    with NewStorages() as allocations:
        model.unmerge_adapter()
        model.set_adapter("chat")
        model.merge_adapter()
    assert allocations.largest <= largest_adapter < smallest_weight  # O(out * k) temporaries, nothing W-sized
    changed_anywhere = False
    for (name, weight), layer in zip(base_weights(model).items(), layers(model)):
        assert weight.data_ptr() == pointers[name]
        changed = weight.detach() != before[name]
        assert not (changed & ~selected_mask(layer, ["math", "chat"])).any(), name
        changed_anywhere |= bool(changed.any())
    assert changed_anywhere
    with torch.no_grad():  # and the switch gave the merged model of "chat"
        merged = model(input_ids=batch).logits
        model.unmerge_adapter()
        torch.testing.assert_close(merged, model(input_ids=batch).logits, atol=1e-5, rtol=1e-5)


def test_adding_switching_and_deleting_adapters_leaves_the_base_weights_alone(model_factory, tmp_path, batch):
    trained = with_adapters(model_factory)
    trained.save_pretrained(tmp_path)  # one folder per adapter
    model = PeftModel.from_pretrained(model_factory(), tmp_path / "math", adapter_name="math")
    weights = base_weights(model)
    before = {name: (w.data_ptr(), w.detach().clone()) for name, w in weights.items()}
    smallest_weight = min(w.numel() for w in weights.values())

    def held_bytes():
        tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                   for t in [*model.parameters(), *model.buffers()]}
        return sum(tensors.values())

    held = held_bytes()
    model.load_adapter(tmp_path / "chat", adapter_name="chat")
    added = sum(t.untyped_storage().nbytes() for layer in layers(model)
                for t in (layer.neuroada_delta["chat"], layer.neuroada_indices["chat"]))
    assert held_bytes() == held + added  # the adapter's own tensors, no copy of a base weight kept
    with NewStorages() as allocations:
        model.set_adapter("chat")
    with torch.no_grad():
        chat = model(input_ids=batch).logits
    with NewStorages() as more_allocations:
        model.set_adapter("math")
        model.delete_adapter("chat")
    assert max(allocations.largest, more_allocations.largest) < smallest_weight
    assert held_bytes() == held
    for name, weight in base_weights(model).items():
        assert weight.data_ptr() == before[name][0] and torch.equal(weight, before[name][1]), name
    torch.testing.assert_close(chat, alone(trained, "chat", lambda: trained(input_ids=batch).logits))


def test_peft_hotswap_refuses_neuroada_and_the_documented_equivalent_works(tmp_path, batch):
    from peft.utils.hotswap import hotswap_adapter

    factory = MODEL_FACTORIES["llama"]
    trained = with_adapters(factory)
    trained.save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(factory(), tmp_path / "math")  # as "default"
    with pytest.raises(ValueError, match="Hotswapping only supports"):
        hotswap_adapter(model, str(tmp_path / "code"), adapter_name="default")
    # the equivalent (README): load beside, activate, drop the old one
    model.load_adapter(tmp_path / "code", adapter_name="code")
    model.set_adapter("code")
    model.delete_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch).logits,
                                   alone(trained, "code", lambda: trained(input_ids=batch).logits))


def test_merge_onloads_layers_only_where_accelerate_hooks_exist(monkeypatch):
    # merge_adapter skips PEFT's onload_layer walk (slower than a k=1 merge) unless a module carries an accelerate
    # hook, as the modules of an offloaded model do
    from accelerate.hooks import ModelHook, add_hook_to_module

    import neuroada.model

    onloaded = []
    real = neuroada.model.onload_layer
    monkeypatch.setattr(neuroada.model, "onload_layer", lambda layer: onloaded.append(layer) or real(layer))
    model = with_adapters(MODEL_FACTORIES["llama"])
    model.merge_adapter(["math"])
    model.unmerge_adapter()
    assert onloaded == []
    add_hook_to_module(layers(model)[0].get_base_layer(), ModelHook())
    model.merge_adapter(["math"])
    model.unmerge_adapter()
    assert onloaded == layers(model) * 2


# merge_adapter / unmerge_adapter keep the list of NeuroAda layers between calls (neuroada.model._LayerWalk); each
# test below first merges and unmerges once so that a list is kept, then changes the model behind it.

def keep_layer_walk(model):
    model.merge_adapter(["math"])
    model.unmerge_adapter()


def test_merge_after_add_adapter_on_more_modules_merges_the_new_layers(batch):
    model = get_peft_model(MODEL_FACTORIES["llama"](), NeuroAdaConfig(k=2, target_modules=["q_proj"]), "math").eval()
    keep_layer_walk(model)
    model.add_adapter("more", NeuroAdaConfig(k=2, target_modules=["q_proj", "v_proj"], init_weights=False))
    model.set_adapter("more")
    with torch.no_grad():
        for layer in layers(model):
            layer.neuroada_delta["more"].mul_(10)
        expected = model(input_ids=batch).logits
        model.merge_adapter(["more"])
        merged = model(input_ids=batch).logits
    assert all(layer.merged for layer in layers(model) if "more" in layer.neuroada_delta)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["setattr", "_modules", "del"])
def test_merge_leaves_alone_a_layer_the_user_took_out(how):
    model = with_adapters(MODEL_FACTORIES["llama"])
    keep_layer_walk(model)
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, NeuroAdaLayer))
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    plain = layer.get_base_layer()
    before = plain.weight.detach().clone()
    if how == "setattr":
        setattr(parent, child, plain)
    elif how == "_modules":  # bypasses Module.__setattr__ and its registration hooks
        parent._modules[child] = plain
    else:
        delattr(parent, child)
    model.merge_adapter(["math"])
    assert not layer.merged and torch.equal(plain.weight, before)
    assert all(other.merged for other in layers(model))


def test_merge_reaches_layers_added_to_a_module_list(batch):
    import copy

    model = with_adapters(MODEL_FACTORIES["llama"])
    keep_layer_walk(model)
    blocks = model.base_model.model.model.layers
    blocks.append(copy.deepcopy(blocks[-1]))
    model.base_model.model.config.num_hidden_layers += 1
    model.set_adapter("math")
    with torch.no_grad():
        expected = model(input_ids=batch).logits
        model.merge_adapter(["math"])
        merged = model(input_ids=batch).logits
    assert all(layer.merged for layer in layers(model))
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


def test_merge_on_a_deep_copy_writes_the_copy_only(batch):
    import copy

    model = with_adapters(MODEL_FACTORIES["llama"])
    keep_layer_walk(model)
    before = {name: w.detach().clone() for name, w in base_weights(model).items()}
    twin = copy.deepcopy(model)
    twin.merge_adapter(["math"])
    assert all(layer.merged for layer in layers(twin)) and not any(layer.merged for layer in layers(model))
    for name, weight in base_weights(model).items():
        assert torch.equal(weight, before[name]), name


def test_merge_after_delete_adapter_gives_the_remaining_adapter(batch):
    model = with_adapters(MODEL_FACTORIES["llama"])
    keep_layer_walk(model)
    model.delete_adapter("math")
    model.set_adapter("code")
    with torch.no_grad():
        expected = model(input_ids=batch).logits
        model.merge_adapter(["code"])
        torch.testing.assert_close(model(input_ids=batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_unmerge_restores_the_entries_merged_even_if_the_indices_were_loaded_anew():
    model = with_adapters(MODEL_FACTORIES["llama"])
    model.add_adapter("random", NeuroAdaConfig(k=2, selection="random", seed=9))  # same shape as "math", other places
    before = {name: w.detach().clone() for name, w in base_weights(model).items()}
    model.merge_adapter(["math"])
    model.load_state_dict({key.replace(".random", ".math"): value for key, value in model.state_dict().items()
                           if key.endswith("neuroada_indices.random")}, strict=False)
    model.unmerge_adapter()
    for name, weight in base_weights(model).items():
        assert torch.equal(weight, before[name]), name


def test_merging_an_adapter_named_twice_is_refused_and_changes_nothing(batch):
    """Merged twice, the saved original of the first merge was overwritten by the merged value: unmerge could never
    give the base back."""
    model = with_adapters(MODEL_FACTORIES["llama"])
    before = {name: weight.clone() for name, weight in base_weights(model).items()}
    with pytest.raises(ValueError, match="'math' more than once"):
        model.merge_adapter(["math", "math"])
    assert all(not layer.merged for layer in layers(model))
    assert all(torch.equal(before[name], weight) for name, weight in base_weights(model).items())
    model.merge_adapter(["math", "chat"])  # distinct names merge and unmerge bit for bit
    model.unmerge_adapter()
    assert all(torch.equal(before[name], weight) for name, weight in base_weights(model).items())


def test_a_mixed_batch_under_inference_mode_does_not_break_later_ones_with_gradients(batch):
    model = with_adapters(MODEL_FACTORIES["llama"])
    names = ["math", "chat", "math", "__base__", "code", "math", "chat"]  # not contiguous: index tensors
    with torch.inference_mode():
        expected = model(input_ids=batch, adapter_names=names).logits
    logits = model(input_ids=batch, adapter_names=names).logits  # gradients on, e.g. an attribution pass
    assert logits.requires_grad
    torch.testing.assert_close(logits, expected.clone())


def test_add_weighted_adapter_is_refused_with_the_alternatives():
    model = with_adapters(MODEL_FACTORIES["llama"])
    with pytest.raises(NotImplementedError, match="merge_and_unload"):
        model.add_weighted_adapter(["math", "chat"], [0.5, 0.5], "mix")
