"""Triton kernels for the sparse bypass, for GPUs. They also run on CPU under ``TRITON_INTERPRET=1`` (slowly), which
is how the tests check them against the dense reference on machines without a GPU.

Every kernel reads its dense operands feature-major (``x_t = x.T``: ``[in, tokens]``; ``grad_t``: ``[out, tokens]``),
so that gathering a selected input position for a tile of tokens reads one contiguous run of memory. Token-major
operands make every gathered element its own memory transaction: the first GPU run measured the token-major
kernels at 3x the frozen layer's time at k=1 and 30x at k=20 (bf16, 4096x4096, 8192 tokens). The transposes cost one
read and one write of each operand. Within a launch, program 0 runs over output (or input) tiles first, so the
programs running together share one token tile of the gathered operand, which stays in L2.

- forward: ``out[n, i] = sum_j x_t[columns[i, j], n] * delta[i, j]``, one program per (output tile, token tile);
- delta gradient: ``grad_delta[i, j] = sum_n grad_t[i, n] * x_t[columns[i, j], n]``: each program reduces one
  (output tile, token split, chunk of j), reading its ``grad_t`` tile once for all j of the chunk; the splits are
  summed afterwards, so no atomics are needed;
- input gradient: ``grad_x[n, c] = sum over entries (i, j) with columns[i, j] = c of grad_t[i, n] * delta[i, j]``,
  through the transposed pattern (entries grouped by input position), one program per (input tile, token tile),
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

# Tiles per program: (features, tokens, warps). Chosen so that on sm_90 no kernel spills registers and each thread
# holds 8 elements of its tile (tests/test_kernel_compile.py compiles them for sm_90 without a GPU and checks the
# spills); their speed on a GPU is what benchmarks/gpu_check.py's kernel_timing part measures, for these and other
# tiles. Module attributes, read at each call, so that the check can try other tiles and the tests can shrink the
# token splits.
_FORWARD_TILES = (32, 64, 8)
_INPUT_GRAD_TILES = (32, 64, 8)
_DELTA_GRAD_TILES = (32, 64, 8)
_DELTA_GRAD_MAX_BLOCK_K = 32  # the j values one delta-gradient program accumulates (its registers grow with them)
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
    def _forward_tile(x_t_ptr, columns_ptr, delta_ptr, rows_o, rows_n, mask_o, mask, k, stride_x_t,
                      BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr):
        """``[BLOCK_O, BLOCK_N]`` float32: ``sum_j x_t[columns[o, j], n] * delta[o, j]`` for the tile's o and n."""
        acc = tl.zeros((BLOCK_O, BLOCK_N), dtype=tl.float32)
        for j in range(0, k):
            cols = tl.load(columns_ptr + rows_o * k + j, mask=mask_o, other=0)
            weights = tl.load(delta_ptr + rows_o * k + j, mask=mask_o, other=0.0)
            xv = tl.load(x_t_ptr + _row_starts(cols, stride_x_t)[:, None] + rows_n[None, :], mask=mask, other=0.0)
            acc += xv.to(tl.float32) * weights[:, None]
        return acc

    @triton.jit
    def _forward_kernel(x_t_ptr, columns_ptr, delta_ptr, out_ptr, tokens, out_features, k, stride_x_t, stride_out,
                        BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr):
        rows_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        rows_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_o = rows_o < out_features
        mask = mask_o[:, None] & (rows_n < tokens)[None, :]
        acc = _forward_tile(x_t_ptr, columns_ptr, delta_ptr, rows_o, rows_n, mask_o, mask, k, stride_x_t, BLOCK_O,
                            BLOCK_N)
        tl.store(out_ptr + _row_starts(rows_n, stride_out)[None, :] + rows_o[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _delta_grad_kernel(x_t_ptr, grad_t_ptr, columns_ptr, partial_ptr, tokens, out_features, k, stride_x_t,
                           stride_g_t, tokens_per_split, BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        rows_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        split = tl.program_id(1)
        first_j = tl.program_id(2) * BLOCK_K
        slots = tl.arange(0, BLOCK_K)
        mask_o = rows_o < out_features
        acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
        start = split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, tokens)
        for offset in range(0, end - start, BLOCK_N):
            rows_n = start + offset + tl.arange(0, BLOCK_N)
            mask = mask_o[:, None] & (rows_n < end)[None, :]
            gv = tl.load(grad_t_ptr + _row_starts(rows_o, stride_g_t)[:, None] + rows_n[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            for slot in range(0, tl.minimum(BLOCK_K, k - first_j)):
                cols = tl.load(columns_ptr + rows_o * k + first_j + slot, mask=mask_o, other=0)
                xv = tl.load(x_t_ptr + _row_starts(cols, stride_x_t)[:, None] + rows_n[None, :], mask=mask,
                             other=0.0)
                part = tl.sum(gv * xv.to(tl.float32), axis=1)
                acc += tl.where(slots[None, :] == slot, part[:, None], 0.0)
        js = first_j + slots
        tl.store(partial_ptr + (split * out_features + rows_o)[:, None] * k + js[None, :], acc,
                 mask=mask_o[:, None] & (js < k)[None, :])

    @triton.jit
    def _input_grad_tile(grad_t_ptr, rows_ptr, weights_ptr, offsets_ptr, cols_c, rows_n, mask_c, mask_n, stride_g_t,
                         BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
        """``[BLOCK_C, BLOCK_N]`` float32: ``sum over entries (i, j) at input c of grad_t[i, n] * delta[i, j]``."""
        begin = tl.load(offsets_ptr + cols_c, mask=mask_c, other=0)
        count = tl.load(offsets_ptr + cols_c + 1, mask=mask_c, other=0) - begin
        acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
        for e in range(0, tl.max(count, axis=0)):
            valid = e < count
            rows = tl.load(rows_ptr + begin + e, mask=valid, other=0)
            weights = tl.load(weights_ptr + begin + e, mask=valid, other=0.0)
            gv = tl.load(grad_t_ptr + _row_starts(rows, stride_g_t)[:, None] + rows_n[None, :],
                         mask=valid[:, None] & mask_n[None, :], other=0.0)
            acc += gv.to(tl.float32) * weights[:, None]
        return acc

    @triton.jit
    def _input_grad_kernel(grad_t_ptr, rows_ptr, weights_ptr, offsets_ptr, out_ptr, tokens, in_features, stride_g_t,
                           stride_out, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
        cols_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        rows_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_c = cols_c < in_features
        mask_n = rows_n < tokens
        acc = _input_grad_tile(grad_t_ptr, rows_ptr, weights_ptr, offsets_ptr, cols_c, rows_n, mask_c, mask_n,
                               stride_g_t, BLOCK_C, BLOCK_N)
        tl.store(out_ptr + _row_starts(rows_n, stride_out)[None, :] + cols_c[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=mask_c[:, None] & mask_n[None, :])


def bypass_forward(x2d: torch.Tensor, delta: torch.Tensor, columns: torch.Tensor,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x2d S^T`` as ``[tokens, out]`` (x2d token-major, as the layer gets it), summed in float32 and stored in
    ``out_dtype`` (rounded once, to nearest on a GPU)."""
    tokens, out_features, k = x2d.shape[0], delta.shape[0], delta.shape[1]
    out = torch.empty(tokens, out_features, dtype=out_dtype, device=x2d.device)
    if tokens:
        x_t = x2d.T.contiguous()
        block_o, block_n, warps = _FORWARD_TILES
        grid = (triton.cdiv(out_features, block_o), triton.cdiv(tokens, block_n))
        _forward_kernel[grid](x_t, columns, delta.float().contiguous(), out, tokens, out_features, k, x_t.stride(0),
                              out.stride(0), BLOCK_O=block_o, BLOCK_N=block_n, num_warps=warps)
    return out


def delta_grad(grad_t: torch.Tensor, x_t: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``grad_delta`` as ``[out, k]`` float32, from feature-major ``grad_t`` ``[out, tokens]`` and ``x_t``
    ``[features, tokens]`` (all of x's features, or only the kept ones with ``columns`` pointing into them)."""
    grad_t, x_t = grad_t.contiguous(), x_t.contiguous()
    tokens, (out_features, k) = x_t.shape[1], columns.shape
    splits = max(1, triton.cdiv(tokens, _TOKENS_PER_SPLIT))
    block_o, block_n, warps = _DELTA_GRAD_TILES
    block_k = min(triton.next_power_of_2(max(k, 1)), _DELTA_GRAD_MAX_BLOCK_K)
    partial = torch.zeros(splits, out_features, k, dtype=torch.float32, device=x_t.device)
    grid = (triton.cdiv(out_features, block_o), splits, triton.cdiv(k, block_k))
    if tokens and k:
        _delta_grad_kernel[grid](x_t, grad_t, columns, partial, tokens, out_features, k, x_t.stride(0),
                                 grad_t.stride(0), _TOKENS_PER_SPLIT, BLOCK_O=block_o, BLOCK_N=block_n,
                                 BLOCK_K=block_k, num_warps=warps)
    return partial.sum(0)


def input_grad(grad_t: torch.Tensor, delta: torch.Tensor, transposed_rows: torch.Tensor,
               transposed_order: torch.Tensor, transposed_offsets: torch.Tensor, in_features: int,
               dtype: torch.dtype) -> torch.Tensor:
    """``grad S`` as ``[tokens, in]`` in ``dtype``, from feature-major ``grad_t`` ``[out, tokens]``;
    ``transposed_offsets`` has ``in + 1`` entries."""
    grad_t = grad_t.contiguous()
    tokens = grad_t.shape[1]
    weights = delta.float().reshape(-1)[transposed_order].contiguous()
    out = torch.empty(tokens, in_features, dtype=dtype, device=grad_t.device)
    if tokens:
        block_c, block_n, warps = _INPUT_GRAD_TILES
        grid = (triton.cdiv(in_features, block_c), triton.cdiv(tokens, block_n))
        _input_grad_kernel[grid](grad_t, transposed_rows, weights, transposed_offsets, out, tokens, in_features,
                                 grad_t.stride(0), out.stride(0), BLOCK_C=block_c, BLOCK_N=block_n,
                                 num_warps=warps)
    return out
