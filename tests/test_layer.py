"""The NeuroAda layer on nn.Linear and GPT-2's Conv1D: forward, storage, merge and unmerge."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from neuroada import NeuroAdaConfig, NeuroAdaLinear, sparse_bypass_reference
from neuroada.bypass import choose_backend


def make_layer(kind, in_features=24, out_features=10, dtype=torch.float32, k=3, **config):
    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Linear(in_features, out_features)
    else:
        base = Conv1D(out_features, in_features)
        nn.init.normal_(base.weight)
    base = base.to(dtype).requires_grad_(False)
    return NeuroAdaLinear(base, "default", NeuroAdaConfig(k=k, init_weights=False, **config))


def weight_as_rows(layer):
    weight = layer.get_base_layer().weight
    return weight.T if layer.is_conv1d else weight


BACKENDS = ["auto", "fused", "gather", "dense"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [3, 300])  # "auto" picks a separate bypass for 6 tokens, the fused path for 600
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_and_gradients_are_base_plus_dense_delta(kind, tokens, backend):
    layer = make_layer(kind, bypass_backend=backend)
    x = torch.randn(2, tokens, 24, requires_grad=True)
    adapted_weight = layer.get_base_layer().weight + layer.get_delta_weight("default")  # in the base's layout
    rows = adapted_weight.T if layer.is_conv1d else adapted_weight
    expected = x @ rows.T + layer.get_base_layer().bias
    out = layer(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    upstream = torch.randn(out.shape)
    grad_x, grad_delta = torch.autograd.grad(out, (x, layer.neuroada_delta["default"]), upstream)
    indices = layer.neuroada_indices["default"].long()
    expected_grad_delta = (upstream.reshape(-1, 10).T @ x.detach().reshape(-1, 24)).gather(1, indices)
    torch.testing.assert_close(grad_x, upstream @ rows.detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad_delta, expected_grad_delta, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_selection_runs_along_the_input_axis(kind):
    layer = make_layer(kind, k=2)
    base = layer.get_base_layer().weight
    # by definition, in the layout each class stores: Linear [out, in], Conv1D [in, out]; neuron i = output i
    stored = base.tolist()
    def weight(i, j):
        return stored[j][i] if kind == "conv1d" else stored[i][j]
    expected = [sorted(sorted(range(24), key=lambda j: (-abs(weight(i, j)), j))[:2]) for i in range(10)]
    assert layer.neuroada_indices["default"].shape == (10, 2)
    assert layer.neuroada_indices["default"].tolist() == expected


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_storage_dtypes(kind, dtype):
    layer = make_layer(kind, in_features=300, dtype=dtype)
    assert layer.neuroada_delta["default"].dtype == torch.float32
    assert layer.neuroada_indices["default"].dtype == torch.int32  # (int16 in files; collectives have no int16)
    assert layer(torch.randn(3, 300).to(dtype)).dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_unmerged_and_unmerge_restores_bits(kind, dtype, backend):
    layer = make_layer(kind, dtype=dtype, bypass_backend=backend)
    with torch.no_grad():  # deltas far larger than the weights: W + d - d loses W's low bits, only a restore is exact
        layer.neuroada_delta["default"].copy_(torch.randn(10, 3, generator=torch.Generator().manual_seed(1)) * 100)
    x = torch.randn(80, 24).to(dtype)
    original = layer.get_base_layer().weight.detach().clone()
    unmerged_out = layer(x)
    layer.merge()
    assert layer.merged
    # merged, the sum is rounded once to the weight's dtype: relative error of one rounding at the output's scale
    tolerance = (1e-5 if dtype == torch.float32 else 2**-7) * unmerged_out.float().abs().max().item()
    torch.testing.assert_close(layer(x).float(), unmerged_out.float(), atol=tolerance, rtol=0)
    layer.unmerge()
    assert torch.equal(layer.get_base_layer().weight, original)


def test_merge_sums_in_float32_then_casts_once():
    layer = make_layer("linear", dtype=torch.bfloat16)
    rows = weight_as_rows(layer)
    indices = layer.neuroada_indices["default"].long()
    expected = (rows.gather(1, indices).float() + layer.neuroada_delta["default"].detach()).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(weight_as_rows(layer).gather(1, indices), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_delta_on_large_bf16_weight_still_changes_the_output(backend):
    base = nn.Linear(2, 1, bias=False).to(torch.bfloat16).requires_grad_(False)
    base.weight.data = torch.tensor([[256.0, -256.0]], dtype=torch.bfloat16)
    layer = NeuroAdaLinear(base, "default", NeuroAdaConfig(k=1, bypass_backend=backend))
    assert torch.equal(layer.neuroada_indices["default"], torch.tensor([[0]], dtype=torch.uint8))  # tie: lower
    layer.neuroada_delta["default"].data.fill_(0.25)
    x = torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16)
    assert base(x).item() == 0.0
    assert layer(x).item() == 0.25
    # What composing W + delta in bf16 (the reference code's forward) gives: the update is rounded away.
    composed = base.weight.clone()
    composed[0, 0] += torch.tensor(0.25, dtype=torch.bfloat16)
    assert (x @ composed.T).item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_saved_for_backward_holds_no_weight_copy(kind, backend):
    layer = make_layer(kind, in_features=64, out_features=128, k=2, bypass_backend=backend)
    x = torch.randn(100, 64, requires_grad=True)
    weight = layer.get_base_layer().weight
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    copies = [t for t in saved if t.numel() >= weight.numel() and t.data_ptr() != weight.data_ptr()]
    assert not copies


def test_unmerge_without_merge_warns_and_changes_nothing():
    layer = make_layer("linear")
    before = layer.get_base_layer().weight.clone()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    assert torch.equal(layer.get_base_layer().weight, before)


def test_k_is_capped_at_in_features():
    layer = make_layer("linear", in_features=3, k=8)
    assert layer.neuroada_delta["default"].shape == (10, 3)


def test_fused_path_is_skipped_where_it_would_change_semantics():
    layer = make_layer("linear", bypass_backend="fused")
    base = layer.get_base_layer()
    x = torch.randn(100, 24)
    assert choose_backend("fused", x, 3, layer._fusable(x)) == "fused"
    handle = base.register_forward_hook(lambda module, args, out: out * 2)
    assert choose_backend("fused", x, 3, layer._fusable(x)) != "fused"  # the base layer's hook must run
    bypass = sparse_bypass_reference(x, layer.neuroada_delta["default"], layer.neuroada_indices["default"])
    torch.testing.assert_close(layer(x), base(x) + bypass, atol=1e-5, rtol=1e-5)  # base(x) includes the hook
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert choose_backend("fused", x, 3, layer._fusable(x)) != "fused"


def test_index_layouts_follow_the_module_to_another_device(monkeypatch):
    """The op's index layouts are cached per selection; after ``.to(device)`` they must be those of the moved
    indices, not the cached copies on the old device. With a GPU the moved layer must compute what it computed on
    the CPU. Without one the meta device stands in: its tensors have no data and ``build_pattern`` has no meta
    kernel (bincount), so the layouts are built from a CPU placeholder and moved, to see which device they land on."""
    layer = make_layer("linear", bypass_backend="gather")
    x = torch.randn(5, 24)
    expected = layer(x)  # caches the layouts on the CPU
    if torch.cuda.is_available():
        layer.to("cuda")
        torch.testing.assert_close(layer(x.cuda()).cpu(), expected, atol=1e-5, rtol=1e-5)
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        import neuroada.layer
        from neuroada.bypass import SparsePattern, build_pattern

        def build_from_placeholder(indices, in_features):
            placeholder = torch.arange(indices.shape[1], dtype=indices.dtype).expand(indices.shape)  # distinct, sorted
            pattern = build_pattern(placeholder, in_features)
            return SparsePattern(*(t.to(indices.device) for t in pattern[:7]), in_features)

        monkeypatch.setattr(neuroada.layer, "build_pattern", build_from_placeholder)
        layer.to("meta")
        device = torch.device("meta")
    assert layer.neuroada_indices["default"].device == device
    pattern = layer.pattern("default")
    assert all(t.device == device for t in pattern[:7])


@pytest.mark.parametrize("hook", ["module", "module_pre", "global"])
def test_fused_path_runs_the_base_layers_backward_hooks(hook):
    """A backward hook on the base layer (gradient scaling, clipping, monitoring) changes the input gradient; the
    fused path never calls the base module, so it must not be taken while one exists."""
    layer = make_layer("linear", bypass_backend="fused")
    base = layer.get_base_layer()
    halve = lambda module, grad_output_or_input, *rest: tuple(g * 0.5 if g is not None else None  # noqa: E731
                                                                  for g in grad_output_or_input)
    if hook == "module":
        handle = base.register_full_backward_hook(lambda module, grad_input, grad_output: halve(module, grad_input))
    elif hook == "module_pre":
        handle = base.register_full_backward_pre_hook(halve)
    else:
        handle = torch.nn.modules.module.register_module_full_backward_hook(
            lambda module, grad_input, grad_output: halve(module, grad_input) if module is base else None)
    try:
        x = torch.randn(100, 24, requires_grad=True)
        bypass = sparse_bypass_reference(x, layer.neuroada_delta["default"].detach(), layer.neuroada_indices["default"])
        (base(x) + bypass).square().sum().backward()
        expected, x.grad = x.grad, None
        layer(x).square().sum().backward()
        torch.testing.assert_close(x.grad, expected, atol=1e-5, rtol=1e-5)
    finally:
        handle.remove()


def test_fused_path_refuses_the_input_dtypes_the_base_layer_refuses():
    layer = make_layer("linear", bypass_backend="fused")
    for dtype in (torch.bfloat16, torch.float64):
        x = torch.randn(600, 24, dtype=dtype)
        with pytest.raises(RuntimeError, match="dtype"):
            layer.get_base_layer()(x)
        with pytest.raises(RuntimeError, match="dtype"):
            layer(x)


@pytest.mark.parametrize("backend", ["gather", "fused"])
def test_second_order_gradients_raise_in_every_layout(backend):
    """After a first step the layer may keep only the input columns its deltas read, saved detached: a gradient
    penalty through the delta gradient would then silently lose its input terms, so it must raise."""
    layer = make_layer("linear", in_features=64, out_features=6, k=1, bypass_backend=backend)
    layer(torch.randn(3, 64, requires_grad=True)).sum().backward()  # the layer learns it is alone on its input
    x = torch.randn(5, 64, requires_grad=True)
    delta = layer.neuroada_delta["default"]
    with pytest.raises(RuntimeError, match="second-order|no autograd formula"):
        gradient, = torch.autograd.grad(layer(x).sum(), delta, create_graph=True)
        torch.autograd.grad(gradient.pow(2).sum(), x, allow_unused=True)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("backend", ["auto", "gather", "dense", "fused"])
@pytest.mark.parametrize("tokens", [4, 600])
def test_float64_layer_holds_float64_deltas_is_exact_and_passes_gradcheck(kind, backend, tokens):
    """A float64 base gets float64 deltas and a float64 bypass: the adapted layer equals its merged weight to float64
    rounding, and finite differences confirm the delta and input gradients."""
    layer = make_layer(kind, dtype=torch.float64, bypass_backend=backend)
    delta = layer.neuroada_delta["default"]
    assert delta.dtype == torch.float64
    x = torch.randn(tokens, 24, dtype=torch.float64)
    merged = weight_as_rows(layer).clone()
    merged.scatter_add_(1, layer.neuroada_indices["default"].long(), delta.detach())
    expected = x @ merged.T + layer.get_base_layer().bias
    torch.testing.assert_close(layer(x).detach(), expected, atol=1e-12, rtol=1e-12)
    layer.merge()
    torch.testing.assert_close(weight_as_rows(layer), merged, atol=0, rtol=0)
    layer.unmerge()
    small = x[:3].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, d: layer(a), (small, delta))


def test_a_model_cast_to_float64_after_the_adapter_was_added_is_exact():
    layer = make_layer("linear")
    layer.double()
    assert layer.neuroada_delta["default"].dtype == torch.float64
    x = torch.randn(5, 24, dtype=torch.float64)
    merged = weight_as_rows(layer).clone()
    merged.scatter_add_(1, layer.neuroada_indices["default"].long(), layer.neuroada_delta["default"].detach())
    torch.testing.assert_close(layer(x).detach(), x @ merged.T + layer.get_base_layer().bias, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cast, expected", [(lambda m: m.half(), torch.float32),
                                            (lambda m: m.to(torch.bfloat16), torch.float32),
                                            (lambda m: m.double(), torch.float64),
                                            (lambda m: m.double().float(), torch.float32)])
def test_casting_the_model_keeps_the_deltas_at_their_precision(cast, expected):
    """model.half() / .to(bf16) after get_peft_model cast every parameter, deltas too, so that small updates were
    rounded away in training; the deltas now keep float32 (float64 on a float64 base), in the same Parameter (an
    optimizer made before the cast still holds it), trainable, with their values."""
    layer = make_layer("linear")
    delta = layer.neuroada_delta["default"]
    values = delta.detach().clone()
    cast(layer)
    assert layer.neuroada_delta["default"] is delta
    assert delta.dtype == expected and delta.requires_grad
    torch.testing.assert_close(delta.detach().float(), values, atol=0, rtol=0)
    x = torch.randn(4, 24, dtype=layer.get_base_layer().weight.dtype)
    layer(x).float().sum().backward()
    assert delta.grad is not None and delta.grad.dtype == expected
