"""FSDP2 (``fully_shard``) on two CPU processes: the deltas are sharded like any parameter, training matches one
process with the same global batch, and the saved adapter is the single-process adapter."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # two torchrun processes: ~10 s

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_fsdp_training_saves_the_single_process_adapter(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    worker = os.path.join(TESTS, "workers", "fsdp_train.py")
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--standalone", worker, str(tmp_path), TESTS],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    # the learning-rate check finds the sharded deltas too, on every rank
    assert [(tmp_path / f"lr_warning_rank{rank}").read_text() for rank in (0, 1)] == ["True", "True"]
    assert "get_model_state_dict" in (tmp_path / "sharded_save").read_text()
    assert not (tmp_path / "sharded" / "adapter_model.safetensors").exists()
    sharded = load_file(tmp_path / "fsdp" / "adapter_model.safetensors")
    single = load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert sharded.keys() == single.keys() and len(single) == 42  # deltas, indices and base values of 14 layers
    for key in single:
        assert sharded[key].dtype == single[key].dtype
        assert (sharded[key].float() - single[key].float()).abs().max() < 1e-5, key
    assert any(v.abs().sum() > 0 for k, v in single.items() if k.endswith("neuroada_delta"))
    configs = [json.loads((tmp_path / name / "adapter_config.json").read_text()) for name in ("fsdp", "single")]
    assert configs[0]["selection_fingerprints"] == configs[1]["selection_fingerprints"]
