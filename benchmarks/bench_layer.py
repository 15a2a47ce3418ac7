"""Layer-level benchmark: forward + backward of one adapted linear layer, every method side by side.

    python benchmarks/bench_layer.py [--tokens 2048] [--repeats 7] [--ks 1 8 20 64] [--shapes 2048x2048 576x1536]
    # on a GPU with Triton (the issue's GPU target):
    python benchmarks/bench_layer.py --device cuda --dtype bfloat16 --tokens 8192 --shapes 4096x4096 --ks 1 20 \
        --methods frozen neuroada-triton dense-compose supertuning lora-r8 full

For each shape (in x out) and k, the methods run interleaved (one call of each per round, several rounds) so that
machine noise hits them alike. Reported: median forward+backward time as a ratio to the frozen layer (the floor:
forward plus the backward to the input, no weight gradient), and the bytes autograd keeps for backward besides
the layer's own parameters. The sparse peers get the same number of trainable entries as NeuroAda at that k.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from common import bytes_kept_for_backward, markdown_table, median_seconds, timed, wrap_linear

METHODS = ["frozen", "neuroada-fused", "neuroada-gather", "neuroada-dense", "dense-compose", "supertuning", "shira", "lora-r8", "full"]


def parse_shape(text: str) -> tuple[int, int]:
    in_features, out_features = (int(v) for v in text.split("x"))
    return in_features, out_features


def run_shape(in_features, out_features, k, tokens, repeats, methods=METHODS, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features).to(device=device, dtype=dtype)
    modules = {method: wrap_linear(method, copy.deepcopy(linear), k) for method in methods}
    x = torch.randn(tokens, in_features, device=device, dtype=dtype)
    # each method reads its own copy of the input, as a layer alone on its input in a model does (NeuroAda keeps
    # only the columns its deltas read when no other adapted layer reads the same tensor)
    inputs = {method: x.clone().requires_grad_(True) for method in methods}
    upstream = torch.randn(tokens, out_features, device=device, dtype=dtype)

    def step(method):
        inputs[method].grad = None
        modules[method].zero_grad(set_to_none=True)
        modules[method](inputs[method]).backward(upstream)

    for _ in range(2):  # warm-up: first calls allocate, build caches and learn who shares the input
        for method in methods:
            step(method)
    samples = {method: [] for method in methods}
    for _ in range(repeats):
        for method in methods:
            samples[method].append(timed(lambda: step(method)))
    kept = {method: bytes_kept_for_backward(lambda: module(inputs[method]),
                                            list(module.parameters()) + list(module.buffers()))
            for method, module in modules.items()}
    floor = median_seconds(samples["frozen"])
    trainable = {method: sum(p.numel() for p in module.parameters() if p.requires_grad)
                 for method, module in modules.items()}
    return {method: (median_seconds(samples[method]) / floor, kept[method], trainable[method]) for method in methods}, floor


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 8, 20, 64])
    parser.add_argument("--shapes", nargs="+", default=["2048x2048", "576x1536"])
    parser.add_argument("--methods", nargs="+", default=METHODS, help="'frozen' (the floor) must be one of them")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    methods = ["frozen"] + [m for m in args.methods if m != "frozen"]
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {args.dtype} base, {args.tokens} tokens, "
          f"median of {args.repeats} interleaved rounds\n")
    for shape in args.shapes:
        in_features, out_features = parse_shape(shape)
        rows = []
        for k in args.ks:
            results, floor = run_shape(in_features, out_features, k, args.tokens, args.repeats, methods, args.device,
                                       dtype)
            for method, (ratio, kept, trainable) in results.items():
                rows.append([str(k), method, f"{ratio:.2f}x", f"{kept / 2**20:.1f}", f"{trainable:,}"])
            rows.append([str(k), "(floor time)", f"{floor * 1000:.1f} ms", "", ""])
        print(f"### layer {in_features} -> {out_features}\n")
        print(markdown_table(["k", "method", "fwd+bwd vs frozen", "MiB kept for backward", "trainable"], rows))
        print()


if __name__ == "__main__":
    main()
