"""The sparse bypass op: ``y = x S^T`` where row i of S holds ``delta[i, j]`` at column ``indices[i, j]``.

Autograd keeps only ``x`` (shared with whatever else keeps it), ``delta`` and the O(out_features * k) index
structures: never a dense ``[out, in]`` copy of W or S, and there is no weight gradient at all. The gradient of
``delta`` is the sampled product ``grad_delta[i, j] = sum_n grad_y[n, i] * x[n, indices[i, j]]``.

Backends, chosen per call by :func:`choose_backend` unless the config names one:

- ``"fused"``: the whole layer ``x (W + S)^T + b`` as one matmul on a temporary ``W + S`` that is built in the
  forward, dropped, and built again in the backward for the input gradient. Costs two copies of W on top of the
  frozen layer's two matmuls: the cheapest on CPU for fp32 weights and a few hundred tokens or more. Composes in
  float32, so a bf16/fp16 weight never rounds the delta away.
- ``"triton"``: GPU kernels (:mod:`neuroada.triton_backend`), added to the base layer's output.
- ``"gather"``: a weighted ``embedding_bag`` over the transposed activations, O(tokens * out * k), added to the
  base layer's output. S^T uses the transposed pattern (entries grouped by input position) that
  :func:`build_pattern` makes once per selection. For few tokens (decoding) and for bases the fused path cannot
  replace.
- ``"dense"``: S scattered into a temporary ``[out, in]`` matrix inside the call, then a matmul; added to the base
  output. For k a large share of in_features when the fused path does not apply.

The ops are registered with ``torch.library`` (``neuroada::bypass``, ``neuroada::linear_bypass`` and their
backwards), so ``torch.compile`` treats them as single nodes instead of breaking the graph.
:func:`sparse_bypass_reference` is the plain dense implementation that the tests hold every backend to.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernel_check, triton_backend

BACKENDS = ("auto", "fused", "triton", "gather", "dense")

_TRANSPOSE_SLAB_ROWS = 128

# Below this many tokens the fused path's two copies of W cost more than they save (benchmarks/bench_layer.py
# --tokens: on CPU the crossover sits between 128 and 512 tokens depending on the shape), and the W-sized
# temporaries raise peak memory for small batches.
_FUSED_MIN_TOKENS = 512

# Device types on which "auto" prefers the Triton kernels (a name, so tests can add "cpu" for the interpreter).
_TRITON_DEVICE_TYPES = ("cuda",)

# The CPU sampled product builds a CSR tensor on every backward; PyTorch warns about CSR's beta status each time.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class SparsePattern(NamedTuple):
    """A selection in the layouts the op needs; built once per selection, reused every step."""

    columns: Tensor  # [out, k] int64: the selected input positions of each output neuron
    transposed_rows: Tensor  # [out * k] int64: output neuron of each entry, entries ordered by input position
    transposed_order: Tensor  # [out * k] int64: flat position in delta of each entry, in that order
    transposed_offsets: Tensor  # [in + 1] int64: where each input position's entries start (and the end)
    row_offsets: Tensor  # [out + 1] int64: CSR row pointers of S (every row holds k entries)
    in_features: int


def build_pattern(indices: Tensor, in_features: int) -> SparsePattern:
    columns = indices.long()
    out_features, k = columns.shape
    flat = columns.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    offsets = torch.zeros(in_features + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(torch.bincount(flat, minlength=in_features), 0)
    row_offsets = torch.arange(0, out_features * k + 1, k, device=flat.device)
    return SparsePattern(columns, order // k, order, offsets, row_offsets, in_features)


def choose_backend(tokens: int, in_features: int, k: int, device: torch.device, fusable: bool = False,
                   dtype: torch.dtype = torch.float32) -> str:
    """The backend for one call. ``fusable``: the caller can replace its base layer's matmul by the fused one
    (a plain float32 linear layer). Measured on CPU (benchmarks/bench_layer.py): fused beats a separate bypass
    from a few hundred tokens on; among the separate bypasses, dense S wins when k is a large share of
    in_features (crossover near k = in / 8). On a GPU with Triton, the Triton kernels, once they have passed their
    self-check for this device and activation ``dtype`` (:mod:`neuroada.kernel_check`)."""
    if (device.type in _TRITON_DEVICE_TYPES and triton_backend.available(device)
            and kernel_check.triton_usable(device, dtype)):
        return "triton"
    if fusable and tokens >= _FUSED_MIN_TOKENS:
        return "fused"
    return "dense" if 8 * k >= in_features else "gather"


def sparse_bypass(x: Tensor, delta: Tensor, pattern: SparsePattern, backend: str = "auto") -> Tensor:
    """``x S^T`` for ``x`` of shape ``[..., in]``; returns ``[..., out]`` in float32 (``delta``'s dtype)."""
    if x.shape[-1] != pattern.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the adapted layer expects {pattern.in_features}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown bypass backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = choose_backend(x.numel() // max(x.shape[-1], 1), pattern.in_features, delta.shape[1], x.device,
                                 dtype=x.dtype)
    if backend == "fused":
        raise ValueError("the fused backend replaces the whole layer: call linear_with_bypass")
    if backend == "triton" and not triton_backend.available(x.device):
        raise ValueError(f"the triton backend needs Triton and a GPU (or TRITON_INTERPRET=1 on CPU); x is on {x.device}")
    out = torch.ops.neuroada.bypass(x.reshape(-1, x.shape[-1]), delta, *pattern[:5], backend)
    return out.reshape(*x.shape[:-1], delta.shape[0])


def linear_with_bypass(
    x: Tensor, weight_rows: Tensor, bias: Optional[Tensor], delta: Tensor, pattern: SparsePattern
) -> Tensor:
    """``x (W + S)^T + b`` for a frozen ``weight_rows`` ([out, in], any strides), in x's dtype. W gets no gradient
    (b does if it requires one); autograd keeps x, delta and references to W and b, no copy of W."""
    if x.shape[-1] != pattern.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the adapted layer expects {pattern.in_features}")
    if weight_rows.requires_grad:
        raise ValueError("linear_with_bypass needs a frozen weight; it computes no weight gradient")
    out = torch.ops.neuroada.linear_bypass(x.reshape(-1, x.shape[-1]), weight_rows, bias, delta, pattern.columns,
                                           pattern.row_offsets)
    return out.reshape(*x.shape[:-1], delta.shape[0])


def sparse_bypass_reference(x: Tensor, delta: Tensor, indices: Tensor) -> Tensor:
    """The dense definition: scatter delta into S and multiply. For tests only (it materialises S)."""
    dense = torch.zeros(delta.shape[0], x.shape[-1], dtype=torch.float32, device=delta.device)
    dense = dense.scatter(1, indices.long(), delta.float())
    return x.float() @ dense.T


def dense_matrix(delta: Tensor, columns: Tensor, in_features: int) -> Tensor:
    """S as a float32 ``[out, in]`` matrix (for the dense backend and for inspecting an adapter)."""
    dense = torch.zeros(delta.shape[0], in_features, dtype=torch.float32, device=delta.device)
    return dense.scatter_(1, columns, delta.float())


# ---------------------------------------------------------------------------------------------- the separate bypass


@torch.library.custom_op("neuroada::bypass", mutates_args=())
def _bypass_op(x2d: Tensor, delta: Tensor, columns: Tensor, transposed_rows: Tensor, transposed_order: Tensor,
               transposed_offsets: Tensor, row_offsets: Tensor, backend: str) -> Tensor:
    with torch.autocast(x2d.device.type, enabled=False):
        if backend == "triton":
            return triton_backend.bypass_forward(x2d, delta, columns)
        if backend == "dense":
            return x2d.float() @ dense_matrix(delta, columns, x2d.shape[1]).T
        out_t = F.embedding_bag(columns, _transposed_f32(x2d), per_sample_weights=delta.float(), mode="sum")
        return _transposed_f32(out_t)


@_bypass_op.register_fake
def _(x2d, delta, columns, transposed_rows, transposed_order, transposed_offsets, row_offsets, backend):
    return x2d.new_empty(x2d.shape[0], delta.shape[0], dtype=torch.float32)


@torch.library.custom_op("neuroada::bypass_backward", mutates_args=())
def _bypass_backward_op(grad: Tensor, x2d: Tensor, delta: Tensor, columns: Tensor, transposed_rows: Tensor,
                        transposed_order: Tensor, transposed_offsets: Tensor, row_offsets: Tensor, backend: str,
                        need_input_grad: bool, need_delta_grad: bool) -> tuple[Tensor, Tensor]:
    grad_x = x2d.new_empty(0)
    grad_delta = delta.new_empty(0)
    with torch.autocast(x2d.device.type, enabled=False):
        if backend == "triton":
            if need_input_grad:
                grad_x = triton_backend.input_grad(grad, delta, transposed_rows, transposed_order,
                                                   transposed_offsets, x2d.shape[1], x2d.dtype)
            if need_delta_grad:
                grad_delta = triton_backend.delta_grad(grad, x2d, columns).to(delta.dtype)
            return grad_x, grad_delta
        grad_t = _transposed_f32(grad)  # [out, tokens]
        if need_input_grad:
            if backend == "dense":
                grad_x = (grad_t.T @ dense_matrix(delta, columns, x2d.shape[1])).to(x2d.dtype)
            else:
                weights = delta.float().reshape(-1)[transposed_order]
                grad_x_t = F.embedding_bag(transposed_rows, grad_t, transposed_offsets, per_sample_weights=weights,
                                           mode="sum", include_last_offset=True)
                grad_x = _transposed_f32(grad_x_t).to(x2d.dtype)
        if need_delta_grad:
            grad_delta = _sampled_product(grad_t, x2d, columns, row_offsets).to(delta.dtype)
    return grad_x, grad_delta


@_bypass_backward_op.register_fake
def _(grad, x2d, delta, columns, transposed_rows, transposed_order, transposed_offsets, row_offsets, backend,
      need_input_grad, need_delta_grad):
    return (torch.empty_like(x2d) if need_input_grad else x2d.new_empty(0),
            torch.empty_like(delta) if need_delta_grad else delta.new_empty(0))


def _bypass_setup_context(ctx, inputs, output):
    x2d, delta, *pattern, backend = inputs
    ctx.save_for_backward(x2d, delta, *pattern)
    ctx.backend = backend


def _bypass_backward(ctx, grad):
    x2d, delta, *pattern = ctx.saved_tensors
    need_x, need_delta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_delta = torch.ops.neuroada.bypass_backward(grad, x2d, delta, *pattern, ctx.backend, need_x,
                                                             need_delta)
    return (grad_x if need_x else None, grad_delta if need_delta else None) + (None,) * 6


_bypass_op.register_autograd(_bypass_backward, setup_context=_bypass_setup_context)


# ------------------------------------------------------------------------------------------------ the fused layer


@torch.library.custom_op("neuroada::linear_bypass", mutates_args=())
def _linear_bypass_op(x2d: Tensor, weight_rows: Tensor, bias: Optional[Tensor], delta: Tensor, columns: Tensor,
                      row_offsets: Tensor) -> Tensor:
    with torch.autocast(x2d.device.type, enabled=False):
        composed = _composed_weight(weight_rows, delta, columns)
        out = F.linear(x2d.to(composed.dtype), composed, None if bias is None else bias.to(composed.dtype))
    return out.to(x2d.dtype)


@_linear_bypass_op.register_fake
def _(x2d, weight_rows, bias, delta, columns, row_offsets):
    return x2d.new_empty(x2d.shape[0], weight_rows.shape[0])


@torch.library.custom_op("neuroada::linear_bypass_backward", mutates_args=())
def _linear_bypass_backward_op(grad: Tensor, x2d: Tensor, weight_rows: Tensor, delta: Tensor, columns: Tensor,
                               row_offsets: Tensor, need_input_grad: bool,
                               need_delta_grad: bool) -> tuple[Tensor, Tensor]:
    grad_x = x2d.new_empty(0)
    grad_delta = delta.new_empty(0)
    with torch.autocast(x2d.device.type, enabled=False):
        if need_input_grad:
            composed = _composed_weight(weight_rows, delta, columns)
            grad_x = (grad.to(composed.dtype) @ composed).to(x2d.dtype)
        if need_delta_grad:
            grad_delta = _sampled_product(_transposed_f32(grad), x2d, columns, row_offsets).to(delta.dtype)
    return grad_x, grad_delta


@_linear_bypass_backward_op.register_fake
def _(grad, x2d, weight_rows, delta, columns, row_offsets, need_input_grad, need_delta_grad):
    return (torch.empty_like(x2d) if need_input_grad else x2d.new_empty(0),
            torch.empty_like(delta) if need_delta_grad else delta.new_empty(0))


def _linear_bypass_setup_context(ctx, inputs, output):
    x2d, weight_rows, bias, delta, columns, row_offsets = inputs
    ctx.save_for_backward(x2d, weight_rows, delta, columns, row_offsets)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_bypass_backward(ctx, grad):
    x2d, weight_rows, delta, columns, row_offsets = ctx.saved_tensors
    need_x, need_bias, need_delta = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    grad_x, grad_delta = torch.ops.neuroada.linear_bypass_backward(grad, x2d, weight_rows, delta, columns,
                                                                    row_offsets, need_x, need_delta)
    grad_bias = grad.float().sum(0).to(ctx.bias_dtype) if need_bias else None
    return grad_x if need_x else None, None, grad_bias, grad_delta if need_delta else None, None, None


_linear_bypass_op.register_autograd(_linear_bypass_backward, setup_context=_linear_bypass_setup_context)


# --------------------------------------------------------------------------------------------------------- helpers


def _composed_weight(weight_rows: Tensor, delta: Tensor, columns: Tensor) -> Tensor:
    """A temporary ``W + S``: a contiguous float32 copy of W with the deltas scattered in."""
    composed = weight_rows.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
    return composed.scatter_add_(1, columns, delta.float())


def _transposed_f32(matrix: Tensor) -> Tensor:
    """``matrix.T`` as a contiguous float32 tensor. Copied in slabs of rows: PyTorch's blocked transpose runs on one
    thread and thrashes the cache on power-of-two strides; slabs of 128 rows measured 1.4-2x faster on CPU."""
    out = torch.empty(matrix.shape[1], matrix.shape[0], dtype=torch.float32, device=matrix.device)
    if matrix.device.type != "cpu":
        return out.copy_(matrix.T)
    for start in range(0, matrix.shape[0], _TRANSPOSE_SLAB_ROWS):
        out[:, start : start + _TRANSPOSE_SLAB_ROWS].copy_(matrix[start : start + _TRANSPOSE_SLAB_ROWS].T)
    return out


def _sampled_product(grad_t: Tensor, x2d: Tensor, columns: Tensor, row_offsets: Tensor) -> Tensor:
    """``out[i, j] = sum_n grad_t[i, n] * x2d[n, columns[i, j]]``: the product ``grad_t @ x2d`` evaluated only at
    the selected entries, as a CSR sampled matmul (columns are sorted within each row, as CSR requires). Both
    operands go in row-major over tokens, the layout the CPU kernel runs fastest on (about 15x faster than
    strided operands), so x is transposed here."""
    x_t = _transposed_f32(x2d)
    out_features, k = columns.shape
    sampled = torch.sparse_csr_tensor(
        row_offsets,
        columns.reshape(-1),
        torch.zeros(out_features * k, dtype=torch.float32, device=grad_t.device),  # beta * NaN would be NaN
        size=(out_features, x2d.shape[1]),
        check_invariants=False,
    )
    product = torch.sparse.sampled_addmm(sampled, grad_t, x_t.T, beta=0.0)
    return product.values().view(out_features, k)
