"""The two task kinds of the recipes: sequence classification and instruction tuning of a causal LM.

Each task turns raw records into model inputs and evaluates a model on held-out records:
- classification: accuracy (and macro F1, or Matthews correlation for CoLA-like metrics) from one forward pass;
- instruction: the prompt of the paper's math_10k / commonsense_170k scripts, loss on the response tokens only,
  evaluation by greedy generation and answer extraction (the last number, or an option label).
"""

from __future__ import annotations

import re

import numpy as np
import torch
from tqdm.auto import tqdm

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    "### Response:\n"
)
# Option answers. commonsense_170k's answers are tokens such as answer2 / solution1 / option2 / ending4, true/false;
# LLM-Adapters reads the first token of the data set's kind from a generation, case-sensitively.
OPTION_TOKEN = re.compile(r"(answer|solution|option|ending)\d+")
TRUE_FALSE = re.compile(r"\b(true|false)\b", re.IGNORECASE)
# Letters A-E only as capitals (IGNORECASE read the article "a" as option A): after "answer is" / "answer:" or in
# parentheses first, else the first capital letter standing alone.
MARKED_LETTER = re.compile(r"(?i:\banswer\s*(?:is\s*:?|:))\s*\(?([A-E])\b|\(([A-E])\)")
BARE_LETTER = re.compile(r"\b([A-E])\b")
OPTION_NUMBER = re.compile(r"\b(?:answer|option|solution)?\s*([1-5])\b", re.IGNORECASE)
# A number: digits with thousands separators only in groups of three ("1,234"; "1,2,3" is a list), a fraction
# with or without its leading zero (".5"), and a minus sign only where no digit, letter or ")" precedes it ("3-5" is
# a range, not -5).
NUMBER = re.compile(r"(?:(?<![\w).])-)?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?:\.\d+)?(?<=\d)")
# The prompt's own section headers: a model that writes one has started a new example, and its answer has ended.
NEW_SECTION = re.compile(r"###\s*(?:Instruction|Input|Response)\s*:")
# Which extraction scored a generation. Bump it with every change to what extract_answer reads or answers_match
# accepts: benchmarks/compare_methods.py refuses to mix runs scored by different versions in one table.
ANSWER_EXTRACTION_VERSION = 2


# --------------------------------------------------------------------------------------------------- classification


def encode_classification(batch, tokenizer, text_column, text_pair_column, max_length):
    texts = [str(t) for t in batch[text_column]]
    pairs = [str(t) for t in batch[text_pair_column]] if text_pair_column else None
    return tokenizer(texts, pairs, truncation=True, max_length=max_length)


def classification_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro F1 and Matthews correlation of class predictions."""
    classes = np.unique(np.concatenate([labels, predictions]))
    f1s = []
    for c in classes:
        tp = np.sum((predictions == c) & (labels == c))
        precision = tp / max(np.sum(predictions == c), 1)
        recall = tp / max(np.sum(labels == c), 1)
        f1s.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return {
        "accuracy": float(np.mean(predictions == labels)),
        "f1": float(np.mean(f1s)),
        "matthews": _matthews(predictions, labels, classes),
    }


def _matthews(predictions, labels, classes) -> float:
    confusion = np.array([[np.sum((labels == a) & (predictions == b)) for b in classes] for a in classes], float)
    t, p, c, s = confusion.sum(1), confusion.sum(0), np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denominator) if denominator else 0.0


@torch.no_grad()
def evaluate_classifier(model, dataset, collator, batch_size: int = 64, desc: str = "evaluating",
                        per_example: bool = False) -> dict:
    """Accuracy, macro F1 and Matthews correlation; with ``per_example``, also ``hits``: 1/0 per example, in order
    (paired comparisons between methods on the same examples need them)."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    predictions, labels = [], []
    device = next(model.parameters()).device
    for batch in tqdm(loader, desc=desc, leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels.append(batch.pop("labels").cpu().numpy())
        predictions.append(model(**batch).logits.argmax(-1).cpu().numpy())
    predictions, labels = np.concatenate(predictions), np.concatenate(labels)
    metrics = classification_metrics(predictions, labels)
    if per_example:
        metrics["hits"] = (predictions == labels).astype(int).tolist()
    return metrics


# ------------------------------------------------------------------------------------------------------ instruction


def prompt_for(record) -> str:
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT.format(instruction=record["instruction"])


def encode_instruction(record, tokenizer, max_length):
    """Prompt + response + EOS; labels are -100 on the prompt, so the loss covers the response only."""
    prompt = tokenizer(prompt_for(record), add_special_tokens=False)["input_ids"]
    response = tokenizer(str(record["output"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt + response)[:max_length]
    labels = ([-100] * len(prompt) + response)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def extract_answer(text: str, kind: str, expected: str | None = None) -> str | None:
    """The answer a generation gives, read up to the first prompt section header it writes ("### Instruction:",
    "### Input:", "### Response:"): the last number (``kind="number"``; ``expected`` is not used), its first
    non-empty line as text (``kind="text"``, normalised by :func:`normalised_text`) or the first option label,
    lower-case. ``expected``, the record's answer, says which kind of option label to read: its
    answerN / solutionN / optionN / endingN token, true/false, a letter A-E or a number 1-5 (without it: the first
    of these kinds that the generation holds)."""
    text = NEW_SECTION.split(text, maxsplit=1)[0]
    if kind == "number":
        numbers = NUMBER.findall(text)
        if not numbers:
            return None
        value = float(numbers[-1].replace(",", ""))
        return str(int(value)) if value.is_integer() else str(value)
    if kind == "text":
        lines = [line for line in text.splitlines() if line.strip()]
        return normalised_text(lines[0]) if lines else None
    expected = str(expected).strip().lower() if expected is not None else ""
    token = OPTION_TOKEN.fullmatch(expected)
    if token:  # the first token of the answer's kind, as LLM-Adapters' evaluation reads it
        match = re.search(rf"\b{token.group(1)}\d+\b", text)
        return match.group(0) if match else None
    if expected in ("true", "false"):
        return _true_false(text)
    if expected in ("a", "b", "c", "d", "e"):
        return _letter(text)
    if expected.isdigit():
        return _option_number(text)
    for reader in (_option_token, _true_false, _letter, _option_number):
        found = reader(text)
        if found is not None:
            return found
    return None


def _option_token(text: str) -> str | None:
    match = re.search(rf"\b{OPTION_TOKEN.pattern}\b", text)
    return match.group(0) if match else None


def _true_false(text: str) -> str | None:
    match = TRUE_FALSE.search(text)
    return match.group(1).lower() if match else None


def _letter(text: str) -> str | None:
    match = MARKED_LETTER.search(text) or BARE_LETTER.search(text)
    return next(group for group in match.groups() if group).lower() if match else None


def _option_number(text: str) -> str | None:
    match = OPTION_NUMBER.search(text)
    return match.group(1) if match else None


def normalised_text(text: str) -> str:
    """A free-text answer as compared: case-folded, inner whitespace collapsed, without surrounding quotes and a
    final full stop, exclamation or question mark ("Paris." and "paris" are the same answer)."""
    text = " ".join(str(text).split()).casefold()
    return text.strip("\"'`").rstrip(".!?").strip()


def answer_readable(answer, kind: str) -> bool:
    """Whether a record's ``answer`` can ever be counted correct with ``kind``: a generation that is exactly the
    answer would be (a number for "number", not "1/2" or "nan"; a label of a known kind for "option":
    answerN/solutionN/optionN/endingN, true/false, A-E, 1-5; any non-empty text for "text")."""
    if answer is None or not str(answer).strip():
        return False
    return answers_match(extract_answer(str(answer), kind, str(answer)), str(answer), kind)


def answers_match(predicted: str | None, expected: str, kind: str) -> bool:
    if predicted is None:
        return False
    if kind == "text":
        return predicted == normalised_text(expected)
    if kind == "number":
        try:
            return abs(float(predicted) - float(str(expected).replace(",", ""))) < 1e-6
        except ValueError:
            return False
    return predicted == str(expected).strip().lower()


@torch.no_grad()
def evaluate_generation(model, tokenizer, records, answer_kind: str, batch_size: int = 16,
                        max_new_tokens: int = 16, desc: str = "generating", per_example: bool = False) -> dict:
    """Exact match of the extracted answer by greedy decoding; also returns a few examples for the report and, with
    ``per_example``, ``hits``: 1/0 per record, in order."""
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every prompt
    device = next(model.parameters()).device
    hits, examples = [], []
    try:
        for start in tqdm(range(0, len(records), batch_size), desc=desc, leave=False):
            chunk = records[start : start + batch_size]
            inputs = tokenizer([prompt_for(r) for r in chunk], return_tensors="pt", padding=True,
                               add_special_tokens=False, return_token_type_ids=False).to(device)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for record, text in zip(chunk, texts):
                predicted = extract_answer(text, answer_kind, record["answer"])
                hit = answers_match(predicted, record["answer"], answer_kind)
                hits.append(int(hit))
                if len(examples) < 5:
                    examples.append({"question": record["instruction"], "generated": text.strip(),
                                     "expected": record["answer"], "correct": hit})
    finally:
        tokenizer.padding_side = padding_side
    metrics = {"exact_match": sum(hits) / max(len(records), 1), "examples": examples}
    if per_example:
        metrics["hits"] = hits
    return metrics
