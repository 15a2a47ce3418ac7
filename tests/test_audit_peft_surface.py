"""Defects an audit of PEFT's wider API (low_cpu_mem_usage loads, pickling, full state dicts, damaged files, copies)
and of the learning-rate guard found; every test here failed on the code before its fix."""

import copy
import io
import os
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from conftest import tiny_llama
from neuroada import NeuroAdaConfig, NeuroAdaLayer, NeuroAdaLearningRateWarning

IDS = torch.tensor([[1, 5, 9, 12, 33, 7, 2, 40]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def layers(model):
    return [m for m in model.modules() if isinstance(m, NeuroAdaLayer)]


def trained_adapter(tmp_path, seed=0, **config):
    """A saved adapter with non-zero deltas; returns its folder."""
    options = dict(k=2, target_modules=["q_proj", "v_proj"], init_weights=False, seed=seed) | config
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(**options))
    folder = tmp_path / f"adapter{seed}"
    model.save_pretrained(folder)
    return str(folder)


# ------------------------------------------------------------------ low_cpu_mem_usage loads on a low-precision base


@pytest.mark.parametrize("is_trainable", [False, True])
def test_low_cpu_mem_usage_load_on_a_bf16_base_keeps_the_deltas_float32_and_their_trainability(tmp_path, is_trainable):
    """PEFT moves a low_cpu_mem_usage adapter to the base layer's device and dtype by wrapping a cast copy in a new
    Parameter: a frozen adapter became trainable, and its float32 deltas were rounded to bf16."""
    folder = trained_adapter(tmp_path)
    saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
    model = PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), folder, low_cpu_mem_usage=True,
                                      is_trainable=is_trainable)
    deltas = {n: p for n, p in model.named_parameters() if "neuroada_delta" in n}
    assert deltas and all(p.dtype == torch.float32 for p in deltas.values())
    assert all(p.requires_grad == is_trainable for p in deltas.values())
    for name, value in saved.items():
        if "neuroada_delta" in name:
            live = next(p for n, p in deltas.items() if n.replace(".default", "") == name)
            assert torch.equal(live.detach().cpu(), value)  # bit for bit, not rounded through bf16
    assert (model.get_nb_trainable_parameters()[0] > 0) == is_trainable


def test_low_cpu_mem_usage_load_matches_a_plain_load(tmp_path):
    folder = trained_adapter(tmp_path)
    plain = PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), folder)
    low = PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), folder, low_cpu_mem_usage=True)
    torch.testing.assert_close(logits(low), logits(plain), atol=0, rtol=0)


# ------------------------------------------------------------------ pickling a whole model


def test_a_peft_model_pickles(tmp_path):
    """torch.save(model) failed: the tuner kept a code object from its injection."""
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2, target_modules=["q_proj"], init_weights=False))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(logits(again), logits(model), atol=0, rtol=0)


# ------------------------------------------------------------------ a full state dict loaded into a merged model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_state_dict_loaded_into_a_merged_model_unmerges_to_the_loaded_base(dtype):
    """The merge records (the originals and the columns they were written at) belonged to the selection before the
    load: unmerge wrote them back at the old columns, so the base came back damaged. Now they follow the load, as
    LoRA's subtraction does."""
    def model(seed):
        torch.manual_seed(seed)
        config = NeuroAdaConfig(k=2, target_modules=["q_proj", "v_proj"], selection="random", seed=seed,
                                init_weights=False)
        return get_peft_model(tiny_llama().to(dtype), config)

    source, target = model(1), model(2)
    expected = logits(source)
    with source.disable_adapter():
        base = logits(source)
    source.merge_adapter()
    target.merge_adapter()
    target.load_state_dict(source.state_dict())
    tolerance = dict(atol=0.05, rtol=0) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(target), expected, **tolerance)
    target.unmerge_adapter()
    torch.testing.assert_close(logits(target), expected, **tolerance)
    with target.disable_adapter():
        torch.testing.assert_close(logits(target), base, **tolerance)


def test_reloading_a_merged_models_own_state_dict_keeps_unmerge_bit_exact():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama().to(torch.bfloat16),
                           NeuroAdaConfig(k=2, target_modules=["q_proj"], init_weights=False))
    weight = layers(model)[0].get_base_layer().weight.detach().clone()
    model.merge_adapter()
    model.load_state_dict(model.state_dict())
    model.unmerge_adapter()
    assert torch.equal(layers(model)[0].get_base_layer().weight, weight)


# ------------------------------------------------------------------ a load that fails leaves the model as it was


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_or_missing_bin_weights_file_changes_no_model(tmp_path, damage):
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2, target_modules=["q_proj"], init_weights=False))
    folder = tmp_path / "adapter"
    model.save_pretrained(folder, safe_serialization=False)
    weights = folder / "adapter_model.bin"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        weights.unlink()
    base = tiny_llama()
    with pytest.raises(ValueError, match="adapter_model"):
        PeftModel.from_pretrained(base, str(folder))
    assert not layers(base) and not hasattr(base, "peft_config")
    host = get_peft_model(tiny_llama(), NeuroAdaConfig(k=1, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="adapter_model"):
        host.load_adapter(str(folder), adapter_name="new")
    assert list(host.peft_config) == ["default"]
    assert all("new" not in layer.neuroada_delta for layer in layers(host))


# ------------------------------------------------------------------ copies and assign-loads keep the delta's bookkeeping


def _lr_warnings(model, lr):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model(input_ids=IDS, labels=IDS).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return [w for w in caught if issubclass(w.category, NeuroAdaLearningRateWarning)]


def test_a_deep_copy_is_checked_for_a_lora_rate_and_learns_its_input_sharing():
    model = copy.deepcopy(get_peft_model(tiny_llama(), NeuroAdaConfig(k=1, target_modules=["q_proj", "down_proj"])))
    model.train()
    assert len(_lr_warnings(model, 2e-4)) == 1
    assert {layer._input_sharing for layer in layers(model)} == {"alone"}  # decided after the first backward


def test_a_low_cpu_mem_usage_load_is_checked_for_a_lora_rate(tmp_path):
    folder = trained_adapter(tmp_path, k=1, target_modules=["q_proj", "down_proj"])
    model = PeftModel.from_pretrained(tiny_llama(), folder, low_cpu_mem_usage=True, is_trainable=True).train()
    assert len(_lr_warnings(model, 2e-4)) == 1
    assert {layer._input_sharing for layer in layers(model)} == {"alone"}


# ------------------------------------------------------------------ collectives: DDP, FSDP and DeepSpeed broadcast buffers

DDP_SCRIPT = """
import os, tempfile, torch, torch.distributed as dist
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
import neuroada
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
config = LlamaConfig(hidden_size=320, intermediate_size=640, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=64)
model = get_peft_model(LlamaForCausalLM(config), neuroada.NeuroAdaConfig(k=1))
ddp = torch.nn.parallel.DistributedDataParallel(model)
ids = torch.randint(0, 64, (2, 5))
ddp(input_ids=ids, labels=ids).loss.backward()
print("trained", sorted({str(b.dtype) for n, b in model.named_buffers() if "neuroada_indices" in n}))
"""


def test_data_parallel_wraps_a_model_wider_than_256(tmp_path):
    """Indices of layers 257-32768 wide were int16 buffers, which neither gloo nor NCCL can broadcast: DDP (and
    FSDP's sync_module_states) failed with 'Invalid scalar type' on every real model."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-c", DDP_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained ['torch.int32']" in result.stdout


def test_indices_are_stored_in_the_smallest_dtype_and_held_in_one_collectives_carry(tmp_path):
    """The adapter file keeps int16 indices for layers 257-32768 wide (half the bytes); in memory they are int32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=320, intermediate_size=640, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), NeuroAdaConfig(k=1, init_weights=False))
    assert {b.dtype for n, b in model.named_buffers() if "neuroada_indices" in n} == {torch.int32}
    model.save_pretrained(tmp_path / "a")
    stored = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert {v.dtype for k, v in stored.items() if "neuroada_indices" in k} == {torch.int16}
    for options in ({}, {"low_cpu_mem_usage": True}):
        torch.manual_seed(0)
        again = PeftModel.from_pretrained(LlamaForCausalLM(config), tmp_path / "a", **options)
        assert {b.dtype for n, b in again.named_buffers() if "neuroada_indices" in n} == {torch.int32}, options
        torch.testing.assert_close(logits(again), logits(model), atol=0, rtol=0)


def test_load_adapter_into_the_merged_adapters_name_unmerges_to_the_old_base(tmp_path):
    """An adapter-only load leaves the weight (and so the merge records) alone: after unmerge the new deltas apply
    on the base, exactly."""
    folder = trained_adapter(tmp_path, seed=5)
    torch.manual_seed(6)
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=2, target_modules=["q_proj", "v_proj"], init_weights=False))
    model.merge_adapter()
    model.load_adapter(folder, adapter_name="default")
    model.unmerge_adapter()
    expected = PeftModel.from_pretrained(tiny_llama(), folder)
    torch.testing.assert_close(logits(model), logits(expected), atol=1e-6, rtol=0)
