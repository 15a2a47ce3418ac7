"""Candidate Triton kernels for the next step of the GPU bypass, timed against the library's by the GPU check's
``kernel_variants`` part (``benchmarks/gpu_check.py``). Not used by the library: a variant moves there once a GPU run
shows it faster and the check shows it correct.

The first H200 run (docs/results/gpu-check-h200-session7.md) put the Triton layer at 3.55x the frozen layer at k=1.
Compiled for sm_90 (without a GPU), the kernels' loads and stores are already 16-byte vector operations; the time
goes to the bytes moved around them: transposes, float32 intermediates, separate adds. These variants cut that
(about 1.9 GB per step at k=1, 4096x4096, 8192 bf16 tokens, to about 0.75 GB by the byte count; unmeasured):

- ``transpose(matrix)``: a tiled Triton transpose, for ``x.T.contiguous()`` and the gradient's transpose;
- ``forward_add(x_t, delta, columns, base, out=base)``: ``base + x S^T`` summed in float32 and rounded once into
  ``base``'s dtype, in place (the library stores the bypass in that dtype, then adds: two roundings, one more pass);
- ``input_grad_add(...)``: the input gradient added into the base layer's, in place (autograd sums them in a pass);
- ``BypassLinear``: the whole layer ``x W^T + b + x S^T`` with these, saving ``x_t`` (no second transpose of x for
  the delta gradient, which reuses the library's kernel). Memory caveat: layers sharing one input (q/k/v) would each
  save their own ``x_t``, where the library shares ``x``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from neuroada import triton_backend  # the library's kernels: delta_grad is reused as it is, and the tile loops
from neuroada.triton_backend import _forward_tile, _input_grad_tile

TRANSPOSE_TILES = (64, 64, 4)  # (rows, cols, warps): 64x64 bf16 = 8 KB per tile, 8 elements (16 B) per thread
FORWARD_TILES = (32, 64, 4)  # (features, tokens, warps)
INPUT_GRAD_TILES = (32, 64, 4)


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, rows, cols, stride_src, stride_dst, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """dst[c, r] = src[r, c]. Programs are grouped so that GROUP row tiles of one column band run together (the
    destination rows they write are then filled in long runs)."""
    pid = tl.program_id(0)
    tiles_r = tl.cdiv(rows, BLOCK_R)
    tiles_c = tl.cdiv(cols, BLOCK_C)
    per_group = GROUP * tiles_c
    group = pid // per_group
    first_r = group * GROUP
    group_rows = tl.minimum(tiles_r - first_r, GROUP)
    tile_r = first_r + (pid % per_group) % group_rows
    tile_c = (pid % per_group) // group_rows
    r = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    tile = tl.load(src_ptr + r.to(tl.int64)[:, None] * stride_src + c[None, :], mask=mask)
    tile_t = tl.trans(tile)  # [BLOCK_C, BLOCK_R]
    tl.store(dst_ptr + c.to(tl.int64)[:, None] * stride_dst + r[None, :], tile_t.to(dst_ptr.dtype.element_ty),
             mask=tl.trans(mask))


@triton.jit
def _tile_ids(TOKENS_FIRST: tl.constexpr):
    """(feature tile, token tile) of this program. TOKENS_FIRST: program 0 runs over token tiles (programs running
    together read long runs of the same feature-major rows) instead of over feature tiles (programs running together
    read the same 128-byte window of many rows)."""
    if TOKENS_FIRST:
        return tl.program_id(1), tl.program_id(0)
    return tl.program_id(0), tl.program_id(1)


@triton.jit
def _store_added(acc, rows_n, features, mask_t, base_ptr, out_ptr, stride_base, stride_out):
    """``out[n, f] = base[n, f] + acc[f, n]``, summed in float32 and rounded once; ``acc`` is transposed in
    registers first, so the token-major tensors are read and written along f."""
    n64 = rows_n.to(tl.int64)[:, None]
    base = tl.load(base_ptr + n64 * stride_base + features[None, :], mask=mask_t, other=0.0)
    tl.store(out_ptr + n64 * stride_out + features[None, :], (base.to(tl.float32) + tl.trans(acc)).to(
        out_ptr.dtype.element_ty), mask=mask_t)


@triton.jit
def _forward_add_kernel(x_t_ptr, columns_ptr, delta_ptr, base_ptr, out_ptr, tokens, out_features, k, stride_x_t,
                        stride_base, stride_out, BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr,
                        TOKENS_FIRST: tl.constexpr = False):
    pid_o, pid_n = _tile_ids(TOKENS_FIRST)
    rows_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_o = rows_o < out_features
    mask = mask_o[:, None] & (rows_n < tokens)[None, :]
    acc = _forward_tile(x_t_ptr, columns_ptr, delta_ptr, rows_o, rows_n, mask_o, mask, k, stride_x_t, BLOCK_O,
                        BLOCK_N)
    _store_added(acc, rows_n, rows_o, tl.trans(mask), base_ptr, out_ptr, stride_base, stride_out)


@triton.jit
def _input_grad_add_kernel(grad_t_ptr, rows_ptr, weights_ptr, offsets_ptr, base_ptr, out_ptr, tokens, in_features,
                           stride_g_t, stride_base, stride_out, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                           TOKENS_FIRST: tl.constexpr = False):
    pid_c, pid_n = _tile_ids(TOKENS_FIRST)
    cols_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_c = cols_c < in_features
    mask_n = rows_n < tokens
    acc = _input_grad_tile(grad_t_ptr, rows_ptr, weights_ptr, offsets_ptr, cols_c, rows_n, mask_c, mask_n,
                           stride_g_t, BLOCK_C, BLOCK_N)
    _store_added(acc, rows_n, cols_c, mask_n[:, None] & mask_c[None, :], base_ptr, out_ptr, stride_base, stride_out)


# ----------------------------------------------------------------------------------------------------- host code


def transpose(matrix: torch.Tensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``matrix.T`` as a contiguous tensor (of ``dtype``, default matrix's)."""
    rows, cols = matrix.shape
    if matrix.stride(1) != 1:
        matrix = matrix.contiguous()
    if out is None:
        out = torch.empty(cols, rows, dtype=dtype or matrix.dtype, device=matrix.device)
    if rows and cols:
        block_r, block_c, warps = TRANSPOSE_TILES
        grid = (triton.cdiv(rows, block_r) * triton.cdiv(cols, block_c),)
        _transpose_kernel[grid](matrix, out, rows, cols, matrix.stride(0), out.stride(0), BLOCK_R=block_r,
                                BLOCK_C=block_c, GROUP=8, num_warps=warps)
    return out


def _grid(features: int, tokens: int, tiles, tokens_first: bool) -> tuple:
    """Programs per (feature tile, token tile), token tiles first with ``tokens_first`` (see ``_tile_ids``)."""
    grid = (triton.cdiv(features, tiles[0]), triton.cdiv(tokens, tiles[1]))
    return grid[::-1] if tokens_first else grid


def forward_add(x_t: torch.Tensor, delta: torch.Tensor, columns: torch.Tensor, base: torch.Tensor,
                out: torch.Tensor | None = None, tiles=None, tokens_first: bool = False) -> torch.Tensor:
    """``base + x S^T`` in base's dtype, from feature-major ``x_t`` [in, tokens] and token-major ``base`` [tokens,
    out]. ``out=base`` works in place."""
    tokens, out_features = base.shape
    k = columns.shape[1]
    if out is None:
        out = torch.empty_like(base)
    if tokens:
        block_o, block_n, warps = tiles = tiles or FORWARD_TILES
        _forward_add_kernel[_grid(out_features, tokens, tiles, tokens_first)](x_t, columns, delta.float().contiguous(), base, out, tokens, out_features, k,
                                  x_t.stride(0), base.stride(0), out.stride(0), BLOCK_O=block_o, BLOCK_N=block_n,
                                  TOKENS_FIRST=tokens_first, num_warps=warps)
    return out


def input_grad_add(grad_t: torch.Tensor, delta: torch.Tensor, transposed_rows: torch.Tensor,
                   transposed_order: torch.Tensor, transposed_offsets: torch.Tensor, base: torch.Tensor,
                   out: torch.Tensor | None = None, tiles=None, tokens_first: bool = False) -> torch.Tensor:
    """``base + grad S`` in base's dtype ([tokens, in]); ``out=base`` works in place."""
    tokens, in_features = base.shape
    weights = delta.float().reshape(-1)[transposed_order.long()].contiguous()
    if out is None:
        out = torch.empty_like(base)
    if tokens:
        block_c, block_n, warps = tiles = tiles or INPUT_GRAD_TILES
        _input_grad_add_kernel[_grid(in_features, tokens, tiles, tokens_first)](grad_t, transposed_rows, weights, transposed_offsets, base, out, tokens,
                                     in_features, grad_t.stride(0), base.stride(0), out.stride(0), BLOCK_C=block_c,
                                     BLOCK_N=block_n, TOKENS_FIRST=tokens_first, num_warps=warps)
    return out


class BypassLinear(torch.autograd.Function):
    """``x W^T + b + x S^T`` for a frozen W (no weight gradient), x 2-D token-major. Saves x_t (feature-major, x's
    dtype) instead of x: the same bytes, and the backward needs no transpose of x. Memory traffic per step beyond the
    two matmuls (bf16, T tokens, in = out = F): transpose x (2TF x 2 B), forward_add (x_t and base read, out written:
    3TF x 2 B, in place), transpose grad (2TF x 2 B), input_grad_add (3TF x 2 B, in place), delta_grad (2TF x 2 B)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, columns, transposed_rows, transposed_order, transposed_offsets):
        x_t = transpose(x)
        y = torch.nn.functional.linear(x, weight, bias)
        forward_add(x_t, delta, columns, y, out=y)
        ctx.save_for_backward(x_t, weight, delta, columns, transposed_rows, transposed_order, transposed_offsets)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x_t, weight, delta, columns, t_rows, t_order, t_offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_t = transpose(grad)  # bf16 stays bf16: same values as the fp32 copy the library makes
        grad_x = grad_bias = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight
            input_grad_add(grad_t, delta, t_rows, t_order, t_offsets, grad_x, out=grad_x)
        if ctx.needs_input_grad[3]:
            grad_delta = triton_backend.delta_grad(grad_t, x_t, columns).to(delta.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.float().sum(0).to(grad.dtype)
        return grad_x, None, grad_bias, grad_delta, None, None, None, None


def bypass_linear(x2d, weight, bias, delta, pattern):
    return BypassLinear.apply(x2d, weight, bias, delta, pattern.columns, pattern.transposed_rows,
                              pattern.transposed_order, pattern.transposed_offsets)
