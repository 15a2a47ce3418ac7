"""Checks on adapter files before anything is loaded from them."""

from __future__ import annotations

import os

from safetensors import SafetensorError, safe_open

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def check_adapter_file(directory: str) -> None:
    """Read every tensor of ``directory``'s adapter weights, so a truncated or damaged file fails here, with its
    path named, before any model has been modified. Silently returns when the file is not a local one."""
    path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(path):
        return
    try:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise ValueError(
            f"the adapter file {path} is damaged or truncated ({error}); no model was changed. Save or copy the "
            "adapter again."
        ) from error
