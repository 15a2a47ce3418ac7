"""The NeuroAda layer: a frozen linear layer plus a sparse bypass with k trainable scalars per output neuron."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import quantized, sharding
from .bypass import SparsePattern, build_pattern, choose_backend, dense_matrix, linear_with_bypass, sparse_bypass
from .config import NeuroAdaConfig
from .selection import layer_seed, select_per_neuron


def supports(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


class NeuroAdaLayer(BaseTunerLayer):
    """Adapter state of one wrapped layer, per adapter name:

    - ``neuroada_delta[name]``: ``[out_features, k]`` float32 parameter, whatever the base dtype, so that small
      updates to large weights are not rounded away;
    - ``neuroada_indices[name]``: ``[out_features, k]`` buffer of selected input positions, in the smallest integer
      dtype that holds ``in_features``, rows sorted.

    The base weight is addressed as ``[out_features, in_features]`` rows whatever its storage: ``nn.Linear`` stores
    that layout, transformers' ``Conv1D`` (GPT-2) stores the transpose.
    """

    adapter_layer_names = ("neuroada_delta",)
    other_param_names = ("neuroada_indices", "bypass_backend")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.neuroada_delta = nn.ParameterDict({})
        self.neuroada_indices = BufferDict(persistent=True)
        self.bypass_backend: dict[str, str] = {}
        # Original weight entries at the selected positions, kept while an adapter is merged so that unmerge
        # restores the base weight bit for bit (subtracting delta again would not, in bf16).
        self._merged_originals: dict[str, torch.Tensor] = {}
        self._patterns: dict[str, SparsePattern] = {}
        self._disable_adapters = False
        self.merged_adapters = []

        base = self.get_base_layer()
        if not supports(base):
            raise TypeError(f"NeuroAda adapts nn.Linear and transformers Conv1D layers, not {type(base).__name__}")
        self.is_conv1d = isinstance(base, Conv1D)
        self.quantization = quantized.kind(base)  # "4bit" / "8bit" (bitsandbytes) or None
        if self.is_conv1d:
            self.in_features, self.out_features = sharding.logical_shape(base.weight)
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    def weight_rows(self) -> torch.Tensor:
        """The base weight's data as ``[out_features, in_features]`` (a view: writes go to the weight)."""
        weight = self.get_base_layer().weight.data
        return weight.T if self.is_conv1d else weight

    def full_weight_rows(self) -> torch.Tensor:
        """The whole base weight as ``[out_features, in_features]``, gathered first when it is sharded (a DTensor,
        as under FSDP2 / tensor parallelism, or a DeepSpeed ZeRO-3 partition), so that selection sees every input of
        every neuron."""
        if self.quantization:
            return quantized.dequantized_weight(self.get_base_layer())
        weight = sharding.full_copy(self.get_base_layer().weight)
        return weight.T if self.is_conv1d else weight

    def update_layer(self, adapter_name: str, config: NeuroAdaConfig, module_name: str = "") -> None:
        k = min(config.k, self.in_features)
        rows = self.full_weight_rows()
        indices = select_per_neuron(rows, k, config.selection, seed=layer_seed(config.seed, module_name))
        if config.init_weights:
            delta = torch.zeros(self.out_features, k, dtype=torch.float32, device=rows.device)
        else:
            delta = torch.randn(self.out_features, k, dtype=torch.float32, device=rows.device) * 0.02
        self.neuroada_delta[adapter_name] = nn.Parameter(delta)
        sharding.register_with_zero3(self, self.neuroada_delta[adapter_name], self.get_base_layer().weight)
        self.neuroada_indices[adapter_name] = indices
        self._patterns.pop(adapter_name, None)
        self.bypass_backend[adapter_name] = config.bypass_backend
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def pattern(self, adapter_name: str) -> SparsePattern:
        """The op's index layouts, built once per selection. Loading indices into the buffer (load_state_dict)
        drops them, see :meth:`_forget_patterns`; a move to another device rebuilds them there."""
        pattern = self._patterns.get(adapter_name)
        indices = self.neuroada_indices[adapter_name]
        if pattern is None or pattern.columns.device != indices.device:
            pattern = self._patterns[adapter_name] = build_pattern(indices, self.in_features)
        return pattern

    @staticmethod
    def _forget_patterns(module, incompatible_keys) -> None:
        module._patterns.clear()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter as a dense matrix shaped like the base weight (float32)."""
        dense = dense_matrix(self.neuroada_delta[adapter_name].detach(), self.pattern(adapter_name).columns,
                             self.in_features)
        return dense.T if self.is_conv1d else dense

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """W[i, idx[i, j]] += delta[i, j] in one scatter per adapter, summed in float32, cast once to W's dtype."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if self.quantization:
            self._merge_quantized(adapter_names, safe_merge)
            return
        base_weight = self.get_base_layer().weight
        with sharding.writable_whole([base_weight, *self.neuroada_delta.values()]):
            rows = self.weight_rows()
            for name in adapter_names:
                if name not in self.neuroada_delta:
                    continue
                indices = self.neuroada_indices[name].long()
                original = rows.gather(1, indices)
                merged = (original.float() + self.neuroada_delta[name].detach().float()).to(rows.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter {name!r} would put NaN/inf into the weight; the adapter is "
                                     "broken")
                rows.scatter_(1, indices, merged)
                self._merged_originals[name] = original
                self.merged_adapters.append(name)

    def _merge_quantized(self, adapter_names: list[str], safe_merge: bool, sign: float = 1.0) -> None:
        """Dequantise, add (or with ``sign=-1`` subtract) the deltas in float32, quantize again."""
        warnings.warn(
            f"merging NeuroAda deltas into a bitsandbytes {self.quantization} layer rounds the merged weight to the "
            "quantization grid again: deltas smaller than its step are lost, and unmerge cannot restore the "
            "original bits. Merge into an unquantized copy of the base model to keep them."
        )
        weight = quantized.dequantized_weight(self.get_base_layer())
        for name in adapter_names:
            if name in self.neuroada_delta:
                weight.scatter_add_(1, self.neuroada_indices[name].long(), sign * self.neuroada_delta[name].detach())
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"merging {adapter_names} would put NaN/inf into the weight; the adapter is broken")
        quantized.store_weight(self.get_base_layer(), weight)
        if sign > 0:
            self.merged_adapters.extend(n for n in adapter_names if n in self.neuroada_delta)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("NeuroAda layer is not merged; nothing to unmerge.")
            return
        if self.quantization:
            self._merge_quantized(list(reversed(self.merged_adapters)), safe_merge=False, sign=-1.0)
            self.merged_adapters.clear()
            return
        with sharding.writable_whole([self.get_base_layer().weight]):
            rows = self.weight_rows()
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                rows.scatter_(1, self.neuroada_indices[name].long(), self._merged_originals.pop(name))

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.neuroada_delta:
            sharding.unregister_from_zero3(self, self.neuroada_delta[adapter_name])
        super().delete_adapter(adapter_name)
        self._patterns.pop(adapter_name, None)


class NeuroAdaLinear(nn.Module, NeuroAdaLayer):
    """NeuroAda around an ``nn.Linear`` or a transformers ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: NeuroAdaConfig, module_name: str = ""):
        super().__init__()
        NeuroAdaLayer.__init__(self, base_layer)
        self.register_load_state_dict_post_hook(NeuroAdaLayer._forget_patterns)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.neuroada_delta]
        backends = {name: self._backend_for(name, x, fusable=len(active) == 1 and not args and not kwargs)
                    for name in active}
        if len(active) == 1 and backends[active[0]] == "fused":
            base = self.get_base_layer()
            weight_rows = base.weight.T if self.is_conv1d else base.weight
            return linear_with_bypass(x, weight_rows, base.bias, self.neuroada_delta[active[0]], self.pattern(active[0]))
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            bypass = sparse_bypass(x, self.neuroada_delta[name], self.pattern(name), backends[name])
            result = result + bypass.to(result.dtype)
        return result

    def _backend_for(self, adapter_name: str, x: torch.Tensor, fusable: bool) -> str:
        """The configured backend, or for "auto" the cheapest one that is exact for this call. The fused path
        replaces the base layer's own forward, so it needs a plain float32 frozen weight, no hooks on the base
        layer and no autocast (which would run the base matmul in low precision)."""
        backend = self.bypass_backend[adapter_name]
        base = self.get_base_layer()
        fusable = (
            fusable
            and base.weight.dtype == torch.float32
            and not base.weight.requires_grad
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not sharding.is_zero3_partitioned(base.weight)
            and not torch.is_autocast_enabled(x.device.type)
        )
        if backend == "auto" or (backend == "fused" and not fusable):  # "fused" where it applies, else the best other
            tokens = x.numel() // max(x.shape[-1], 1)
            k = self.neuroada_delta[adapter_name].shape[1]
            return choose_backend(tokens, self.in_features, k, x.device, fusable, x.dtype)
        return backend

    def __repr__(self) -> str:
        return "neuroada." + super().__repr__()
