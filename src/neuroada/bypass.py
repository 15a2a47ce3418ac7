"""The sparse bypass op: ``y = x S^T`` where row i of S holds ``delta[i, j]`` at column ``indices[i, j]``.

The layer adds this to the frozen base layer's output. Autograd keeps only ``x`` (shared with whatever else keeps
it), ``delta`` and the O(out_features * k) index structures: never a dense ``[out, in]`` copy of W or S, and there
is no weight gradient at all. The gradient of ``delta`` is the sampled product
``grad_delta[i, j] = sum_n grad_y[n, i] * x[n, indices[i, j]]``, computed by a chunked gather-dot.

Two ways to apply S (and S^T in the backward), chosen per call by :func:`choose_backend`:

- ``"gather"``: a weighted ``embedding_bag`` over the transposed activations, O(tokens * out * k). S^T uses the
  transposed pattern (CSR by input position) that :func:`build_pattern` makes once per selection.
- ``"dense"``: S is scattered into a temporary ``[out, in]`` matrix that lives only inside this call, then one
  matmul. Cheaper when k is a large share of in_features.

:func:`sparse_bypass_reference` is the plain dense implementation that the tests hold the op to.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "gather", "dense")

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


def choose_backend(tokens: int, in_features: int, k: int) -> str:
    """Dense pays O(out * in) to scatter S plus a matmul at BLAS speed; gather pays O(tokens * out * k) at memory
    speed. Dense wins when k is a large share of in_features (measured on CPU: the crossover is near k = in / 8)."""
    del tokens  # both costs scale with the token count; the crossover does not depend on it
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
    return _SparseBypass.apply(x, delta, pattern, backend)


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
                out = x2d.float() @ _dense_matrix(delta, pattern).T
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
                    grad_x2d = grad_t.T @ _dense_matrix(delta, pattern)
                else:
                    weights = delta.float().reshape(-1)[pattern.transposed_order]
                    grad_x2d = F.embedding_bag(pattern.transposed_rows, grad_t, pattern.transposed_offsets,
                                               per_sample_weights=weights, mode="sum").T
                grad_x = grad_x2d.to(x.dtype).reshape(x.shape)
            if ctx.needs_input_grad[1]:
                grad_delta = _sampled_product(grad_t, _transposed_f32(x2d), pattern).to(delta.dtype)
        return grad_x, grad_delta, None, None


def _transposed_f32(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix.T`` as a contiguous float32 tensor, in one copy."""
    out = torch.empty(matrix.shape[1], matrix.shape[0], dtype=torch.float32, device=matrix.device)
    return out.copy_(matrix.T)


def _dense_matrix(delta: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    dense = torch.zeros(delta.shape[0], pattern.in_features, dtype=torch.float32, device=delta.device)
    return dense.scatter_(1, pattern.columns, delta.float())


def _sampled_product(grad_t: torch.Tensor, x_t: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """``out[i, j] = grad_t[i] . x_t[columns[i, j]]``: the product ``grad_t @ x_t.T`` evaluated only at the selected
    entries, as a CSR sampled matmul (columns are sorted within each row, as CSR requires). Both operands are
    row-major over tokens, the layout the CPU kernel runs fastest on (about 15x faster than strided operands)."""
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
