"""Data-aware selection: choose each neuron's connections from a few batches of training data.

The paper selects by ``|W|`` alone. Two criteria here also look at the data (``selection=`` in NeuroAdaConfig):

- ``"activation"``: ``|W[i, j]| * ||x_j||``, the L2 norm of input j over the calibration tokens (Wanda's score).
  One forward pass per batch; forward pre-hooks on the adapted layers add up the squared inputs per column, so the
  extra memory is O(in_features) per layer. Padding tokens (``attention_mask == 0``) are left out where the layer's
  input holds the mask's tokens (``[batch, sequence, features]``, or flattened as multiple-choice models do); in an
  encoder-decoder model, ``attention_mask`` applies to the encoder's layers and to the decoder's layers that read
  the encoder's output, ``decoder_attention_mask`` (if given) to the other decoder layers. Elsewhere every token
  counts, as in Wanda (a warning names such layers when the batches have a mask).
- ``"gradient"``: ``sum over batches b of |dL_b/dW[i, j] * W[i, j]|``, the first-order estimate of the loss change
  from each connection. The dense gradient of a layer is ``g^T x`` (its output gradient times its input), formed
  from hooks when the backward reaches the layer, so the base weights stay frozen and no ``.grad`` is ever
  allocated. Only a group of layers is scored per pass over the batches, so that the score buffers (one ``[out, in]``
  buffer per layer, plus one for the batch's gradient) fit ``max_score_bytes``; the default is one layer per group:
  the extra memory is about two ``[out, in]`` buffers of the largest layer, never the whole model's gradient, at the
  cost of one forward and backward per batch and group. A larger budget scores more layers per pass.

The adapter is created first (``get_peft_model``, deltas at zero) and then calibrated, as PEFT's EVA does
(``initialize_lora_eva_weights``); re-selecting zero deltas changes nothing else, so this is exact::

    peft_model = get_peft_model(model, NeuroAdaConfig(k=1, selection="activation"))
    calibrate_selection(peft_model, train_dataloader, num_batches=8)

Scores are computed on each layer's device in float32 (float64 for float64 weights) and selected like magnitude:
top-k per row, ties to the lower position, rows sorted (:func:`neuroada.selection.select_top_k_scores`). The same
batches give the same selection. The config records the data used (``calibration``) and, per layer, the sum of
``|W|`` at the selection (``selected_weight_sums``), which a load uses to check its base.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from .layer import NeuroAdaLayer
from .model import NeuroAdaModel, _named_layers
from .selection import DATA_CRITERIA, select_top_k_scores


def calibrate_selection(model: nn.Module, batches: Iterable[Mapping], num_batches: Optional[int] = None, *,
                        adapter_name: Optional[str] = None, max_score_bytes: Optional[int] = None) -> dict:
    """Choose the connections of an adapter with a data-aware selection (``"activation"`` or ``"gradient"``) from
    calibration batches, and record the data used in its config.

    Args:
        model: a ``PeftModel`` (from ``get_peft_model``) or a ``NeuroAdaModel`` holding the adapter, its deltas not
            yet trained (zero, or untouched ``init_weights=False`` values, which keep their slots).
        batches: a dataloader or a list of batches; each a mapping of model inputs (``model(**batch)``), with
            ``labels`` for ``"gradient"`` (it needs ``model(**batch).loss``). Moved to the model's device here.
        num_batches: how many batches to use, from the start of ``batches``. Default: all of them (a sized
            iterable only). Fewer available than asked is an error.
        adapter_name: default: the active adapter.
        max_score_bytes: ``"gradient"`` only: memory for score buffers per pass over the batches (each adapted
            layer needs ``out * in * 4`` bytes in float32). Default: one layer per pass.

    Returns:
        The record written to the adapter config's ``calibration``: ``batches``, ``samples``, ``tokens``.

    In a distributed run (``torch.distributed`` initialised) this is a collective: every process must call it, each
    on its own batches; all then take process 0's selection (a broadcast), so data-parallel training updates the same
    connections everywhere. Called on one process only, it waits for the others.
    """
    tuner = model.base_model if isinstance(getattr(model, "base_model", None), NeuroAdaModel) else model
    if not isinstance(tuner, NeuroAdaModel):
        raise TypeError(f"calibrate_selection needs the model returned by get_peft_model with a NeuroAdaConfig, got "
                        f"{type(model).__name__}")
    adapter_name = adapter_name or _single_active_adapter(tuner)
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"no adapter named {adapter_name!r}; the model holds {sorted(tuner.peft_config)}")
    config = tuner.peft_config[adapter_name]
    if config.selection not in DATA_CRITERIA:
        raise ValueError(f"adapter {adapter_name!r} uses selection={config.selection!r}, which is chosen from the "
                         f"weights at injection and needs no data; calibrate_selection is for {DATA_CRITERIA}")
    layers = _named_layers(tuner.model, adapter_name)
    _check_untrained(layers, adapter_name, config.init_weights)
    batches = _take(batches, num_batches)
    score = _activation_scores if config.selection == "activation" else _gradient_scores
    with _base_model_in_eval(tuner):
        indices = score(tuner, layers, adapter_name, batches, max_score_bytes)
    indices = _the_first_process_selection(indices)
    for name, layer in layers.items():  # all at once, so that a failure above leaves the adapter as it was
        layer.set_selection(adapter_name, indices[name])
    # The record goes into a copy that this adapter alone holds: get_peft_model keeps the caller's config object,
    # which may be reused for other models or adapters that this data did not calibrate.
    config = copy.deepcopy(config)
    config.calibration = _data_record(batches)
    config.selected_weight_sums = {name: selected_weight_sum(layer.full_weight_rows(), indices[name])
                                   for name, layer in layers.items()}
    tuner.peft_config[adapter_name] = config
    return config.calibration


# ------------------------------------------------------------------ the two criteria


def _activation_scores(tuner, layers, adapter_name, batches, max_score_bytes) -> dict[str, torch.Tensor]:
    squares: dict[str, torch.Tensor] = {}
    current = {}
    encoder_layers, encoder = _encoder_side(tuner.model, layers)
    padding_counted = set()

    def add_squares(name, module, args):
        x = args[0]
        score_dtype = _score_dtype(module.weight)
        if encoder is None or name in encoder_layers or x is current.get("encoder_output"):
            mask = current.get("mask")
        else:  # a decoder layer reading decoder tokens
            mask = current.get("decoder_mask")
        x = x.detach().to(score_dtype)
        if mask is not None and _holds_mask_tokens(x, mask):
            x = x * mask.to(device=x.device, dtype=score_dtype).reshape(x.shape[:-1]).unsqueeze(-1)
        elif x.dim() >= 3 and (current.get("mask") is not None or current.get("decoder_mask") is not None):
            padding_counted.add(name)
        column_squares = x.square().reshape(-1, x.shape[-1]).sum(0)
        squares[name] = column_squares if name not in squares else squares[name] + column_squares

    def keep_encoder_output(module, args, output):
        current["encoder_output"] = output[0] if isinstance(output, tuple) else getattr(
            output, "last_hidden_state", output)

    handles = [layer.get_base_layer().register_forward_pre_hook(_bound(add_squares, name))
               for name, layer in layers.items()]
    if encoder is not None:
        handles.append(encoder.register_forward_hook(keep_encoder_output))
    with _hooks(handles), torch.no_grad():
        for batch in batches:
            batch = _to_device(batch, _device_of(tuner))
            current.update(mask=batch.get("attention_mask"), decoder_mask=batch.get("decoder_attention_mask"),
                           encoder_output=None)
            tuner.model(**batch)
    current.clear()
    _check_reached(layers, squares, "activation")
    if padding_counted:
        warnings.warn(
            f"selection='activation': the inputs of {len(padding_counted)} layer(s) (e.g. "
            f"{sorted(padding_counted)[0]!r}) never held the tokens of the batches' attention mask, so padding "
            "tokens count in their input norms (as in Wanda); give unpadded batches to leave padding out there.")
    indices = {}
    for name, layer in layers.items():
        weight = layer.full_weight_rows()
        scores = weight.detach().to(_score_dtype(weight)).abs() * squares.pop(name).sqrt().to(weight.device)
        indices[name] = select_top_k_scores(scores, layer.neuroada_indices[adapter_name].shape[1])
    return indices


def _encoder_side(model: nn.Module, layers: dict[str, NeuroAdaLayer]) -> tuple[set[str], Optional[nn.Module]]:
    """For an encoder-decoder model: the adapted layers inside its encoder, and the encoder. ((), None) otherwise."""
    config = getattr(model, "config", None)
    get_encoder = getattr(model, "get_encoder", None)
    if not getattr(config, "is_encoder_decoder", False) or get_encoder is None:
        return set(), None
    encoder = get_encoder()
    inside = {id(module) for module in encoder.modules()}
    return {name for name, layer in layers.items() if id(layer) in inside}, encoder


def _holds_mask_tokens(x: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether ``x`` (``[..., features]``) holds one row per token of ``mask``, in its order: the same leading
    shape, or flattened leading dimensions with the same sequence length (``[batch * choices, sequence]``)."""
    if x.dim() < 3 or mask.dim() < 2:
        return False
    return x.shape[-2] == mask.shape[-1] and x.shape[:-1].numel() == mask.numel()


def _gradient_scores(tuner, layers, adapter_name, batches, max_score_bytes) -> dict[str, torch.Tensor]:
    model = tuner.model
    indices = {}
    with _frozen_parameters(model), torch.enable_grad():
        for group in score_groups(layers, max_score_bytes):
            scores = _gradient_scores_of_group(model, {name: layers[name] for name in group}, batches)
            for name in group:
                indices[name] = select_top_k_scores(scores.pop(name), layers[name].neuroada_indices[adapter_name]
                                                    .shape[1])
    return indices


def _gradient_scores_of_group(model, layers: dict[str, NeuroAdaLayer], batches) -> dict[str, torch.Tensor]:
    """``sum_b |dL_b/dW * W|`` for the layers of one group: per batch, each layer's dense gradient is formed from
    its input and output gradient when the backward reaches it, and folded into the layer's score at batch end."""
    scores: dict[str, torch.Tensor] = {}
    batch_gradient: dict[str, torch.Tensor] = {}

    def capture(name, module, args, output):
        x = args[0].detach()
        if not output.requires_grad:
            # the first scored layer on this path: the backward's graph starts here. A copy, not the leaf itself,
            # goes on, so that the model may still change it in place.
            output = output.detach().requires_grad_(True).clone()
        output.register_hook(_bound(add_gradient, name, x))
        return output

    def add_gradient(name, x, output_gradient):
        score_dtype = _score_dtype(layers[name].get_base_layer().weight)
        gradient = output_gradient.reshape(-1, output_gradient.shape[-1]).to(score_dtype).T @ \
            x.reshape(-1, x.shape[-1]).to(score_dtype)  # [out, in], the layout of full_weight_rows
        if name in batch_gradient:
            batch_gradient[name] += gradient
        else:
            batch_gradient[name] = gradient

    with _hooks([layer.get_base_layer().register_forward_hook(_bound(capture, name))
                 for name, layer in layers.items()]):
        for batch in batches:
            loss = model(**_to_device(batch, _device_of(model))).loss
            if loss is None:
                raise ValueError("selection='gradient' needs a loss: give calibration batches with labels "
                                 "(model(**batch).loss must not be None)")
            loss.backward()
            del loss
            _check_reached(layers, batch_gradient, "gradient", also=scores)
            for name, gradient in list(batch_gradient.items()):
                weight = layers[name].full_weight_rows().detach()
                contribution = gradient.mul_(weight.to(gradient.device, gradient.dtype)).abs_()
                if name in scores:
                    scores[name] += contribution
                else:
                    scores[name] = contribution
                del batch_gradient[name], gradient, contribution
    return scores


def _the_first_process_selection(indices: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In a distributed run, process 0's selection on every process. Each process scores its own batches (or the
    same ones, with kernels that need not add up bit for bit alike on every device), and a near tie can fall
    either way; data-parallel training must update the same connections everywhere."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return indices
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else \
        torch.device("cpu")
    names = list(indices)  # model order: the same on every process
    flat = torch.cat([indices[name].reshape(-1).to(device=device, dtype=torch.int64) for name in names])
    dist.broadcast(flat, src=0)
    agreed, start = {}, 0
    for name in names:
        size = indices[name].numel()
        agreed[name] = flat[start:start + size].reshape(indices[name].shape).to(indices[name].device,
                                                                               indices[name].dtype)
        start += size
    return agreed


def score_groups(layers: dict[str, NeuroAdaLayer], max_score_bytes: Optional[int]) -> list[list[str]]:
    """Layers in model order, in consecutive groups whose score buffers fit ``max_score_bytes`` (at least one layer
    each); ``None``: one layer per group."""
    if max_score_bytes is not None and (isinstance(max_score_bytes, bool) or not isinstance(max_score_bytes, int)
                                        or max_score_bytes < 1):
        raise ValueError(f"max_score_bytes must be a positive integer (bytes), got {max_score_bytes!r}")
    groups, size = [], 0
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        need = layer.out_features * layer.in_features * _score_dtype(weight).itemsize
        if not groups or max_score_bytes is None or size + need > max_score_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += need
    return groups


# ------------------------------------------------------------------ the base check at load time


def selected_weight_sum(weight_rows: torch.Tensor, indices: torch.Tensor) -> float:
    """The sum of ``|W|`` over a selection (float64), recorded at calibration to recognise the base at load."""
    return float(weight_rows.detach().gather(1, indices.long().to(weight_rows.device)).double().abs().sum())


def same_selected_weight_sum(weight_rows: torch.Tensor, indices: torch.Tensor, recorded: Optional[float]) -> bool:
    """Whether ``weight_rows`` gives the ``recorded`` sum at ``indices``, up to rounding the weights to bfloat16 or
    float16 (each ``|W|`` moves by at most 2^-8 of itself, or by a float16 subnormal step). True without a record."""
    if recorded is None:
        return True
    actual = selected_weight_sum(weight_rows, indices)
    tolerance = 2.0**-7 * max(abs(actual), abs(recorded)) + indices.numel() * 2.0**-24
    return abs(actual - recorded) <= tolerance


# ------------------------------------------------------------------ helpers


def _single_active_adapter(tuner: NeuroAdaModel) -> str:
    active = tuner.active_adapters
    if len(active) != 1:
        raise ValueError(f"several adapters are active ({active}); name the one to calibrate with adapter_name=")
    return active[0]


def _check_untrained(layers: dict[str, NeuroAdaLayer], adapter_name: str, init_weights: bool) -> None:
    if not layers:
        raise ValueError(f"adapter {adapter_name!r} adapts no layer of this model; nothing to calibrate")
    if not init_weights and not any(adapter_name in layer.uncalibrated for layer in layers.values()):
        # its deltas started random (never zero), so trained ones cannot be told from untrained ones
        raise ValueError(
            f"adapter {adapter_name!r} is already calibrated (or loaded) and has init_weights=False, so whether its "
            "deltas are trained cannot be told; a new selection could move trained deltas to other connections. "
            "Add a new adapter and calibrate that one.")
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"layer {name!r} has merged adapters; call unmerge_adapter() before calibrate_selection")
        if init_weights and bool(layer.neuroada_delta[adapter_name].detach().ne(0).any()):
            raise ValueError(
                f"adapter {adapter_name!r} has trained deltas (layer {name!r}); a new selection would move them to "
                "other connections. Calibrate right after get_peft_model, before training.")


def _take(batches, num_batches: Optional[int]) -> list[Mapping]:
    if num_batches is None:
        if not hasattr(batches, "__len__"):
            raise ValueError("give num_batches= for an iterable without a length (e.g. a streaming dataloader)")
        num_batches = len(batches)
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
    taken = list(itertools.islice(iter(batches), num_batches))
    if len(taken) < num_batches:
        raise ValueError(f"the calibration data holds {len(taken)} batch(es), fewer than num_batches={num_batches}; "
                         "lower num_batches or give more data")
    for batch in taken:
        if not isinstance(batch, Mapping):
            raise TypeError(f"each calibration batch must be a mapping of model inputs (model(**batch)), such as a "
                            f"dataloader with a transformers collator gives; got a {type(batch).__name__}")
    return taken


def _data_record(batches: list[Mapping]) -> dict:
    samples = tokens = 0
    for batch in batches:
        ids = batch.get("input_ids")
        if ids is None:
            ids = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        mask = batch.get("attention_mask")
        samples += int(ids.shape[0]) if ids is not None and ids.dim() else 0
        tokens += int(mask.sum()) if mask is not None else (int(ids.numel()) if ids is not None else 0)
    return {"batches": len(batches), "samples": samples, "tokens": tokens}


def _score_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _bound(function, *leading):
    return lambda *args: function(*leading, *args)


def _check_reached(layers, seen: dict, criterion: str, also: Optional[dict] = None) -> None:
    missing = [name for name in layers if name not in seen and (also is None or name not in also)]
    if missing:
        raise RuntimeError(
            f"selection={criterion!r}: the calibration batches never reached {len(missing)} adapted layer(s), e.g. "
            f"{missing[0]!r}" + (" (no gradient flowed back to it: a loss that does not depend on it, or gradient "
                                 "checkpointing, which runs the forward without gradients; enable it after "
                                 "calibrating)" if criterion == "gradient" else "")
            + "; nothing was changed. Exclude such layers with exclude_modules or give batches that use them.")


@contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _base_model_in_eval(tuner: NeuroAdaModel):
    """The base model as it scores: NeuroAda layers disabled (whatever their deltas), dropout off; restored after."""
    modes = {module: module.training for module in tuner.modules()}
    disabled = {layer: layer._disable_adapters for layer in tuner.modules() if isinstance(layer, NeuroAdaLayer)}
    try:
        tuner.eval()
        for layer in disabled:
            layer._disable_adapters = True
        yield
    finally:
        for layer, flag in disabled.items():
            layer._disable_adapters = flag
        for module, mode in modes.items():
            module.training = mode


@contextmanager
def _frozen_parameters(model: nn.Module):
    """No parameter requires a gradient while the gradient criterion runs: the backward then computes only the
    input gradients that lead to the scored layers, and allocates no ``.grad``."""
    flags = {param: param.requires_grad for param in model.parameters()}
    try:
        for param in flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in flags.items():
            param.requires_grad_(flag)
