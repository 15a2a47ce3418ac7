"""The sparse bypass op: ``y = x S^T`` where row i of S holds ``delta[i, j]`` at column ``indices[i, j]``.

Autograd keeps only ``x`` (shared with whatever else keeps it), ``delta`` and the O(out_features * k) index
structures: never a dense ``[out, in]`` copy of W or S, and there is no weight gradient at all. The gradient of
``delta`` is the sampled product ``grad_delta[i, j] = sum_n grad_y[n, i] * x[n, indices[i, j]]`` (a CSR sampled
matmul).

Backends, chosen per call by :func:`choose_backend` unless the config names one:

- ``"fused"``: the whole layer ``x (W + S)^T + b`` as one matmul on a temporary ``W + S`` that is built in the
  forward, dropped, and built again in the backward for the input gradient. Costs two scatters of size
  ``out * in`` on top of the frozen layer's two matmuls, which is the cheapest on CPU for fp32 weights and more
  than a handful of tokens. Composes in float32, so a bf16/fp16 weight never rounds the delta away.
- ``"gather"``: a weighted ``embedding_bag`` over the transposed activations, O(tokens * out * k), added to the
  base layer's output. S^T uses the transposed pattern (CSR by input position) that :func:`build_pattern` makes
  once per selection. For few tokens (decoding) and for bases the fused path cannot replace.
- ``"dense"``: S scattered into a temporary ``[out, in]`` matrix inside the call, then a matmul; added to the base
  output. For k a large share of in_features when the fused path does not apply.

:func:`sparse_bypass_reference` is the plain dense implementation that the tests hold every backend to.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "fused", "gather", "dense")

_TRANSPOSE_SLAB_ROWS = 128

# Below this many tokens the fused path's two O(out * in) scatters cost more than the matmuls they ride on.
_FUSED_MIN_TOKENS = 64

# The sampled product below builds a CSR tensor on every backward; PyTorch warns about CSR's beta status each time.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class SparsePattern(NamedTuple):
    """A selection in the layouts the op needs; built once per selection, reused every step."""

    columns: torch.Tensor  # [out, k] int64: the selected input positions of each output neuron
    transposed_rows: torch.Tensor  # [out * k] int64: output neuron of each entry, entries ordered by input position
    transposed_order: torch.Tensor  # [out * k] int64: flat position in delta of each entry, in that order
    transposed_offsets: torch.Tensor  # [in] int64: where each input position's entries start
    row_offsets: torch.Tensor  # [out + 1] int64: CSR row pointers of S (every row holds k entries)
    in_features: int


def build_pattern(indices: torch.Tensor, in_features: int) -> SparsePattern:
    columns = indices.long()
    out_features, k = columns.shape
    flat = columns.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=in_features)
    offsets = torch.zeros(in_features, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)[:-1]
    row_offsets = torch.arange(0, out_features * k + 1, k, device=flat.device)
    return SparsePattern(columns, order // k, order, offsets, row_offsets, in_features)


def choose_backend(tokens: int, in_features: int, k: int, fusable: bool = False) -> str:
    """The backend for one call. ``fusable``: the caller can replace its base layer's matmul by the fused one
    (a plain float32 linear layer). Measured on CPU (benchmarks/bench_layer.py): fused beats adding a separate
    bypass for every k once there are a few dozen tokens; among the separate bypasses, dense S wins when k is a
    large share of in_features (crossover near k = in / 8)."""
    if fusable and tokens >= _FUSED_MIN_TOKENS:
        return "fused"
    return "dense" if 8 * k >= in_features else "gather"


def sparse_bypass(
    x: torch.Tensor, delta: torch.Tensor, pattern: SparsePattern, backend: str = "auto"
) -> torch.Tensor:
    """``x S^T`` for ``x`` of shape ``[..., in]``; returns ``[..., out]`` in float32 (``delta``'s dtype)."""
    if x.shape[-1] != pattern.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the adapted layer expects {pattern.in_features}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown bypass backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = choose_backend(x.numel() // max(x.shape[-1], 1), pattern.in_features, delta.shape[1])
    if backend == "fused":
        raise ValueError("the fused backend replaces the whole layer: call linear_with_bypass")
    return _SparseBypass.apply(x, delta, pattern, backend)


def linear_with_bypass(
    x: torch.Tensor, weight_rows: torch.Tensor, bias: torch.Tensor | None, delta: torch.Tensor, pattern: SparsePattern
) -> torch.Tensor:
    """``x (W + S)^T + b`` for a frozen ``weight_rows`` ([out, in], any strides), in x's dtype. W and b get no
    gradient (b does if it requires one); autograd keeps x, delta and references to W and b, no copy of W."""
    if x.shape[-1] != pattern.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the adapted layer expects {pattern.in_features}")
    if weight_rows.requires_grad:
        raise ValueError("linear_with_bypass needs a frozen weight; it computes no weight gradient")
    return _FusedLinearBypass.apply(x, weight_rows, bias, delta, pattern)


def sparse_bypass_reference(x: torch.Tensor, delta: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The dense definition: scatter delta into S and multiply. For tests only (it materialises S)."""
    dense = torch.zeros(delta.shape[0], x.shape[-1], dtype=torch.float32, device=delta.device)
    dense = dense.scatter(1, indices.long(), delta.float())
    return x.float() @ dense.T


class _SparseBypass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, pattern, backend):
        x2d = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            if backend == "dense":
                out = x2d.float() @ dense_matrix(delta, pattern).T
            else:
                out = F.embedding_bag(pattern.columns, _transposed_f32(x2d), per_sample_weights=delta.float(),
                                      mode="sum").T
        ctx.save_for_backward(x, delta)
        ctx.pattern = pattern
        ctx.backend = backend
        return out.reshape(*x.shape[:-1], delta.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, delta = ctx.saved_tensors
        pattern, backend = ctx.pattern, ctx.backend
        x2d = x.reshape(-1, x.shape[-1])
        grad_t = _transposed_f32(grad_out.reshape(-1, grad_out.shape[-1]))  # [out, tokens]
        grad_x = grad_delta = None
        with torch.autocast(x.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                if backend == "dense":
                    grad_x2d = grad_t.T @ dense_matrix(delta, pattern)
                else:
                    weights = delta.float().reshape(-1)[pattern.transposed_order]
                    grad_x2d = F.embedding_bag(pattern.transposed_rows, grad_t, pattern.transposed_offsets,
                                               per_sample_weights=weights, mode="sum").T
                grad_x = grad_x2d.to(x.dtype).reshape(x.shape)
            if ctx.needs_input_grad[1]:
                grad_delta = _sampled_product(grad_t, x2d, pattern).to(delta.dtype)
        return grad_x, grad_delta, None, None


class _FusedLinearBypass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_rows, bias, delta, pattern):
        x2d = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            composed = _composed_weight(weight_rows, delta, pattern)
            out = F.linear(x2d.to(composed.dtype), composed, None if bias is None else bias.to(composed.dtype))
        ctx.save_for_backward(x, weight_rows, delta)
        ctx.pattern = pattern
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.to(x.dtype).reshape(*x.shape[:-1], delta.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight_rows, delta = ctx.saved_tensors
        grad2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_delta = grad_bias = None
        with torch.autocast(x.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                composed = _composed_weight(weight_rows, delta, ctx.pattern)
                grad_x = (grad2d.to(composed.dtype) @ composed).to(x.dtype).reshape(x.shape)
            if ctx.needs_input_grad[3]:
                x2d = x.reshape(-1, x.shape[-1])
                grad_delta = _sampled_product(_transposed_f32(grad2d), x2d, ctx.pattern).to(delta.dtype)
            if ctx.bias_needs_grad:
                grad_bias = grad2d.float().sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, grad_delta, None


def _composed_weight(weight_rows: torch.Tensor, delta: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """A temporary ``W + S``: a contiguous float32 copy of W with the deltas scattered in."""
    composed = weight_rows.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
    return composed.scatter_add_(1, pattern.columns, delta.float())


def _transposed_f32(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix.T`` as a contiguous float32 tensor. Copied in slabs of rows: PyTorch's blocked transpose runs on one
    thread and thrashes the cache on power-of-two strides; slabs of 128 rows measured 1.4-2x faster on CPU."""
    out = torch.empty(matrix.shape[1], matrix.shape[0], dtype=torch.float32, device=matrix.device)
    if matrix.device.type != "cpu":
        return out.copy_(matrix.T)
    for start in range(0, matrix.shape[0], _TRANSPOSE_SLAB_ROWS):
        out[:, start : start + _TRANSPOSE_SLAB_ROWS].copy_(matrix[start : start + _TRANSPOSE_SLAB_ROWS].T)
    return out


def dense_matrix(delta: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """S as a float32 ``[out, in]`` matrix (for the dense backend and for inspecting an adapter)."""
    dense = torch.zeros(delta.shape[0], pattern.in_features, dtype=torch.float32, device=delta.device)
    return dense.scatter_(1, pattern.columns, delta.float())


def _sampled_product(grad_t: torch.Tensor, x2d: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """``out[i, j] = sum_n grad_t[i, n] * x2d[n, columns[i, j]]``: the product ``grad_t @ x2d`` evaluated only at
    the selected entries, as a CSR sampled matmul (columns are sorted within each row, as CSR requires). Both
    operands go in row-major over tokens, the layout the CPU kernel runs fastest on (about 15x faster than
    strided operands), so x is transposed here."""
    x_t = _transposed_f32(x2d)
    out_features, k = pattern.columns.shape
    sampled = torch.sparse_csr_tensor(
        pattern.row_offsets,
        pattern.columns.reshape(-1),
        torch.zeros(out_features * k, dtype=torch.float32, device=grad_t.device),  # beta * NaN would be NaN
        size=(out_features, pattern.in_features),
        check_invariants=False,
    )
    product = torch.sparse.sampled_addmm(sampled, grad_t, x_t.T, beta=0.0)
    return product.values().view(out_features, k)
