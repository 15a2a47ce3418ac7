"""The model card (README.md) that ``neuroada train`` writes into an adapter folder: what the adapter is, what
it was trained from and how, its metrics, and how to load it (PEFT needs ``import neuroada`` first)."""

from __future__ import annotations

import os

from .models import HUB_IDS

_LOADERS = {"SEQ_CLS": "AutoModelForSequenceClassification", "CAUSAL_LM": "AutoModelForCausalLM"}


def base_model_name(model: str) -> str:
    """The base model's hub id where known (the offline aliases, a hub id), else the name as given."""
    return HUB_IDS.get(model, model)


def write_model_card(adapter_dir: str, run, config, command: str, metrics: dict, training, targets: str) -> str:
    """Replace PEFT's empty model card with one that describes this adapter."""
    base = base_model_name(run.task.model)
    loader = _LOADERS[config.task_type]
    name = run.metric_name
    head = ""
    if run.classification:
        head = f", num_labels={len(run.labels)}"
    schedule = getattr(training.lr_scheduler_type, "value", training.lr_scheduler_type)  # an enum in TrainingArguments
    before = "-" if metrics["before"] is None else f"{metrics['before'][name]:.4f}"
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base}",
        "tags:",
        "- neuroada",
        "- peft",
        "---",
        "",
        f"# NeuroAda adapter for {base}",
        "",
        "[NeuroAda](https://arxiv.org/abs/2510.18940) (per-neuron top-k bypass deltas beside frozen weights) "
        f"with k={config.k} ({config.selection} selection{_calibration_text(config)}) on `{targets}` of `{base}`"
        + (f" (loaded from `{run.model_path}`)" if run.model_path != base else "") + ".",
        f"Trainable parameters: {metrics['trainable_parameters']:,} of {metrics['total_parameters']:,}.",
        "",
        "## Loading",
        "",
        "PEFT knows NeuroAda once `neuroada` is imported (without it, loading fails with `KeyError: 'NEUROADA'`):",
        "",
        "```python",
        "import neuroada  # registers NeuroAda with PEFT",
        "from peft import PeftModel",
        f"from transformers import {loader}",
        "",
        f"base = {loader}.from_pretrained({base!r}{head})",
        f"model = PeftModel.from_pretrained(base, {os.path.abspath(adapter_dir)!r})",
        "```",
        "",
        "Or without neuroada at inference time: `neuroada merge --adapter ADAPTER --output MERGED` writes a plain "
        "transformers model folder.",
        "",
        "## Training",
        "",
        f"- command: `{command}`",
        f"- task: {run.task.task} on `{run.task.data}`" + (f", labels {run.labels}" if run.labels else ""),
        f"- {metrics['train_examples']} training and {metrics['test_examples']} test examples, "
        f"{metrics['steps']} steps at learning rate {training.learning_rate:g} ({schedule}, "
        f"{training.warmup_steps} warmup steps), seed {training.seed}",
        "",
        "## Metrics (held-out test split)",
        "",
        f"| {name} before training | after |",
        "|---|---|",
        f"| {before} | {metrics['after'][name]:.4f} |",
        "",
    ]
    path = os.path.join(adapter_dir, "README.md")
    with open(path, "w") as handle:
        handle.write("\n".join(lines))
    return path


def _calibration_text(config) -> str:
    """How much training data a data-aware selection was chosen from (empty for the weight-only criteria)."""
    record = getattr(config, "calibration", None)
    if not record:
        return ""
    return f", scored on {record['batches']} training batches: {record['samples']} examples, {record['tokens']} tokens"
