"""benchmarks/bench_adapters.py --smoke runs end to end (so that the benchmark cannot rot); no timing is checked."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_bench_adapters_smoke_prints_every_table(capsys):
    spec = importlib.util.spec_from_file_location("bench_adapters", BENCHMARKS / "bench_adapters.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    text = bench.main(["--smoke"])
    assert text in capsys.readouterr().out
    for row in ("| NeuroAda k=1 | 0.", "| LoRA r=8 | 0.", "| reload a merged model |", "| load_adapter, NeuroAda k=1",
                "| NeuroAda k=1 | 32 |", "| LoRA r=8 | 32 |", "| NeuroAda k=20 | 51,200 |"):
        assert row in text, row
