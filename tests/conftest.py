import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    # Run the Triton kernels in Triton's CPU interpreter; must be set before neuroada defines them.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import neuroada  # noqa: F401  (registers NeuroAda with PEFT)

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


MODEL_FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def model_factory(request):
    return MODEL_FACTORIES[request.param]


@pytest.fixture
def tokens():
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
