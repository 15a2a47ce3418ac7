"""Shared pieces of the benchmarks: the peer methods, built on one module each, and small measuring helpers."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, ShiraConfig, SupertuningConfig, get_peft_model
from torch import nn

import neuroada
from neuroada.selection import select_per_neuron


class DenseCompose(nn.Module):
    """The authors' reference forward: a dense W + S per call (kept by autograd), F.linear on it."""

    def __init__(self, linear: nn.Linear, k: int):
        super().__init__()
        self.base = linear.requires_grad_(False)
        columns = select_per_neuron(linear.weight.detach(), k).long()
        rows = torch.arange(linear.out_features, device=columns.device)[:, None] * linear.in_features
        self.register_buffer("flat_indices", (rows + columns).reshape(-1))
        self.delta = nn.Parameter(torch.zeros(columns.numel(), device=linear.weight.device))

    def forward(self, x):
        # the reference code adds the deltas in the weight's dtype (bf16 on a bf16 base)
        delta = self.delta.to(self.base.weight.dtype)
        weight = self.base.weight.reshape(-1).scatter_add(0, self.flat_indices, delta).view_as(self.base.weight)
        return F.linear(x, weight, self.base.bias)


class MaskedFullFineTuning(nn.Module):
    """Mask-based selective fine-tuning (the paper's baseline): W trainable, its gradient masked to the selection."""

    def __init__(self, linear: nn.Linear, k: int):
        super().__init__()
        self.base = linear.requires_grad_(True)
        columns = select_per_neuron(linear.weight.detach(), k).long()
        mask = torch.zeros_like(linear.weight, dtype=torch.bool).scatter_(1, columns, True)
        self.register_buffer("mask", mask)
        linear.weight.register_hook(lambda grad: grad * self.mask)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)

    def forward(self, x):
        return self.base(x)


def sparsity_matching_k(linears: list[nn.Linear], k: int) -> float:
    """Super-Tuning's sparsity that trains as many entries over ``linears`` as NeuroAda at ``k`` (out * k per
    layer): one ratio for all of them, since Super-Tuning selects over each whole matrix."""
    entries = sum(linear.out_features * min(k, linear.in_features) for linear in linears)
    return 1.0 - entries / sum(linear.weight.numel() for linear in linears)


def wrap_linear(method: str, linear: nn.Linear, k: int) -> nn.Module:
    """One linear layer adapted by ``method``, with the same number of trainable entries as NeuroAda at ``k``
    for the sparse peers."""
    holder = nn.Sequential(linear)
    out_features, in_features = linear.weight.shape
    entries = out_features * k
    if method == "frozen":
        return holder.requires_grad_(False)
    if method == "full":
        return holder.requires_grad_(True)
    if method.startswith("neuroada"):
        backend = method.split("-", 1)[1] if "-" in method else "auto"
        return get_peft_model(holder, neuroada.NeuroAdaConfig(k=k, target_modules=["0"], bypass_backend=backend))
    if method == "dense-compose":
        return DenseCompose(linear, k)
    if method == "masked-full":
        return MaskedFullFineTuning(linear, k)
    if method == "supertuning":
        return get_peft_model(holder, SupertuningConfig(target_modules=["0"], sparsity=sparsity_matching_k([linear], k)))
    if method == "shira":
        rank = max(1, round(entries / (out_features + in_features)))
        return get_peft_model(holder, ShiraConfig(target_modules=["0"], r=rank))
    if method.startswith("lora"):
        rank = int(method.removeprefix("lora-r"))
        return get_peft_model(holder, LoraConfig(target_modules=["0"], r=rank, lora_alpha=2 * rank))
    raise ValueError(f"unknown method {method!r}")


def median_seconds(samples: list[float]) -> float:
    return statistics.median(samples)


def timed(fn) -> float:
    """Wall time of ``fn``; on a GPU, with the queued kernels finished before and after."""
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def bytes_kept_for_backward(fn, parameters) -> int:
    """Bytes of the distinct tensors autograd saves while ``fn`` runs, leaving out the module's own parameters and
    buffers (references, not copies)."""
    own = {p.untyped_storage().data_ptr() for p in parameters}
    kept: dict[int, int] = {}

    def pack(tensor):
        if tensor.layout != torch.strided:  # sparse (SHiRA): count its values and indices
            parts = [tensor._values(), tensor._indices()] if tensor.is_sparse else []
            for part in parts:
                kept[part.untyped_storage().data_ptr()] = part.untyped_storage().nbytes()
            return tensor
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())


def peak_bytes_allocated(fn) -> int:
    """Peak bytes that torch's CPU allocator held while ``fn`` ran, above what was live when it started: exact and
    free of the C allocator's retention (freed memory that glibc keeps resident), which the resident set size is
    not. From the profiler's allocation events in time order (its private event tree: the public event list files
    most allocations under their operator, without a time of their own). Frees of tensors made before ``fn`` are
    not reported by the allocator, so memory those release does not lower the running total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.typed[1]
        if type(fields).__name__.endswith("Allocation") and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.total_allocated))
    return max((total for _, total in sorted(events)), default=0)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
