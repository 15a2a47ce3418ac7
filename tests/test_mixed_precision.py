"""bf16 bases and autocast: deltas stay float32, small updates survive, merge casts once."""

import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from neuroada import NeuroAdaConfig, NeuroAdaLayer
from conftest import tiny_llama


def test_bf16_base_keeps_fp32_deltas_and_trains(tokens):
    model = get_peft_model(tiny_llama().to(torch.bfloat16), NeuroAdaConfig(k=2))
    deltas = [m.neuroada_delta["default"] for m in model.modules() if isinstance(m, NeuroAdaLayer)]
    assert all(d.dtype == torch.float32 for d in deltas)
    model.train()
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    assert all(d.grad is not None and d.grad.dtype == torch.float32 and d.grad.abs().sum() > 0 for d in deltas)


def test_autocast_matches_fp32_within_bf16_precision(tokens):
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2, init_weights=False))
    with torch.no_grad():
        reference = model(tokens).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(tokens).logits
        with model.disable_adapter():
            base = model(tokens).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                base_autocast = model(tokens).logits
    # A few bf16 roundings of the logits' scale (measured: 0.0017 at scale 0.4, i.e. under one 2^-8 step).
    tolerance = 4 * 2**-8 * reference.abs().max().item()
    torch.testing.assert_close(autocast.float(), reference, atol=tolerance, rtol=0)
    # What the adapter adds survives autocast (its effect, about half the logits' scale, is not rounded away).
    effect = reference - base
    assert effect.abs().max() > 20 * tolerance
    torch.testing.assert_close(autocast.float() - base_autocast.float(), effect, atol=tolerance, rtol=0)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens, labels=tokens).loss.backward()
    grads = [m.neuroada_delta["default"].grad for m in model.modules() if isinstance(m, NeuroAdaLayer)]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


def test_trainer_bf16_flag(tmp_path):
    examples = [{"input_ids": ids, "labels": ids}
                for ids in torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(0))]
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=1))
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, max_steps=2,
                             per_device_train_batch_size=4, learning_rate=5e-2, report_to=[], save_strategy="no")
    Trainer(model=model, args=args, train_dataset=examples).train()
    deltas = [m.neuroada_delta["default"] for m in model.modules() if isinstance(m, NeuroAdaLayer)]
    assert all(d.dtype == torch.float32 and d.abs().sum() > 0 for d in deltas)


def test_compiled_model_matches_eager(tokens):
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2, init_weights=False))
    model.train()
    eager_loss = model(tokens, labels=tokens).loss
    eager_grads = torch.autograd.grad(eager_loss, [p for p in model.parameters() if p.requires_grad])
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(tokens, labels=tokens).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
