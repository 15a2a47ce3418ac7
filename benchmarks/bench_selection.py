"""How long selection takes: magnitude (from the weights, at injection) against the data-aware criteria
(``activation``, ``gradient``: ``calibrate_selection`` over calibration batches), on SmolLM2-135M with all seven
projections adapted, on CPU.

    python benchmarks/bench_selection.py [--weights real|random|tiny] [--batches 8] [--batch-size 4] [--length 128]
                                         [--ks 1 8] [--gradient-budgets-mb all 64 layer] [--threads N]

Each row is the wall time of ``get_peft_model`` plus, for a data criterion, ``calibrate_selection`` on ``--batches``
batches of random tokens (labels = inputs), median of ``--repeats`` runs. The gradient criterion scores a group of
layers per pass over the batches, the group's [out, in] float32 score buffers fitting the budget: ``layer`` (the
library's default, least memory: one forward and backward per batch and layer, 210 x 8 on SmolLM2, hours on a CPU),
a number of MiB, or ``all`` (every layer in one pass: the whole model's scores at once). "passes" counts forward
(+ backward) passes over one batch. ``--weights real`` uses the offline SmolLM2-135M-Instruct weights (cached as
float32 by the command line), ``random`` the same shape from a seed, ``tiny`` a 2-layer Llama for the smoke test
(tests/test_data_selection.py), not for numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from bench_model import PROJECTIONS, smollm2  # noqa: E402
from common import markdown_table  # noqa: E402

CRITERIA = ["magnitude", "activation", "gradient"]


def calibration_batches(count: int, batch_size: int, length: int, vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch_size, length), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return batches


def budget_bytes(budget: str):
    """``layer`` -> None (one layer per pass), ``all`` -> no limit, else MiB."""
    if budget == "layer":
        return None
    if budget == "all":
        return 1 << 62
    return int(float(budget) * 2**20)


def time_selection(model, criterion: str, k: int, batches, budget: str | None) -> tuple[float, int]:
    """Seconds to build the adapter and choose its connections, and the passes over one batch it took."""
    from peft import get_peft_model

    import neuroada
    from neuroada.calibration import score_groups

    started = time.perf_counter()
    peft_model = get_peft_model(model, neuroada.NeuroAdaConfig(k=k, selection=criterion,
                                                                target_modules=PROJECTIONS))
    passes = 0
    if criterion != "magnitude":
        neuroada.calibrate_selection(peft_model, batches, max_score_bytes=budget_bytes(budget) if budget else None)
        passes = len(batches)
        if criterion == "gradient":
            layers = {name: module for name, module in peft_model.named_modules()
                      if isinstance(module, neuroada.NeuroAdaLayer)}
            passes *= len(score_groups(layers, budget_bytes(budget)))
    seconds = time.perf_counter() - started
    peft_model.unload()  # the base model back, for the next run
    return seconds, passes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", choices=["real", "random", "tiny"], default="real")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[1])
    parser.add_argument("--criteria", nargs="+", choices=CRITERIA, default=CRITERIA)
    parser.add_argument("--gradient-budgets-mb", nargs="+", default=["all", "64"],
                        help="'layer' (the library default), a number of MiB, or 'all'")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = smollm2(args.weights).eval()
    batches = calibration_batches(args.batches, args.batch_size, args.length, model.config.vocab_size)
    runs = [(criterion, k, budget) for k in args.ks for criterion in args.criteria
            for budget in (args.gradient_budgets_mb if criterion == "gradient" else [None])]
    rows = []
    for criterion, k, budget in runs:
        samples = [time_selection(model, criterion, k, batches, budget) for _ in range(args.repeats)]
        seconds = statistics.median(s for s, _ in samples)
        rows.append([criterion, str(k), "-" if budget is None else budget, str(samples[0][1]), f"{seconds:.2f}"])
        print(f"done: {' '.join(rows[-1])}", file=sys.stderr, flush=True)  # progress of a long run
    shape = {"real": "SmolLM2-135M-Instruct", "random": "SmolLM2-135M-shaped random",
             "tiny": "tiny (smoke test)"}[args.weights]
    print(f"{shape} Llama, seven projections, {args.batches} batches of {args.batch_size} x {args.length} tokens, "
          f"{torch.get_num_threads()} thread(s)")
    print(markdown_table(["criterion", "k", "gradient budget (MiB)", "passes", "seconds"], rows))


if __name__ == "__main__":
    main()
