"""The NeuroAda layer: a frozen linear layer plus a sparse bypass with k trainable scalars per output neuron."""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import learning_rate, quantized, sharding
from .bypass import (SparsePattern, accumulation_dtype, build_pattern, choose_backend, dense_matrix, keeps_columns,
                     linear_with_bypass, sparse_bypass)
from .config import NeuroAdaConfig
from .selection import (DATA_CRITERIA, index_dtype_for, layer_seed, precision_fragile_rows, select_per_neuron,
                        selection_fingerprint)


# Mixed-adapter batches: adapters that share a selection are computed together by one gather while it holds at most
# this many entries (samples x tokens x out x k: 64 MiB in float32, as for a decoding step or a short prompt); larger
# batches take one op call per adapter, whose fixed cost they amortise.
_SHARED_GATHER_MAX_ENTRIES = 1 << 24


def supports(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _version_of(tensor: torch.Tensor) -> Optional[int]:
    """The tensor's version counter (bumped by every in-place write), None for an inference-mode tensor (none kept)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


_placeholders_visible = [0]  # > 0 inside deferred_selections_kept()


@contextlib.contextmanager
def deferred_selections_kept():
    """Inside, reading a deferred selection (``state_dict()``, ``neuroada_indices[name]``) gives its placeholder
    instead of computing it: for PEFT's plumbing between injecting an adapter and loading its weights, which reads
    only keys, shapes and dtypes."""
    _placeholders_visible[0] += 1
    try:
        yield
    finally:
        _placeholders_visible[0] -= 1


def delta_dtype_for(weight: torch.Tensor) -> torch.dtype:
    """The dtype of deltas on a base weight: float32 (so that a bf16/fp16/quantized base never rounds small updates
    away), float64 on a float64 base (whose bypass is then exact)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _held(indices: torch.Tensor) -> torch.Tensor:
    """Indices as a layer holds them: int16 ones (layers 257-32768 wide, as files store them) widened to int32, since
    neither gloo nor NCCL can broadcast int16, and DDP, FSDP and DeepSpeed broadcast buffers. uint8, int32 and int64
    pass as they are."""
    return indices.to(torch.int32) if indices.dtype == torch.int16 else indices


class _Selections(BufferDict):
    """``neuroada_indices``: a BufferDict whose entries can be *deferred*: registered as a placeholder of the right
    shape and dtype, with the selection computed by its first reader, unless indices are written first (assigned, or
    loaded by ``load_state_dict``). An adapter loaded with stored indices is injected this way: selecting on every
    layer (a sort of every weight row) would be thrown away when the file's indices are loaded over it.

    It also knows which entries are *uncalibrated*: placeholders of a data-aware selection, which only indices
    written in (by ``calibrate_selection``, or loaded from a file) replace. Kept here, beside the indices, because a
    load writes them here and nowhere else."""

    def __init__(self) -> None:
        super().__init__(persistent=True)
        self._deferred: dict[str, Any] = {}  # name -> a callable returning the selection
        self.uncalibrated: set[str] = set()

    def defer(self, key: str, placeholder: torch.Tensor, select) -> None:
        self[key] = placeholder
        self._deferred[key] = select

    def settled(self, key: str) -> torch.Tensor:
        """The selection ``key``, computed now if it was deferred (also inside deferred_selections_kept)."""
        if key in self._deferred:
            selection = self._deferred[key]()
            del self._deferred[key]
            super().__setitem__(key, _held(selection.to(self._buffers[key].device)))
        return self._buffers[key]

    def _settle_all(self) -> None:
        if not _placeholders_visible[0]:
            for key in list(self._deferred):
                self.settled(key)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._deferred and not _placeholders_visible[0]:
            return self.settled(key)
        return self._buffers[key]

    def __setitem__(self, key: str, buffer: torch.Tensor) -> None:
        self._deferred.pop(key, None)
        self.uncalibrated.discard(key)
        super().__setitem__(key, _held(buffer))

    def __delitem__(self, key: str) -> None:
        self._deferred.pop(key, None)
        self.uncalibrated.discard(key)
        super().__delitem__(key)

    def clear(self) -> None:
        self._deferred.clear()
        self.uncalibrated.clear()
        super().clear()

    def items(self):
        self._settle_all()
        return super().items()

    def values(self):
        self._settle_all()
        return super().values()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        self._settle_all()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key, buffer in self._buffers.items():  # a load with assign=True puts the file's tensors here
            if buffer is not None and buffer.dtype == torch.int16:
                self._buffers[key] = _held(buffer)
        if len(error_msgs) == errors:  # (otherwise load_state_dict raises)
            for key in [key for key in self._deferred if prefix + key in state_dict]:
                del self._deferred[key]  # the loaded indices are the selection
            self.uncalibrated.difference_update([key for key in self.uncalibrated if prefix + key in state_dict])


class NeuroAdaLayer(BaseTunerLayer):
    """Adapter state of one wrapped layer, per adapter name:

    - ``neuroada_delta[name]``: ``[out_features, k]`` float32 parameter whatever the base dtype (float64 on a float64
      base), so that small updates to large weights are not rounded away;
    - ``neuroada_indices[name]``: ``[out_features, k]`` buffer of selected input positions, rows sorted: uint8 up to
      256 inputs, else int32 (the collectives of data-parallel training have no int16; files store int16 up to
      32768, see ``index_dtype_for``).

    The base weight is addressed as ``[out_features, in_features]`` rows whatever its storage: ``nn.Linear`` stores
    that layout, transformers' ``Conv1D`` (GPT-2) stores the transpose.
    """

    adapter_layer_names = ("neuroada_delta",)
    other_param_names = ("neuroada_indices", "bypass_backend")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.neuroada_delta = nn.ParameterDict({})
        self.neuroada_indices = _Selections()
        self.bypass_backend: dict[str, str] = {}
        self._data_aware: dict[str, bool] = {}  # adapter -> selection chosen from data (the learning-rate check)
        self._task_types: dict[str, Optional[str]] = {}  # adapter -> its PEFT task type (the same check's advice)
        # Original weight entries at the selected positions, kept while an adapter is merged so that unmerge
        # restores the base weight bit for bit (subtracting delta again would not, in bf16). Buffers, so that
        # .to() / .half() move and cast them with the weight; not persistent, so never saved.
        self._merged_originals = BufferDict(persistent=False)
        # The int64 positions each merged adapter was written at: unmerge restores exactly those, also if the indices
        # were loaded anew meanwhile, without converting them again.
        self._merged_columns: dict[str, torch.Tensor] = {}
        # Rows whose selection a bf16/fp16 copy of the base could break differently (ties after rounding), with
        # their indices: what an adapter saved without indices stores so that it reloads in another precision.
        self.pinned_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # The base weight at each adapter's selected positions, taken where the selection was computed (see
        # selected_base_values), with the indices tensor and version they belong to.
        self._base_values: dict[str, tuple[torch.Tensor, Optional[int], torch.Tensor]] = {}
        # adapter -> (the op's index layouts, the indices tensor and version they were built from): see pattern()
        self._patterns: dict[str, tuple[SparsePattern, torch.Tensor, Optional[int]]] = {}
        self._selection_keys: dict[str, tuple[SparsePattern, str]] = {}  # see _selection_key (mixed batches)
        # Whether another adapted layer reads the same input tensor (q/k/v, gate/up): "learning" in the forwards
        # that train the deltas, until the first backward has accumulated this layer's delta gradient
        # (end_input_learning), then "shared" or "alone". Only a layer alone on its input keeps a gathered
        # x[:, kept] for its backward instead of x: a partial copy beside an x kept anyway adds memory. Decided after
        # the layer's backward, never between a forward and its backward, so that a checkpointed block recomputes
        # what its forward saved, however many other forwards (a DPO reference, an evaluation) run in between.
        self._input_sharing = "learning"
        self._inputs_recorded = False
        # Training forwards seen while learning, and backwards that reached the delta since: the decision waits
        # until every such forward has had its backward (two forwards, then their two backwards, as a checkpointed
        # model recomputes each forward in its backward and must keep what that forward kept).
        self._learning_forwards = 0
        self._learning_backwards = 0
        self._input_seen_shared = False
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

    def get_base_layer(self) -> nn.Module:
        """PEFT's (the innermost ``base_layer``), without the failed attribute lookup that PEFT's ``hasattr`` makes
        on the plain layer at the bottom (``Module.__getattr__`` raising AttributeError: several times a k=1 layer's
        gather and scatter when switching a merged adapter)."""
        base = self._modules["base_layer"]
        while ("base_layer" in base._modules or "base_layer" in base.__dict__
               or hasattr(type(base), "base_layer")):
            base = base.base_layer
        return base

    def weight_rows(self) -> torch.Tensor:
        """The base weight's data as ``[out_features, in_features]`` (a view: writes go to the weight)."""
        weight = self.get_base_layer().weight.data
        return weight.T if self.is_conv1d else weight

    def full_weight_rows(self) -> torch.Tensor:
        """The whole base weight as ``[out_features, in_features]``, gathered first when it is sharded (a DTensor,
        as under FSDP2 / tensor parallelism, or a DeepSpeed ZeRO-3 partition), so that selection sees every input of
        every neuron. Without the deltas of merged adapters: selection and its checks always see the base."""
        base = self.get_base_layer()
        if base.weight.is_meta:
            raise ValueError(
                "NeuroAda selects each neuron's connections from the base weights, but this layer's weight is on the "
                "meta device (a model built with init_empty_weights / device_map='meta' before its weights were "
                "loaded). Load the weights first (e.g. from_pretrained without init_empty_weights, or "
                "load_checkpoint_and_dispatch), then call get_peft_model or PeftModel.from_pretrained.")
        if self.quantization:
            if self.merged:
                raise ValueError("cannot select connections on a quantized layer with merged adapters: the merge "
                                 "rounded the base weight; call unmerge_adapter() first")
            return quantized.dequantized_weight(base)
        weight = sharding.full_copy(base.weight)
        rows = weight.T if self.is_conv1d else weight
        if self.merged_adapters:
            rows = rows.clone()
            for name in reversed(self.merged_adapters):
                rows.scatter_(1, self._merged_columns[name].to(rows.device), self._merged_originals[name].to(rows))
        return rows

    def update_layer(self, adapter_name: str, config: NeuroAdaConfig, module_name: str = "") -> None:
        k = min(config.k, self.in_features)
        # A data-aware selection is chosen later by calibrate_selection (or comes from the file on a load, which
        # always stores indices for it); until then the shapes need a placeholder, which nothing may train or save.
        # Whatever the config says it was calibrated on: a config is reused, copied, read back from a saved adapter.
        criterion = "magnitude" if config.selection in DATA_CRITERIA else config.selection
        select = functools.partial(self._select, k, criterion, layer_seed(config.seed, module_name))
        if self._loads_stored_indices(config):
            indices = None
            device = self.get_base_layer().weight.device
        else:
            rows = self.full_weight_rows()
            indices = _held(select(rows))  # the tensor the layer will hold, which _base_values is tied to
            device = rows.device
            if not config.save_indices:  # computed now, while every process holds the whole weight
                self.pinned_rows[adapter_name] = self._pinned(rows, indices, config.selection)
            else:  # likewise, for a save from one process of a sharded model
                self._base_values[adapter_name] = (indices, _version_of(indices),
                                                   self._gather_base_values(rows, indices))
        dtype = delta_dtype_for(self.get_base_layer().weight)
        if config.init_weights:
            delta = torch.zeros(self.out_features, k, dtype=dtype, device=device)
        else:
            delta = (torch.randn(self.out_features, k, dtype=torch.float32, device=device) * 0.02).to(dtype)
        self.neuroada_delta[adapter_name] = nn.Parameter(delta)
        self._data_aware[adapter_name] = config.selection in DATA_CRITERIA
        self._task_types[adapter_name] = None if config.task_type is None else str(
            getattr(config.task_type, "value", config.task_type))
        self._track_delta(adapter_name)
        sharding.register_with_zero3(self, self.neuroada_delta[adapter_name], self.get_base_layer().weight)
        if indices is None:
            placeholder = torch.zeros(self.out_features, k, dtype=index_dtype_for(self.in_features), device=device)
            self.neuroada_indices.defer(adapter_name, placeholder, select)
        else:
            self.neuroada_indices[adapter_name] = indices
        if config.selection in DATA_CRITERIA:
            self.neuroada_indices.uncalibrated.add(adapter_name)
        self._patterns.pop(adapter_name, None)
        self.bypass_backend[adapter_name] = config.bypass_backend
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def current_deltas(self):
        """(Parameter, k, data_aware, task_type) of each delta this layer holds now, for the learning-rate check
        (which finds deltas this way too when their Parameter was replaced without being marked: FSDP2 shards them)."""
        for name, delta in self.neuroada_delta.items():
            shape = getattr(delta, "ds_shape", delta.shape)  # (DeepSpeed ZeRO-3 leaves an empty partition)
            if len(shape) == 2:
                yield delta, shape[1], self._data_aware.get(name, False), self._task_types.get(name)

    def _track_delta(self, adapter_name: str) -> None:
        """Attach to the delta Parameter what finds it there: its k for the learning-rate check, and the hook that
        ends the input-sharing decision. Again whenever the Parameter object was replaced (a load with
        ``assign=True``, as ``low_cpu_mem_usage`` does, or ``copy.deepcopy``), which forward checks."""
        delta = self.neuroada_delta[adapter_name]
        learning_rate.track_delta(delta, delta.shape[1], self._data_aware.get(adapter_name, False),
                                  self._task_types.get(adapter_name))
        learning_rate.watch_holder(self)
        if delta.requires_grad:  # (a frozen delta, loaded for inference, gets no gradient to hook)
            layer = weakref.ref(self)
            delta.register_post_accumulate_grad_hook(lambda _: layer() is not None and layer().end_input_learning())

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """PEFT's (called after a ``low_cpu_mem_usage`` load) casts every adapter tensor to the base layer's dtype
        and wraps it in a new, trainable Parameter. Deltas stay float32 (float64 on a float64 base; see the class
        docstring) and keep their trainability, so they are moved in place; indices keep their integer dtype."""
        base_weight = self.get_base_layer().weight
        target = device if device is not None else base_weight.device
        if target.type == "meta":
            return
        delta = self.neuroada_delta[adapter_name] if adapter_name in self.neuroada_delta else None
        if delta is not None and not delta.is_meta:
            delta.data = delta.data.to(target, delta_dtype_for(base_weight))
        if adapter_name in self.neuroada_indices._buffers:
            indices = self.neuroada_indices._buffers[adapter_name]
            if not indices.is_meta:
                self.neuroada_indices._buffers[adapter_name] = indices.to(target)

    def set_selection(self, adapter_name: str, indices: torch.Tensor) -> None:
        """Replace ``adapter_name``'s selection by ``indices`` (``[out_features, k]``, rows sorted), e.g. one chosen
        from calibration data; the deltas keep their values, now on the new connections."""
        current = self.neuroada_indices[adapter_name]
        if tuple(indices.shape) != tuple(current.shape):
            raise ValueError(f"a new selection must have the shape of the current one, {tuple(current.shape)}; got "
                             f"{tuple(indices.shape)}")
        self.neuroada_indices[adapter_name] = indices.to(device=current.device, dtype=current.dtype)
        self._patterns.pop(adapter_name, None)
        self._selection_keys.pop(adapter_name, None)
        self.pinned_rows.pop(adapter_name, None)
        self._base_values.pop(adapter_name, None)

    @property
    def uncalibrated(self) -> set[str]:
        """Adapters with a data-aware selection not chosen yet (by calibrate_selection or a load): they hold a
        placeholder (magnitude) selection, and their forward refuses to run."""
        return self.neuroada_indices.uncalibrated

    def _select(self, k: int, criterion: str, seed: int, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        return select_per_neuron(self.full_weight_rows() if rows is None else rows, k, criterion, seed=seed)

    def _loads_stored_indices(self, config: NeuroAdaConfig) -> bool:
        """Whether ``config`` comes with a saved adapter that holds its indices (``selection_fingerprints`` are
        written at save time), so that selecting now can wait: the load writes the stored indices, and the selection
        is computed only if something reads the indices first (see :class:`_Selections`). Only for a plain weight
        here in memory and no DeepSpeed ZeRO-3: a sharded weight is gathered by collectives that every process must
        run at the same point, which a first read need not be."""
        return (bool(config.save_indices and config.selection_fingerprints) and not self.quantization
                and self.base_weight_readable() and not sharding._zero3_enabled())

    def selected_base_values(self, adapter_name: str) -> Optional[torch.Tensor]:
        """The base weight at ``adapter_name``'s selected positions, ``W[i, idx[i, j]]`` as ``[out_features, k]``
        float16 on the CPU (without merged deltas), which an adapter saved with indices stores so that a load can
        tell its base in O(out * k). Taken when the selection was computed, while the indices are still that tensor
        unchanged; else read now, except from a sharded or quantized weight (a gather is a collective that a save on
        one process must not run; a dequantisation costs O(weights)): None there, and loads of the file check the
        selection instead."""
        if self.quantization:  # rounded weights: the float original of the base would not match them
            return None
        indices = self.neuroada_indices[adapter_name]
        kept = self._base_values.get(adapter_name)
        if kept is not None and kept[0] is indices and kept[1] is not None and kept[1] == _version_of(indices):
            return kept[2]
        if not self.base_weight_readable():
            return None
        return self._gather_base_values(self.full_weight_rows(), indices)

    def base_weight_readable(self) -> bool:
        """Whether this process can read the whole base weight as it is: loaded (not on the meta device) and not
        sharded."""
        weight = self.get_base_layer().weight
        return not (weight.is_meta or sharding.is_sharded(weight))

    @staticmethod
    def _gather_base_values(rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return rows.gather(1, indices.to(device=rows.device, dtype=torch.long)).to("cpu", torch.float16)

    def pinned_rows_for(self, adapter_name: str, criterion: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of ``adapter_name``'s selection that a bf16/fp16 copy of the base could break differently, and
        their indices (on the CPU)."""
        if adapter_name not in self.pinned_rows:
            self.pinned_rows[adapter_name] = self._pinned(self.full_weight_rows(), self.neuroada_indices[adapter_name],
                                                          criterion)
        return self.pinned_rows[adapter_name]

    @staticmethod
    def _pinned(rows: torch.Tensor, indices: torch.Tensor, criterion: str) -> tuple[torch.Tensor, torch.Tensor]:
        fragile = precision_fragile_rows(rows, indices, criterion)
        return fragile, indices.cpu()[fragile]

    def pattern(self, adapter_name: str) -> SparsePattern:
        """The op's index layouts, built once per selection and built again whenever the indices may have changed:
        loaded (see :meth:`_forget_patterns`), assigned, written in place (the tensor's version counter), moved to
        another device; and when they were built under ``torch.inference_mode`` (inference tensors, which a
        training step cannot save for its backward) and are now needed outside it."""
        indices = self.neuroada_indices[adapter_name]
        cached = self._patterns.get(adapter_name)
        if cached is not None and cached[1] is indices and torch.compiler.is_compiling():
            return cached[0]  # (a compiled graph is traced once; the version counter is not traceable)
        if (cached is None or cached[1] is not indices or cached[2] != _version_of(indices)
                or cached[0].columns.device != indices.device
                or (cached[0].columns.is_inference() and not torch.is_inference_mode_enabled())):
            cached = self._patterns[adapter_name] = (build_pattern(indices, self.in_features), indices,
                                                     _version_of(indices))
        return cached[0]

    @staticmethod
    def _forget_patterns(module, incompatible_keys) -> None:
        module._patterns.clear()
        module._selection_keys.clear()
        if module.__dict__.pop("_weight_loaded", False) and module.merged_adapters:
            module._follow_loaded_merge()

    def _note_weight_in_load(self, state_dict, prefix, *args) -> None:
        """(load pre-hook) Whether this load writes the base weight: a merged layer's records must then follow it."""
        self._weight_loaded = prefix + "base_layer.weight" in state_dict

    def _follow_loaded_merge(self) -> None:
        """A state dict that wrote the base weight of a merged layer (a merged model's full state dict, say): the
        weight holds the loaded merge, and unmerge must restore the loaded base, not the originals recorded by the
        merge before the load, at columns the loaded indices may no longer select. Kept if the load changed nothing
        (bit-exact unmerge, as before); else each merged adapter's original becomes the weight minus its delta,
        last merged first, as LoRA's unmerge subtracts. A load of the adapter only (PEFT's load_adapter) leaves the
        weight and so the records alone: unmerge then restores the old merge's base exactly."""
        weight = self.get_base_layer().weight
        if self.quantization or sharding.is_sharded(weight):
            return  # (sharded: only a gather, a collective, would show the whole weight)
        rows = weight.data.T if self.is_conv1d else weight.data
        names = list(self.merged_adapters)
        remerged = self.full_weight_rows()  # a copy with the recorded originals restored
        unchanged = True
        for name in names:
            indices = self.neuroada_indices[name].long().to(rows.device)
            if not torch.equal(indices, self._merged_columns[name].to(rows.device)):
                unchanged = False
                break
            remerged.scatter_(1, indices, _merged_value(remerged.gather(1, indices), self.neuroada_delta[name]))
        if unchanged and torch.equal(remerged, rows):
            return
        current = rows.clone()
        for name in reversed(names):
            indices = self.neuroada_indices[name].long().to(rows.device)
            delta = self.neuroada_delta[name].detach().to(rows.device)
            original = _merged_value(current.gather(1, indices), delta, sign=-1)
            current.scatter_(1, indices, original)
            self._merged_originals._buffers[name] = original
            self._merged_columns[name] = indices

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter as a dense matrix shaped like the base weight (in the deltas' dtype)."""
        dense = dense_matrix(self.neuroada_delta[adapter_name].detach(), self.pattern(adapter_name).columns,
                             self.in_features)
        return dense.T if self.is_conv1d else dense

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """W[i, idx[i, j]] += delta[i, j] in one scatter per adapter, summed in float32 (float64 for a float64 W)
        and cast to W's dtype (once
        per adapter: an entry that two merged adapters select is rounded after each)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        twice = sorted({name for name in adapter_names if adapter_names.count(name) > 1})
        if twice:  # the second merge would save the first one's merged value as the original: unmerge couldn't undo it
            raise ValueError(f"merge names adapter {twice[0]!r} more than once ({adapter_names}); nothing was merged. "
                             "Merge each adapter once.")
        if self.quantization:
            self._merge_quantized(adapter_names, safe_merge)
            return
        base_weight = self.get_base_layer().weight
        if base_weight.is_meta:
            raise ValueError("cannot merge into a weight on the meta device; load the base weights first")
        adapter_names = [name for name in adapter_names if name in self.neuroada_delta]
        deltas = [self.neuroada_delta[name] for name in adapter_names]
        with sharding.writable_whole([base_weight, *deltas]):
            rows = base_weight.data.T if self.is_conv1d else base_weight.data  # weight_rows(), inside the gather
            for name, delta in zip(adapter_names, deltas):
                indices = self.neuroada_indices[name].long()
                original = rows.gather(1, indices)
                merged = _merged_value(original, delta)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter {name!r} would put NaN/inf into the weight; the adapter is "
                                     "broken")
                rows.scatter_(1, indices, merged)
                # = self._merged_originals[name] = original (register_buffer's checks cost more than the scatter)
                self._merged_originals._buffers[name] = original
                self._merged_originals._non_persistent_buffers_set.add(name)
                self._merged_columns[name] = indices
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
        base_weight = self.get_base_layer().weight
        with sharding.writable_whole([base_weight]):
            rows = base_weight.data.T if self.is_conv1d else base_weight.data  # weight_rows(), inside the gather
            while self.merged_adapters:
                name = self.merged_adapters[-1]
                # the columns are a plain tensor: they stay where they were if the model moved while merged
                original = self._merged_originals[name].to(device=rows.device, dtype=rows.dtype)
                rows.scatter_(1, self._merged_columns[name].to(rows.device), original)
                # forgotten only once written back, so that a failure leaves the merge undoable
                self.merged_adapters.pop()
                del self._merged_originals[name], self._merged_columns[name]

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.neuroada_delta:
            sharding.unregister_from_zero3(self, self.neuroada_delta[adapter_name])
        super().delete_adapter(adapter_name)
        self._patterns.pop(adapter_name, None)
        self._selection_keys.pop(adapter_name, None)
        self.pinned_rows.pop(adapter_name, None)
        self._base_values.pop(adapter_name, None)
        self._data_aware.pop(adapter_name, None)
        self._task_types.pop(adapter_name, None)


@functools.lru_cache(maxsize=16)
def _sample_groups(adapter_names: tuple[str, ...], device: torch.device) -> tuple[tuple[str, Any], ...]:
    """``(name, rows)`` per distinct name, in order of first appearance; ``rows`` is a slice where the name's samples
    are consecutive (a view of the batch, no copy), else an index tensor on ``device``. Cached, since every adapted
    layer of a forward (and every decoding step of a generate call) asks for the same names."""
    positions: dict[str, list[int]] = {}
    for index, name in enumerate(adapter_names):
        positions.setdefault(name, []).append(index)
    groups = []
    for name, indices in positions.items():
        if indices[-1] - indices[0] + 1 == len(indices):
            groups.append((name, slice(indices[0], indices[-1] + 1)))
        else:
            with torch.inference_mode(False):  # cached: a later forward may need it for its backward
                groups.append((name, torch.tensor(indices, dtype=torch.long, device=device)))
    return tuple(groups)


def _count(rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


@functools.lru_cache(maxsize=64)
def _shared_rows(adapter_names: tuple[str, ...], names: tuple[str, ...], device: torch.device):
    """For the samples of a batch whose adapter is one of ``names``: their positions in the batch (None when that is
    the whole batch, in order) and the position of each one's adapter in ``names``."""
    slot_of = {name: slot for slot, name in enumerate(names)}
    rows = [index for index, name in enumerate(adapter_names) if name in slot_of]
    whole = rows == list(range(len(adapter_names)))
    with torch.inference_mode(False):  # cached: a later forward may need them for its backward
        slots = torch.tensor([slot_of[adapter_names[index]] for index in rows], dtype=torch.long, device=device)
        return (None if whole else torch.tensor(rows, dtype=torch.long, device=device)), slots


def _merged_value(original: torch.Tensor, delta: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """W[i, idx] + delta (``sign=-1``: minus), summed in float32 (float64 if either is) and cast once to the weight's
    dtype."""
    delta = delta.detach()
    if original.dtype is delta.dtype and original.dtype in _EXACT_SUM_DTYPES:  # (casts would cost more than the add)
        return original + delta if sign > 0 else original - delta
    weight_dtype, dtype = original.dtype, accumulation_dtype(original, delta)
    delta, original = delta.to(original.device, dtype), original.to(dtype)
    summed = original + delta if sign > 0 else original - delta
    return summed.to(weight_dtype)


_EXACT_SUM_DTYPES = (torch.float32, torch.float64)  # summed as they are, no wider dtype to sum in


def _in_backward() -> bool:
    """Whether autograd is running a backward on this thread (where checkpointing recomputes forwards)."""
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is not None and graph_task_id() != -1


# id of an input tensor -> (a weak reference to it, the adapted layers that read it), while layers learn whether
# they share their input (see NeuroAdaLayer._keeps_columns); entries go when the tensor does.
_input_readers: dict[int, tuple[weakref.ref, list[weakref.ref]]] = {}


def _record_reader(x: torch.Tensor, layer: NeuroAdaLayer) -> None:
    key = id(x)
    entry = _input_readers.get(key)
    if entry is None or entry[0]() is not x:
        entry = (weakref.ref(x, lambda _, key=key: _input_readers.pop(key, None)), [])
        _input_readers[key] = entry
    readers = entry[1]
    readers.append(weakref.ref(layer))
    if len(readers) > 1:
        for reader in readers:
            if reader() is not None:
                reader()._input_seen_shared = True


class NeuroAdaLinear(nn.Module, NeuroAdaLayer):
    """NeuroAda around an ``nn.Linear`` or a transformers ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: NeuroAdaConfig, module_name: str = ""):
        super().__init__()
        NeuroAdaLayer.__init__(self, base_layer)
        self.register_load_state_dict_post_hook(NeuroAdaLayer._forget_patterns)
        self._register_load_state_dict_pre_hook(self._note_weight_in_load)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half(): the cached layouts are rebuilt on the new device at the next call, and the old
        # copies freed now rather than kept on the old device.
        self._patterns.clear()
        self._selection_keys.clear()
        kept = {name: (delta.data, delta.grad) for name, delta in self.neuroada_delta.items()}
        result = super()._apply(fn, *args, **kwargs)
        # .half() / .to(bf16) cast the deltas too, and training would round small updates away: they keep the
        # dtype they have on this base, with their values as they were (in place: an optimizer holds the Parameter)
        target = delta_dtype_for(self.get_base_layer().weight)
        for name, delta in self.neuroada_delta.items():
            data, grad = kept.get(name, (None, None))
            if delta.dtype == target or data is None or delta.is_meta or not delta.dtype.is_floating_point:
                continue
            delta.data = data.to(device=delta.device, dtype=target)
            if grad is not None:
                delta.grad = grad.to(device=delta.device, dtype=target)
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if "_hf_hook" in vars(self.neuroada_delta) or "_hf_hook" in vars(self.neuroada_indices):
            with self._onloaded():  # accelerate offloading: the deltas and indices wait on the meta device
                return self._forward(x, *args, **kwargs)
        return self._forward(x, *args, **kwargs)

    @contextlib.contextmanager
    def _onloaded(self):
        """Run accelerate's offload hooks of the delta and index dicts around a forward, as calling those modules
        would: the forward reads their tensors directly, so the hooks would otherwise never put them in place."""
        hooked = [module for module in (self.neuroada_delta, self.neuroada_indices) if "_hf_hook" in vars(module)]
        for module in hooked:
            module._hf_hook.pre_forward(module)
        try:
            yield
        finally:
            for module in hooked:
                module._hf_hook.post_forward(module, None)

    def _forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.uncalibrated:
            self._refuse_uncalibrated(adapter_names if adapter_names is not None else self.active_adapters)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            # merged adapters are in the weight; an active adapter that is not (a merge of some of the active
            # ones) still adds its bypass, so that a merge never changes the output (LoRA's layers drop it)
            pending = [name for name in self.active_adapters
                       if name not in self.merged_adapters and name in self.neuroada_delta]
            if not pending:
                return self.base_layer(x, *args, **kwargs)
            return self._forward_with(x, pending, *args, **kwargs)
        return self._forward_with(x, self.active_adapters, *args, **kwargs)

    def _refuse_uncalibrated(self, adapter_names) -> None:
        waiting = sorted(self.uncalibrated.intersection(adapter_names))
        if waiting:
            raise RuntimeError(
                f"NeuroAda adapter {waiting[0]!r} selects its connections from data (a data-aware selection) and has "
                "not been calibrated yet: call neuroada.calibrate_selection(peft_model, batches, num_batches=...) "
                "after get_peft_model and before training or using the model.")

    def _forward_with(self, x: torch.Tensor, adapter_names, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer plus the bypasses of ``adapter_names`` (those this layer holds) on the whole batch."""
        active = [name for name in adapter_names if name in self.neuroada_delta]
        for name in active:
            if not learning_rate.is_tracked(self.neuroada_delta[name]):
                self._track_delta(name)
            if self.neuroada_delta[name].is_meta:
                raise RuntimeError(
                    f"NeuroAda adapter {name!r}: the deltas are on the meta device (offloaded by hooks that did not "
                    "bring them back), so the layer cannot compute its output. Offload with accelerate's cpu_offload "
                    "/ dispatch_model on the PeftModel's base model, or keep the adapter on a real device.")
        fusable = len(active) == 1 and not args and not kwargs and self._fusable(x)
        backends = {name: choose_backend(self.bypass_backend[name], x, self.neuroada_delta[name].shape[1], fusable)
                    for name in active}
        keep_columns = len(active) == 1 and self._keeps_columns(x, active[0])
        if len(active) == 1 and backends[active[0]] == "fused":
            base = self.get_base_layer()
            weight_rows = base.weight.T if self.is_conv1d else base.weight
            return linear_with_bypass(x, weight_rows, base.bias, self.neuroada_delta[active[0]], self.pattern(active[0]),
                                      keep_columns)
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            bypass = sparse_bypass(x, self.neuroada_delta[name], self.pattern(name), backends[name], keep_columns,
                                   out_dtype=result.dtype)
            result = result + bypass
        return result

    # ------------------------------------------------------------------ mixed-adapter batches (PEFT's adapter_names)

    def _check_forward_args(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Refuse ``adapter_names`` that cannot be honoured, with the messages of PEFT's LoRA layers."""
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            # a merged adapter is in W for every sample; the per-sample choice could not take it out
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
        """Sample ``n`` of the batch gets the bypass of ``adapter_names[n]`` ("__base__", or an adapter this layer
        does not hold: none). The base layer runs once on the whole batch; each adapter's bypass runs on its own
        samples only and is added into theirs, so the cost is the base plus O(tokens * out * k) per adapter."""
        groups = _sample_groups(tuple(adapter_names), x.device)
        if len(groups) == 1:  # one name for the whole batch: the ordinary path (the fused layer where it applies)
            return self._forward_with(x, [groups[0][0]], *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        tokens_per_sample = x.numel() // max(x.shape[-1], 1) // max(len(x), 1)
        by_selection: dict[str, list[tuple[str, Any]]] = {}
        for name, rows in groups:
            if name in self.neuroada_delta:
                by_selection.setdefault(self._selection_key(name), []).append((name, rows))
        for members in by_selection.values():
            samples = sum(_count(rows) for _, rows in members)
            entries = samples * tokens_per_sample * self.neuroada_delta[members[0][0]].numel()
            if len(members) > 1 and entries <= _SHARED_GATHER_MAX_ENTRIES:
                self._add_shared_selection(result, x, adapter_names, [name for name, _ in members])
                continue
            for name, rows in members:
                delta = self.neuroada_delta[name]
                part = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
                # the fused backend replaces the whole layer, which the batch shares here: the rule picks another
                backend = choose_backend(self.bypass_backend[name], part, delta.shape[1], fusable=False)
                bypass = sparse_bypass(part, delta, self.pattern(name), backend, out_dtype=result.dtype)
                if isinstance(rows, slice):
                    result[rows] += bypass
                else:
                    result.index_add_(0, rows, bypass)
        return result

    def _add_shared_selection(self, result: torch.Tensor, x: torch.Tensor, adapter_names, names: list[str]) -> None:
        """The bypasses of adapters that select the same connections in this layer (same k and criterion on the same
        base: the usual case), for all their samples at once: one gather of the selected inputs, times each sample's
        own deltas. A handful of ops whatever the number of adapters, where one op call per adapter costs a fixed
        overhead each (most of the time of a decoding step over many adapters)."""
        rows, slots = _shared_rows(tuple(adapter_names), tuple(names), x.device)
        part = x if rows is None else x.index_select(0, rows)
        columns = self.pattern(names[0]).columns
        out_features, k = columns.shape
        deltas = torch.stack([self.neuroada_delta[name] for name in names])
        dtype = accumulation_dtype(x, deltas)
        deltas = deltas.to(dtype).index_select(0, slots)
        gathered = part.index_select(-1, columns.reshape(-1)).reshape(*part.shape[:-1], out_features, k)
        deltas = deltas.reshape(len(slots), *[1] * (part.dim() - 2), out_features, k)
        bypass = (gathered.to(dtype) * deltas).sum(-1).to(result.dtype)
        if rows is None:
            result += bypass
        else:
            result.index_add_(0, rows, bypass)

    def _selection_key(self, name: str) -> str:
        """Equal for the adapters of this layer whose selections are equal. Kept with the index layouts it was
        computed from, so that it is computed again whenever they are (new indices, another device)."""
        pattern = self.pattern(name)
        cached = self._selection_keys.get(name)
        if cached is not None and cached[0] is pattern:
            return cached[1]
        key = selection_fingerprint(pattern.columns)
        for other, (other_pattern, other_key) in self._selection_keys.items():
            if other != name and other_key == key and not torch.equal(other_pattern.columns, pattern.columns):
                key = f"{key}:{name}"  # a hash collision: keep this selection apart
                break
        self._selection_keys[name] = (pattern, key)
        return key

    def _keeps_columns(self, x: torch.Tensor, adapter_name: str) -> bool:
        """Whether the op keeps only ``x[:, kept]`` for the backward instead of x: when the deltas train, nothing
        else keeps x (the base is a plain frozen layer, which saves no input, and no other adapted layer reads the
        same tensor), and the selection reads few enough input positions."""
        if not (torch.is_grad_enabled() and self.neuroada_delta[adapter_name].requires_grad):
            return False
        if torch.compiler.is_compiling():
            return False  # the sharing bookkeeping below is Python state a compiled graph must not depend on
        if self._input_sharing == "learning":
            _record_reader(x, self)
            self._inputs_recorded = True
            if not _in_backward():  # a recomputation inside a backward (checkpointing) is not a forward of its own
                self._learning_forwards += 1
            return False
        return (self._input_sharing == "alone" and self._base_is_plain_frozen_linear()
                and keeps_columns(self.pattern(adapter_name)))

    def end_input_learning(self) -> None:
        """Decide whether this layer shares its input with another adapted layer, from the training forwards seen
        so far (every reader of their inputs has run by now). Called when a backward has accumulated the delta's
        gradient: after every recomputation of this layer in that backward. Decided only once every training forward
        seen so far has had its backward, so that no forward waits for a backward whose recomputation would keep
        other tensors than it did (a forward that is never backpropagated keeps the layer learning: it then keeps x,
        which is exact, only not smaller)."""
        if self._input_sharing != "learning":
            return
        self._learning_backwards += 1
        if self._inputs_recorded and self._learning_backwards >= self._learning_forwards:
            self._input_sharing = "shared" if self._input_seen_shared else "alone"

    def _fusable(self, x: torch.Tensor) -> bool:
        """Whether the fused path computes exactly what calling the base layer would: its forward is nn.Linear's
        or Conv1D's own (not a subclass's), nothing hooks it (its own or global forward and backward hooks), and its
        weight and input are plain float32 tensors (the weight frozen) outside autocast (which would run the base matmul in low precision)."""
        base = self.get_base_layer()
        hooks = nn.modules.module
        return (
            self._base_is_plain_frozen_linear()
            and type(base).__call__ is nn.Module.__call__
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not (base._backward_hooks or base._backward_pre_hooks)
            and not (hooks._global_forward_hooks or hooks._global_forward_pre_hooks)
            and not (hooks._global_backward_hooks or hooks._global_backward_pre_hooks)
            and base.weight.dtype == torch.float32
            and x.dtype == torch.float32  # (the base layer refuses other input dtypes; so must this path)
            and not sharding.is_zero3_partitioned(base.weight)
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _base_is_plain_frozen_linear(self) -> bool:
        """The base computes exactly ``x W^T + b`` (nn.Linear's or Conv1D's own forward, not a subclass's, not a
        quantized layer) with a frozen weight, so it saves no input for a backward."""
        base = self.get_base_layer()
        return (type(base).forward is (Conv1D.forward if self.is_conv1d else nn.Linear.forward)
                and "forward" not in vars(base)  # (replaced on the instance: accelerate's hooks, a wrapper)
                and not base.weight.requires_grad and not self.quantization)

    def __repr__(self) -> str:
        return "neuroada." + super().__repr__()
