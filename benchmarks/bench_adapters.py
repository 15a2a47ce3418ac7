"""Many adapters on one base: switching the merged adapter, mixed-adapter batches and the memory of 100 adapters,
NeuroAda against LoRA, side by side in one process, on a SmolLM2-135M-shaped Llama (random weights: timings only;
all seven projections adapted), fp32 on CPU.

    python benchmarks/bench_adapters.py [--seq 16] [--repeats 3] [--switch-repeats 9] [--smoke]

- switch: with one adapter merged, unmerge it and merge another one of the same kind (NeuroAda k=1 and k=20: a
  scatter of the [out, k] selected entries; LoRA r=8: W += B A, a dense [out, in] product per layer), against
  reloading the weights of a merged model from a safetensors file (in the page cache);
- load: ``load_adapter`` of a saved NeuroAda k=1 adapter (once; with its stored indices it selects nothing, it
  checks the base by the base weights stored at the selected positions);
- mixed batch: one forward of 32 sequences whose samples are spread over 1, 4 or 32 adapters (sample ``i`` gets
  adapter ``i % n``) with PEFT's ``adapter_names=``, NeuroAda k=1 against LoRA r=8, for ``--seq`` tokens per
  sequence (prefill) and for 1 token per sequence (a decoding step's shape, without a KV cache);
- memory: the bytes of one adapter's tensors in the model, times 100.

Times are this process's CPU time by default (``--clock wall`` for elapsed time): on a shared machine other
processes' load inflates it much less than wall time. Timed workloads run interleaved (one of each per round, ``--switch-repeats`` / ``--repeats`` rounds) and medians are
reported, so that noise from other processes hits them alike; ratios are taken within a round-robin in one process.
The default run takes about 4 minutes on a loaded 2-core machine (half of it building the models: the selection).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH = 32
ADAPTER_COUNTS = (1, 4, 32)


def base_model(smoke: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if not smoke:
        from bench_model import smollm2_shaped_llama

        return smollm2_shaped_llama().eval()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def add_neuroada_copies(model, source: str, names: list[str]) -> None:
    """More adapters of ``source``'s config with random deltas. The same k and criterion on the same base select
    the same connections, so the selection is copied rather than computed again (which costs as much as the
    first one): what ``add_adapter`` would build, minus that time."""
    from neuroada import NeuroAdaLayer

    for name in names:
        model.peft_config[name] = model.peft_config[source]
        for layer in model.modules():
            if isinstance(layer, NeuroAdaLayer) and source in layer.neuroada_delta:
                delta = layer.neuroada_delta[source]
                layer.neuroada_delta[name] = nn.Parameter(torch.randn_like(delta) * 0.02, requires_grad=False)
                layer.neuroada_indices[name] = layer.neuroada_indices[source].clone()
                layer.bypass_backend[name] = layer.bypass_backend[source]


def adapter_bytes(model, name: str) -> int:
    tensors = {key: t for key, t in [*model.named_parameters(), *model.named_buffers()]
               if key.endswith(f".{name}") or f".{name}." in key}
    return sum(t.numel() * t.element_size() for t in tensors.values())


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def timed(fn) -> float:
    start = clock()
    fn()
    return clock() - start


def interleaved(workloads: dict, repeats: int, warm_up=None) -> dict[str, float]:
    """Median seconds of each workload, run round-robin ``repeats`` times after a warm-up (the workloads named in
    ``warm_up``, all of them by default). A workload is ``fn`` or ``(prepare, fn)`` where ``prepare`` runs untimed
    before each ``fn``."""
    samples = {name: [] for name in workloads}
    for round_ in range(repeats + 1):
        for name, work in workloads.items():
            if not round_ and warm_up is not None and name not in warm_up:
                continue
            prepare, fn = work if isinstance(work, tuple) else (None, work)
            if prepare is not None:
                prepare()
            seconds = timed(fn)
            if round_:
                samples[name].append(seconds)
        print(f"  round {round_}/{repeats} done", file=sys.stderr, flush=True)
    return {name: statistics.median(values) for name, values in samples.items()}


def merged_switch(model, first: str, second: str):
    """``(prepare, switch)``: prepare leaves ``first`` merged alone; switch replaces it by ``second``."""

    def prepare():
        if any(getattr(m, "merged", False) for m in model.modules()):
            model.unmerge_adapter()
        model.merge_adapter([first])

    def switch():
        model.unmerge_adapter()
        model.merge_adapter([second])

    return prepare, switch


def unmerged(model):
    def prepare():
        if any(getattr(m, "merged", False) for m in model.modules()):
            model.unmerge_adapter()
    return prepare


def mixed_forward(model, tokens, names):
    def run():
        with torch.inference_mode():
            model(input_ids=tokens, adapter_names=names)
    return unmerged(model), run


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=16, help="tokens per sequence of the prefill batch (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of the mixed batches (default 3)")
    parser.add_argument("--switch-repeats", type=int, default=9, help="timed rounds of the switches (default 9)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu (default): this process's CPU time, which other processes' load inflates less "
                             "than wall time (with 1 thread it is the compute time); wall: elapsed time")
    parser.add_argument("--smoke", action="store_true", help="a toy model and one round: checks that it runs")
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    repeats, switch_repeats = (1, 1) if args.smoke else (args.repeats, args.switch_repeats)

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_model, save_model

    import neuroada
    from common import markdown_table

    def log(message):
        print(message, file=sys.stderr, flush=True)

    log("building the models")
    k1 = [f"k1-{i}" for i in range(max(ADAPTER_COUNTS))]
    neuroada_model = get_peft_model(base_model(args.smoke), neuroada.NeuroAdaConfig(
        k=1, target_modules=PROJECTIONS, init_weights=False), adapter_name=k1[0]).eval()
    neuroada_model.add_adapter("k20-0", neuroada.NeuroAdaConfig(k=20, target_modules=PROJECTIONS, init_weights=False))
    add_neuroada_copies(neuroada_model, "k20-0", ["k20-1"])
    lora = [f"r8-{i}" for i in range(max(ADAPTER_COUNTS))]
    lora_model = get_peft_model(base_model(args.smoke), LoraConfig(
        r=8, lora_alpha=16, target_modules=PROJECTIONS, init_lora_weights=False), adapter_name=lora[0]).eval()
    for name in lora[1:]:
        lora_model.add_adapter(name, LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS,
                                                init_lora_weights=False))
    lora_model.eval()
    plain = base_model(args.smoke)

    with tempfile.TemporaryDirectory() as folder:
        neuroada_model.save_pretrained(folder)  # the k=1 adapter, loaded again below as a second one
        log("timing load_adapter")
        load_seconds = timed(lambda: neuroada_model.load_adapter(os.path.join(folder, k1[0]), adapter_name=k1[1]))
        add_neuroada_copies(neuroada_model, k1[0], k1[2:])
        neuroada_model.eval()

        merged_file = os.path.join(folder, "merged.safetensors")
        save_model(plain, merged_file)
        log("timing switches")
        switch = interleaved({
            "NeuroAda k=1": merged_switch(neuroada_model, k1[0], k1[1]),
            "NeuroAda k=20": merged_switch(neuroada_model, "k20-0", "k20-1"),
            "LoRA r=8": merged_switch(lora_model, lora[0], lora[1]),
            "reload a merged model": lambda: load_model(plain, merged_file),
        }, switch_repeats)
    neuroada_model.unmerge_adapter()
    lora_model.unmerge_adapter()

    generator = torch.Generator().manual_seed(0)
    vocab = plain.config.vocab_size
    batches = {"prefill": torch.randint(0, vocab, (BATCH, args.seq), generator=generator),
               "step": torch.randint(0, vocab, (BATCH, 1), generator=generator)}
    workloads = {}
    for shape, tokens in batches.items():
        for count in ADAPTER_COUNTS:
            workloads[("NeuroAda k=1", count, shape)] = mixed_forward(
                neuroada_model, tokens, [k1[i % count] for i in range(BATCH)])
            workloads[("LoRA r=8", count, shape)] = mixed_forward(
                lora_model, tokens, [lora[i % count] for i in range(BATCH)])
    log("timing mixed batches")
    # warmed up on the cheap one-token batches: the first call of each adapter builds its index layouts
    mixed = interleaved(workloads, repeats, warm_up=[name for name in workloads if name[2] == "step"])

    base_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
    memory = {"NeuroAda k=1": adapter_bytes(neuroada_model, k1[0]),
              "NeuroAda k=20": adapter_bytes(neuroada_model, "k20-0"),
              "LoRA r=8": adapter_bytes(lora_model, lora[0])}

    shape = "toy Llama (--smoke)" if args.smoke else "SmolLM2-135M-shaped Llama"
    report = [f"{shape}, fp32, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} "
              f"time, medians of "
              f"{switch_repeats} (switch) and {repeats} (mixed batches) interleaved rounds\n"]
    floor = switch["NeuroAda k=1"]
    report.append(markdown_table(
        ["switch the merged adapter", "seconds", "vs NeuroAda k=1"],
        [[name, f"{seconds:.4f}", f"{seconds / floor:.1f}x"] for name, seconds in switch.items()]
        + [["load_adapter, NeuroAda k=1 (once)", f"{load_seconds:.2f}", f"{load_seconds / floor:.0f}x"]]))
    rows = []
    for method in ("NeuroAda k=1", "LoRA r=8"):
        for count in ADAPTER_COUNTS:
            prefill, step = mixed[(method, count, "prefill")], mixed[(method, count, "step")]
            one_prefill, one_step = mixed[(method, 1, "prefill")], mixed[(method, 1, "step")]
            rows.append([method, str(count), f"{BATCH * args.seq / prefill:,.0f}", f"{one_prefill / prefill:.2f}",
                         f"{step * 1e3:.0f}", f"{one_step / step:.2f}"])
    report.append("\n" + markdown_table(
        ["mixed batch of 32", "adapters", f"prefill tokens/s ({args.seq}/seq)", "vs 1 adapter",
         "step ms (1 token/seq)", "vs 1 adapter"], rows))
    report.append("\n" + markdown_table(
        ["adapter", "bytes per adapter", "100 adapters (MB)", "100 adapters vs base weights"],
        [[name, f"{size:,}", f"{100 * size / 1e6:.1f}", f"{100 * size / base_bytes:.3f}x"]
         for name, size in memory.items()]))
    text = "\n".join(report)
    print(text)
    return text


if __name__ == "__main__":
    main()
