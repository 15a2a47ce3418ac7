"""The sparse bypass op: ``y = x S^T`` where row i of S holds ``delta[i, j]`` at column ``indices[i, j]``.

Autograd keeps only ``x`` (shared with whatever else keeps it) or, where nothing else keeps it, only the input
columns some neuron reads (``x[:, pattern.kept]``), plus ``delta`` and the O(out_features * k) index structures:
never a dense ``[out, in]`` copy of W or S, and there is no weight gradient at all. The gradient of ``delta`` is the
sampled product ``grad_delta[i, j] = sum_n grad_y[n, i] * x[n, indices[i, j]]``, which reads no other column.

Backends, chosen per call by :func:`choose_backend` unless the config names one:

- ``"fused"``: the whole layer ``x (W + S)^T + b`` as one matmul on a temporary ``W + S`` that is built in the
  forward, dropped, and built again in the backward for the input gradient. Costs two copies of W on top of the
  frozen layer's two matmuls: the cheapest on CPU for fp32 weights and a few hundred tokens or more. Composes in
  float32 (float64 for float64 operands), so a bf16/fp16 weight never rounds the delta away.
- ``"triton"``: GPU kernels (:mod:`neuroada.triton_backend`), added to the base layer's output.
- ``"gather"``: a weighted ``embedding_bag`` over the transposed activations, O(tokens * out * k), added to the
  base layer's output. S^T uses the transposed pattern (entries grouped by input position) that
  :func:`build_pattern` makes once per selection. For few tokens (decoding) and for bases the fused path cannot
  replace.
- ``"dense"``: S scattered into a temporary ``[out, in]`` matrix inside the call, then a matmul; added to the base
  output. For k a large share of in_features when the fused path does not apply.

The ops are registered with ``torch.library`` (``neuroada::bypass``, ``neuroada::linear_bypass`` and their
backwards), so ``torch.compile`` treats them as single nodes instead of breaking the graph. Every backend
accumulates in float32, or in float64 where an operand is float64 (:func:`accumulation_dtype`; Triton then steps
aside), so a float64 model is exact and ``gradcheck`` holds. :func:`sparse_bypass_reference` is the plain dense
implementation that the tests hold every backend to.
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

# The op keeps for its backward only the input columns that some neuron reads, x[:, kept], when they are at most
# this share of the input; above it, x itself (a gathered copy of nearly all of x saves little memory and costs a
# copy). Measured with benchmarks/bench_layer.py (README "Activation memory").
KEEP_COLUMNS_MAX_COVERAGE = 0.75

# Messages already given by _warn_once (a fallback is announced once per process, not once per layer and call).
_warned: set[str] = set()


class SparsePattern(NamedTuple):
    """A selection in the layouts the op needs; built once per selection, reused every step. All int32: the
    smallest index type that embedding_bag, CSR tensors and the Triton kernels accept."""

    columns: Tensor  # [out, k]: the selected input positions of each output neuron, rows sorted
    transposed_rows: Tensor  # [out * k]: output neuron of each entry, entries ordered by input position
    transposed_order: Tensor  # [out * k]: flat position in delta of each entry, in that order
    transposed_offsets: Tensor  # [in + 1]: where each input position's entries start (and the end)
    row_offsets: Tensor  # [out + 1]: CSR row pointers of S (every row holds k entries)
    kept: Tensor  # [u]: the input positions some neuron reads, sorted (the only columns the delta gradient needs)
    kept_columns: Tensor  # [out, k]: columns as positions in kept
    in_features: int

    @property
    def coverage(self) -> float:
        """The share of the input positions that some neuron reads."""
        return self.kept.numel() / max(self.in_features, 1)


def check_indices(indices: Tensor, in_features: int) -> None:
    """Refuse a selection the backends would disagree on or misread: every position in range, each row strictly
    ascending (as select_per_neuron returns it). A repeated position would be summed by some backends and
    overwritten by others; CSR, which the delta gradient uses, needs the columns of a row sorted."""
    if indices.dim() != 2 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor [out_features, k], got {indices.dtype} of shape "
                         f"{tuple(indices.shape)}")
    if indices.numel() == 0:
        return
    wide = indices.long()
    if wide.min() < 0 or wide.max() >= in_features:
        raise ValueError(f"indices fall outside 0..{in_features - 1} (min {int(wide.min())}, max {int(wide.max())})")
    steps = wide[:, 1:] - wide[:, :-1]
    bad = (steps <= 0).any(dim=1)
    if bad.any():
        row = int(bad.nonzero()[0])
        problem = "repeats a position" if (steps[row] == 0).any() else "is not sorted ascending"
        raise ValueError(f"row {row} of the indices {problem} ({wide[row].tolist()}); each neuron's k connections "
                         "must be distinct and sorted, as select_per_neuron returns them, with the deltas in the "
                         "same order")


def build_pattern(indices: Tensor, in_features: int) -> SparsePattern:
    # (inside a compiled graph the check, data-dependent branches, is skipped: a layer's indices were checked when
    # they were selected or loaded)
    if not torch.compiler.is_compiling():
        check_indices(indices, in_features)
    columns = indices.long()
    out_features, k = columns.shape
    flat = columns.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    offsets = torch.zeros(in_features + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(torch.bincount(flat, minlength=in_features), 0)
    row_offsets = torch.arange(0, out_features * k + 1, k, device=flat.device)
    kept, kept_columns = torch.unique(columns, sorted=True, return_inverse=True)
    layouts = (columns, order // k, order, offsets, row_offsets, kept, kept_columns)
    return SparsePattern(*(t.to(torch.int32) for t in layouts), in_features)


def choose_backend(requested: str, x: Tensor, k: int, fusable: bool = False) -> str:
    """The one place where a backend is decided, per call. ``x`` is the layer input ``[..., in_features]``;
    ``fusable``: the caller may replace its base layer's forward by the fused matmul (it is a plain frozen float32
    linear layer whose forward is exactly ``x W^T + b``).

    1. An explicit backend is used where it can run. ``"fused"`` where ``fusable`` is false and ``"triton"`` where
       Triton cannot run (no Triton, not a GPU) fall back to rule 2, which computes the same bypass; a Triton
       fallback is announced once, since it is a property of the machine, not of the adapter.
    2. ``"auto"``: the Triton kernels on a GPU where they run and passed their self-check for this device and
       activation dtype (:mod:`neuroada.kernel_check`); else the fused layer from 512 tokens on where
       ``fusable`` (the copies of W cost less than a separate bypass); else a dense S when k is at least 1/8 of
       the inputs; else the gather kernels. (Measured on CPU by benchmarks/bench_layer.py.)
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown bypass backend {requested!r}; choose one of {BACKENDS}")
    if requested in ("gather", "dense") or (requested == "fused" and fusable):
        return requested
    if requested == "triton":
        if x.dtype == torch.float64:  # the kernels accumulate in float32; the PyTorch backends keep float64 exact
            return choose_backend("auto", x, k, fusable)
        if triton_backend.available(x.device):
            return "triton"
        _warn_once(f"the triton bypass backend cannot run on {x.device} ("
                   f"{'Triton is not installed' if triton_backend.triton is None else 'not a GPU'}); using the "
                   "PyTorch backends, which compute the same bypass. The setting is stored in the adapter's config "
                   "but binds nothing: set bypass_backend='auto' to silence this.")
    if (x.device.type in _TRITON_DEVICE_TYPES and x.dtype != torch.float64 and triton_backend.available(x.device)
            and kernel_check.triton_usable(x.device, x.dtype)):
        return "triton"
    tokens = x.numel() // max(x.shape[-1], 1)
    if fusable and tokens >= _FUSED_MIN_TOKENS:
        return "fused"
    return "dense" if 8 * k >= x.shape[-1] else "gather"


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def sparse_bypass(x: Tensor, delta: Tensor, pattern: SparsePattern, backend: str = "auto",
                  keep_columns: Optional[bool] = None, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``x S^T`` for ``x`` of shape ``[..., in]``; returns ``[..., out]``, summed in :func:`accumulation_dtype`
    (float32, or float64 where x or delta is) and returned in it, or rounded once to ``out_dtype`` (the dtype the
    caller adds it in: the same numbers as a cast afterwards, without a float32 copy of the output, and the backward
    then gets its gradient in that dtype too).

    ``keep_columns``: keep only ``x[:, pattern.kept]`` for the backward instead of ``x``; ``None`` decides by the
    selection's coverage (:func:`keeps_columns`). Pass ``False`` when something else keeps ``x`` anyway (another
    layer reading the same input): a partial copy beside the whole would only add memory."""
    if x.shape[-1] != pattern.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the adapted layer expects {pattern.in_features}")
    if backend == "fused":
        raise ValueError("the fused backend replaces the whole layer: call linear_with_bypass")
    backend = choose_backend(backend, x, delta.shape[1])
    if backend == "triton" and delta.dtype == torch.float64:
        backend = "gather"  # (float32 x, float64 delta: the kernels would round the delta)
    keep_columns = keeps_columns(pattern) if keep_columns is None else keep_columns
    out_dtype = accumulation_dtype(x, delta) if out_dtype is None else out_dtype
    out = torch.ops.neuroada.bypass(x.reshape(-1, x.shape[-1]), delta, pattern.columns, pattern.transposed_rows,
                                    pattern.transposed_order, pattern.transposed_offsets, pattern.row_offsets,
                                    pattern.kept, pattern.kept_columns, backend, keep_columns, out_dtype)
    return out.reshape(*x.shape[:-1], delta.shape[0])


def linear_with_bypass(
    x: Tensor, weight_rows: Tensor, bias: Optional[Tensor], delta: Tensor, pattern: SparsePattern,
    keep_columns: Optional[bool] = None,
) -> Tensor:
    """``x (W + S)^T + b`` for a frozen ``weight_rows`` ([out, in], any strides), in x's dtype. W gets no gradient
    (b does if it requires one); autograd keeps x (or only ``x[:, pattern.kept]``, see :func:`sparse_bypass`),
    delta and references to W and b, no copy of W."""
    if x.shape[-1] != pattern.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the adapted layer expects {pattern.in_features}")
    if weight_rows.requires_grad:
        raise ValueError("linear_with_bypass needs a frozen weight; it computes no weight gradient")
    keep_columns = keeps_columns(pattern) if keep_columns is None else keep_columns
    out = torch.ops.neuroada.linear_bypass(x.reshape(-1, x.shape[-1]), weight_rows, bias, delta, pattern.columns,
                                           pattern.row_offsets, pattern.kept, pattern.kept_columns, keep_columns)
    return out.reshape(*x.shape[:-1], delta.shape[0])


def keeps_columns(pattern: SparsePattern) -> bool:
    """Whether keeping ``x[:, kept]`` for the backward pays: the selection reads at most
    :data:`KEEP_COLUMNS_MAX_COVERAGE` of the inputs."""
    return pattern.coverage <= KEEP_COLUMNS_MAX_COVERAGE


def accumulation_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """What the op computes and sums in: float32, or float64 where any operand is float64 (float32 is a floor for
    bf16/fp16 operands, never a ceiling)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def sparse_bypass_reference(x: Tensor, delta: Tensor, indices: Tensor) -> Tensor:
    """The dense definition: scatter delta into S and multiply. For tests only (it materialises S)."""
    dtype = accumulation_dtype(x, delta)
    dense = torch.zeros(delta.shape[0], x.shape[-1], dtype=dtype, device=delta.device)
    dense = dense.scatter(1, indices.long(), delta.to(dtype))
    return x.to(dtype) @ dense.T


def dense_matrix(delta: Tensor, columns: Tensor, in_features: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """S as an ``[out, in]`` matrix of ``dtype`` (default :func:`accumulation_dtype` of delta; for the dense backend
    and for inspecting an adapter)."""
    dtype = accumulation_dtype(delta) if dtype is None else dtype
    dense = torch.zeros(delta.shape[0], in_features, dtype=dtype, device=delta.device)
    return dense.scatter_(1, columns.long(), delta.to(dtype))


# ---------------------------------------------------------------------------------------------- the separate bypass


@torch.library.custom_op("neuroada::bypass", mutates_args=())
def _bypass_op(x2d: Tensor, delta: Tensor, columns: Tensor, transposed_rows: Tensor, transposed_order: Tensor,
               transposed_offsets: Tensor, row_offsets: Tensor, kept: Tensor, kept_columns: Tensor, backend: str,
               keep_columns: bool, out_dtype: torch.dtype) -> Tensor:
    dtype = accumulation_dtype(x2d, delta)
    with torch.autocast(x2d.device.type, enabled=False):
        if backend == "triton":
            return triton_backend.bypass_forward(x2d, delta, columns, out_dtype)
        if backend == "dense":
            return (x2d.to(dtype) @ dense_matrix(delta, columns, x2d.shape[1], dtype).T).to(out_dtype)
        out_t = F.embedding_bag(columns, _transposed(x2d, dtype), per_sample_weights=delta.to(dtype), mode="sum")
        return _transposed(out_t, out_dtype)


@_bypass_op.register_fake
def _(x2d, delta, columns, transposed_rows, transposed_order, transposed_offsets, row_offsets, kept, kept_columns,
      backend, keep_columns, out_dtype):
    return x2d.new_empty(x2d.shape[0], delta.shape[0], dtype=out_dtype)


@torch.library.custom_op("neuroada::bypass_backward", mutates_args=())
def _bypass_backward_op(grad: Tensor, saved_x: Tensor, delta: Tensor, columns: Tensor, sampled_columns: Tensor,
                        transposed_rows: Tensor, transposed_order: Tensor, transposed_offsets: Tensor,
                        row_offsets: Tensor, backend: str, in_features: int, kept_layout: bool,
                        need_input_grad: bool, need_delta_grad: bool) -> tuple[Tensor, Tensor]:
    grad_x = saved_x.new_empty(0)
    grad_delta = delta.new_empty(0)
    dtype = accumulation_dtype(grad, saved_x, delta)
    with torch.autocast(grad.device.type, enabled=False):
        if backend == "triton":  # the kernels read feature-major operands, in their own dtypes
            grad_t = _transposed(grad, grad.dtype)  # [out, tokens]
            if need_input_grad:
                grad_x = triton_backend.input_grad(grad_t, delta, transposed_rows, transposed_order,
                                                   transposed_offsets, in_features, saved_x.dtype)
            if need_delta_grad:
                x_t = _feature_major(saved_x, kept_layout, saved_x.dtype)
                grad_delta = triton_backend.delta_grad(grad_t, x_t, sampled_columns).to(delta.dtype)
            return grad_x, grad_delta
        grad_t = _transposed(grad, dtype)
        if need_input_grad:
            if backend == "dense":
                grad_x = (grad_t.T @ dense_matrix(delta, columns, in_features, dtype)).to(saved_x.dtype)
            else:
                weights = delta.to(dtype).reshape(-1)[transposed_order]
                grad_x_t = F.embedding_bag(transposed_rows, grad_t, transposed_offsets, per_sample_weights=weights,
                                           mode="sum", include_last_offset=True)
                grad_x = _transposed(grad_x_t, dtype).to(saved_x.dtype)
        if need_delta_grad:
            grad_delta = _sampled_product(grad_t, _feature_major(saved_x, kept_layout, dtype), sampled_columns,
                                          row_offsets).to(delta.dtype)
    return grad_x, grad_delta


@_bypass_backward_op.register_fake
def _(grad, saved_x, delta, columns, sampled_columns, transposed_rows, transposed_order, transposed_offsets,
      row_offsets, backend, in_features, kept_layout, need_input_grad, need_delta_grad):
    grad_x = grad.new_empty(grad.shape[0], in_features, dtype=saved_x.dtype) if need_input_grad else grad.new_empty(0)
    return grad_x, (torch.empty_like(delta) if need_delta_grad else delta.new_empty(0))


def _bypass_setup_context(ctx, inputs, output):
    (x2d, delta, columns, transposed_rows, transposed_order, transposed_offsets, row_offsets, kept, kept_columns,
     backend, keep_columns, _) = inputs
    keep = keep_columns and ctx.needs_input_grad[1]  # without a delta gradient x is not needed at all
    saved_x = _kept_input(x2d, kept) if keep else x2d
    ctx.save_for_backward(saved_x, delta, columns, kept_columns if keep else columns, transposed_rows,
                          transposed_order, transposed_offsets, row_offsets)
    ctx.backend, ctx.in_features, ctx.kept_layout = backend, x2d.shape[1], keep


def _refuse_double_backward() -> None:
    """The backward ops have no autograd formula, and a layer that keeps only some input columns saves them detached:
    a second-order gradient (``create_graph=True``, the only case where a backward runs with grad mode on) would lose
    terms, with or without an error depending on that layout. So it is refused here, always."""
    if torch.is_grad_enabled():
        raise RuntimeError("NeuroAda's bypass has no second-order gradients (create_graph=True, e.g. a gradient "
                           "penalty); compute such a term on a model with the adapter merged, or without it")


def _bypass_backward(ctx, grad):
    _refuse_double_backward()
    saved_x, delta, *pattern = ctx.saved_tensors
    need_x, need_delta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_delta = torch.ops.neuroada.bypass_backward(grad, saved_x, delta, *pattern, ctx.backend,
                                                             ctx.in_features, ctx.kept_layout, need_x, need_delta)
    return (grad_x if need_x else None, grad_delta if need_delta else None) + (None,) * 10


_bypass_op.register_autograd(_bypass_backward, setup_context=_bypass_setup_context)


# ------------------------------------------------------------------------------------------------ the fused layer


@torch.library.custom_op("neuroada::linear_bypass", mutates_args=())
def _linear_bypass_op(x2d: Tensor, weight_rows: Tensor, bias: Optional[Tensor], delta: Tensor, columns: Tensor,
                      row_offsets: Tensor, kept: Tensor, kept_columns: Tensor, keep_columns: bool) -> Tensor:
    with torch.autocast(x2d.device.type, enabled=False):
        composed = _composed_weight(weight_rows, delta, columns, accumulation_dtype(x2d, weight_rows, delta))
        out = F.linear(x2d.to(composed.dtype), composed, None if bias is None else bias.to(composed.dtype))
    return out.to(x2d.dtype)


@_linear_bypass_op.register_fake
def _(x2d, weight_rows, bias, delta, columns, row_offsets, kept, kept_columns, keep_columns):
    return x2d.new_empty(x2d.shape[0], weight_rows.shape[0])


@torch.library.custom_op("neuroada::linear_bypass_backward", mutates_args=())
def _linear_bypass_backward_op(grad: Tensor, saved_x: Tensor, weight_rows: Tensor, delta: Tensor, columns: Tensor,
                               sampled_columns: Tensor, row_offsets: Tensor, kept_layout: bool, need_input_grad: bool,
                               need_delta_grad: bool) -> tuple[Tensor, Tensor]:
    grad_x = saved_x.new_empty(0)
    grad_delta = delta.new_empty(0)
    dtype = accumulation_dtype(grad, saved_x, weight_rows, delta)
    with torch.autocast(grad.device.type, enabled=False):
        if need_input_grad:
            composed = _composed_weight(weight_rows, delta, columns, dtype)
            grad_x = (grad.to(dtype) @ composed).to(saved_x.dtype)
        if need_delta_grad:
            grad_delta = _sampled_product(_transposed(grad, dtype), _feature_major(saved_x, kept_layout, dtype),
                                          sampled_columns, row_offsets).to(delta.dtype)
    return grad_x, grad_delta


@_linear_bypass_backward_op.register_fake
def _(grad, saved_x, weight_rows, delta, columns, sampled_columns, row_offsets, kept_layout, need_input_grad,
      need_delta_grad):
    grad_x = grad.new_empty(grad.shape[0], weight_rows.shape[1], dtype=saved_x.dtype) if need_input_grad \
        else grad.new_empty(0)
    return grad_x, (torch.empty_like(delta) if need_delta_grad else delta.new_empty(0))


def _linear_bypass_setup_context(ctx, inputs, output):
    x2d, weight_rows, bias, delta, columns, row_offsets, kept, kept_columns, keep_columns = inputs
    keep = keep_columns and ctx.needs_input_grad[3]
    saved_x = _kept_input(x2d, kept) if keep else x2d
    ctx.save_for_backward(saved_x, weight_rows, delta, columns, kept_columns if keep else columns, row_offsets)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.kept_layout = keep


def _linear_bypass_backward(ctx, grad):
    _refuse_double_backward()
    saved_x, weight_rows, delta, columns, sampled_columns, row_offsets = ctx.saved_tensors
    need_x, need_bias, need_delta = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    grad_x, grad_delta = torch.ops.neuroada.linear_bypass_backward(grad, saved_x, weight_rows, delta, columns,
                                                                    sampled_columns, row_offsets, ctx.kept_layout,
                                                                    need_x, need_delta)
    grad_bias = grad.to(accumulation_dtype(grad)).sum(0).to(ctx.bias_dtype) if need_bias else None
    return (grad_x if need_x else None, None, grad_bias, grad_delta if need_delta else None) + (None,) * 5


_linear_bypass_op.register_autograd(_linear_bypass_backward, setup_context=_linear_bypass_setup_context)


# --------------------------------------------------------------------------------------------------------- helpers


def _composed_weight(weight_rows: Tensor, delta: Tensor, columns: Tensor, dtype: torch.dtype) -> Tensor:
    """A temporary ``W + S``: a contiguous copy of W in ``dtype`` with the deltas scattered in."""
    composed = weight_rows.to(dtype, copy=True, memory_format=torch.contiguous_format)
    return composed.scatter_add_(1, columns.long(), delta.to(dtype))


def _transposed(matrix: Tensor, dtype: torch.dtype) -> Tensor:
    """``matrix.T`` as a contiguous tensor of ``dtype``. Copied in slabs of rows: PyTorch's blocked transpose runs on
    one thread and thrashes the cache on power-of-two strides; slabs of 128 rows measured 1.4-2x faster on CPU."""
    out = torch.empty(matrix.shape[1], matrix.shape[0], dtype=dtype, device=matrix.device)
    if matrix.device.type != "cpu":
        return out.copy_(matrix.T)
    for start in range(0, matrix.shape[0], _TRANSPOSE_SLAB_ROWS):
        out[:, start : start + _TRANSPOSE_SLAB_ROWS].copy_(matrix[start : start + _TRANSPOSE_SLAB_ROWS].T)
    return out


def _kept_input(x2d: Tensor, kept: Tensor) -> Tensor:
    """``x2d[:, kept]`` in x's dtype, laid out the way every backward reads it: feature-major ``[u, tokens]`` (the
    sampled product and the Triton kernels then need no transpose of x). On the CPU the gather runs in slabs of
    token rows, so that each slab's transpose stays in cache."""
    kept = kept.long()
    if x2d.device.type != "cpu":
        return x2d.index_select(1, kept).T.contiguous()
    out = torch.empty(kept.numel(), x2d.shape[0], dtype=x2d.dtype, device=x2d.device)
    for start in range(0, x2d.shape[0], _TRANSPOSE_SLAB_ROWS):
        out[:, start : start + _TRANSPOSE_SLAB_ROWS].copy_(
            x2d[start : start + _TRANSPOSE_SLAB_ROWS].index_select(1, kept).T)
    return out


def _feature_major(saved_x: Tensor, kept_layout: bool, dtype: torch.dtype) -> Tensor:
    """The saved input as ``[features, tokens]`` of ``dtype``: a gathered copy is already laid out so, x is
    transposed."""
    return saved_x.to(dtype) if kept_layout else _transposed(saved_x, dtype)


def _sampled_product(grad_t: Tensor, x_t: Tensor, columns: Tensor, row_offsets: Tensor) -> Tensor:
    """``out[i, j] = sum_n grad_t[i, n] * x_t[columns[i, j], n]``: the product ``grad_t @ x_t.T`` evaluated only at
    the selected entries, as a CSR sampled matmul (columns are sorted within each row, as CSR requires). Both
    operands go in row-major over tokens ([out, tokens] and [features, tokens]), the layout the CPU kernel runs
    fastest on (about 15x faster than strided operands)."""
    out_features, k = columns.shape
    with warnings.catch_warnings():  # PyTorch warns about CSR's beta status; scoped here, not process-wide
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        sampled = torch.sparse_csr_tensor(
            row_offsets,
            columns.reshape(-1),
            torch.zeros(out_features * k, dtype=grad_t.dtype, device=grad_t.device),  # beta * NaN would be NaN
            size=(out_features, x_t.shape[0]),
            check_invariants=False,
        )
        product = torch.sparse.sampled_addmm(sampled, grad_t, x_t.T, beta=0.0)
    return product.values().view(out_features, k)
