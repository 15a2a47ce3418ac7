"""bitsandbytes 4-bit (nf4/fp4) and 8-bit base layers: read their weight as float32, and write one back.

NeuroAda selects on the dequantised weight, adds its bypass to the quantized layer's output (the base stays
quantized while training), and merges by dequantise -> add -> requantise, which rounds the merged weight to the
quantization grid again (so small deltas can be lost on merge; unmerged they are exact).
"""

from __future__ import annotations

import torch
from torch import nn


def kind(module: nn.Module) -> str | None:
    """``"4bit"``, ``"8bit"`` or None, from the weight's class, without importing bitsandbytes. An 8-bit layer with
    ``has_fp16_weights`` (bitsandbytes' default) holds its float weight as it is, not int8 codes: None."""
    weight = getattr(module, "weight", None)
    if getattr(weight, "has_fp16_weights", False):
        return None
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(type(weight).__name__)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a float32 ``[out_features, in_features]`` tensor."""
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(module.weight, state=getattr(module, "state", None)).float()


def store_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantize ``weight`` ([out, in], float) into ``module`` the way bitsandbytes quantizes a loaded layer."""
    import bitsandbytes as bnb

    old = module.weight
    if kind(module) == "4bit":
        options = {k: v for k, v in vars(old).items() if not k.startswith("_") and k not in ("data", "bnb_quantized")}
        options["requires_grad"] = False
        module.weight = bnb.nn.Params4bit(weight.to("cpu", old.quant_state.dtype), **options).to(old.device)
    else:
        module.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False,
                                          has_fp16_weights=old.has_fp16_weights).to(old.device)
        module.state.SCB = None  # recomputed from the new weight
