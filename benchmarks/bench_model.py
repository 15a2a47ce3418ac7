"""Model-level benchmark: one training step (forward, backward, AdamW) of a SmolLM2-135M-shaped Llama with each
method adapting all seven projections, on CPU.

    python benchmarks/bench_model.py [--batch 4] [--seq 256] [--steps 3] [--methods ...] [--tiny]

Each method runs in its own process (so peak memory is its own): build the model (random weights, fixed seed),
adapt it, one warm-up step, then ``--steps`` timed steps. Reported: median step time as a ratio to the frozen
floor (forward plus the backward to the inputs, no weight gradient, no optimizer state) and the peak resident
memory sampled during the steps. Methods run one after another, so the ratios carry more noise than the
interleaved layer benchmark. ``--tiny`` swaps in a 2-layer, 32-wide Llama of the same structure: for the smoke test
(tests/test_benchmarks.py), not for numbers.
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

METHODS = ["frozen", "neuroada-k1", "neuroada-k20", "lora-r8", "supertuning-k1", "masked-full-k1", "full"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def run_one(method: str, batch: int, seq: int, steps: int, tiny: bool = False) -> dict:
    model = adapt(smollm2_shaped_llama(tiny), method)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer states, caches
    times = []
    with PeakMemory() as memory:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return {"method": method, "seconds": statistics.median(times), "peak_bytes": memory.peak,
            "trainable": sum(p.numel() for p in trainable)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--tiny", action="store_true", help="a toy model of the same structure (smoke test)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker, args.batch, args.seq, args.steps, args.tiny)))
        return

    from common import markdown_table

    results = {}
    for method in args.methods:
        command = [sys.executable, __file__, "--worker", method, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[method] = json.loads(output.strip().splitlines()[-1])
        print(f"  {method}: {results[method]['seconds']:.2f} s/step", file=sys.stderr)
    floor = results.get("frozen")
    rows = []
    for method, r in results.items():
        ratio = f"{r['seconds'] / floor['seconds']:.2f}x" if floor else "-"
        memory = f"{r['peak_bytes'] / floor['peak_bytes']:.2f}x" if floor else "-"
        rows.append([method, f"{r['trainable']:,}", f"{r['seconds']:.2f}", ratio, f"{r['peak_bytes'] / 1e9:.2f}", memory])
    print(f"{'tiny (smoke test)' if args.tiny else 'SmolLM2-135M-shaped'} Llama, batch {args.batch} x {args.seq} tokens, fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps\n")
    print(markdown_table(["method", "trainable", "s/step", "vs frozen", "peak GB", "peak vs frozen"], rows))


if __name__ == "__main__":
    main()
