"""The Triton kernels against the dense reference. On machines without a GPU they run in Triton's CPU
interpreter (TRITON_INTERPRET=1, set in conftest.py), so shapes stay small."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import examples
from neuroada import triton_backend
from neuroada.bypass import build_pattern, sparse_bypass, sparse_bypass_reference
from neuroada.selection import select_per_neuron

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not triton_backend.available(DEVICE):
    pytest.skip("Triton cannot run here: no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@settings(max_examples=examples(25))
@given(
    out_features=st.integers(1, 40),
    in_features=st.integers(1, 40),
    tokens=st.integers(0, 40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    criterion=st.sampled_from(["magnitude", "random"]),
    data=st.data(),
)
def test_kernels_match_dense_reference(out_features, in_features, tokens, dtype, criterion, data):
    k = data.draw(st.integers(1, min(in_features, 5)))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    # magnitude selection on a weight with a few large input columns puts many entries on one input position:
    # the input-gradient kernel's uneven per-position loop gets exercised
    weight = torch.randn(out_features, in_features, generator=generator)
    weight[:, : max(1, in_features // 8)] *= 10
    indices = select_per_neuron(weight, k, criterion, seed=3)
    pattern = build_pattern(indices.to(DEVICE), in_features)
    x = torch.randn(2, tokens, in_features, generator=generator).to(DEVICE, dtype).requires_grad_(True)
    delta = torch.randn(out_features, k, generator=generator).to(DEVICE).requires_grad_(True)
    # as the layer calls it (stored in the activation dtype, its gradient arriving in it), or in float32
    out_dtype = data.draw(st.sampled_from([dtype, torch.float32]))
    out = sparse_bypass(x, delta, pattern, "triton", out_dtype=out_dtype)
    assert out.dtype == out_dtype
    upstream = torch.randn(out.shape, generator=generator).to(DEVICE, out_dtype)
    grad_x, grad_delta = torch.autograd.grad(out, (x, delta), upstream)
    ref = sparse_bypass_reference(x, delta, indices.to(DEVICE))
    ref_x, ref_delta = torch.autograd.grad(ref, (x, delta), upstream.float())
    tol = TOLERANCE[dtype]
    scale = max(1.0, float(in_features), float(tokens))
    torch.testing.assert_close(out.float(), ref, atol=tol * scale, rtol=tol)
    torch.testing.assert_close(grad_x.float(), ref_x.float(), atol=tol * scale, rtol=tol)
    torch.testing.assert_close(grad_delta, ref_delta, atol=tol * scale, rtol=tol)
    assert grad_x.dtype == dtype and grad_delta.dtype == torch.float32


def test_delta_gradient_sums_token_splits(monkeypatch):
    # three splits for 70 tokens, each shorter than the kernel's token block (whose rows past a split's end must be
    # left to the next split), and j in two chunks
    monkeypatch.setattr(triton_backend, "_TOKENS_PER_SPLIT", 32)
    monkeypatch.setattr(triton_backend, "_DELTA_GRAD_MAX_BLOCK_K", 2)
    indices = select_per_neuron(torch.randn(9, 13), 3)
    x = torch.randn(70, 13)
    grad = torch.randn(70, 9)
    expected = (grad.T @ x).gather(1, indices.long())
    got = triton_backend.delta_grad(grad.T.contiguous().to(DEVICE), x.T.contiguous().to(DEVICE),
                                    indices.to(DEVICE))
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-5)


def test_row_offsets_are_64_bit_past_two_to_the_31():
    """tokens x stride >= 2**31 (e.g. 200,000 tokens of 11,008 features) must not wrap: shown on the offset helper
    itself, since a real input that large does not fit a test."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(out_ptr, first_row, stride, BLOCK: tl.constexpr):
        rows = first_row + tl.arange(0, BLOCK)
        tl.store(out_ptr + tl.arange(0, BLOCK), triton_backend._row_starts(rows, stride))

    first_row, stride = 200_000, 11_008  # both fit in 32 bits; their product does not
    out = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    probe[(1,)](out, first_row, stride, BLOCK=4)
    expected = torch.tensor([(first_row + i) * stride for i in range(4)], dtype=torch.int64)
    assert expected.max() >= 2**31
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("keep_columns", [True, False], ids=["x[:, kept] kept", "x kept whole"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_saved_layouts_give_the_reference_gradients(keep_columns, dtype):
    """The backward reads x feature-major either way: the gathered copy is made so in the forward, x kept whole is
    transposed in the backward. Both must give the same gradients (k=2 of 23 inputs: the kept columns are a strict
    subset, so a wrong remapping of the columns into them would show)."""
    generator = torch.Generator().manual_seed(7)
    indices = select_per_neuron(torch.randn(19, 23, generator=generator), 2)
    pattern = build_pattern(indices.to(DEVICE), 23)
    assert pattern.kept.numel() < 23
    x = torch.randn(3, 45, 23, generator=generator).to(DEVICE, dtype).requires_grad_(True)
    delta = torch.randn(19, 2, generator=generator).to(DEVICE).requires_grad_(True)
    out = sparse_bypass(x, delta, pattern, "triton", keep_columns=keep_columns)
    upstream = torch.randn(out.shape, generator=generator).to(DEVICE)
    grad_x, grad_delta = torch.autograd.grad(out, (x, delta), upstream)
    ref = sparse_bypass_reference(x, delta, indices.to(DEVICE))
    ref_x, ref_delta = torch.autograd.grad(ref, (x, delta), upstream)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, ref, atol=tol * 23, rtol=tol)
    torch.testing.assert_close(grad_x.float(), ref_x.float(), atol=tol * 45, rtol=tol)
    torch.testing.assert_close(grad_delta, ref_delta, atol=tol * 45, rtol=tol)
