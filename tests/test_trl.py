"""NeuroAda inside TRL: SFTTrainer and DPOTrainer create it from ``peft_config=NeuroAdaConfig(...)`` as they do LoRA."""

import os

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaForCausalLM

from neuroada import NeuroAdaConfig, NeuroAdaLayer

trl = pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[trl]')")
datasets = pytest.importorskip("datasets")
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

BACKENDS = ["auto", "fused", "gather", "dense", "triton"]

# A minimal chat template: the tiny models' tokenizer (MiniLM's) has none.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def run_args(config_cls, output_dir, **overrides):
    defaults = dict(output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=5e-2, max_steps=3,
                    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    defaults.update(overrides)
    return config_cls(**defaults)


def text_dataset():
    return datasets.Dataset.from_list([{"text": f"{a} plus {b} is {a + b}."} for a in range(8) for b in range(4)])


def conversational_dataset():
    return datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                      {"role": "assistant", "content": f"{a + b}."}]}
        for a in range(8) for b in range(4)
    ])


def preference_dataset():
    return datasets.Dataset.from_list([
        {"prompt": f"{a} plus {b} is", "chosen": f" {a + b}.", "rejected": f" {a + b + 3}."}
        for a in range(4) for b in range(4)
    ])


def neuroada_layers(model):
    return [m for m in model.modules() if isinstance(m, NeuroAdaLayer)]


def plain_forward(trainer):
    """The trained PeftModel without the autocast wrapper that accelerate puts around its forward for bf16 runs."""
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)


# ---------------------------------------------------------------------------------------------------------- SFT


@pytest.mark.parametrize("data, packing, checkpointing", [
    ("text", False, False), ("text", True, True), ("conversational", False, True), ("conversational", True, False),
])
def test_sft_trains_only_the_deltas_and_saves_an_adapter_peft_reloads(tiny_llama_dir, tmp_path, data, packing,
                                                                      checkpointing):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    dataset = text_dataset() if data == "text" else conversational_dataset()
    if data == "conversational":
        tokenizer.chat_template = CHAT_TEMPLATE
    args = run_args(SFTConfig, tmp_path, packing=packing, max_length=64, gradient_checkpointing=checkpointing)
    trainer = SFTTrainer(model=LlamaForCausalLM.from_pretrained(tiny_llama_dir), args=args, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=NeuroAdaConfig(k=2))
    model = trainer.model
    layers = neuroada_layers(model)
    assert len(layers) == 2 * 7  # all-linear: q, k, v, o, gate, up, down in both blocks; never lm_head
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".neuroada_delta." in name for name in trainable)
    assert model.get_nb_trainable_parameters()[0] == sum(layer.out_features * 2 for layer in layers)
    if packing:
        assert len(trainer.train_dataset) < len(dataset)  # several examples per packed row
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    trainer.train()

    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable  # every delta moved, nothing else did
    if checkpointing:
        assert model.base_model.model.is_gradient_checkpointing
    folder = tmp_path / "adapter"
    trainer.save_model(str(folder))
    assert not (folder / "model.safetensors").exists()
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
        assert {key.rsplit(".", 1)[-1] for key in handle.keys()} == {"neuroada_delta", "neuroada_indices",
                                                                "neuroada_base_values"}
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama_dir), str(folder)).eval()
    trained = plain_forward(trainer).eval()
    tokens = torch.tensor([tokenizer("3 plus 4 is 7.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, trained(tokens).logits)


def test_sft_chat_template_with_new_tokens_trains_their_embedding_rows(tiny_llama_dir, tmp_path):
    """``chat_template_path`` copies a template whose special tokens the tokenizer lacks; TRL then asks the PEFT
    config for ``trainable_token_indices`` (and adds lm_head to ``modules_to_save``)."""
    source = AutoTokenizer.from_pretrained(tiny_llama_dir)
    source.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    source.eos_token = "<|im_end|>"
    source.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    source.save_pretrained(tmp_path / "chatml")
    config = NeuroAdaConfig(k=1)
    args = run_args(SFTConfig, tmp_path, max_length=64, chat_template_path=str(tmp_path / "chatml"))
    trainer = SFTTrainer(model=LlamaForCausalLM.from_pretrained(tiny_llama_dir), args=args,
                         train_dataset=conversational_dataset(),
                         processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir), peft_config=config)
    new_ids = trainer.processing_class.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert set(new_ids) <= set(config.trainable_token_indices["embed_tokens"])
    model = trainer.model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in model.named_parameters() if name in trainable}
    trainer.train()
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters() if name in trainable)
    assert any("trainable_tokens_delta" in name for name in trainable)
    assert sum(".neuroada_delta." in name for name in trainable) == 14

    trainer.save_model(str(tmp_path / "adapter"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    base = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    base.resize_token_embeddings(len(tokenizer))
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    tokens = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "what is 1 plus 2?"}],
                                                         add_generation_prompt=True, tokenize=True)["input_ids"]])
    assert set(new_ids) <= set(tokens[0].tolist())
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, plain_forward(trainer).eval()(tokens).logits)


def test_sft_on_a_4bit_base(tiny_llama_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=quantization, device_map="cpu")
    base = prepare_model_for_kbit_training(base)
    args = run_args(SFTConfig, tmp_path, max_length=64, gradient_checkpointing=True)
    trainer = SFTTrainer(model=base, args=args, train_dataset=text_dataset(),
                         processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir),
                         peft_config=NeuroAdaConfig(k=1))
    # TRL casts the trainable parameters to bf16 on a quantized base (its QLoRA convention); the README's way back
    # to float32 deltas, before the optimizer exists:
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    deltas = [layer.neuroada_delta["default"] for layer in neuroada_layers(trainer.model)]
    assert len(deltas) == 14 and all(layer.quantization == "4bit" for layer in neuroada_layers(trainer.model))
    trainer.train()
    assert all(delta.abs().sum() > 0 and delta.dtype == torch.float32 for delta in deltas)
    trainer.save_model(str(tmp_path / "adapter"))
    # The adapter of a quantized base loads on the unquantized base too (e.g. to merge there). Selection ran on the
    # dequantised weights, so the unquantized base would select otherwise: the stored indices are used, with a word
    # saying that this is expected of a quantized training base (not that it is another base).
    with pytest.warns(UserWarning, match="trained on a 4bit quantized base.*as expected"):
        reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama_dir),
                                             str(tmp_path / "adapter"))
    for layer, delta in zip(neuroada_layers(reloaded), deltas):
        assert torch.equal(layer.neuroada_delta["default"], delta.detach())


# ---------------------------------------------------------------------------------------------------------- DPO


def dpo_trainer(model, tmp_path, peft_config=None, **overrides):
    overrides.setdefault("per_device_train_batch_size", 8)
    args = run_args(DPOConfig, tmp_path, **overrides)
    tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path)
    return DPOTrainer(model=model, args=args, train_dataset=preference_dataset(), processing_class=tokenizer,
                      peft_config=peft_config)


def sequence_logps(model, batch):
    """Summed completion log-probabilities, computed the way DPOTrainer computes them."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    fused_lm_head=True, use_cache=False)
    return out.log_probs.sum(1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_reference_is_the_base_model_in_every_backend_merged_or_not(tiny_llama_dir, tmp_path, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    # random deltas, so that an adapter left on would show; fp32 so that "fused" really runs fused on CPU
    config = NeuroAdaConfig(k=2, init_weights=False, bypass_backend=backend)
    trainer = dpo_trainer(LlamaForCausalLM.from_pretrained(tiny_llama_dir), tmp_path, config, bf16=False,
                          per_device_train_batch_size=2)
    assert trainer.ref_model is None  # TRL uses the policy with the adapter disabled
    base = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    add_fused_lm_head(base)
    model = trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    expected = sequence_logps(base, batch)
    adapted = sequence_logps(model, batch)
    assert (adapted - expected).abs().max() > 1e-2

    torch.testing.assert_close(torch.cat(trainer.compute_ref_log_probs(model, batch)), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(sequence_logps(model, batch), adapted, rtol=0, atol=1e-5)

    model.merge_adapter()
    assert all(layer.merged for layer in neuroada_layers(model))
    torch.testing.assert_close(torch.cat(trainer.compute_ref_log_probs(model, batch)), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(sequence_logps(model, batch), adapted, rtol=0, atol=1e-5)  # the adapter is back


def test_dpo_steps_raise_the_chosen_over_rejected_margin(tiny_llama_dir, tmp_path):
    config = NeuroAdaConfig(k=2, task_type="CAUSAL_LM")  # as TRL's examples write LoraConfig
    trainer = dpo_trainer(LlamaForCausalLM.from_pretrained(tiny_llama_dir), tmp_path, config, max_steps=6,
                          learning_rate=0.1, beta=0.5)
    preferences = preference_dataset()
    assert trainer.evaluate(preferences)["eval_rewards/margins"] == 0  # zero deltas: the policy is the reference
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    metrics = trainer.evaluate(preferences)
    assert metrics["eval_rewards/margins"] > 0.05
    assert metrics["eval_rewards/accuracies"] > 0.5
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(".neuroada_delta." in name for name in changed)


def test_grpo_with_a_kl_term_trains_only_the_deltas(tiny_llama_dir, tmp_path):
    """An RL trainer: generation, a reward, and (beta > 0) the KL term against the adapter-disabled reference."""
    from trl import GRPOConfig, GRPOTrainer

    def longer_is_better(completions, **kwargs):
        return [float(len(completion)) for completion in completions]

    prompts = datasets.Dataset.from_list([{"prompt": f"{a} plus {b} is"} for a in range(4) for b in range(4)])
    args = run_args(GRPOConfig, tmp_path, max_steps=2, num_generations=4, max_completion_length=8, beta=0.1,
                    bf16=False)
    trainer = GRPOTrainer(model=LlamaForCausalLM.from_pretrained(tiny_llama_dir), reward_funcs=longer_is_better,
                          args=args, train_dataset=prompts, peft_config=NeuroAdaConfig(k=1),
                          processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir))
    assert trainer.ref_model is None
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert len(changed) == 14 and all(".neuroada_delta." in name for name in changed)


@pytest.fixture(scope="module")
def sft_adapter(tiny_llama_dir, tmp_path_factory):
    """An adapter folder as SFTTrainer writes it, with non-zero deltas."""
    folder = tmp_path_factory.mktemp("sft")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    args = run_args(SFTConfig, folder, max_length=64, max_steps=2)
    trainer = SFTTrainer(model=LlamaForCausalLM.from_pretrained(tiny_llama_dir), args=args,
                         train_dataset=text_dataset(), processing_class=tokenizer, peft_config=NeuroAdaConfig(k=2))
    trainer.train()
    trainer.save_model(str(folder / "adapter"))
    return str(folder / "adapter")


def test_auto_peft_model_loads_an_sft_adapter_with_its_base(sft_adapter):
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    model = AutoPeftModelForCausalLM.from_pretrained(sft_adapter)  # the base from adapter_config.json
    assert len(neuroada_layers(model)) == 14
    saved = load_file(os.path.join(sft_adapter, "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)
    assert any(key.endswith(".neuroada_delta") and saved[key].abs().sum() > 0 for key in saved)


def reference_logps_equal_the_sft_adapter_during_training(trainer, tiny_llama_dir, sft_adapter):
    base = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    add_fused_lm_head(base)  # before wrapping, as TRL does
    batch = next(iter(trainer.get_train_dataloader()))
    expected = sequence_logps(PeftModel.from_pretrained(base, sft_adapter).eval(), batch)
    trainer.model.eval()
    torch.testing.assert_close(torch.cat(trainer.compute_ref_log_probs(trainer.model, batch)), expected, rtol=0,
                               atol=1e-5)
    trainer.model.train()
    trainer.train()
    trainer.model.eval()
    torch.testing.assert_close(torch.cat(trainer.compute_ref_log_probs(trainer.model, batch)), expected, rtol=0,
                               atol=1e-5)


def test_dpo_after_sft_on_the_merged_model_uses_the_sft_model_as_reference(tiny_llama_dir, tmp_path, sft_adapter):
    """TRL's advice for training a new adapter on top of a trained one: merge it, then pass a peft_config."""
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama_dir), sft_adapter).merge_and_unload()
    trainer = dpo_trainer(merged, tmp_path, NeuroAdaConfig(k=2), bf16=False, max_steps=2)
    reference_logps_equal_the_sft_adapter_during_training(trainer, tiny_llama_dir, sft_adapter)


def copy_adapter(model, source, target):
    """Deltas and indices of adapter ``source`` into adapter ``target``, through PEFT's state-dict API."""
    state = get_peft_model_state_dict(model, adapter_name=source)
    set_peft_model_state_dict(model, state, adapter_name=target)


def test_dpo_on_a_trained_adapter_with_its_copy_as_reference(tiny_llama_dir, tmp_path, sft_adapter):
    """DPO after SFT on the adapter itself: TRL adds a frozen "ref" adapter. It copies LoRA's weights into it by
    parameter name (``.default.`` -> ``.ref.``), which misses NeuroAda's (``neuroada_delta.default``); copying the
    adapter through PEFT's state-dict API after building the trainer makes the reference the SFT adapter."""
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama_dir), sft_adapter, is_trainable=True)
    trainer = dpo_trainer(model, tmp_path, bf16=False, max_steps=2)
    assert set(trainer.model.peft_config) == {"default", "ref"}
    copy_adapter(trainer.model, "default", "ref")
    layers = neuroada_layers(trainer.model)
    assert all(not layer.neuroada_delta["ref"].requires_grad for layer in layers)
    default_before = [layer.neuroada_delta["default"].detach().clone() for layer in layers]
    reference_logps_equal_the_sft_adapter_during_training(trainer, tiny_llama_dir, sft_adapter)
    assert all(not torch.equal(layer.neuroada_delta["default"], d) for layer, d in zip(layers, default_before))


@pytest.mark.xfail(raises=AssertionError, strict=True,
                   reason="TRL copies the trained adapter into its 'ref' adapter by parameter name ('.default.' -> "
                          "'.ref.'), which matches LoRA's names but not NeuroAda's ('neuroada_delta.default')")
def test_dpo_on_a_trained_adapter_copies_it_into_the_reference_by_itself(tiny_llama_dir, tmp_path, sft_adapter):
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama_dir), sft_adapter, is_trainable=True)
    trainer = dpo_trainer(model, tmp_path, bf16=False, max_steps=2)
    reference_logps_equal_the_sft_adapter_during_training(trainer, tiny_llama_dir, sft_adapter)


# ---------------------------------------------------------------------------------------------- the command line


def test_cli_eval_and_merge_accept_an_adapter_saved_by_sft_trainer(tiny_llama_dir, tmp_path, arithmetic_jsonl,
                                                                    sft_adapter):
    from neuroada_recipes.cli import main

    merged_dir = str(tmp_path / "merged")
    # TRL leaves task_type unset, so the task is named
    assert main(["merge", "--adapter", sft_adapter, "--output", merged_dir, "--model", tiny_llama_dir,
                 "--task", "instruction"]) == 0
    trained = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama_dir), sft_adapter).eval()
    merged = LlamaForCausalLM.from_pretrained(merged_dir).eval()
    tokens = torch.tensor([[101, 1015, 4606, 1016, 2003]])
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, trained(tokens).logits, rtol=0, atol=1e-5)
    assert main(["eval", "--adapter", sft_adapter, "--model", tiny_llama_dir, "--data", arithmetic_jsonl,
                 "--task", "instruction", "--output", str(tmp_path / "metrics.json")]) == 0
    assert os.path.isfile(tmp_path / "metrics.json")
