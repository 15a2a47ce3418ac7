"""The op keeps only the input columns the deltas read (x[:, kept]) for its backward, where that saves memory."""

import pytest
import torch
from peft import get_peft_model
from torch import nn

from neuroada import NeuroAdaConfig, NeuroAdaLayer, build_pattern, select_per_neuron
from neuroada import triton_backend
from neuroada.bypass import linear_with_bypass, sparse_bypass, sparse_bypass_reference
from conftest import tiny_llama

TRITON = triton_backend.available(torch.device("cpu"))


def low_coverage_weight(out_features, in_features, hot_columns, seed=0):
    """A weight whose largest entries sit in a few input columns, as in trained models: k=1 reads ~hot_columns."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    weight[:, :hot_columns] *= 8
    return weight


def saved_during(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("backend", ["gather", "dense", "fused"] + (["triton"] if TRITON else []))
@pytest.mark.parametrize("keep_columns", [True, False])
@pytest.mark.parametrize("hot, k", [(12, 1), (40, 3), (64, 16)])  # coverage well below, near and at 100%
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_the_dense_reference_whatever_is_kept(backend, keep_columns, hot, k, dtype):
    if backend in ("fused", "triton") and dtype != torch.float32:
        pytest.skip("the fused layer serves float32 bases; the Triton interpreter is slow (its dtypes: test_triton)")
    out_features, in_features, tokens = 48, 64, 37
    weight = low_coverage_weight(out_features, in_features, hot)
    indices = select_per_neuron(weight, k)
    pattern = build_pattern(indices, in_features)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, in_features, generator=generator).to(dtype).requires_grad_(True)
    delta = torch.randn(out_features, k, generator=generator).requires_grad_(True)
    if backend == "fused":
        out = linear_with_bypass(x, weight, None, delta, pattern, keep_columns)
        ref = x.float() @ weight.T + sparse_bypass_reference(x, delta, indices)
    else:
        out = sparse_bypass(x, delta, pattern, backend, keep_columns)
        ref = sparse_bypass_reference(x, delta, indices)
    upstream = torch.randn(out.shape, generator=generator)
    got = torch.autograd.grad(out, (x, delta), upstream.to(out.dtype))
    want = torch.autograd.grad(ref, (x, delta), upstream)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), atol=tolerance * max(1, tokens ** 0.5), rtol=tolerance)


@pytest.mark.parametrize("backend", ["gather", "dense", "fused"] + (["triton"] if TRITON else []))
def test_keeps_the_read_columns_and_not_x_at_low_coverage(backend):
    out_features, in_features, tokens = 40, 100, 64
    weight = low_coverage_weight(out_features, in_features, hot_columns=30)
    pattern = build_pattern(select_per_neuron(weight, 1), in_features)
    assert pattern.coverage <= 0.4
    x = torch.randn(tokens, in_features, requires_grad=True)
    delta = torch.randn(out_features, 1, requires_grad=True)
    if backend == "fused":
        _, saved = saved_during(lambda: linear_with_bypass(x, weight, None, delta, pattern))
    else:
        _, saved = saved_during(lambda: sparse_bypass(x, delta, pattern, backend))
    floats = [t for t in saved if t.is_floating_point() and t.data_ptr() != weight.data_ptr()]
    assert not any(t.data_ptr() == x.data_ptr() for t in saved)  # x itself is not kept
    assert sum(t.numel() for t in floats) == tokens * pattern.kept.numel() + delta.numel()
    assert all(t.numel() <= out_features * 1 + in_features + 1 for t in saved if not t.is_floating_point())


def layer_keeps(model, tokens):
    """What each adapted layer's op keeps in one training forward: {layer name: saved float elements}."""
    kept = {}
    for name, layer in model.named_modules():
        if isinstance(layer, NeuroAdaLayer):
            def pre(module, args, name=name):
                module._saved_hooks = torch.autograd.graph.saved_tensors_hooks(
                    lambda t: kept.setdefault(name, []).append(t) or t, lambda t: t)
                module._saved_hooks.__enter__()

            def post(module, args, out):
                module._saved_hooks.__exit__(None, None, None)

            layer.register_forward_pre_hook(pre)
            layer.register_forward_hook(post)
    model(tokens, labels=tokens).loss.backward()
    return kept


def test_in_a_model_only_layers_alone_on_their_input_keep_a_gathered_copy():
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=1))
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    model(tokens, labels=tokens).loss.backward()  # the first training step learns who shares an input
    kept = layer_keeps(model, tokens)  # the next one acts on it
    layers = {name.rsplit(".", 1)[-1]: layer for name, layer in model.named_modules() if isinstance(layer, NeuroAdaLayer)}
    assert {n: layers[n]._input_sharing for n in layers} == {
        "q_proj": "shared", "k_proj": "shared", "v_proj": "shared", "o_proj": "alone",
        "gate_proj": "shared", "up_proj": "shared", "down_proj": "alone"}
    for name, saved in kept.items():
        layer = model.get_submodule(name)
        pattern = layer.pattern("default")
        x_elements = 2 * 16 * layer.in_features
        ignored = {layer.get_base_layer().weight.data_ptr(), layer.neuroada_delta["default"].data_ptr()}
        floats = sum(t.numel() for t in saved if t.is_floating_point() and t.data_ptr() not in ignored)
        if layer._input_sharing == "alone" and pattern.coverage <= 0.75:
            assert floats == 2 * 16 * pattern.kept.numel() < x_elements, name
        else:  # x itself, shared with the other readers of the same tensor: no copy
            assert floats == x_elements, name


def test_training_with_kept_columns_equals_training_with_x():
    results = []
    for keep in (True, False):
        model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=1))
        if not keep:
            for layer in model.modules():
                if isinstance(layer, NeuroAdaLayer):
                    layer._input_sharing = "shared"  # never gathers
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            model(tokens, labels=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        if keep:  # o_proj and down_proj gathered in steps 2 and 3
            assert sum(layer._input_sharing == "alone" for layer in model.modules()
                       if isinstance(layer, NeuroAdaLayer)) == 4
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_what_the_forward_kept(reentrant):
    """The sharing decision is taken after a layer's backward, so a checkpointed block keeps the same tensors in its
    recomputation as in its forward (a decision taken mid-forward, or at the next model forward when another
    forward ran before the backward, broke non-reentrant checkpointing)."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model = get_peft_model(model, NeuroAdaConfig(k=1, init_weights=False))
        model.train()
        tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
        for _ in range(3):  # learn, then act on what was learnt
            model.zero_grad()
            loss = model(tokens, labels=tokens).loss
            with torch.no_grad(), model.disable_adapter():
                model(tokens)  # another forward between a forward and its backward (as DPO's reference)
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert any(layer._input_sharing == "alone" for layer in model.modules() if isinstance(layer, NeuroAdaLayer))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)
