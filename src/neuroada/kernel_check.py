"""A one-time self-check of the Triton kernels before ``"auto"`` trusts them on a device and dtype.

The kernels are tested in Triton's CPU interpreter, not on every GPU, compiler and driver a user may have. So the
first time ``"auto"`` would pick them for a (device, dtype), :func:`triton_usable` runs them (forward, delta
gradient, input gradient) on a small random case against the dense torch reference, keeps the verdict, and on a
mismatch or an exception warns once and answers False: the torch backends are used instead. An explicitly
requested ``bypass_backend="triton"`` is not checked.
"""

from __future__ import annotations

import warnings

import torch

from . import triton_backend

# Bound on |kernel - reference| relative to the reference's largest magnitude. The reference sees the same rounded
# inputs and accumulates in float32 like the kernels, so what differs is summation order and, for the input
# gradient, the one rounding of the output to the activation dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}

_verdicts: dict[tuple[str, torch.dtype], bool] = {}


def triton_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels give correct results on ``device`` for activations of ``dtype``; checked once per
    (device, dtype), then cached. False (with one warning) when they disagree with the reference or fail."""
    if not triton_backend.available(device):
        return False
    key = (_device_key(device), dtype)
    if key not in _verdicts:
        if torch.compiler.is_compiling() or _capturing_cuda_graph(device):
            # The check launches kernels and reads results back, which a graph being traced or captured cannot
            # hold; run one eager call first to have it checked. Until then, trust the kernels as before.
            return True
        _verdicts[key] = _run_check(torch.device(key[0]), dtype)
    return _verdicts[key]


def forget_verdicts() -> None:
    """Drop the cached verdicts (tests; or after changing the kernels at run time)."""
    _verdicts.clear()


def mismatch(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """The kernels' largest error on the check case, per output, relative to the reference's largest magnitude.
    Raises whatever the kernels raise."""
    from .bypass import build_pattern, sparse_bypass, sparse_bypass_reference
    from .selection import select_per_neuron

    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        generator = torch.Generator().manual_seed(1234)  # a private generator: the caller's random stream is kept
        tokens, in_features, out_features, k = 70, 45, 37, 3  # partial tiles in every dimension
        weight = torch.randn(out_features, in_features, generator=generator)
        weight[:, :3] *= 10  # skewed: most neurons pick the same few inputs, so the input-gradient loop is uneven
        indices = select_per_neuron(weight, k).to(device)
        pattern = build_pattern(indices, in_features)
        x = torch.randn(tokens, in_features, generator=generator).to(device, dtype)
        delta = torch.randn(out_features, k, generator=generator).to(device)
        # (in the activation dtype, as the layers get it; the reference gets the same values in float32)
        upstream = torch.randn(tokens, out_features, generator=generator).to(device, dtype)
        results = []
        for compute in (lambda xi, di: sparse_bypass(xi, di, pattern, "triton", out_dtype=dtype),
                        lambda xi, di: sparse_bypass_reference(xi, di, indices)):
            xi, di = x.clone().requires_grad_(True), delta.clone().requires_grad_(True)
            out = compute(xi, di)
            results.append((out.detach(), *torch.autograd.grad(out, (xi, di), upstream.to(out.dtype))))
    errors = {}
    for name, got, want in zip(("forward", "input_grad", "delta_grad"), *results):
        scale = want.float().abs().max().clamp_min(1e-6)
        errors[name] = float(((got.float() - want.float()).abs().max() / scale).nan_to_num(float("inf")))
    return errors


def _run_check(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        errors = mismatch(device, dtype)
    except Exception as error:  # any failure to compile or launch means: do not use the kernels here
        warnings.warn(f"NeuroAda's Triton kernels failed their self-check on {device} for {dtype} "
                      f"({type(error).__name__}: {error}); using the PyTorch backends instead. "
                      "Set bypass_backend='triton' to force the kernels.", RuntimeWarning, stacklevel=3)
        return False
    tolerance = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    wrong = {name: error for name, error in errors.items() if not error <= tolerance}
    if wrong:
        details = ", ".join(f"{name} off by {error:.2g}" for name, error in wrong.items())
        warnings.warn(f"NeuroAda's Triton kernels disagree with the PyTorch reference on {device} for {dtype} "
                      f"({details} relative; tolerance {tolerance:g}); using the PyTorch backends instead. "
                      "Please report this with your GPU, driver and Triton version.", RuntimeWarning, stacklevel=3)
        return False
    return True


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _capturing_cuda_graph(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
