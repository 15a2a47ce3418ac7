"""Triton kernels for the sparse bypass, for GPUs. They also run on CPU under ``TRITON_INTERPRET=1`` (slowly), which
is how the tests check them against the dense reference on machines without a GPU.

- forward: ``out[n, i] = sum_j x[n, columns[i, j]] * delta[i, j]``, one program per (token tile, output tile),
  a gather-dot over k;
- delta gradient: ``grad_delta[i, j] = sum_n grad[n, i] * x[n, columns[i, j]]``, a sampled product over token
  tiles: each program reduces one (output tile, j, token split), and the splits are summed afterwards, so no
  atomics are needed;
- input gradient: ``grad_x[n, c] = sum over entries (i, j) with columns[i, j] = c of grad[n, i] * delta[i, j]``,
  through the transposed pattern (entries grouped by input position), one program per (token tile, input tile),
  again without atomics.

All accumulation is in float32; activations and gradients may be fp32, bf16 or fp16.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the other backends cover every device
    triton = None

_BLOCK_TOKENS = 32
_BLOCK_FEATURES = 32
_TOKENS_PER_SPLIT = 1024


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device``: Triton installed, and a GPU or the CPU interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _row_starts(rows, stride):
        """Element offsets of rows, in 64 bits: tokens x features passes 2**31 on long inputs (for instance
        8 x 32768 tokens x 11008 features), where 32-bit offsets would wrap and read the wrong memory."""
        return rows.to(tl.int64) * stride

    @triton.jit
    def _forward_kernel(x_ptr, columns_ptr, delta_ptr, out_ptr, tokens, out_features, k, stride_x, stride_out,
                        BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr):
        rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        mask_n = rows_n < tokens
        mask_o = rows_o < out_features
        acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
        for j in range(0, k):
            cols = tl.load(columns_ptr + rows_o * k + j, mask=mask_o, other=0)
            weights = tl.load(delta_ptr + rows_o * k + j, mask=mask_o, other=0.0)
            xv = tl.load(x_ptr + _row_starts(rows_n, stride_x)[:, None] + cols[None, :],
                         mask=mask_n[:, None] & mask_o[None, :], other=0.0)
            acc += xv.to(tl.float32) * weights[None, :]
        tl.store(out_ptr + _row_starts(rows_n, stride_out)[:, None] + rows_o[None, :], acc,
                 mask=mask_n[:, None] & mask_o[None, :])

    @triton.jit
    def _delta_grad_kernel(x_ptr, grad_ptr, columns_ptr, partial_ptr, tokens, out_features, k, stride_x, stride_g,
                           tokens_per_split, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr):
        rows_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        j = tl.program_id(1)
        split = tl.program_id(2)
        mask_o = rows_o < out_features
        cols = tl.load(columns_ptr + rows_o * k + j, mask=mask_o, other=0)
        acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
        start = split * tokens_per_split
        for offset in range(0, tokens_per_split, BLOCK_N):
            rows_n = start + offset + tl.arange(0, BLOCK_N)
            mask = (rows_n < tokens)[:, None] & mask_o[None, :]
            gv = tl.load(grad_ptr + _row_starts(rows_n, stride_g)[:, None] + rows_o[None, :], mask=mask, other=0.0)
            xv = tl.load(x_ptr + _row_starts(rows_n, stride_x)[:, None] + cols[None, :], mask=mask, other=0.0)
            acc += tl.sum(gv.to(tl.float32) * xv.to(tl.float32), axis=0)
        tl.store(partial_ptr + (split * out_features + rows_o) * k + j, acc, mask=mask_o)

    @triton.jit
    def _input_grad_kernel(grad_ptr, rows_ptr, weights_ptr, offsets_ptr, out_ptr, tokens, in_features, stride_g,
                           stride_out, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_n = rows_n < tokens
        mask_c = cols_c < in_features
        begin = tl.load(offsets_ptr + cols_c, mask=mask_c, other=0)
        count = tl.load(offsets_ptr + cols_c + 1, mask=mask_c, other=0) - begin
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for e in range(0, tl.max(count, axis=0)):
            valid = e < count
            rows = tl.load(rows_ptr + begin + e, mask=valid, other=0)
            weights = tl.load(weights_ptr + begin + e, mask=valid, other=0.0)
            gv = tl.load(grad_ptr + _row_starts(rows_n, stride_g)[:, None] + rows[None, :],
                         mask=mask_n[:, None] & valid[None, :], other=0.0)
            acc += gv.to(tl.float32) * weights[None, :]
        tl.store(out_ptr + _row_starts(rows_n, stride_out)[:, None] + cols_c[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mask_c[None, :])


def bypass_forward(x2d: torch.Tensor, delta: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``x2d S^T`` as ``[tokens, out]`` float32."""
    x2d = x2d.contiguous()
    tokens, out_features, k = x2d.shape[0], delta.shape[0], delta.shape[1]
    out = torch.empty(tokens, out_features, dtype=torch.float32, device=x2d.device)
    grid = (triton.cdiv(tokens, _BLOCK_TOKENS), triton.cdiv(out_features, _BLOCK_FEATURES))
    if tokens:
        _forward_kernel[grid](x2d, columns, delta.float().contiguous(), out, tokens, out_features, k, x2d.stride(0),
                              out.stride(0), BLOCK_N=_BLOCK_TOKENS, BLOCK_O=_BLOCK_FEATURES)
    return out


def delta_grad(grad2d: torch.Tensor, x2d: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``grad_delta`` as ``[out, k]`` float32."""
    grad2d, x2d = grad2d.contiguous(), x2d.contiguous()
    tokens, (out_features, k) = x2d.shape[0], columns.shape
    splits = max(1, triton.cdiv(tokens, _TOKENS_PER_SPLIT))
    partial = torch.zeros(splits, out_features, k, dtype=torch.float32, device=x2d.device)
    grid = (triton.cdiv(out_features, _BLOCK_FEATURES), k, splits)
    _delta_grad_kernel[grid](x2d, grad2d, columns, partial, tokens, out_features, k, x2d.stride(0), grad2d.stride(0),
                             _TOKENS_PER_SPLIT, BLOCK_N=_BLOCK_TOKENS, BLOCK_O=_BLOCK_FEATURES)
    return partial.sum(0)


def input_grad(grad2d: torch.Tensor, delta: torch.Tensor, transposed_rows: torch.Tensor,
               transposed_order: torch.Tensor, transposed_offsets: torch.Tensor, in_features: int,
               dtype: torch.dtype) -> torch.Tensor:
    """``grad S`` as ``[tokens, in]`` in ``dtype``; ``transposed_offsets`` has ``in + 1`` entries."""
    grad2d = grad2d.contiguous()
    tokens = grad2d.shape[0]
    weights = delta.float().reshape(-1)[transposed_order].contiguous()
    out = torch.empty(tokens, in_features, dtype=dtype, device=grad2d.device)
    grid = (triton.cdiv(tokens, _BLOCK_TOKENS), triton.cdiv(in_features, _BLOCK_FEATURES))
    if tokens:
        _input_grad_kernel[grid](grad2d, transposed_rows, weights, transposed_offsets, out, tokens, in_features,
                                 grad2d.stride(0), out.stride(0), BLOCK_N=_BLOCK_TOKENS, BLOCK_C=_BLOCK_FEATURES)
    return out
