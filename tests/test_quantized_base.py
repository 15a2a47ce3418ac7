"""bitsandbytes 4-bit and 8-bit base layers (bitsandbytes runs them on CPU)."""

import pytest
import torch
from peft import get_peft_model
from torch import nn

from neuroada import NeuroAdaConfig, NeuroAdaLayer, NeuroAdaLinear, select_per_neuron, sparse_bypass_reference
from neuroada.quantized import dequantized_weight

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")


def quantized_linear(bits, in_features=64, out_features=32, seed=0):
    torch.manual_seed(seed)
    source = nn.Linear(in_features, out_features)
    if bits == 4:
        layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, has_fp16_weights=False)
    layer.load_state_dict(source.state_dict())
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("bits", [4, 8])
def test_selection_forward_and_gradients_on_a_quantized_base(bits):
    base = quantized_linear(bits)
    layer = NeuroAdaLinear(base, "default", NeuroAdaConfig(k=3, init_weights=False))
    dequantized = dequantized_weight(base)
    assert torch.equal(layer.neuroada_indices["default"], select_per_neuron(dequantized, 3))
    x = torch.randn(5, 64, requires_grad=True)
    out = layer(x)
    expected = base(x) + sparse_bypass_reference(x, layer.neuroada_delta["default"], layer.neuroada_indices["default"])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert layer.neuroada_delta["default"].grad is not None and x.grad is not None
    assert layer.get_base_layer().weight.grad is None  # the quantized weight stays frozen


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_requantizes_with_a_warning(bits):
    base = quantized_linear(bits)
    layer = NeuroAdaLinear(base, "default", NeuroAdaConfig(k=2))
    layer.neuroada_delta["default"].data.fill_(0.5)  # well above either quantization step
    x = torch.randn(4, 64)
    unmerged = layer(x)
    before = dequantized_weight(base)
    with pytest.warns(UserWarning, match="rounds the merged weight to the quantization grid"):
        layer.merge()
    merged_weight = dequantized_weight(layer.get_base_layer())
    indices = layer.neuroada_indices["default"].long()
    step = 0.1 if bits == 4 else 0.02  # worst-case requantization error seen on this layer, with margin
    assert ((merged_weight.gather(1, indices) - before.gather(1, indices)) - 0.5).abs().max() < step
    merged = layer(x)
    bias = layer.get_base_layer().bias
    torch.testing.assert_close(merged, x @ merged_weight.T + bias, atol=1e-4, rtol=1e-5)  # runs the merged weight
    # The merged output differs from the unmerged one only by what requantization changed in W + S, entry by entry.
    exact = before.scatter_add(1, indices, layer.neuroada_delta["default"].detach())
    requantization_error = x.abs() @ (merged_weight - exact).abs().T
    assert ((merged - unmerged).abs() <= requantization_error + 1e-4).all()
    with pytest.warns(UserWarning):
        layer.unmerge()
    assert not layer.merged
    assert (dequantized_weight(layer.get_base_layer()) - before).abs().max() < step


def test_get_peft_model_on_a_model_with_4bit_layers():
    model = nn.Sequential(quantized_linear(4, 64, 48, seed=1), nn.ReLU(), quantized_linear(4, 48, 16, seed=2))
    peft_model = get_peft_model(model, NeuroAdaConfig(k=1, target_modules=["0", "2"]))
    layers = [m for m in peft_model.modules() if isinstance(m, NeuroAdaLayer)]
    assert [layer.quantization for layer in layers] == ["4bit", "4bit"]
    assert peft_model.get_nb_trainable_parameters()[0] == 48 + 16
    x = torch.randn(3, 64)
    peft_model(x).sum().backward()
    assert all(layer.neuroada_delta["default"].grad is not None for layer in layers)


def test_an_8bit_layer_that_keeps_float_weights_is_adapted_as_a_plain_weight():
    """bitsandbytes' Linear8bitLt defaults to has_fp16_weights=True: its Int8Params then hold the float weight, not
    int8 codes with a scale (get_peft_model crashed reading a scale that does not exist)."""
    torch.manual_seed(0)
    source = nn.Linear(64, 32)
    base = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=True)
    base.load_state_dict(source.state_dict())
    base = base.to("cpu")
    weight = base.weight.data.float().clone()
    layer = NeuroAdaLinear(base, "default", NeuroAdaConfig(k=3, init_weights=False))
    assert torch.equal(layer.neuroada_indices["default"].long(), select_per_neuron(weight, 3).long())
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = base(x) + sparse_bypass_reference(x, layer.neuroada_delta["default"],
                                                     layer.neuroada_indices["default"])
        torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("save_indices", [True, False])
def test_an_adapter_of_a_quantized_base_holds_no_base_values_and_loads_on_its_float_original(tmp_path, bits,
                                                                                             save_indices):
    """Rounded weights are not the float original's: saved as base values they made a load on the original warn
    'not the base' depending on the criterion. Left out (as the README says); the load checks the selection."""
    import warnings

    from peft import PeftModel
    from safetensors.torch import load_file

    config = NeuroAdaConfig(k=2, target_modules=["0"], selection="random", save_indices=save_indices)
    get_peft_model(nn.Sequential(quantized_linear(bits)), config).save_pretrained(tmp_path)
    kinds = {key.rsplit(".", 1)[-1] for key in load_file(tmp_path / "adapter_model.safetensors")}
    assert not kinds & {"neuroada_base_values", "neuroada_base_sample"}
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(64, 32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(original, tmp_path)
    assert not [w for w in caught if "not the base" in str(w.message)]


def test_an_adapter_of_a_4bit_base_on_its_float_original_says_so_instead_of_another_base(tmp_path):
    """The workflow the merge warning recommends (merge into an unquantized copy): the rounded weights selected
    otherwise, so the selection check fails on the original; the warning said 'not the base the adapter was trained
    on'. The config now records the quantized training base, and the warning says what is expected of it."""
    import warnings

    from peft import PeftConfig, PeftModel

    get_peft_model(nn.Sequential(quantized_linear(4)), NeuroAdaConfig(k=2, target_modules=["0"])).save_pretrained(
        tmp_path)
    assert PeftConfig.from_pretrained(tmp_path).quantized_base == "4bit"
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(nn.Sequential(nn.Linear(64, 32)), tmp_path)
    messages = [str(w.message) for w in caught if "adapter 'default'" in str(w.message)]
    assert len(messages) == 1, messages
    assert "trained on a 4bit quantized base" in messages[0] and "not the base" not in messages[0]
