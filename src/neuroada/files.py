"""Checks on adapter files before anything is loaded from them."""

from __future__ import annotations

import os

from safetensors import SafetensorError, safe_open

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"  # save_pretrained(safe_serialization=False)


def check_adapter_file(directory: str) -> None:
    """Read every tensor of the adapter weights in the local folder ``directory``, so that a missing, truncated or
    damaged file fails here, with its path named, before any model has been modified (PEFT would inject the adapter
    first and fail at the read, leaving the layers behind)."""
    path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    pickled = os.path.join(directory, ADAPTER_PICKLE_NAME)
    if not os.path.isfile(path) and not os.path.isfile(pickled):
        raise ValueError(
            f"the adapter folder {directory} has no weights file ({ADAPTER_WEIGHTS_NAME} or {ADAPTER_PICKLE_NAME}), "
            "only its config; no model was changed. Save or copy the whole adapter folder.")
    try:
        if os.path.isfile(path):
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():
                    handle.get_tensor(key)
        else:
            import torch

            path = pickled
            torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as error:
        raise ValueError(
            f"the adapter file {path} is damaged or truncated ({error}); no model was changed. Save or copy the "
            "adapter again."
        ) from error
