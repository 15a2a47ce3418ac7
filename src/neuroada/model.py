"""NeuroAdaModel: the PEFT tuner that puts NeuroAda layers into a model, saves, loads and merges them."""

from __future__ import annotations

import itertools
import sys
import warnings
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, onload_layer
from peft.utils import _get_submodules
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from torch.distributed.tensor import DTensor

from . import sharding
from .bypass import check_indices
from .layer import NeuroAdaLayer, NeuroAdaLinear, deferred_selections_kept, supports
from .selection import DATA_CRITERIA, index_dtype_for, is_top_k_selection, selection_fingerprint

_PEFT_MODEL_PREFIX = "base_model.model."
# Keys of an adapter saved without indices: the rows whose indices are stored anyway (see precision_fragile_rows).
_PINNED_ROWS = "neuroada_pinned_rows"
_PINNED_INDICES = "neuroada_pinned_indices"
# Key of an adapter saved with indices: the base weight at each selected position, W[i, idx[i, j]], in float16
# (2 bytes, and readable by numpy, unlike bfloat16).
_BASE_VALUES = "neuroada_base_values"
# Key of an adapter saved without indices: the fingerprint of the selection it was trained with (8 bytes), so that a
# load into an adapter that exists already (whose config PEFT uses instead of the file's) is checked too.
_SELECTION_FINGERPRINT = "neuroada_selection_fingerprint"
# Key of an adapter saved without indices: the base weight at the selected positions of a few evenly spaced rows
# (``_sample_rows``), in float16, so that a load can tell a base whose selection is the same but whose weights are not
# (a random selection; a fine-tuned copy that keeps every neuron's largest weights where they were).
_BASE_SAMPLE = "neuroada_base_sample"
_BASE_SAMPLE_ROWS = 64


class AdapterLoadError(ValueError):
    """An adapter does not fit the model it is being loaded on; the model was left as it was."""


# torch modules that use their Linear children's weights without calling them (see _create_and_replace)
_READ_WEIGHTS_DIRECTLY = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


class NeuroAdaModel(BaseTuner):
    """Injects :class:`NeuroAdaLinear` layers into a model. Normally created through ``peft.get_peft_model``.

    Example::

        from peft import get_peft_model
        from neuroada import NeuroAdaConfig

        model = get_peft_model(base_model, NeuroAdaConfig(k=1, target_modules="all-linear"))
    """

    prefix: str = "neuroada_"
    tuner_layer_cls = NeuroAdaLayer
    target_module_mapping: dict = {}  # no per-architecture defaults: target_modules=None means "all-linear"

    # ------------------------------------------------------------------ injection

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """PEFT's injection, made all-or-nothing: on any error the model gets back its modules and trainability."""
        # Kept until the adapter's weights are loaded, so that a failed load can restore trainability too.
        self._requires_grad_before_injection = {param: param.requires_grad for param in model.parameters()}
        self._capped_layers: list[str] = []
        self._injection = (adapter_name, *_outermost_library_call())
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        except BaseException:
            self._undo_adapter(adapter_name)
            raise

        if self._capped_layers:
            warnings.warn(
                f"NeuroAda k={self.peft_config[adapter_name].k} is larger than the input size of "
                f"{len(self._capped_layers)} layer(s) ({', '.join(self._capped_layers[:5])}"
                f"{', ...' if len(self._capped_layers) > 5 else ''}); these layers train all their inputs. "
                "Lower k or exclude them with exclude_modules to silence this."
            )

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        if isinstance(target, NeuroAdaLayer):
            target.update_layer(adapter_name, config, current_key)
            layer = target
        else:
            if not supports(target):
                raise TypeError(
                    f"module {current_key!r} is a {type(target).__name__}; NeuroAda adapts nn.Linear and "
                    "transformers Conv1D layers only. Narrow target_modules or add it to exclude_modules."
                )
            if isinstance(parent, _READ_WEIGHTS_DIRECTLY):
                # nn.MultiheadAttention reads out_proj.weight without calling it, and torch's Transformer layers in
                # eval mode take a native fast path that reads every weight: the adapter would silently do nothing
                raise TypeError(
                    f"module {current_key!r} belongs to a torch {type(parent).__name__}, which reads its weights "
                    "directly instead of calling the layer, so a NeuroAda adapter there would never be applied. "
                    "Add it to exclude_modules (or narrow target_modules).")
            layer = NeuroAdaLinear(target, adapter_name, config, current_key)
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)  # an added adapter is not trainable until it is set active
            self._replace_module(parent, target_name, layer, target)
        if config.k > layer.in_features:
            self._capped_layers.append(current_key)

    def _injected_by_running_call(self, adapter_name: str) -> bool:
        """Whether ``adapter_name`` was injected by the PEFT call that is loading its weights now
        (``PeftModel.from_pretrained``, ``load_adapter`` of a new name), so that a refused load takes it back; a load
        into an adapter that existed before (``load_adapter`` of its name, the Trainer resuming a checkpoint) must
        leave it in place. The outermost PEFT/neuroada frame of the injection is still running in the first case."""
        injection = self.__dict__.get("_injection")  # (cleared by the load, whatever the outcome)
        if injection is None or injection[0] != adapter_name or injection[1] is None:
            return False
        frame = sys._getframe(1)
        while frame is not None:
            if id(frame) == injection[1] and id(frame.f_code) == injection[2]:
                return True
            frame = frame.f_back
        return False

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if hasattr(new_module, "base_layer"):  # a NeuroAda layer going in: PEFT places its adapter weights
            super()._replace_module(parent, child_name, new_module, child)
        else:  # a module coming back on unload keeps its own weights (PEFT's generic version would assign the
            # wrapper's, which for trainable tokens is a plain tensor, not a Parameter); as LoraModel does
            setattr(parent, child_name, new_module)

    def _cast_adapter_dtype(self, *args, **kwargs) -> None:
        # PEFT reads every adapter buffer's dtype right after injection, before a load writes deferred selections
        with deferred_selections_kept():
            super()._cast_adapter_dtype(*args, **kwargs)

    def _undo_adapter(self, adapter_name: str) -> None:
        """Take back everything that injecting ``adapter_name`` did, so that a failed injection or load leaves the
        model as it was: its NeuroAda layers (the base layer back where it was the only adapter), its
        modules_to_save copies (the original module back where it was the only one), its config entry and the
        trainability of every parameter."""
        for key, module in list(self.model.named_modules()):
            if isinstance(module, NeuroAdaLayer) and adapter_name in module.neuroada_delta:
                only = set(module.neuroada_delta.keys()) == {adapter_name}
                original = module.get_base_layer() if only else None
            elif isinstance(module, AuxiliaryTrainingWrapper) and adapter_name in module._adapters:
                only = module._adapters == {adapter_name}
                original = module.original_module if only else None
            else:
                continue
            if only:
                parent, _, child_name = _get_submodules(self.model, key)
                setattr(parent, child_name, original)
            elif isinstance(module, NeuroAdaLayer):
                module.delete_adapter(adapter_name)
            else:
                module.delete_adapter(adapter_name, [a for a in module.active_adapters if a != adapter_name])
        self.peft_config.pop(adapter_name, None)
        if not self.peft_config and hasattr(self.model, "peft_config"):
            del self.model.peft_config
        self._restore_requires_grad()

    def _restore_requires_grad(self) -> None:
        for param, flag in getattr(self, "_requires_grad_before_injection", {}).items():
            param.requires_grad_(flag)

    # ------------------------------------------------------------------ mixed-adapter batches

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """``model(..., adapter_names=[...])`` / ``generate(..., adapter_names=[...])``: one adapter name per sample
        ("__base__" for the base model), handed to every NeuroAda layer (and modules_to_save copy) by a forward
        pre-hook, as PEFT does for LoRA, with LoRA's checks and messages. PeftModel calls this around its forward
        and generate."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        # Checked here, not per layer: a layer need not hold every adapter, but a typo must not pass silently.
        known = set().union(*(layer.neuroada_delta.keys() for layer in self._layers()))
        unknown = {name for name in adapter_names if name != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        num_beams = kwargs.get("num_beams")
        per_input = list(adapter_names)
        if isinstance(num_beams, int) and num_beams > 1:
            if not isinstance(adapter_names, (list, tuple)):
                raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
            # beam search repeats each input num_beams times (the encoder of an encoder-decoder model excepted)
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        handles = []
        try:
            for module in self.modules():
                if isinstance(module, (NeuroAdaLayer, AuxiliaryTrainingWrapper)):
                    hook = partial(_inject_adapter_names, adapter_names=adapter_names)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            encoder = _encoder_of(self.model)
            if encoder is not None and len(adapter_names) != len(per_input):
                for module in encoder.modules():  # registered last, so it overrides the repeated names
                    if isinstance(module, (NeuroAdaLayer, AuxiliaryTrainingWrapper)):
                        hook = partial(_inject_adapter_names, adapter_names=per_input)
                        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------ merge

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        names = adapter_names if adapter_names is not None else self.active_adapters
        layers, offloaded = self._layers_and_offload()
        if layers and all(set(names) <= set(layer.merged_adapters) for layer in layers):
            warnings.warn(
                f"NeuroAda adapter(s) {names} are already merged into every adapted layer; merging again would add "
                "the deltas twice, so nothing was done. Call unmerge_adapter() first to merge again."
            )
            return
        self._check_merge_allowed()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already following adapters were merged")
            for layer in layers:
                with onload_layer(layer) if offloaded else nullcontext():
                    layer.merge(adapter_names=adapter_names, safe_merge=safe_merge)

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        # An output layer tied to the input embeddings (SmolLM2, GPT-2, ...) shares its weight with them: writing
        # the deltas into it would change the embeddings too, which the unmerged adapter never does.
        get_input, get_output = (getattr(self.model, name, None)
                                 for name in ("get_input_embeddings", "get_output_embeddings"))
        output = get_output() if get_output is not None else None
        embeddings = get_input() if get_input is not None else None
        if isinstance(output, NeuroAdaLayer) and embeddings is not None and \
                output.get_base_layer().weight is getattr(embeddings, "weight", None):
            raise ValueError(
                "the adapter adapts the output layer, whose weight is tied to the input embeddings; merging would "
                "write its deltas into the embeddings too and change the model. Keep the adapter unmerged, or untie "
                "the weights first (model.config.tie_word_embeddings = False and give the output layer its own copy "
                "of the weight) before get_peft_model, or leave the output layer out of target_modules.")

    def add_weighted_adapter(self, *args, **kwargs):
        raise NotImplementedError(
            "add_weighted_adapter is not supported for NeuroAda: adapters with different selections hold their deltas "
            "on different connections, so no one adapter of the same k holds their weighted sum. To serve a "
            "combination, merge it into the weights: merge_and_unload(adapter_names=[...]) (or merge_adapter for an "
            "undoable merge); adapters with the same k and selection can be combined by hand as a weighted sum of "
            "their neuroada_delta tensors.")

    def unmerge_adapter(self) -> None:
        layers, offloaded = self._layers_and_offload()
        if not any(layer.merged for layer in layers):
            warnings.warn("No NeuroAda adapter is merged, so there is nothing to unmerge; the model is unchanged.")
            return
        for layer in layers:
            if layer.merged:
                with onload_layer(layer) if offloaded else nullcontext():
                    layer.unmerge()

    def _layers(self) -> list[NeuroAdaLayer]:
        return self._layers_and_offload()[0]

    def _layers_and_offload(self) -> tuple[list[NeuroAdaLayer], bool]:
        """The NeuroAda layers, and whether any of them has offloaded parts (accelerate hooks). The layers come from
        a walk of the whole model (about 1000 modules on a 30-block model: as much time as switching a k=1 adapter
        took), kept while it is provably still the model's tree; see :class:`_LayerWalk`."""
        walk = self.__dict__.get("_layer_walk")
        if walk is None or not walk.still_current(self.model):
            walk = self.__dict__["_layer_walk"] = _LayerWalk(self.model)
        return walk.layers, walk.offloaded()

    # ------------------------------------------------------------------ save / load

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        layers = _named_layers(model, adapter_name)
        if config.selection in DATA_CRITERIA:
            if any(adapter_name in layer.uncalibrated for layer in layers.values()):
                raise ValueError(
                    f"adapter {adapter_name!r} uses selection={config.selection!r}, chosen from data, and has not been "
                    "calibrated, so its connections are placeholders; nothing was saved. Call "
                    "neuroada.calibrate_selection(peft_model, batches) after get_peft_model, then train and save.")
            if not config.save_indices:
                raise ValueError(
                    f"adapter {adapter_name!r}: its selection ({config.selection!r}) was chosen from calibration data, "
                    "which a load cannot recompute, but its config says save_indices=False; nothing was saved. Set "
                    "save_indices=True.")
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # Written into the config that save_pretrained writes next, so a later load can check its base.
        config.selection_fingerprints = {
            name: selection_fingerprint(layer.neuroada_indices[adapter_name]) for name, layer in layers.items()
        }
        config.quantized_base = next((layer.quantization for layer in layers.values() if layer.quantization), None)
        # Checked on the tensors being saved (full ones, also when the live parameters are sharded by FSDP).
        for key, value in selected.items():
            if isinstance(value, DTensor):
                raise ValueError(
                    f"adapter {adapter_name!r}: {key!r} is sharded (an FSDP2 / tensor-parallel DTensor); nothing was "
                    "saved. Save from the full state dict, gathered on every rank: full = get_model_state_dict(model, "
                    "options=StateDictOptions(full_state_dict=True, cpu_offload=True)) (torch.distributed.checkpoint."
                    "state_dict), then on rank 0 model.save_pretrained(path, state_dict=full).")
            if ".neuroada_delta." not in key:
                continue
            layer_name = key.split(".neuroada_delta.")[0].removeprefix(_PEFT_MODEL_PREFIX)
            layer = layers.get(layer_name)
            if layer is not None and value.shape != (layer.out_features, layer.neuroada_indices[adapter_name].shape[1]):
                raise ValueError(
                    f"adapter {adapter_name!r}: layer {layer_name!r} would be saved with deltas of shape "
                    f"{tuple(value.shape)} (a DeepSpeed ZeRO-3 partition?); nothing was saved. Under ZeRO-3 save "
                    "through Trainer.save_model() with stage3_gather_16bit_weights_on_model_save, or pass "
                    "state_dict=engine._zero3_consolidated_16bit_state_dict() to save_pretrained.")
            if not torch.isfinite(value).all():
                raise ValueError(f"adapter {adapter_name!r}: layer {layer_name!r} holds NaN/inf deltas; nothing was saved")
        if config.save_indices:
            for key, value in selected.items():  # the smallest dtype on disk (layers hold int16 ones as int32)
                layer = layers.get(key.split(".neuroada_indices.")[0].removeprefix(_PEFT_MODEL_PREFIX))
                if ".neuroada_indices." in key and layer is not None:
                    selected[key] = value.to(index_dtype_for(layer.in_features))
            # what a load checks its base by in O(out * k): the base weights at the selected positions
            for name, layer in layers.items():
                values = layer.selected_base_values(adapter_name)
                if values is not None:
                    selected[f"{_PEFT_MODEL_PREFIX}{name}.{_BASE_VALUES}"] = values.contiguous()
        else:
            selected = {key: value for key, value in selected.items() if ".neuroada_indices" not in key}
            # The rows a bf16/fp16 copy of the base could select differently, with their indices, so that the
            # adapter reloads on the same weights in another precision (usually a small share of the rows).
            for name, layer in layers.items():
                rows, indices = layer.pinned_rows_for(adapter_name, config.selection)
                selected[f"{_PEFT_MODEL_PREFIX}{name}.{_PINNED_ROWS}"] = rows.to(torch.int32).contiguous()
                selected[f"{_PEFT_MODEL_PREFIX}{name}.{_PINNED_INDICES}"] = indices.contiguous()
                selected[f"{_PEFT_MODEL_PREFIX}{name}.{_SELECTION_FINGERPRINT}"] = torch.tensor(
                    list(bytes.fromhex(config.selection_fingerprints[name])), dtype=torch.uint8)
                values = layer.selected_base_values(adapter_name)
                if values is not None:
                    selected[f"{_PEFT_MODEL_PREFIX}{name}.{_BASE_SAMPLE}"] = values[
                        _sample_rows(layer.out_features)].contiguous()
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # (PEFT reads the model's state dict keys here, which must not compute the selections a load defers)
        with deferred_selections_kept():
            remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        tuner = getattr(model, "base_model", None)
        # Injected for this load, the adapter's config is the file's; a load into an adapter that existed before
        # gets the live adapter's config from PEFT, which says nothing about the file.
        injected_now = isinstance(tuner, NeuroAdaModel) and tuner._injected_by_running_call(adapter_name)
        # PEFT's set_peft_model_state_dict (the caller) leaves out other weights of mismatched sizes when asked to,
        # after this check; the flag reaches this hook only as that frame's argument
        ignore_mismatched_sizes = bool(sys._getframe(1).f_locals.get("ignore_mismatched_sizes", False))
        try:
            with deferred_selections_kept():
                return _validated_for_load(model, config, adapter_name, remapped, config_is_the_files=injected_now,
                                           ignore_mismatched_sizes=ignore_mismatched_sizes)
        except AdapterLoadError:
            if injected_now:
                tuner._undo_adapter(adapter_name)
            raise
        finally:
            tuner = getattr(model, "base_model", None)
            if isinstance(tuner, NeuroAdaModel):
                tuner.__dict__.pop("_injection", None)


# Bumped whenever any module anywhere is assigned a submodule (setattr, add_module, ModuleList.append, PEFT's
# _replace_module): a layer walk taken before the bump may be out of date.
_module_assignments = itertools.count()
_assignment_count = [next(_module_assignments)]


_counting_assignments = []  # the hook's handle, once registered


def _count_module_assignment(module, name, submodule):
    _assignment_count[0] = next(_module_assignments)


def _start_counting_assignments() -> None:
    """Registered by the first layer walk, not at import (no walk exists before it, so none can be stale)."""
    if not _counting_assignments:
        _counting_assignments.append(nn.modules.module.register_module_module_registration_hook(_count_module_assignment))


class _LayerWalk:
    """The NeuroAda layers of a model found by one walk, reused while nothing can have changed the module tree:

    - no module anywhere was assigned a submodule since (a process-wide count, see _count_module_assignment): covers
      injection, PEFT's merge_and_unload / unload / _undo_adapter and a user's ``setattr`` or ``add_module``;
    - every layer found is still its parent's child under its name: covers what bypasses assignment (``del``,
      ``ModuleList.insert``/``pop``, writes into ``_modules``);
    - it is the same model object (a deep copy gets its own walk).

    Accelerate hooks are plain attributes that no assignment reports, so whether a layer is offloaded is looked up
    at every call, in the attributes of each layer and of its direct children (where PEFT's onload_layer looks)."""

    def __init__(self, model: nn.Module) -> None:
        _start_counting_assignments()
        self.model = model
        self.assignments = _assignment_count[0]
        self.layers: list[NeuroAdaLayer] = []
        self.places: list[tuple[dict, str]] = []  # (parent._modules, name) of each layer
        found = set()
        for parent in model.modules():
            for name, child in parent._modules.items():
                if isinstance(child, NeuroAdaLayer) and id(child) not in found:
                    found.add(id(child))
                    self.layers.append(child)
                    self.places.append((parent._modules, name))
        # the attribute dicts of each layer and its direct children (base layer, delta and index dicts)
        self.attributes = [vars(module) for layer in self.layers for module in (layer, *layer._modules.values())]

    def still_current(self, model: nn.Module) -> bool:
        return (model is self.model and self.assignments == _assignment_count[0]
                and all(children.get(name) is layer for (children, name), layer in zip(self.places, self.layers)))

    def offloaded(self) -> bool:
        return any("_hf_hook" in attributes for attributes in self.attributes)


def _outermost_library_call() -> tuple:
    """``(id of the frame, id of its code)`` of the outermost frame on the stack that runs PEFT or neuroada code (the
    user's call into them: get_peft_model, PeftModel.from_pretrained, load_adapter), or ``(None, None)``. Ids, not
    the objects: the tuner keeps them, and a model must stay picklable (``torch.save(model)``)."""
    frame, outermost = sys._getframe(1), None
    while frame is not None:
        if frame.f_globals.get("__name__", "").partition(".")[0] in ("peft", "neuroada"):
            outermost = frame
        frame = frame.f_back
    return (None, None) if outermost is None else (id(outermost), id(outermost.f_code))


def _inject_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _encoder_of(model: nn.Module) -> Optional[nn.Module]:
    """The encoder of an encoder-decoder model, else None (transformers v5 returns the model itself)."""
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    return None if encoder is model else encoder


def _named_layers(model: nn.Module, adapter_name: str) -> dict[str, NeuroAdaLayer]:
    """NeuroAda layers holding ``adapter_name``, by module name relative to the base model."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, NeuroAdaLayer) and adapter_name in module.neuroada_delta:
            layers[name.removeprefix("_fsdp_wrapped_module.").removeprefix(_PEFT_MODEL_PREFIX)] = module
    return layers


def _validated_for_load(model, config, adapter_name, state_dict, config_is_the_files=True,
                        ignore_mismatched_sizes=False):
    """Check a checkpoint against the model it is about to be loaded into, before anything is copied.
    ``config_is_the_files``: ``config`` was read with the file (else its recorded fingerprints are not checked);
    ``ignore_mismatched_sizes``: other weights (not NeuroAda's) of other shapes are left to PEFT, which skips them."""
    model_state = model.state_dict(keep_vars=True)  # (the Parameters: a ZeRO-3 partition keeps its ds_shape)
    prefix = _PEFT_MODEL_PREFIX if any(k.startswith(_PEFT_MODEL_PREFIX) for k in model_state) else ""
    state_dict = dict(state_dict)
    layers = _named_layers(model, adapter_name)
    other_base = {}  # layer name -> why it is not the adapter's base
    fingerprint_mismatches = []
    pinned_after_load = {}
    for name, layer in layers.items():
        delta_key = f"{prefix}{name}.neuroada_delta.{adapter_name}"
        indices_key = f"{prefix}{name}.neuroada_indices.{adapter_name}"
        pinned = (state_dict.pop(f"{_PEFT_MODEL_PREFIX}{name}.{_PINNED_ROWS}", None),
                  state_dict.pop(f"{_PEFT_MODEL_PREFIX}{name}.{_PINNED_INDICES}", None))
        base_values = state_dict.pop(f"{_PEFT_MODEL_PREFIX}{name}.{_BASE_VALUES}", None)
        stored_fingerprint = state_dict.pop(f"{_PEFT_MODEL_PREFIX}{name}.{_SELECTION_FINGERPRINT}", None)
        base_sample = state_dict.pop(f"{_PEFT_MODEL_PREFIX}{name}.{_BASE_SAMPLE}", None)
        expected_shape = tuple(layer.neuroada_delta[adapter_name].shape)
        if delta_key not in state_dict:
            raise AdapterLoadError(
                f"the adapter file has no deltas for layer {name!r}; it was saved from a different model or "
                "target_modules. Load it on the base model it was trained on."
            )
        if tuple(state_dict[delta_key].shape) != expected_shape:
            raise AdapterLoadError(
                f"layer {name!r}: the adapter holds deltas of shape {tuple(state_dict[delta_key].shape)}, but on "
                f"this base the layer needs {expected_shape} ([out_features, k]); the adapter was trained on a base "
                "with other shapes. Load it on the base model it was trained on."
            )
        recorded = (config.selection_fingerprints or {}).get(name) if config_is_the_files else None
        if stored_fingerprint is not None:  # the file's own, whatever config PEFT passed (see _SELECTION_FINGERPRINT)
            recorded = bytes(stored_fingerprint.to(torch.uint8).tolist()).hex()
        # The file decides whether it holds indices, not the config: PEFT passes the live adapter's config when it
        # loads into an adapter that exists already, which may say otherwise.
        if indices_key not in state_dict:
            if config.save_indices and stored_fingerprint is None:
                raise AdapterLoadError(
                    f"layer {name!r}: the adapter file holds no indices and no fingerprint of its selection, but the "
                    "config says indices were saved (save_indices=True); adapter_config.json and "
                    "adapter_model.safetensors come from different saves.")
            # recomputed from this base with the config's rule; the rows that rounding could have broken
            # differently come from the file
            indices = _with_pinned_rows(layer.neuroada_indices.settled(adapter_name), *pinned, name)
            if recorded is not None and recorded != selection_fingerprint(indices):
                fingerprint_mismatches.append(name)
            elif base_sample is not None:
                rows = _sample_rows(layer.out_features)
                if tuple(base_sample.shape) != (rows.numel(), expected_shape[1]):
                    raise AdapterLoadError(f"layer {name!r}: the stored base sample has shape "
                                           f"{tuple(base_sample.shape)}; the file is damaged or from another model.")
                if _same_base_values(layer, indices[rows.to(indices.device)], base_sample, rows) is False:
                    other_base[name] = _OTHER_WEIGHTS
            state_dict[indices_key] = indices
            pinned_after_load[name] = _pinned_union(layer.pinned_rows.get(adapter_name), pinned[0], indices)
            continue
        indices = state_dict[indices_key]
        if tuple(indices.shape) != expected_shape or indices.dtype.is_floating_point:
            raise AdapterLoadError(
                f"layer {name!r}: stored indices have shape {tuple(indices.shape)} and dtype {indices.dtype}, "
                f"expected integer indices of shape {expected_shape}; the file is damaged or from another model."
            )
        try:
            check_indices(indices, layer.in_features)
        except ValueError as error:
            raise AdapterLoadError(f"layer {name!r}: the stored {error}; the file is damaged or was saved from a "
                                   "base with other layers.") from None
        if recorded is not None and recorded != selection_fingerprint(indices):
            raise AdapterLoadError(
                f"layer {name!r}: the stored indices do not match the fingerprint in adapter_config.json; the two "
                "files come from different saves or the weights file is damaged. Save the adapter again."
            )
        if base_values is not None and tuple(base_values.shape) != expected_shape:
            raise AdapterLoadError(f"layer {name!r}: the stored base values have shape {tuple(base_values.shape)}, "
                                   f"expected {expected_shape}; the file is damaged or from another model.")
        # This is the base if its weights at the stored positions are those saved with the adapter (O(out * k), the
        # selection of a load with stored indices is not computed at all). Else, for files saved without base values:
        # a data-chosen selection is no top-k of |W|, so the sum of |W| at it, recorded at calibration, is compared;
        # a weight-only selection is this base's if the stored indices are its own selection or a top-k of it up to
        # ties (the same weights in another precision). Otherwise the stored indices still apply, but the user should
        # know.
        same = None if base_values is None else _same_base_values(layer, indices, base_values)
        if same is False:  # the weights the deltas were trained on are not this base's, whatever the selection
            other_base[name] = _OTHER_WEIGHTS
        elif same is None:
            if config.selection in DATA_CRITERIA:
                from .calibration import same_selected_weight_sum

                if not same_selected_weight_sum(layer.full_weight_rows(), indices,
                                                (config.selected_weight_sums or {}).get(name)):
                    other_base[name] = "on weights whose sum of |W| differs from the one recorded at calibration"
            else:
                live_indices = layer.neuroada_indices.settled(adapter_name)  # computed now if the injection deferred it
                if not torch.equal(indices.long(), live_indices.long()) and not is_top_k_selection(
                        layer.full_weight_rows(), indices, config.selection):
                    other_base[name] = ("not the largest-magnitude connections of this base model's weights"
                                        if config.selection == "magnitude" else
                                        f"not the {config.selection!r} selection of this base model's weights")
        state_dict[indices_key] = indices.to(index_dtype_for(layer.in_features))
    if fingerprint_mismatches:
        raise AdapterLoadError(_fingerprint_message(fingerprint_mismatches, adapter_name))
    known = {f"{prefix}{name}.neuroada_{kind}.{adapter_name}" for name in layers for kind in ("delta", "indices")}
    unknown = sorted(k for k in state_dict if ".neuroada_" in k and k not in known)
    if unknown:
        raise AdapterLoadError(
            f"the adapter file holds NeuroAda weights for modules this model does not adapt (e.g. {unknown[0]!r}); "
            "it was saved from a different model. Load it on the base model it was trained on."
        )
    # Other weights the adapter brings (modules_to_save, trainable tokens): PEFT's load copies every key that fits
    # before it raises on one that does not, so a head for another number of classes must be refused here.
    for key, value in state_dict.items():
        live = model_state.get(key)
        live_shape = None if live is None else tuple(sharding.logical_shape(live))
        if (live is not None and ".neuroada_" not in key and live_shape != tuple(value.shape)
                and not ignore_mismatched_sizes):
            module = key.removeprefix(_PEFT_MODEL_PREFIX).split(".modules_to_save.")[0].split(".token_adapter.")[0]
            raise AdapterLoadError(
                f"module {module!r}: the adapter holds {key.rsplit('.', 1)[-1]!r} of shape {tuple(value.shape)}, but "
                f"this model's has shape {live_shape} (a classification head for another number of classes?); "
                "the model was left unchanged. Load it on a base of the same shapes (e.g. the same num_labels).")
    # A later save without indices stores the rows either base could select differently, with the loaded indices
    # (what this base selects itself there is not the adapter's selection); written only once the load is accepted.
    for name, rows_and_indices in pinned_after_load.items():
        layers[name].pinned_rows[adapter_name] = rows_and_indices
    trained_quantized = config_is_the_files and config.quantized_base
    if other_base and trained_quantized and not any(layers[name].quantization for name in other_base):
        # the workflow the merge warning recommends: merging a quantized base's adapter into its float original
        name = next(iter(other_base))
        warnings.warn(
            f"adapter {adapter_name!r} was trained on a {config.quantized_base} quantized base, whose rounded weights "
            f"ranked the connections; on {len(other_base)} layer(s) of this unquantized base (e.g. {name!r}) the "
            "stored indices are not its own selection, as expected when this is the original of that quantized base. "
            "The adapter is loaded as saved; if this is another model, it does not belong to it."
        )
    elif other_base:
        name, why = next(iter(other_base.items()))
        warnings.warn(
            f"adapter {adapter_name!r}: on {len(other_base)} layer(s) (e.g. {name!r}) the stored indices are {why}, "
            "so it is not the base the adapter was trained on. The adapter is loaded as saved; check that this is the "
            "base you meant."
        )
    return state_dict


_OTHER_WEIGHTS = "on base weights that differ from the ones saved with the adapter"


def _sample_rows(out_features: int) -> torch.Tensor:
    """The rows whose base weights an adapter saved without indices keeps: up to ``_BASE_SAMPLE_ROWS``, evenly
    spaced, the same for the same ``out_features`` (so a load finds them without storing them)."""
    return torch.unique(torch.linspace(0, out_features - 1, min(out_features, _BASE_SAMPLE_ROWS)).round().long())


# Tolerance of the base values check: a value saved in float16 (rounded by at most 2^-11 of itself) against the same
# weight in float32, float16 or bfloat16 (at most 2^-8), possibly rounded through float16 on the way (2^-11): less
# than 2^-7 in all; an unrelated base differs by far more. The absolute term covers float16's subnormal values. A
# weight beyond float16's range was saved as inf and is not compared.
_BASE_VALUES_RTOL, _BASE_VALUES_ATOL = 2.0**-7, 2.0**-24


def _same_base_values(layer: NeuroAdaLayer, indices: torch.Tensor, stored: torch.Tensor,
                      rows: Optional[torch.Tensor] = None) -> Optional[bool]:
    """Whether this base's weights at ``indices`` (of ``rows``, default all) are the ones saved with the adapter, up
    to the rounding of another precision. None where that cannot be told: a sharded or quantized weight, or stored
    values all beyond float16's range (the caller then falls back on the selection check)."""
    if layer.quantization or not layer.base_weight_readable():
        return None
    weights = layer.full_weight_rows()
    if rows is not None:
        weights = weights[rows.to(weights.device)]
    live = weights.gather(1, indices.to(device=weights.device, dtype=torch.long)).float()
    stored = stored.to(device=live.device, dtype=torch.float32)
    finite = torch.isfinite(stored)
    if not finite.any():
        return None
    return bool(torch.isclose(live[finite], stored[finite], rtol=_BASE_VALUES_RTOL, atol=_BASE_VALUES_ATOL).all())


def _pinned_union(live: Optional[tuple], file_rows: Optional[torch.Tensor], indices: torch.Tensor) -> tuple:
    """The rows pinned by this base (``live``, from injection) or by the file, with their loaded ``indices``."""
    rows = [part.long().cpu() for part in (live[0] if live is not None else None, file_rows) if part is not None]
    union = torch.unique(torch.cat(rows)) if rows else torch.zeros(0, dtype=torch.long)
    return union, indices.cpu()[union]


def _with_pinned_rows(indices: torch.Tensor, rows, pinned_indices, layer_name: str) -> torch.Tensor:
    if rows is None:  # saved before pinned rows existed, or with nothing to pin
        return indices
    rows = rows.long()
    if (pinned_indices is None or pinned_indices.shape != (rows.numel(), indices.shape[1])
            or (rows.numel() and (rows.min() < 0 or rows.max() >= indices.shape[0]))):
        raise AdapterLoadError(f"layer {layer_name!r}: the stored pinned rows do not fit this layer; the file is "
                               "damaged or from another model.")
    indices = indices.clone()
    indices[rows.to(indices.device)] = pinned_indices.to(device=indices.device, dtype=indices.dtype)
    return indices


def _fingerprint_message(modules: list[str], adapter_name: str) -> str:
    return (
        f"adapter {adapter_name!r} was saved without indices (save_indices=False), and the selection recomputed "
        f"from this base model's weights differs from the one it was trained with on {len(modules)} layer(s), "
        f"e.g. {modules[0]!r}. The deltas would land on the wrong connections, so the model was left unchanged. "
        "Load it on the base it was trained on, or save adapters with save_indices=True to make them independent "
        "of the base weights."
    )
