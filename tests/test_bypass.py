"""The sparse bypass op against its dense reference: outputs, both gradients, dtypes, backends, odd shapes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import examples
from neuroada.bypass import (build_pattern, choose_backend, linear_with_bypass, sparse_bypass,
                             sparse_bypass_reference)
from neuroada.selection import select_per_neuron

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def run_both(x, delta, indices, backend):
    """Output and gradients (x, delta) of the op and of the reference for the same upstream gradient."""
    pattern = build_pattern(indices, x.shape[-1])
    results = []
    for fn in (lambda a, d: sparse_bypass(a, d, pattern, backend), lambda a, d: sparse_bypass_reference(a, d, indices)):
        a = x.detach().clone().requires_grad_(True)
        d = delta.detach().clone().requires_grad_(True)
        out = fn(a, d)
        upstream = torch.linspace(-1, 1, out.numel()).view(out.shape)
        out.backward(upstream)
        results.append((out.detach(), a.grad, d.grad))
    return results


def assert_close(actual, expected, dtype, scale):
    tolerance = TOLERANCE[dtype] * max(1.0, scale)
    torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance, rtol=TOLERANCE[dtype])


@settings(max_examples=examples(60))
@given(
    out_features=st.integers(1, 24),
    in_features=st.integers(1, 40),
    leading=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    backend=st.sampled_from(["gather", "dense", "auto"]),
    data=st.data(),
)
def test_matches_dense_reference(out_features, in_features, leading, dtype, backend, data):
    k = data.draw(st.integers(1, in_features))
    seed = data.draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, in_features, generator=generator).to(dtype)
    delta = torch.randn(out_features, k, generator=generator)
    indices = select_per_neuron(torch.randn(out_features, in_features, generator=generator), k, "random", seed)
    (out, gx, gd), (ref_out, ref_gx, ref_gd) = run_both(x, delta, indices, backend)
    assert out.dtype == torch.float32 and out.shape == (*leading, out_features)
    assert gx.dtype == dtype and gx.shape == x.shape
    assert gd.dtype == torch.float32 and gd.shape == delta.shape
    tokens = x.numel() // in_features
    assert_close(out, ref_out, dtype, k)
    assert_close(gx, ref_gx, dtype, out_features)
    assert_close(gd, ref_gd, dtype, tokens)


@pytest.mark.parametrize("backend", ["gather", "dense"])
@pytest.mark.parametrize("shape", [(1, 7, 7), (5, 1, 1), (1, 1, 1), (16, 300, 300)])
def test_odd_shapes(backend, shape):
    out_features, in_features, k = shape  # k == in_features, single-row layers, 1x1
    x = torch.randn(3, 2, in_features)
    delta = torch.randn(out_features, k)
    indices = select_per_neuron(torch.randn(out_features, in_features), k)
    (out, gx, gd), (ref_out, ref_gx, ref_gd) = run_both(x, delta, indices, backend)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gx, ref_gx, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gd, ref_gd, atol=1e-4, rtol=1e-5)


def test_zero_tokens():
    pattern = build_pattern(select_per_neuron(torch.randn(4, 6), 2), 6)
    x = torch.randn(0, 6, requires_grad=True)
    delta = torch.randn(4, 2, requires_grad=True)
    out = sparse_bypass(x, delta, pattern)
    out.sum().backward()
    assert out.shape == (0, 4) and torch.equal(delta.grad, torch.zeros(4, 2))


@pytest.mark.parametrize("backend", ["gather", "dense", "auto"])
def test_gradients_with_respect_to_delta_only(backend):
    generator = torch.Generator().manual_seed(0)
    indices = select_per_neuron(torch.randn(8, 12, generator=generator), 3)
    pattern = build_pattern(indices, 12)
    x = torch.randn(5, 12, generator=generator)  # needs no gradient: only delta's is computed
    upstream = torch.randn(5, 8, generator=generator)
    delta = torch.randn(8, 3, generator=generator, requires_grad=True)
    sparse_bypass(x, delta, pattern, backend).backward(upstream)
    # grad_delta[i, j] = sum over tokens n of upstream[n, i] * x[n, indices[i, j]]
    expected = torch.tensor([[sum(upstream[n, i].item() * x[n, int(indices[i, j])].item() for n in range(5))
                              for j in range(3)] for i in range(8)])
    torch.testing.assert_close(delta.grad, expected, atol=1e-5, rtol=1e-5)
    assert x.grad is None


@pytest.mark.parametrize("backend", ["gather", "dense", "auto", "fused"])
@pytest.mark.parametrize("keep_columns", [True, False])
def test_float64_operands_are_computed_in_float64_and_pass_gradcheck(backend, keep_columns):
    """A float64 input or delta makes the op accumulate in float64 (float32 is the floor, never the ceiling), so
    finite differences check both gradients: gradcheck in every backend and both saved layouts."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 9, dtype=torch.float64, generator=generator)
    pattern = build_pattern(select_per_neuron(weight, 3), 9)
    x = torch.randn(2, 3, 9, dtype=torch.float64, generator=generator, requires_grad=True)
    delta = torch.randn(5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    if backend == "fused":
        bias = torch.randn(5, dtype=torch.float64, generator=generator, requires_grad=True)
        op = lambda a, d, b: linear_with_bypass(a, weight, b, d, pattern, keep_columns)
        inputs = (x, delta, bias)
        reference = x.detach() @ weight.T + bias.detach() + sparse_bypass_reference(x.detach(), delta.detach(),
                                                                                     pattern.columns)
    else:
        op = lambda a, d: sparse_bypass(a, d, pattern, backend, keep_columns)
        inputs = (x, delta)
        reference = sparse_bypass_reference(x.detach(), delta.detach(), pattern.columns)
    out = op(*inputs)
    assert out.dtype == torch.float64 and reference.dtype == torch.float64
    torch.testing.assert_close(out.detach(), reference, atol=1e-13, rtol=1e-13)
    assert torch.autograd.gradcheck(op, inputs)


def test_a_float32_delta_on_float64_inputs_gives_float64_gradients_to_both():
    pattern = build_pattern(select_per_neuron(torch.randn(5, 7), 3), 7)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(5, 3, dtype=torch.float32, requires_grad=True)
    for backend in ("gather", "dense"):
        out = sparse_bypass(x, delta, pattern, backend)
        ref = sparse_bypass_reference(x, delta, pattern.columns)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, ref, atol=1e-13, rtol=1e-13)
        gx, gd = torch.autograd.grad(out.sum(), (x, delta))
        rx, rd = torch.autograd.grad(ref.sum(), (x, delta))
        assert (gx.dtype, gd.dtype) == (torch.float64, torch.float32)
        torch.testing.assert_close(gx, rx, atol=1e-13, rtol=1e-13)
        torch.testing.assert_close(gd, rd)


@pytest.mark.parametrize("backend", ["gather", "dense"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_out_dtype_is_the_cast_afterwards_bit_for_bit(backend, dtype):
    """The layer asks for its output dtype: the same numbers as the float32 result cast afterwards, forward and both
    gradients, without the float32 copy."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 29, generator=generator).to(dtype)
    delta = torch.randn(13, 3, generator=generator)
    pattern = build_pattern(select_per_neuron(torch.randn(13, 29, generator=generator), 3), 29)
    upstream = torch.randn(3, 7, 13, generator=generator).to(dtype)
    results = []
    for compute in (lambda a, d: sparse_bypass(a, d, pattern, backend, out_dtype=dtype),
                    lambda a, d: sparse_bypass(a, d, pattern, backend).to(dtype)):
        a, d = x.clone().requires_grad_(True), delta.clone().requires_grad_(True)
        out = compute(a, d)
        results.append((out, *torch.autograd.grad(out, (a, d), upstream)))
    for got, want in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("backend", ["gather", "dense"])
def test_keeps_only_input_and_delta_for_backward(backend):
    out_features, in_features, k, tokens = 256, 128, 4, 6
    pattern = build_pattern(select_per_neuron(torch.randn(out_features, in_features), k), in_features)
    x = torch.randn(tokens, in_features, requires_grad=True)
    delta = torch.randn(out_features, k, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sparse_bypass(x, delta, pattern, backend)
    floats = [t for t in saved if t.is_floating_point()]
    assert sum(t.numel() for t in floats) == x.numel() + delta.numel()
    # besides x and delta only the selection's index layouts, each O(out * k) or O(in)
    assert all(t.numel() <= max(out_features * k, in_features) + 1 for t in saved if not t.is_floating_point())


def test_rejects_wrong_input_width_and_backend():
    pattern = build_pattern(select_per_neuron(torch.randn(4, 6), 2), 6)
    with pytest.raises(ValueError, match="input has 5 features"):
        sparse_bypass(torch.randn(2, 5), torch.zeros(4, 2), pattern)
    with pytest.raises(ValueError, match="unknown bypass backend"):
        sparse_bypass(torch.randn(2, 6), torch.zeros(4, 2), pattern, "triton-please")


def test_backend_choice():
    assert choose_backend("auto", torch.empty(2048, 2048), 1, fusable=True) == "fused"
    assert choose_backend("auto", torch.empty(8, 2048), 1, fusable=True) == "gather"  # decoding: W copies dominate
    assert choose_backend("auto", torch.empty(2048, 2048), 20) == "gather"
    assert choose_backend("auto", torch.empty(2048, 64), 16) == "dense"



def test_triton_steps_aside_for_float64(monkeypatch):
    """The kernels accumulate in float32: a float64 input, or a float64 delta, goes to the PyTorch backends, explicitly
    asked for or not, wherever the kernels could run."""
    import neuroada.bypass as bypass

    monkeypatch.setattr(bypass.triton_backend, "available", lambda device: True)
    monkeypatch.setattr(bypass.kernel_check, "triton_usable", lambda device, dtype: True)
    monkeypatch.setattr(bypass, "_TRITON_DEVICE_TYPES", ("cpu",))
    assert choose_backend("auto", torch.empty(8, 64), 1) == "triton"  # the premise: the kernels would be chosen
    assert choose_backend("triton", torch.empty(8, 64), 1) == "triton"
    assert choose_backend("auto", torch.empty(8, 64, dtype=torch.float64), 1) == "gather"
    assert choose_backend("triton", torch.empty(8, 64, dtype=torch.float64), 1) == "gather"
    pattern = build_pattern(select_per_neuron(torch.randn(5, 64), 1), 64)
    monkeypatch.setattr(bypass.triton_backend, "bypass_forward", lambda *args: pytest.fail("the kernels ran"))
    x, delta = torch.randn(8, 64), torch.randn(5, 1, dtype=torch.float64)
    out = sparse_bypass(x, delta, pattern, "triton")
    torch.testing.assert_close(out, sparse_bypass_reference(x, delta, pattern.columns), atol=1e-13, rtol=1e-13)

def test_transposed_pattern_lists_every_entry_once():
    indices = select_per_neuron(torch.randn(9, 5), 3, "random", seed=4)
    pattern = build_pattern(indices, 5)
    flat = indices.long().reshape(-1)
    # Entries ordered by input position; the row of each entry is the neuron that selected that position.
    assert torch.equal(flat[pattern.transposed_order], torch.sort(flat, stable=True).values)
    assert torch.equal(pattern.transposed_rows, pattern.transposed_order // 3)
    counts = torch.bincount(flat, minlength=5)
    assert torch.equal(pattern.transposed_offsets, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))


@settings(max_examples=examples(40))
@given(
    out_features=st.integers(1, 20),
    in_features=st.integers(1, 30),
    tokens=st.integers(0, 12),
    weight_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    x_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    transposed_storage=st.booleans(),
    with_bias=st.booleans(),
    data=st.data(),
)
def test_fused_linear_matches_reference(out_features, in_features, tokens, weight_dtype, x_dtype, transposed_storage,
                                        with_bias, data):
    k = data.draw(st.integers(1, in_features))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    weight = torch.randn(out_features, in_features, generator=generator).to(weight_dtype)
    if transposed_storage:  # Conv1D keeps [in, out]; the layer passes its transpose, a strided view
        weight = weight.T.contiguous().T
    bias = torch.randn(out_features, generator=generator).requires_grad_(True) if with_bias else None
    indices = select_per_neuron(weight, k)
    pattern = build_pattern(indices, in_features)
    x = torch.randn(2, tokens, in_features, generator=generator).to(x_dtype).requires_grad_(True)
    delta = torch.randn(out_features, k, generator=generator).requires_grad_(True)
    out = linear_with_bypass(x, weight, bias, delta, pattern)
    upstream = torch.randn(out.shape, generator=generator)
    grads = torch.autograd.grad(out, [x, delta] + ([bias] if with_bias else []), upstream.to(out.dtype))

    ref = x.float() @ weight.float().T + sparse_bypass_reference(x, delta, indices)
    if with_bias:
        ref = ref + bias
    ref_grads = torch.autograd.grad(ref, [x, delta] + ([bias] if with_bias else []), upstream)
    assert out.dtype == x_dtype and grads[0].dtype == x_dtype and grads[1].dtype == torch.float32
    scale = max(1.0, in_features, tokens)
    assert_close(out, ref, x_dtype, scale)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, x_dtype, scale)


def test_fused_keeps_no_weight_copy():
    weight = torch.randn(256, 128)
    pattern = build_pattern(select_per_neuron(weight, 2), 128)
    x = torch.randn(6, 128, requires_grad=True)
    delta = torch.randn(256, 2, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear_with_bypass(x, weight, None, delta, pattern)
    copies = [t for t in saved if t.numel() >= weight.numel() and t.data_ptr() != weight.data_ptr()]
    floats = [t for t in saved if t.is_floating_point() and t.data_ptr() != weight.data_ptr()]
    assert not copies and sum(t.numel() for t in floats) == x.numel() + 512


def test_fused_refuses_a_trainable_weight():
    weight = torch.randn(4, 6, requires_grad=True)
    with pytest.raises(ValueError, match="frozen weight"):
        linear_with_bypass(torch.randn(2, 6), weight, None, torch.zeros(4, 1),
                           build_pattern(select_per_neuron(weight.detach(), 1), 6))


@pytest.mark.parametrize("rows, cols, dtype", [(300, 70, torch.float32), (257, 129, torch.bfloat16), (128, 5, torch.float16)])
def test_transposed_copy_matches_transpose(rows, cols, dtype, monkeypatch):
    import neuroada.bypass as bypass

    monkeypatch.setattr(bypass, "_TRANSPOSE_SLAB_ROWS", 16)  # several slabs, the last one partial
    matrix = torch.randn(rows, cols).to(dtype)
    got = bypass._transposed(matrix, torch.float32)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, matrix.T.float())
    kept_dtype = bypass._transposed(matrix, dtype)  # what the Triton backward reads: no float32 copy
    assert kept_dtype.dtype == dtype and kept_dtype.is_contiguous() and torch.equal(kept_dtype, matrix.T)
