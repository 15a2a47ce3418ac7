"""The Triton kernels' self-check: a faulty kernel (injected in Triton's CPU interpreter) makes "auto" warn once and
fall back to the PyTorch backends, with correct results; explicit "triton" stays unchecked."""

import warnings

import pytest
import torch
from torch import nn

from neuroada import bypass, kernel_check, triton_backend
from neuroada.bypass import build_pattern, sparse_bypass_reference
from neuroada.config import NeuroAdaConfig
from neuroada.layer import NeuroAdaLinear

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not triton_backend.available(DEVICE):
    pytest.skip("Triton cannot run here: no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    # let "auto" consider the kernels on this device (on CPU: in the interpreter), with no verdict cached yet
    monkeypatch.setattr(bypass, "_TRITON_DEVICE_TYPES", ("cuda", "cpu"))
    kernel_check.forget_verdicts()
    yield
    kernel_check.forget_verdicts()


wrong_forward_original = triton_backend.bypass_forward


def faulty_forward(x2d, delta, columns, out_dtype=torch.float32):
    return wrong_forward_original(x2d, delta, columns, out_dtype) * 1.5


def failing_input_grad(*args, **kwargs):
    raise RuntimeError("PTX assembly failed (injected)")


def adapted_layer(dtype=torch.float32):
    torch.manual_seed(0)
    linear = nn.Linear(24, 20).to(DEVICE, dtype).requires_grad_(False)
    config = NeuroAdaConfig(k=3, init_weights=False)
    return NeuroAdaLinear(linear, "default", config)


def layer_and_reference(layer, x):
    out = layer(x)
    delta = layer.neuroada_delta["default"]
    indices = layer.neuroada_indices["default"]
    ref = layer.base_layer(x).float() + sparse_bypass_reference(x, delta, indices)
    return out, ref


def test_correct_kernels_pass_once_and_auto_uses_them(monkeypatch):
    calls = []
    original = triton_backend.bypass_forward
    monkeypatch.setattr(triton_backend, "bypass_forward", lambda *a: calls.append(1) or original(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a passing check warns about nothing
        assert kernel_check.triton_usable(DEVICE, torch.float32)
        checked = len(calls)
        assert kernel_check.triton_usable(DEVICE, torch.float32)  # cached: no second run
    assert checked == 1 and len(calls) == 1
    assert bypass.choose_backend("auto", torch.empty(16, 24, device=DEVICE), 3) == "triton"


@pytest.mark.parametrize("fault", ["wrong forward", "raising input gradient"])
def test_faulty_kernel_falls_back_with_one_warning_and_correct_results(monkeypatch, fault):
    if fault == "wrong forward":
        monkeypatch.setattr(triton_backend, "bypass_forward", faulty_forward)
    else:
        monkeypatch.setattr(triton_backend, "input_grad", failing_input_grad)
    layer = adapted_layer()
    x = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="Triton kernels .* PyTorch backends instead") as record:
        out, ref = layer_and_reference(layer, x)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert bypass.choose_backend("auto", x, 3, fusable=False) in ("gather", "dense")  # a PyTorch backend
    torch.testing.assert_close(out.float(), ref, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (x, layer.neuroada_delta["default"]), upstream)
    ref_grads = torch.autograd.grad(ref, (x, layer.neuroada_delta["default"]), upstream)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the verdict is cached: no second warning
        layer(x)
        assert not kernel_check.triton_usable(DEVICE, torch.float32)


def test_verdict_is_per_dtype(monkeypatch):
    monkeypatch.setattr(triton_backend, "bypass_forward", faulty_forward)
    with pytest.warns(RuntimeWarning):
        assert not kernel_check.triton_usable(DEVICE, torch.bfloat16)
    monkeypatch.setattr(triton_backend, "bypass_forward", wrong_forward_original)
    assert kernel_check.triton_usable(DEVICE, torch.float32)
    assert not kernel_check.triton_usable(DEVICE, torch.bfloat16)


def test_explicit_triton_is_not_checked(monkeypatch):
    monkeypatch.setattr(triton_backend, "bypass_forward", faulty_forward)
    indices = torch.tensor([[0, 2], [1, 3]], device=DEVICE)
    x = torch.randn(3, 4, device=DEVICE)
    delta = torch.randn(2, 2, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = bypass.sparse_bypass(x, delta, build_pattern(indices, 4), "triton")
    torch.testing.assert_close(out, 1.5 * sparse_bypass_reference(x, delta, indices))  # the faulty kernel ran
    assert kernel_check._verdicts == {}


def test_the_check_leaves_the_callers_random_stream_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    assert kernel_check.triton_usable(DEVICE, torch.float16)
    torch.testing.assert_close(torch.rand(3), expected)


def test_check_works_under_no_grad_and_inference_mode():
    with torch.inference_mode():
        assert kernel_check.triton_usable(DEVICE, torch.float32)
    kernel_check.forget_verdicts()
    with torch.no_grad():
        assert kernel_check.triton_usable(DEVICE, torch.bfloat16)


@pytest.mark.slow
def test_compiled_layer_needs_no_graph_break_before_or_after_the_check():
    layer = adapted_layer()
    x = torch.randn(5, 24, device=DEVICE)
    before = torch.compile(layer, fullgraph=True)(x)  # not checked yet: under tracing the kernels are trusted
    assert kernel_check._verdicts == {}
    torch._dynamo.reset()
    eager = layer(x)  # the eager call runs the check
    assert list(kernel_check._verdicts.values()) == [True]
    after = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(before, eager)
    torch.testing.assert_close(after, eager)
