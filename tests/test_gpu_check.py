"""`benchmarks/gpu_check.py --dry-run`: the prepared GPU check runs every part on CPU at toy sizes (the Triton
kernels in the interpreter) and reports real figures, so the command cannot rot between GPU runs."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ["environment", "correctness", "peft_roundtrip", "kernel_timing", "layer_timing", "kernel_variants",
         "model_step", "end_to_end"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton", reason="the dry run checks the Triton kernels in the interpreter")
    out = tmp_path_factory.mktemp("gpu-report")
    environment = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
                       PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run", "--out",
                           str(out)], env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "report.json") as handle:
        data = json.load(handle)
    return data, (out / "report.md").read_text()


def test_every_part_runs_and_passes(report):
    data, markdown = report
    assert list(data["parts"]) == PARTS
    for name, part in data["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"), part.get("reason"))
        assert f"## {name}: ok" in markdown


def test_correctness_covers_every_backend_and_dtype_with_small_errors(report):
    cases = report[0]["parts"]["correctness"]["result"]["cases"]
    covered = {(c["backend"], c["dtype"]) for c in cases}
    assert covered == {(b, d) for b in ("triton", "gather", "dense", "fused") for d in ("fp32", "bf16", "fp16")}
    assert all(c["ok"] for c in cases)
    assert {c["k"] for c in cases} >= {1, 8, 20, 64}
    assert any("skewed" in c["case"] for c in cases)
    for case in cases:  # measured errors, not placeholders
        assert 0 <= case["grad_delta"] <= 1e-4 and 0 <= case["out"] <= 2e-2


def test_measurements_are_real_figures(report):
    parts = report[0]["parts"]
    assert parts["environment"]["result"]["triton_self_check"]["bf16"]["usable"] is True
    roundtrip = parts["peft_roundtrip"]["result"]
    assert all(roundtrip["checks"].values()) and "data_parallel_step" in roundtrip["checks"]
    assert roundtrip["auto_backend"] in ("fused", "triton", "gather", "dense")  # a backend, not an error
    kernels = parts["kernel_timing"]["result"]["kernels"]
    assert {entry["kernel"] for entry in kernels} == {"forward", "input_grad", "delta_grad"}
    assert all(entry["ms"] > 0 and entry["error_vs_default"] <= 1e-5 for entry in kernels)
    variants = parts["kernel_variants"]["result"]
    assert variants["checks"] and all(c["ok"] and max(c["errors"]) <= 1e-5 for c in variants["checks"])
    assert {e["k"] for e in variants["layers"]} == {1, 20} and not variants["truncated"]
    assert all(e["current_ms"] > 0 and e["variant_ms"] > 0 for e in variants["steps"])
    layers = parts["layer_timing"]["result"]["layers"]
    assert layers and all(entry["floor_ms"] > 0 and entry["ratios"]["frozen"] == 1.0 for entry in layers)
    assert all(set(entry["ratios"]) >= {"neuroada-triton", "lora-r8", "supertuning", "dense-compose", "full"}
               for entry in layers)
    steps = parts["model_step"]["result"]["steps"]
    assert {(s["method"], s["checkpointing"]) for s in steps} == {
        (m, c) for m in ("frozen", "neuroada-k1", "neuroada-k20", "lora-r8", "supertuning-k1", "masked-full-k1", "full")
        for c in (False, True)}
    assert all(s["seconds"] > 0 and s["peak_bytes"] > 0 for s in steps)
    trainable = {s["method"]: s["trainable"] for s in steps}
    assert 0 == trainable["frozen"] < trainable["neuroada-k1"] < trainable["neuroada-k20"] < trainable["full"]
    end_to_end = parts["end_to_end"]["result"]
    assert end_to_end["exit_code"] == 0 and 0 <= end_to_end["accuracy_after"] <= 1 and end_to_end["seconds"] > 0
