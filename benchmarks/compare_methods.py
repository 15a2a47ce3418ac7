"""Accuracy against the peers: the same base model, task, step budget and seeds for every method, each with its own
learning-rate sweep chosen on a validation split (never on the test split).

    python benchmarks/compare_methods.py --task minilm-sentiment [--quick] [--out docs/results]

Per method: sweep the learning rates on seed 0 (extending the sweep by one step past an edge until the best rate is
inside it), then train the best rate on every seed and evaluate on the test split. Every run is its own process,
so its peak memory is its own. Writes ``<out>/<task>.md`` (a Markdown table) and ``<out>/<task>.json``.

Methods: NeuroAda k=1, 8, 20 (all linear layers); LoRA r=8 on the same modules; PEFT Super-Tuning with as many
trainable entries as NeuroAda k=1 (top-k over each whole matrix instead of per neuron); BitFit (biases); full
fine-tuning; and the untrained base model (``zero-shot``, generative tasks). Classifier heads, where the task has
one, are trained by every method.

Each run records which test examples it got right, so every method is compared with LoRA r=8 on the same examples:
the paired difference (per example, averaged over seeds) with a bootstrap 95% interval over the test examples.
``--plot docs/lr_sensitivity.png`` draws validation score against learning rate for every method and task.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py

METHODS = ["neuroada-k1", "neuroada-k8", "neuroada-k20", "lora-r8", "supertuning-k1", "bitfit", "full", "zero-shot",
           # the untrained base with room to answer in a sentence (it does not stop after the number as trained
           # models do, so the task's own budget cuts some right answers short)
           "zero-shot-long",
           # data-aware selection (issue 15): the same k, calibrated on the first batches of the training split
           "neuroada-k1-activation", "neuroada-k8-activation", "neuroada-k1-gradient", "neuroada-k8-gradient"]
CALIBRATION_BATCHES = 8
ZERO_SHOT_LONG_TOKENS = 48
GRADIENT_SCORE_BYTES = 1 << 30  # every layer of both models in one pass over the batches (fp32 scores)
REFERENCE = "lora-r8"  # the method every other one is compared with, example by example
BOOTSTRAP_RESAMPLES = 10_000

# Starting sweeps (log-spaced). Sparse deltas want large rates, LoRA ~1e-3, full fine-tuning ~1e-4.
SWEEPS = {
    "neuroada-k1": [3e-3, 1e-2, 3e-2], "neuroada-k8": [3e-3, 1e-2, 3e-2], "neuroada-k20": [1e-3, 3e-3, 1e-2],
    "lora-r8": [3e-4, 1e-3, 3e-3], "supertuning-k1": [3e-3, 1e-2, 3e-2], "bitfit": [1e-3, 3e-3, 1e-2],
    "full": [3e-5, 1e-4, 3e-4],
}
# --wide-sweeps: four rates (a 30x range) from the start, for the learning-rate sensitivity plot
WIDE_SWEEPS = {
    "neuroada-k1": [3e-3, 1e-2, 3e-2, 1e-1], "neuroada-k8": [1e-3, 3e-3, 1e-2, 3e-2],
    "neuroada-k20": [1e-3, 3e-3, 1e-2, 3e-2], "lora-r8": [1e-4, 3e-4, 1e-3, 3e-3],
    "supertuning-k1": [3e-3, 1e-2, 3e-2, 1e-1], "bitfit": [1e-3, 3e-3, 1e-2, 3e-2], "full": [1e-5, 3e-5, 1e-4, 3e-4],
}

TASKS = {
    # (recipe, steps, batch, train size, validation size, test size)
    "minilm-sentiment": dict(recipe="minilm-sentiment", steps=150, batch=32, train=4000, validation=500, test=1000),
    "smollm2-arithmetic": dict(recipe="smollm2-arithmetic", steps=70, batch=8, train=2000, validation=200,
                               test=1000),
    "smollm2-legs": dict(recipe="smollm2-legs", steps=70, batch=8, train=2000, validation=200, test=1000),
}
for _method in METHODS:  # a data-aware method sweeps the same rates as magnitude at its k
    if _method.startswith("neuroada-k") and _method.count("-") == 2:
        SWEEPS[_method] = SWEEPS[_method.rsplit("-", 1)[0]]
        WIDE_SWEEPS[_method] = WIDE_SWEEPS[_method.rsplit("-", 1)[0]]
QUICK = dict(steps=8, batch=8, train=64, validation=32, test=32)


# ------------------------------------------------------------------------------------------------ one run (worker)


def adapt(model, method: str, classification: bool, calibration_batches=None):
    """The model with ``method`` applied; returns (model, coverage) where coverage counts the output neurons and
    input positions holding at least one trainable entry (sparse methods only). ``calibration_batches``: a
    callable giving the batches a data-aware selection (``neuroada-k<k>-<criterion>``) is calibrated on."""
    from peft import LoraConfig, SupertuningConfig, get_peft_model

    from common import sparsity_matching_k
    from neuroada import NeuroAdaConfig, calibrate_selection

    task_type = "SEQ_CLS" if classification else "CAUSAL_LM"
    head = {"classifier", "score"}
    if method.startswith("neuroada-k"):
        k, criterion = neuroada_k_and_selection(method)
        model = get_peft_model(model, NeuroAdaConfig(k=k, selection=criterion, task_type=task_type))
        if criterion != "magnitude":
            calibrate_selection(model, calibration_batches(), num_batches=CALIBRATION_BATCHES,
                                max_score_bytes=GRADIENT_SCORE_BYTES)
        return model, _coverage(model, "neuroada")
    if method == "lora-r8":
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                task_type=task_type)), None
    if method == "supertuning-k1":
        probe = get_peft_model(_clone(model), NeuroAdaConfig(k=1, task_type=task_type))
        linears = [m.get_base_layer() for m in probe.modules() if hasattr(m, "neuroada_delta")]
        sparsity = sparsity_matching_k(linears, 1)
        names = sorted(n for n, m in probe.base_model.model.named_modules() if hasattr(m, "neuroada_delta"))
        del probe, linears
        _release_memory()  # the probe copied the model: give it back, or the run's peak memory would count it
        config = SupertuningConfig(target_modules=names, sparsity=sparsity, task_type=task_type)
        model = get_peft_model(model, config)
        return model, _coverage(model, "supertuning")
    if method == "bitfit":
        if not any(name.endswith(".bias") for name, _ in model.named_parameters()):
            raise NotApplicable(f"{type(model).__name__} has no bias terms, so BitFit has nothing to train")
        for name, param in model.named_parameters():
            param.requires_grad_(name.endswith(".bias") or name.split(".")[0] in head)
        return model, None
    if method == "full":
        return model.requires_grad_(True), None
    raise ValueError(method)


def neuroada_k_and_selection(method: str) -> tuple[int, str]:
    """``neuroada-k8`` -> (8, "magnitude"), ``neuroada-k1-gradient`` -> (1, "gradient")."""
    k, _, criterion = method.removeprefix("neuroada-k").partition("-")
    return int(k), criterion or "magnitude"


def _release_memory() -> None:
    """Free what was dropped and return it to the operating system (glibc keeps freed memory otherwise, and the
    resident size a run reports as its peak would still include it)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _clone(model):
    import copy

    return copy.deepcopy(model)


def _coverage(model, kind: str) -> dict:
    neurons = positions = total_neurons = total_positions = 0
    for module in model.modules():
        if kind == "neuroada" and hasattr(module, "neuroada_indices"):
            rows = module.neuroada_indices["default"].long()
            out_features, in_features = module.out_features, module.in_features
            neurons += out_features  # every row holds k entries
            positions += rows.unique().numel()
        elif kind == "supertuning" and hasattr(module, "supertuning_indices"):
            flat = module.supertuning_indices["default"].long()
            in_features, out_features = module.in_features, module.out_features
            neurons += (flat // in_features).unique().numel()
            positions += (flat % in_features).unique().numel()
        else:
            continue
        total_neurons += out_features
        total_positions += in_features
    return {"neurons": neurons, "neurons_total": total_neurons, "positions": positions,
            "positions_total": total_positions}


def run_one(spec: dict) -> dict:
    """Train one (method, learning rate, seed); score the validation split at half time and at the end (to show
    whether training has stopped improving) and the test split at the end."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from neuroada_recipes.cli import TaskRun

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    started_run = time.time()
    set_seed(spec["seed"])
    run = TaskRun(_task_arguments(spec))
    train, test = run.prepare_data(seed=0)  # the same split for every method and seed
    validation = train.select(range(spec["validation"]))
    train = train.select(range(spec["validation"], len(train)))
    if not run.classification:  # the instruction validation split must stay raw for generation
        validation = _raw_validation(run, spec)
    if spec["method"] in ("zero-shot", "zero-shot-long"):
        if run.classification:
            return {"not_applicable": "a new classification head is untrained without fine-tuning"}
        model = run.load_base_model()
        scored = run.evaluate(model, test, "test", per_example=True)
        return {"scores": {"validation": run.evaluate(model, validation, "validation")[run.metric_name],
                           "test": scored[run.metric_name]}, "test_hits": scored["hits"], "validation_curve": {},
                "metric_name": run.metric_name, **_extraction_record(run), "trainable": 0,
                "total": sum(p.numel() for p in model.parameters()),
                "train_seconds": 0.0, "wall_seconds": time.time() - started_run, "coverage": None,
                "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "final_loss": None}
    def calibration_batches():  # the first batches of the training split, as the Trainer would shuffle them
        loader = torch.utils.data.DataLoader(train.shuffle(seed=spec["seed"]), batch_size=spec["batch"],
                                             collate_fn=run.collator)
        return [batch for _, batch in zip(range(CALIBRATION_BATCHES), loader)]

    started_selection = time.time()
    try:
        model, coverage = adapt(run.load_base_model(), spec["method"], run.classification, calibration_batches)
    except NotApplicable as reason:
        return {"not_applicable": str(reason)}
    selection_seconds = time.time() - started_selection
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    args = TrainingArguments(
        output_dir=spec["scratch"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        learning_rate=spec["lr"], lr_scheduler_type="linear", warmup_steps=max(1, spec["steps"] // 20),
        seed=spec["seed"], report_to="none", save_strategy="no", logging_steps=max(1, spec["steps"] // 10),
        disable_tqdm=True, use_cpu=True,
    )
    curve, evaluating = {}, [0.0]

    class HalfwayValidation(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == spec["steps"] // 2:
                started = time.time()
                curve[state.global_step] = run.evaluate(model, validation, "validation")[run.metric_name]
                model.train()
                evaluating[0] += time.time() - started

    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=run.collator,
                      callbacks=[HalfwayValidation()])
    started = time.time()
    trainer.train()
    seconds = time.time() - started - evaluating[0]
    curve[spec["steps"]] = run.evaluate(model, validation, "validation")[run.metric_name]
    scored = run.evaluate(model, test, "test", per_example=True)
    scores = {"validation": curve[spec["steps"]], "test": scored[run.metric_name]}
    return {"scores": scores, "test_hits": scored["hits"], "validation_curve": curve, "metric_name": run.metric_name,
            **_extraction_record(run),
            "trainable": trainable, "total": total, "train_seconds": seconds, "adapt_seconds": selection_seconds,
            "train_rows": len(train), "code": _code_version(),
            "wall_seconds": time.time() - started_run,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "coverage": coverage,
            "final_loss": trainer.state.log_history[-1].get("train_loss")}


def _extraction_record(run) -> dict:
    """``answer_extraction``: the version of the answer extraction that scored a generation task's run."""
    return {} if run.classification else {"answer_extraction": _current_answer_extraction()}


def _task_arguments(spec: dict):
    """The command line's task settings for a run: the recipe's, at the run's sizes (``zero-shot-long``: a larger
    answer budget). Needs ``src`` on the path."""
    from neuroada_recipes.cli import TaskArguments
    from neuroada_recipes.recipes import RECIPES

    fields = {k: v for k, v in RECIPES[spec["recipe"]].items() if k in TaskArguments.__dataclass_fields__}
    fields.update(recipe=spec["recipe"], train_size=spec["train"] + spec["validation"], test_size=spec["test"],
                  evaluate_before=False)
    if spec.get("method") == "zero-shot-long":
        fields["max_new_tokens"] = ZERO_SHOT_LONG_TOKENS
    return TaskArguments(**fields)


def _code_version() -> str | None:
    """The commit the run's code came from, "+changes" when the library or benchmarks differ from it (a run log
    that grows over sessions can then tell which runs a code change could have touched)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "src", "benchmarks"], cwd=root,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if changed else "")


def _answer_extraction(result: dict) -> int | None:
    """The version of ``extract_answer`` that scored a run (None for runs not scored from generations). Runs from
    before the version was recorded were scored by version 1."""
    if result.get("metric_name") != "exact_match":
        return None
    return result.get("answer_extraction", 1)


def _current_answer_extraction() -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from neuroada_recipes.tasks import ANSWER_EXTRACTION_VERSION

    return ANSWER_EXTRACTION_VERSION


def _raw_validation(run, spec):
    from neuroada_recipes.data import load_table

    # generated problems with a third seed, minus the test and training ones, as a raw validation split
    splits = run._splits(0, test_only=False)
    seen = set(splits.test["instruction"]) | set(splits.train["instruction"])
    pool = load_table(run.task.data, seed=2000, size=spec["validation"] * 3)
    records = []
    for record in pool:
        if record["instruction"] not in seen:
            seen.add(record["instruction"])
            records.append(record)
    return records[: spec["validation"]]


# ------------------------------------------------------------------------------------------------ the comparison


class NotApplicable(Exception):
    """The method has nothing to train on this model (BitFit on a model without biases)."""


class MissingRun(Exception):
    """A run that --report-only would have to launch."""


class Runs:
    """Every finished run, appended to ``<out>/<task>.runs.jsonl``: an interrupted comparison resumes where it
    stopped, and a rerun with the same sizes reuses what it has."""

    SIZE_KEYS = ("recipe", "steps", "batch", "train", "validation", "test", "method", "lr", "seed")

    def __init__(self, path: str, launch_missing: bool = True):
        self.path = path
        self.launch_missing = launch_missing
        self.done, self.specs = {}, []
        if os.path.exists(path):
            with open(path) as handle:
                for line in handle:
                    record = json.loads(line)
                    self.done[self._key(record["spec"])] = record["result"]
                    self.specs.append(record["spec"])
        self.extraction = {_answer_extraction(result) for result in self.done.values()} - {None}
        if len(self.extraction) > 1:
            raise RuntimeError(f"{path} mixes runs scored by answer extraction versions {sorted(self.extraction)}: "
                               "their scores are not comparable; split the log by the results' answer_extraction")

    def _key(self, spec: dict) -> str:
        return json.dumps([spec[k] for k in self.SIZE_KEYS])

    def get(self, spec: dict) -> dict:
        key = self._key(spec)
        if key not in self.done:
            if not self.launch_missing:
                raise MissingRun(spec)
            current = _current_answer_extraction()
            if self.extraction - {current}:
                # the code of the newest run of the log (runs are appended in order)
                newest = next((r.get("code") for r in reversed(list(self.done.values())) if r.get("code")), None)
                raise RuntimeError(
                    f"{self.path} holds runs scored by answer extraction version {min(self.extraction)} and this "
                    f"checkout scores with version {current} (neuroada_recipes.tasks.ANSWER_EXTRACTION_VERSION): a "
                    f"table would mix the two. Finish that comparison from a checkout of its code "
                    f"({newest or 'see the runs'}; `git worktree add <dir> <commit>`, then --out pointing here), or "
                    "start a new one with another --out.")
            command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"run {spec} failed:\n{result.stderr[-3000:]}")
            self.done[key] = json.loads(result.stdout.strip().splitlines()[-1])
            self.specs.append(spec)
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"spec": spec, "result": self.done[key]}) + "\n")
        return self.done[key]

    def seconds(self, base: dict) -> float:
        """Wall time of every run made at these sizes (sweeps included), as recorded by each run."""
        sizes = [base[k] for k in self.SIZE_KEYS[:6]]
        return sum(self.done[self._key(spec)].get("wall_seconds", 0.0) for spec in self.specs
                   if [spec[k] for k in self.SIZE_KEYS[:6]] == sizes)

    def finished(self, base: dict, method: str) -> dict:
        """Validation scores of the runs made so far for ``method`` at these sizes, by (rate, seed)."""
        sizes = [base[k] for k in self.SIZE_KEYS[:6]]
        return {(spec["lr"], spec["seed"]): self.done[self._key(spec)]["scores"]["validation"] for spec in self.specs
                if spec["method"] == method and [spec[k] for k in self.SIZE_KEYS[:6]] == sizes
                and "scores" in self.done[self._key(spec)]}


MAX_EXTENSIONS = 4  # bounds the run time; a best rate still at the edge after these is reported as such


def sweep(runs: Runs, base: dict, method: str, rates: list[float], log) -> tuple[float, dict]:
    """Best validation rate on seed 0; widens the sweep by one log-step past whichever edge wins, until it is
    interior."""
    results = {}
    rates = sorted(rates)
    for _ in range(MAX_EXTENSIONS + 1):
        for lr in rates:
            if lr not in results:
                results[lr] = runs.get(dict(base, method=method, lr=lr, seed=0))
                if "not_applicable" in results[lr]:
                    raise NotApplicable(results[lr]["not_applicable"])
                curve = ", ".join(f"step {s}: {v:.4f}" for s, v in results[lr]["validation_curve"].items())
                log(f"  {method} lr={lr:g}: validation {curve}")
        best = max(sorted(results), key=lambda r: results[r]["scores"]["validation"])  # ties: the lowest rate
        ordered = sorted(results)
        ratio = ordered[1] / ordered[0] if len(ordered) > 1 else 3.0
        if best == ordered[0] and best / ratio >= 1e-6:
            rates = [best / ratio] + ordered
        elif best == ordered[-1] and best * ratio <= 1.0:
            rates = ordered + [best * ratio]
        else:
            return best, results
    log(f"  {method}: best rate {best:g} still at the edge after {MAX_EXTENSIONS} extensions")
    return best, results


def compare(task: str, quick: bool, seeds: list[int], methods: list[str], out: str, overrides: dict,
            threads: int | None, report_only: bool = False, fixed_rates: dict | None = None,
            wide: bool = False) -> None:
    spec = {**TASKS[task], **(QUICK if quick else {}), **overrides}  # later ones win: --quick, then --steps etc.
    name = f"{task}{'-quick' if quick else ''}"
    base = dict(spec, scratch=os.path.join(out, "scratch", name), threads=threads)
    os.makedirs(out, exist_ok=True)
    runs = Runs(os.path.join(out, f"{name}.runs.jsonl"), launch_missing=not report_only)

    def log(line):
        print(line, flush=True)
        if not report_only:  # a report adds nothing to the run log
            with open(os.path.join(out, f"{name}.log"), "a") as handle:
                handle.write(line + "\n")

    log(f"# {task}: {spec}, seeds {seeds}")
    rows, unfinished, not_applicable = {}, [], {}
    for method in methods:
        default_row = None
        try:
            if method.startswith("zero-shot"):  # nothing trained: one run, no rate, no seeds
                best = 0.0
                swept = {best: runs.get(dict(base, method=method, lr=best, seed=0))}
                if "not_applicable" in swept[best]:
                    raise NotApplicable(swept[best]["not_applicable"])
                finals = [swept[best]]
            else:
                if method in (fixed_rates or {}):  # a follow-up at a rate chosen earlier: no sweep
                    best = fixed_rates[method]
                    swept = {best: runs.get(dict(base, method=method, lr=best, seed=0))}
                else:
                    rates = (WIDE_SWEEPS if wide else SWEEPS)[method]
                    best, swept = sweep(runs, base, method, rates[:2] if quick else rates, log)
                # seed 0 at the best rate is the sweep's own run: its test score was computed alongside, never
                # looked at
                finals = [runs.get(dict(base, method=method, lr=best, seed=seed)) for seed in seeds]
                rule = rule_rate(method, spec["recipe"])
                if rule is not None and not quick:  # what a user gets without a sweep: the library's default
                    try:
                        ruled = runs.get(dict(base, method=method, lr=rule, seed=0))
                        default_row = {"lr": rule, "validation": ruled["scores"]["validation"],
                                       "test": ruled["scores"]["test"]}
                    except MissingRun:  # a report before the default-rate run: the method's row stands without it
                        default_row = None
        except MissingRun:
            unfinished.append((method, runs.finished(base, method)))
            continue
        except NotApplicable as reason:
            log(f"{method}: not applicable: {reason}")
            not_applicable[method] = str(reason)
            continue
        scores = [r["scores"]["test"] for r in finals]
        halfway = [list(r["validation_curve"].values()) for r in finals]
        rows[method] = {"lr": best, "swept": {f"{lr:g}": r["scores"]["validation"] for lr, r in sorted(swept.items())},
                        "test": scores, "mean": statistics.mean(scores),
                        "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                        "validation_halfway_to_end": halfway, **{k: finals[0][k] for k in (
                            "metric_name", "trainable", "total", "coverage")},
                        "train_seconds": statistics.mean(r["train_seconds"] for r in finals),
                        "adapt_seconds": statistics.mean(r.get("adapt_seconds", float("nan")) for r in finals),
                        "peak_gb": max(r["peak_gb"] for r in finals),
                        "test_hits": [r.get("test_hits") for r in finals], "default_rate": default_row,
                        # every rate run on seed 0 at these sizes (a sweep may have visited fewer): for --plot
                        "validation_by_rate": {f"{lr:g}": v for (lr, seed), v in sorted(
                            runs.finished(base, method).items()) if seed == 0}}
        log(f"{method}: lr {best:g}, test {rows[method]['mean']:.4f} +- {rows[method]['std']:.4f}")
    twin_free = twin_free_test_examples(spec) if REFERENCE in rows else None
    add_paired_differences(rows, twin_free)
    hours = runs.seconds(base) / 3600
    with open(os.path.join(out, f"{name}.json"), "w") as handle:
        json.dump({"task": task, "spec": spec, "seeds": seeds, "threads": threads, "run_hours": hours,
                   "methods": {m: {k: v for k, v in row.items() if k != "test_hits"} for m, row in rows.items()},
                   "unfinished": {m: {f"lr {lr:g}, seed {seed}": v for (lr, seed), v in done.items()}
                                  for m, done in unfinished}, "not_applicable": not_applicable}, handle, indent=2)
    table = markdown(task, spec, seeds, rows)
    for method, reason in not_applicable.items():
        table += f"\n{method}: not applicable ({reason}).\n"
    if unfinished:
        table += "\nNot finished in the time given (sweep or seeds incomplete); validation so far:\n"
        for method, done in unfinished:
            scores = ", ".join(f"lr {lr:g} seed {seed}: {v:.3f}" for (lr, seed), v in sorted(done.items())) or "none"
            table += f"- {method}: {scores}\n"
    with open(os.path.join(out, f"{name}.md"), "w") as handle:
        handle.write(table)
    print(table)


def rule_rate(method: str, recipe: str) -> float | None:
    """The learning rate ``neuroada.suggested_learning_rate`` gives a NeuroAda method on a recipe's task (None for
    the other methods)."""
    if not method.startswith("neuroada-k"):
        return None
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    # the library's rule, without importing torch
    from neuroada_recipes.recipes import PEFT_TASK_TYPES, RECIPES, suggested_learning_rate

    task_type = PEFT_TASK_TYPES[RECIPES[recipe]["task"]]
    return float(f"{suggested_learning_rate(neuroada_k_and_selection(method)[0], task_type):.6g}")


def paired_difference(hits: list[list[int]], reference_hits: list[list[int]], resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> dict:
    """Mean over test examples of (method - reference), each side first averaged over its own seeds, with two
    percentile bootstrap 95% intervals:

    - ``low``/``high`` resample the test examples only (the seeds stay paired with their examples): how sure the
      difference is for these trained models;
    - ``seeds_low``/``seeds_high`` resample each side's seeds too (independently, with replacement), so the interval
      also holds training noise: what another set of seeds could give. With three seeds a crude estimate, but not
      an interval that treats the trained models as fixed."""
    import numpy as np

    method_hits, reference = np.asarray(hits, float), np.asarray(reference_hits, float)
    per_example = method_hits.mean(axis=0) - reference.mean(axis=0)
    examples = len(per_example)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, examples, size=(resamples, examples))
    means = per_example[draws].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    # the same example draws, as counts; each seed's score on a draw is then one dot product
    counts = np.zeros((resamples, examples))
    np.add.at(counts, (np.repeat(np.arange(resamples), examples), draws.ravel()), 1.0)
    seed_rng = np.random.default_rng(seed + 1)
    sides = []
    for side in (method_hits, reference):
        per_seed = counts @ side.T / examples  # [resamples, seeds]
        picked = seed_rng.integers(0, side.shape[0], size=(resamples, side.shape[0]))
        sides.append(np.take_along_axis(per_seed, picked, axis=1).mean(axis=1))
    seeds_low, seeds_high = np.percentile(sides[0] - sides[1], [2.5, 97.5])
    return {"difference": float(per_example.mean()), "low": float(low), "high": float(high),
            "seeds_low": float(seeds_low), "seeds_high": float(seeds_high), "examples": examples}


def add_paired_differences(rows: dict, twin_free: list[bool] | None = None) -> None:
    """``row["vs_reference"]`` for every method whose runs recorded per-example hits, as the reference's did; with
    ``twin_free`` (a mask over the test examples, see :func:`twin_free_test_examples`) also
    ``row["vs_reference_twin_free"]``, the same on those examples only."""
    reference = rows.get(REFERENCE)
    if reference is None or not all(reference["test_hits"]):
        return
    for method, row in rows.items():
        if method != REFERENCE and all(row["test_hits"]):
            row["vs_reference"] = paired_difference(row["test_hits"], reference["test_hits"])
            if twin_free is not None:
                keep = [i for i, kept in enumerate(twin_free) if kept]
                row["vs_reference_twin_free"] = paired_difference([[h[i] for i in keep] for h in row["test_hits"]],
                                                                  [[h[i] for i in keep] for h in reference["test_hits"]])


def canonical_problem(recipe: str, question: str):
    """The problem a generated question asks, whatever its wording: "3 + 5" and "5 + 3" (two terms, + or *), the
    same animals listed in another order. Other questions are their own canonical form."""
    import re

    if recipe == "smollm2-legs":
        listed = re.search(r"if you have (.*)\?", question)
        return tuple(sorted(listed.group(1).split(", "))) if listed else question
    if recipe == "smollm2-arithmetic" and question.startswith("Calculate "):
        terms = question[len("Calculate "):].rstrip(".").split(" ")
        if len(terms) == 3 and terms[1] in ("+", "*"):
            return (terms[1], *sorted((terms[0], terms[2])))
    return question


def twin_free_test_examples(spec: dict) -> list[bool] | None:
    """For the generated tasks: which test problems have no twin (the same problem in other words, see
    :func:`canonical_problem`) among the training problems the runs draw from, nor inside the test split. The split
    deduplicates exact strings only, so a twin of a test problem can be trained on. None for other tasks."""
    import collections

    if spec["recipe"] not in ("smollm2-arithmetic", "smollm2-legs"):
        return None
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from neuroada_recipes.cli import TaskRun

    splits = TaskRun(_task_arguments(spec))._splits(0, test_only=False)  # as run_one: the first rows validate
    trained = {canonical_problem(spec["recipe"], q) for q in splits.train["instruction"][spec["validation"]:]}
    tested = [canonical_problem(spec["recipe"], q) for q in splits.test["instruction"]]
    repeats = collections.Counter(tested)
    return [problem not in trained and repeats[problem] == 1 for problem in tested]


def markdown(task, spec, seeds, rows) -> str:
    metric = next(iter(rows.values()))["metric_name"] if rows else "metric"
    lines = [f"### {task}: {metric} on {spec['test']} test examples, mean +- std over seeds {seeds}", "",
             f"{spec['steps']} steps of batch {spec['batch']}, {spec['train']} training and {spec['validation']} "
             "validation examples; learning rate chosen on validation, seed 0. Paired difference with "
             f"{REFERENCE} in points (each example's score averaged over seeds; bootstrap over the test examples, "
             f"{BOOTSTRAP_RESAMPLES:,} resamples; \"seeds too\": resampling each side's seeds as well, so that the "
             "interval also holds training noise).", "",
             f"| method | {metric} | vs {REFERENCE}, paired (95% CI) | trainable | share | best lr (validation at each "
             "swept rate) | validation half-way -> end (per seed) | train s | peak GB | neurons / inputs covered |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, row in rows.items():
        coverage = row["coverage"]
        covered = "-" if coverage is None else (
            f"{coverage['neurons']:,}/{coverage['neurons_total']:,} / {coverage['positions']:,}/"
            f"{coverage['positions_total']:,}")
        swept = ", ".join(f"{lr}: {score:.3f}" for lr, score in row["swept"].items())
        rate = "-" if method.startswith("zero-shot") else f"{row['lr']:g} ({swept})"
        curves = "; ".join(" -> ".join(f"{v:.3f}" for v in curve) for curve in row["validation_halfway_to_end"])
        paired = row.get("vs_reference")
        versus = "-" if paired is None else (
            f"{100 * paired['difference']:+.1f} [{100 * paired['low']:+.1f}, {100 * paired['high']:+.1f}]"
            + (f"; seeds too [{100 * paired['seeds_low']:+.1f}, {100 * paired['seeds_high']:+.1f}]"
               if "seeds_low" in paired else ""))
        lines.append(f"| {method} | {row['mean']:.4f} +- {row['std']:.4f} | {versus} | {row['trainable']:,} | "
                     f"{100 * row['trainable'] / row['total']:.3f}% | {rate} | {curves or '-'} | "
                     f"{row['train_seconds']:.0f} | {row['peak_gb']:.2f} | {covered} |")
    twin_free = {m: row["vs_reference_twin_free"] for m, row in rows.items() if "vs_reference_twin_free" in row}
    if twin_free:
        examples = next(iter(twin_free.values()))["examples"]
        lines += ["", f"The same paired differences on the {examples} test problems that have no twin (the same "
                  "problem in other words: the operands of a two-term + or * swapped, the same animals in another "
                  "order) among the training problems or inside the test split: "
                  + "; ".join(f"{m} {100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
                              for m, d in twin_free.items()) + "."]
    calibrated = {m: row for m, row in rows.items() if m.startswith("neuroada-k") and m.count("-") == 2}
    if calibrated:
        lines += ["", f"Data-aware selections are calibrated on {CALIBRATION_BATCHES} training batches; seconds to "
                  "build the adapter (selection and calibration included), mean over seeds: " + ", ".join(
                      f"{m} {row['adapt_seconds']:.1f}" for m, row in calibrated.items())
                  + "; magnitude: " + (", ".join(f"{m} {row['adapt_seconds']:.1f}" for m, row in rows.items()
                                                 if m.startswith("neuroada-k") and m.count("-") == 1
                                                 and row["adapt_seconds"] == row["adapt_seconds"])  # not NaN
                                       or "not recorded (runs made before build times were)") + "."]
    ruled = {m: row for m, row in rows.items() if row.get("default_rate")}
    if ruled:
        lines += ["", "The default learning rate (`neuroada.suggested_learning_rate(k, task_type)`, no sweep) against the swept "
                  "best, seed 0:", "", "| method | default rate | validation at default | best swept rate | "
                  "validation at best | test at default | test at best |", "|---|---|---|---|---|---|---|"]
        for method, row in ruled.items():
            default, best_validation = row["default_rate"], row["swept"][f"{row['lr']:g}"]
            lines.append(f"| {method} | {default['lr']:.3g} | {default['validation']:.3f} | {row['lr']:g} | "
                         f"{best_validation:.3f} | {default['test']:.3f} | {row['test'][0]:.3f} |")
    return "\n".join(lines) + "\n"


def plot_sensitivity(out: str, tasks: list[str], path: str) -> None:
    """One panel per task: each method's validation score (seed 0) at every rate it was run at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = [t for t in tasks if os.path.exists(os.path.join(out, f"{t}.json"))]
    if not found:
        raise SystemExit(f"no <task>.json in {out} for {tasks}: run the comparisons (or --report-only) first")
    figure, axes = plt.subplots(1, len(found), figsize=(5.5 * len(found), 4.2), squeeze=False)
    for axis, task in zip(axes[0], found):
        with open(os.path.join(out, f"{task}.json")) as handle:
            report = json.load(handle)
        curves = {m: {float(lr): v for lr, v in row.get("validation_by_rate", row["swept"]).items()}
                  for m, row in report["methods"].items() if not m.startswith("zero-shot")}
        for method, done in report.get("unfinished", {}).items():  # "lr 0.01, seed 0": score
            curves[method] = {float(key.split(",")[0].split()[1]): v for key, v in done.items() if key.endswith("seed 0")}
        for method, points in curves.items():
            if points:
                rates = sorted(points)
                axis.plot(rates, [points[r] for r in rates], marker="o", label=method,
                          color=plt.get_cmap("tab20")(METHODS.index(method) % 20))  # one colour per method
        if "zero-shot" in report["methods"]:
            zero_shot = next(iter(report["methods"]["zero-shot"]["swept"].values()))  # its validation score
            axis.axhline(zero_shot, color="grey", linestyle=":", label="zero-shot")
        axis.set_xscale("log")
        axis.set_xlabel("learning rate")
        axis.set_ylabel(f"validation {next(iter(report['methods'].values()))['metric_name']}"
                        if report["methods"] else "validation")
        axis.set_title(f"{task} ({report['spec']['steps']} steps)")
        axis.grid(alpha=0.3)
    labels = {}
    for axis in axes[0]:  # one legend for all panels, beside them (methods differ between tasks)
        for handle, label in zip(*axis.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    figure.legend(list(labels.values()), list(labels), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="minilm-sentiment")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two rates, one seed: minutes")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--out", default="docs/results")
    for size in ("steps", "batch", "train", "validation", "test"):
        parser.add_argument(f"--{size}", type=int, help=f"override the task's {size}")
    parser.add_argument("--threads", type=int, help="torch threads per run (two comparisons can share a machine)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the table from the runs already made (<out>/<task>.runs.jsonl), launch nothing")
    parser.add_argument("--fixed-rate", nargs="+", default=[], metavar="METHOD=LR",
                        help="skip the sweep for these methods (e.g. a longer follow-up at the rates a sweep chose)")
    parser.add_argument("--wide-sweeps", action="store_true",
                        help="start every sweep at four rates (a 30x range), for the sensitivity plot")
    parser.add_argument("--plot", metavar="PNG", help="draw validation score against learning rate from the "
                        "<out>/<task>.json files of --tasks-to-plot, then exit")
    parser.add_argument("--tasks-to-plot", nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))))
        return
    if args.plot:
        plot_sensitivity(args.out, args.tasks_to_plot, args.plot)
        return
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    overrides = {k: getattr(args, k) for k in ("steps", "batch", "train", "validation", "test") if getattr(args, k)}
    fixed = {m: float(lr) for m, lr in (item.split("=") for item in args.fixed_rate)}
    compare(args.task, args.quick, seeds, args.methods, args.out, overrides, args.threads, args.report_only, fixed,
            args.wide_sweeps)


if __name__ == "__main__":
    main()
