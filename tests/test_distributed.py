"""Data-parallel training on two CPU processes (gloo), through torchrun and through accelerate launch: the adapter
after N steps equals the single-process run with the same global batch, and only rank 0 writes."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import free_port

pytestmark = pytest.mark.slow  # two processes, each importing torch and transformers: ~15 s per test

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def train_flags(model_dir, data, output_dir, batch):
    return ["train", "--model", model_dir, "--task", "instruction", "--data", data, "--test_size", "4",
            "--max_length", "48", "--max_new_tokens", "2", "--max_steps", "3", "--learning_rate", "5e-2",
            "--use_cpu", "true", "--disable_tqdm", "true", "--evaluate_before", "false", "--logging_steps", "1",
            "--seed", "7", "--output_dir", str(output_dir), "--per_device_train_batch_size", str(batch)]


def run(command):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, tiny_llama_dir, arithmetic_jsonl_module):
    out = tmp_path_factory.mktemp("single")
    run([os.path.join(BIN, "neuroada")] + train_flags(tiny_llama_dir, arithmetic_jsonl_module, out, batch=8))
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(output_dir, expected, log):
    got = load_file(output_dir / "adapter" / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        assert (got[key].float() - expected[key].float()).abs().max() < 1e-5, key
    assert any(v.abs().sum() > 0 for k, v in got.items() if k.endswith("neuroada_delta"))  # it trained
    assert log.count("neuroada train:") == 1  # the summary and every file come from rank 0 only
    history = json.loads((output_dir / "log_history.json").read_text())
    # 36 training records in global batches of 8 (two processes x 4): 5 steps an epoch; one process of 4 takes 9
    assert history[0]["epoch"] == pytest.approx(1 / 5)


def test_torchrun_two_processes_match_one(tmp_path, tiny_llama_dir, arithmetic_jsonl_module, single_process):
    log = run([os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--standalone", "-m",
               "neuroada_recipes.cli"] + train_flags(tiny_llama_dir, arithmetic_jsonl_module, tmp_path, batch=4)
              + ["--ddp_backend", "gloo"])
    assert_same_adapter(tmp_path, single_process, log)


def test_accelerate_launch_two_processes_match_one(tmp_path, tiny_llama_dir, arithmetic_jsonl_module,
                                                   single_process):
    config = os.path.join(REPO, "docs", "accelerate_cpu_2proc.yaml")
    log = run([os.path.join(BIN, "accelerate"), "launch", "--config_file", config,
               "--main_process_port", str(free_port()), "-m", "neuroada_recipes.cli"] + train_flags(tiny_llama_dir, arithmetic_jsonl_module, tmp_path, batch=4)
              + ["--ddp_backend", "gloo"])
    assert_same_adapter(tmp_path, single_process, log)
