"""Data-aware selection (``selection="activation"`` / ``"gradient"``, chosen by ``calibrate_selection``): each
criterion against its brute-force definition in plain dense torch, determinism, the refusals (no data, no indices
saved, no loss, trained deltas), the save/load round trip with its base check, the gradient criterion's memory
staying at one layer's [out, in] buffers, and the command line flags."""

import copy
import functools
import json
import weakref

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from conftest import tiny_llama
from neuroada import NeuroAdaConfig, NeuroAdaLayer, calibrate_selection, select_per_neuron, select_top_k_scores

K = 2


def make_batches(seed: int, count: int = 3, batch: int = 2, length: int = 9, vocab: int = 96) -> list[dict]:
    """Token batches with labels; the second sample of each is right-padded by three tokens."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[1, length - 3:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return batches


def calibrated(factory, criterion: str, batches, **kwargs):
    model = get_peft_model(factory(), NeuroAdaConfig(k=K, selection=criterion))
    calibrate_selection(model, batches, **kwargs)
    return model


def selections(peft_model) -> dict[str, torch.Tensor]:
    return {name.removeprefix("base_model.model."): module.neuroada_indices["default"].long()
            for name, module in peft_model.named_modules() if isinstance(module, NeuroAdaLayer)}


def weight_rows(module) -> torch.Tensor:
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def brute_force_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k largest scores, ties to the lower position, positions sorted: written out in Python."""
    rows = []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        rows.append(sorted(order[:k]))
    return torch.tensor(rows)


def brute_force_activation(base, names, batches) -> dict[str, torch.Tensor]:
    """|W| times the L2 norm of each input over the batches' real (unpadded) tokens, in float64."""
    inputs = {name: [] for name in names}
    handles = [base.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: inputs[name].append(args[0].detach())) for name in names]
    with torch.no_grad():
        for batch in batches:
            base(**batch)
    for handle in handles:
        handle.remove()
    scores = {}
    for name in names:
        tokens = torch.cat([x[batch["attention_mask"].bool()] for x, batch in zip(inputs[name], batches)])
        norms = tokens.double().pow(2).sum(0).sqrt()
        scores[name] = weight_rows(base.get_submodule(name)).detach().double().abs() * norms
    return scores


def brute_force_gradient(base, names, batches) -> dict[str, torch.Tensor]:
    """sum over batches of |dL/dW * W| from ordinary full fine-tuning gradients."""
    for param in base.parameters():
        param.requires_grad_(True)
    scores = {name: 0.0 for name in names}
    for batch in batches:
        base.zero_grad()
        base(**batch).loss.backward()
        for name in names:
            module = base.get_submodule(name)
            gradient = module.weight.grad.T if isinstance(module, Conv1D) else module.weight.grad
            scores[name] = scores[name] + (gradient.double() * weight_rows(module).detach().double()).abs()
    return scores


BRUTE_FORCE = {"activation": brute_force_activation, "gradient": brute_force_gradient}


@pytest.mark.parametrize("criterion", ["activation", "gradient"])
def test_each_criterion_equals_its_brute_force_definition(model_factory, criterion):
    batches = make_batches(0)
    model = calibrated(model_factory, criterion, batches)
    chosen = selections(model)
    scores = BRUTE_FORCE[criterion](model_factory(), list(chosen), batches)
    for name, indices in chosen.items():
        assert torch.equal(indices, brute_force_top_k(scores[name], K)), name
    # the criterion is not magnitude under another name
    base = model_factory()
    assert any(not torch.equal(indices, select_per_neuron(weight_rows(base.get_submodule(name)).detach(), K).long())
               for name, indices in chosen.items())
    record = model.peft_config["default"].calibration
    assert record == {"batches": 3, "samples": 6, "tokens": 3 * (2 * 9 - 3)}


def test_gradient_scores_do_not_depend_on_how_many_layers_a_pass_scores():
    batches = make_batches(1)
    one_layer = selections(calibrated(tiny_llama, "gradient", batches))
    all_layers = selections(calibrated(tiny_llama, "gradient", batches, max_score_bytes=1 << 30))
    assert one_layer.keys() == all_layers.keys()
    assert all(torch.equal(one_layer[name], all_layers[name]) for name in one_layer)


@pytest.mark.parametrize("criterion", ["activation", "gradient"])
def test_same_data_same_selection_other_data_other_selection(criterion):
    first = selections(calibrated(tiny_llama, criterion, make_batches(2)))
    again = selections(calibrated(tiny_llama, criterion, make_batches(2)))
    other = selections(calibrated(tiny_llama, criterion, make_batches(3)))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)
    assert all(bool((indices[:, 1:] > indices[:, :-1]).all()) for indices in first.values())  # rows sorted


def test_only_the_first_num_batches_are_used():
    batches = make_batches(4, count=4)
    two = calibrated(tiny_llama, "activation", batches, num_batches=2)
    assert two.peft_config["default"].calibration["batches"] == 2
    assert all(torch.equal(a, b) for a, b in zip(selections(two).values(),
                                                  selections(calibrated(tiny_llama, "activation",
                                                                        batches[:2])).values()))


def test_select_top_k_scores_breaks_ties_like_magnitude():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.5], [2.0, 2.0, 2.0, 2.0]])
    assert select_top_k_scores(scores, 2).tolist() == [[1, 2], [0, 1]]
    weight = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(select_top_k_scores(weight.abs(), 3), select_per_neuron(weight, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        select_top_k_scores(torch.tensor([[float("nan"), 1.0]]), 1)


def test_a_second_adapter_is_calibrated_on_the_base_whatever_the_first_adapter_holds(tokens):
    batches = make_batches(6)
    alone = selections(calibrated(tiny_llama, "activation", batches))
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=K, init_weights=False))  # non-zero deltas, active
    before = selections(model)
    model.add_adapter("data", NeuroAdaConfig(k=K, selection="activation"))
    model(input_ids=tokens)  # the active adapter runs; only "data" waits for its calibration
    calibrate_selection(model, batches, adapter_name="data")
    data = {name.removeprefix("base_model.model."): module.neuroada_indices["data"].long()
            for name, module in model.named_modules() if isinstance(module, NeuroAdaLayer)}
    assert all(torch.equal(data[name], alone[name]) for name in alone)  # scored on the base, not base + "default"
    assert all(torch.equal(before[name], indices) for name, indices in selections(model).items())
    model.set_adapter("data")
    model(input_ids=tokens)


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("criterion", ["activation", "gradient"])
def test_without_indices_in_the_file_a_data_selection_is_refused(criterion):
    with pytest.raises(ValueError, match="save_indices=True"):
        NeuroAdaConfig(selection=criterion, save_indices=False)


@pytest.mark.parametrize("criterion", ["activation", "gradient"])
def test_without_data_the_adapter_refuses_to_run_and_to_save(criterion, tmp_path, tokens):
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=K, selection=criterion))
    with pytest.raises(RuntimeError, match=r"calibrate_selection\(peft_model, batches"):
        model(input_ids=tokens)
    with pytest.raises(ValueError, match="has not been calibrated"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    with model.disable_adapter():  # the base model is still usable
        model(input_ids=tokens)
    with pytest.raises(ValueError, match="needs calibration data"):
        select_per_neuron(torch.randn(3, 4), 1, criterion)


def test_bad_calibration_input_is_refused_and_changes_nothing(tokens):
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=K, selection="gradient"))
    before = selections(model)
    with pytest.raises(ValueError, match="needs a loss"):
        calibrate_selection(model, [{"input_ids": tokens}])
    with pytest.raises(ValueError, match="holds 3 batch"):
        calibrate_selection(model, make_batches(0), num_batches=8)
    with pytest.raises(TypeError, match="mapping of model inputs"):
        calibrate_selection(model, [tokens])
    assert all(torch.equal(before[name], indices) for name, indices in selections(model).items())
    assert model.peft_config["default"].calibration is None
    with pytest.raises(RuntimeError, match="not been calibrated"):
        model(input_ids=tokens)
    magnitude = get_peft_model(tiny_llama(), NeuroAdaConfig(k=K))
    with pytest.raises(ValueError, match="needs no data"):
        calibrate_selection(magnitude, make_batches(0))


def test_calibrating_trained_deltas_is_refused():
    model = calibrated(tiny_llama, "activation", make_batches(0))
    next(p for n, p in model.named_parameters() if "neuroada_delta" in n).data.fill_(0.1)
    with pytest.raises(ValueError, match="before training"):
        calibrate_selection(model, make_batches(0))


def test_a_calibrated_config_gives_a_new_adapter_no_data_selection(tmp_path, tokens):
    """calibrate_selection records its data in the adapter's own config: the user's config object, reused for another
    model, a copy of it for add_adapter, or a config read back from a saved adapter, must not make a new adapter pass
    for calibrated while it holds the placeholder (magnitude) selection."""
    config = NeuroAdaConfig(k=K, selection="activation")
    first = get_peft_model(tiny_llama(), config)
    calibrate_selection(first, make_batches(0))
    assert config.calibration is None  # the user's object is not written to
    second = get_peft_model(tiny_llama(), config)  # the same config object, another model
    with pytest.raises(RuntimeError, match="not been calibrated"):
        second(input_ids=tokens)
    calibrate_selection(second, make_batches(1, count=2))
    assert first.peft_config["default"].calibration["batches"] == 3  # each adapter keeps its own record
    assert second.peft_config["default"].calibration["batches"] == 2

    first.add_adapter("duplicate", copy.deepcopy(first.peft_config["default"]))  # carries a calibration record
    with pytest.raises(RuntimeError, match="not been calibrated"):
        first.set_adapter("duplicate") or first(input_ids=tokens)
    with pytest.raises(ValueError, match="has not been calibrated"):
        first.save_pretrained(tmp_path / "refused", selected_adapters=["duplicate"])
    first.set_adapter("default")
    first.save_pretrained(tmp_path / "saved", selected_adapters=["default"])
    fresh = get_peft_model(tiny_llama(), NeuroAdaConfig.from_pretrained(tmp_path / "saved"))  # a new run from it
    with pytest.raises(RuntimeError, match="not been calibrated"):
        fresh(input_ids=tokens)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved")  # a load takes the file's selection
    assert torch.equal(loaded(input_ids=tokens).logits, first(input_ids=tokens).logits)


def test_a_data_selection_is_never_saved_without_its_indices(tmp_path):
    model = calibrated(tiny_llama, "gradient", make_batches(0))
    model.peft_config["default"].save_indices = False  # past the constructor's check
    with pytest.raises(ValueError, match="save_indices"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_a_calibrated_selection_is_final_when_deltas_start_random():
    """With init_weights=False the deltas are never zero, so trained ones cannot be told from untrained ones: a
    second calibration would move trained deltas to other connections, and is refused."""
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=K, selection="activation", init_weights=False))
    calibrate_selection(model, make_batches(0))
    before = selections(model)
    with pytest.raises(ValueError, match="already calibrated"):
        calibrate_selection(model, make_batches(1))
    assert all(torch.equal(before[name], indices) for name, indices in selections(model).items())


def _inputs_of(base, names, batch):
    inputs = {}
    handles = [base.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: inputs.setdefault(name, args[0].detach())) for name in names]
    with torch.no_grad():
        base(**batch)
    for handle in handles:
        handle.remove()
    return inputs


def test_activation_masks_padding_only_where_the_mask_belongs():
    """Encoder-decoder: the encoder's attention_mask is not the decoder's, even when both have the same length;
    multiple choice: the model flattens [batch, choices, tokens] inputs, and the mask must follow."""
    from transformers import BertConfig, BertForMultipleChoice, T5Config, T5ForConditionalGeneration

    def activation_top_k(layer, x, mask=None):
        tokens = x.reshape(-1, x.shape[-1]) if mask is None else x[mask.reshape(x.shape[:-1]).bool()]
        return brute_force_top_k(layer.weight.detach().double().abs() * tokens.double().pow(2).sum(0).sqrt(), K)

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                             num_decoder_layers=1, num_heads=4, decoder_start_token_id=0,
                                             pad_token_id=0)).eval()
    ids = torch.randint(1, 96, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(1, 96, (2, 8))}  # same length
    names = ["encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.0.SelfAttention.q",
             "decoder.block.0.layer.1.EncDecAttention.k"]  # the last reads the encoder's output
    inputs = _inputs_of(t5, names, batch)
    expected = {names[0]: activation_top_k(t5.get_submodule(names[0]), inputs[names[0]], mask),
                names[1]: activation_top_k(t5.get_submodule(names[1]), inputs[names[1]]),  # no decoder padding
                names[2]: activation_top_k(t5.get_submodule(names[2]), inputs[names[2]], mask)}
    model = get_peft_model(t5, NeuroAdaConfig(k=K, selection="activation", target_modules=["q", "k"]))
    calibrate_selection(model, [batch])
    for name in names:
        assert torch.equal(selections(model)[name], expected[name]), name

    choices = BertForMultipleChoice(BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4,
                                               max_position_embeddings=64)).eval()
    ids = torch.randint(1, 96, (2, 2, 10))
    mask = torch.ones(2, 2, 10, dtype=torch.long)
    mask[:, :, 4:] = 0
    batch = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": torch.tensor([0, 1])}
    name = "bert.encoder.layer.0.attention.self.query"
    expected = activation_top_k(choices.get_submodule(name), _inputs_of(choices, [name], batch)[name], mask)
    model = get_peft_model(choices, NeuroAdaConfig(k=K, selection="activation", target_modules=["query"]))
    calibrate_selection(model, [batch])
    assert torch.equal(selections(model)[name], expected)


# ------------------------------------------------------------------ save / load


@pytest.mark.parametrize("criterion", ["activation", "gradient"])
def test_save_and_load_give_the_same_model_and_check_the_base(criterion, tmp_path, tokens, recwarn):
    model = calibrated(tiny_llama, criterion, make_batches(5))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "neuroada_delta" in name:
            param.data.normal_(std=0.05)  # as after training
    expected = model(input_ids=tokens).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["selection"] == criterion and saved["save_indices"] is True
    assert saved["calibration"] == {"batches": 3, "samples": 6, "tokens": 45}
    assert set(saved["selected_weight_sums"]) == set(selections(model))

    recwarn.clear()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(loaded(input_ids=tokens).logits, expected)
    assert all(torch.equal(selections(loaded)[name], indices) for name, indices in selections(model).items())
    PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path)  # the same base in another precision
    assert not [w for w in recwarn if "not the base" in str(w.message)]

    with pytest.warns(UserWarning, match=r"weights that differ from the ones saved.*not the base"):
        PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path)
    # a file without base values (or a quantized base, where they cannot be compared): the recorded sum of |W|
    file = tmp_path / "adapter_model.safetensors"
    save_file({key: value for key, value in load_file(file).items() if "neuroada_base_values" not in key}, file)
    with pytest.warns(UserWarning, match=r"sum of \|W\| differs.*not the base"):
        PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path)


# ------------------------------------------------------------------ memory of the gradient criterion


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops allocate while the mode is on, alive at each moment, and their peak.
    A storage counts from the op that creates it until the last tensor on it (a view too) is gone; views of tensors
    made before (the model's weights) count nothing."""

    def __init__(self):
        super().__init__()
        self.owners: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors on it]
        self.live = self.peak = 0

    def _release(self, address: int) -> None:
        entry = self.owners[address]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.owners[address]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = any(ret.alias_info is not None for ret in func._schema.returns)
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            address = storage.data_ptr()
            if address not in self.owners:
                if aliases or address == 0:
                    continue
                self.owners[address] = [storage.nbytes(), 0]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self.owners[address][1] += 1
            weakref.finalize(tensor, self._release, address)
        return out


def test_gradient_criterion_memory_stays_at_one_layers_gradient():
    """Four blocks: their [out, in] float32 buffers sum to 4 MiB, the largest layer's is 256 KiB. Scoring one
    layer per pass must peak near one layer's buffers (the batch's gradient, the score, the selection's sort), and
    scoring all layers in one pass near the sum: the measurement sees the difference."""
    def model():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
        return get_peft_model(LlamaForCausalLM(config).eval(), NeuroAdaConfig(k=1, selection="gradient"))

    batches = make_batches(0, count=2, length=8, vocab=64)
    layers = [m for m in model().modules() if isinstance(m, NeuroAdaLayer)]
    largest = max(layer.out_features * layer.in_features * 4 for layer in layers)
    total = sum(layer.out_features * layer.in_features * 4 for layer in layers)
    assert (largest, total) == (256 * 1024, 4 * 1024 * 1024)

    peaks = {}
    for budget in (None, total):
        peft_model = model()
        with LiveTensorBytes() as tracker:
            calibrate_selection(peft_model, batches, max_score_bytes=budget)
        peaks[budget] = tracker.peak
    assert peaks[None] < 5 * largest, peaks  # 2 buffers + the sort's values and int64 positions, + activations
    assert peaks[total] > total, peaks


# ------------------------------------------------------------------ command line


@pytest.mark.parametrize("criterion", ["activation", "gradient"])
def test_command_line_calibrates_on_training_batches(criterion, tmp_path, tiny_bert):
    from test_cli import run_cli, write_sentiment_csv

    data = write_sentiment_csv(tmp_path)
    run = tmp_path / "run"
    code, out, _ = run_cli(["train", "--model", tiny_bert, "--data", data, "--max_length", "16", "--k", "2",
                            "--selection", criterion, "--calibration_batches", "3", "--output_dir", str(run),
                            "--max_steps", "2", "--per_device_train_batch_size", "8", "--disable_tqdm", "true",
                            "--evaluate_before", "false"]
                           + (["--calibration_memory_mb", "1"] if criterion == "gradient" else []))
    assert code == 0, out
    assert f"selection: {criterion} on 3 training batches (24 examples" in out
    assert "the default learning rate" in out and "Give --learning_rate" in out  # none was given
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["selection"] == criterion and saved["calibration"]["batches"] == 3
    assert saved["calibration"]["samples"] == 24
    card = (run / "adapter" / "README.md").read_text()
    assert f"({criterion} selection, scored on 3 training batches: 24 examples" in card
    if criterion == "activation":  # the saved adapter loads and scores
        code, out, _ = run_cli(["eval", "--adapter", str(run / "adapter")])
        assert code == 0 and "accuracy" in out, out


@pytest.mark.parametrize("flags, message", [
    (["--selection", "activation", "--save_indices", "false"], "keep save_indices=True"),
    (["--selection", "gradient", "--calibration_batches", "0"], "--calibration_batches must be at least 1"),
    (["--selection", "gradient", "--calibration_memory_mb", "0"], "--calibration_memory_mb must be at least 1"),
])
def test_command_line_refuses_bad_calibration_settings_before_loading(flags, message, tmp_path, tiny_bert, capsys,
                                                                      monkeypatch):
    from neuroada_recipes import cli

    def no_loading(*args, **kwargs):
        raise AssertionError("a model or data set was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "TaskRun", no_loading)
    data = tmp_path / "data.csv"
    data.write_text("text,label\na,0\nb,1\n")
    assert cli.main(["train", "--model", tiny_bert, "--data", str(data), "--output_dir", str(tmp_path / "run")]
                    + flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ the selection-time benchmark at toy size


def test_bench_selection_at_toy_size(monkeypatch, capsys):
    import importlib
    import os
    import sys

    benchmarks = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    monkeypatch.syspath_prepend(benchmarks)
    bench_selection = importlib.import_module("bench_selection")
    monkeypatch.setattr(sys, "argv", ["bench_selection.py", "--weights", "tiny", "--batches", "2", "--batch-size", "1",
                                      "--length", "8", "--gradient-budgets-mb", "layer", "all"])
    bench_selection.main()
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    passes = {(cells[0].strip(), cells[2].strip()): int(cells[3]) for cells in rows}
    # magnitude reads no data; activation one forward per batch; gradient one per batch and group of layers
    assert passes == {("magnitude", "-"): 0, ("activation", "-"): 2, ("gradient", "layer"): 2 * 14,
                      ("gradient", "all"): 2}


@pytest.mark.slow
def test_every_process_of_a_distributed_run_takes_the_first_process_selection(tmp_path):
    """Data-parallel training must update the same connections on every process; each process calibrates on its
    own batches here (the CLI gives all the same ones, but kernels need not agree bit for bit on every device)."""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--standalone",
                             os.path.join(tests, "workers", "calibrate_distributed.py"), str(tmp_path), tests],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    wide = functools.partial(tiny_llama, intermediate_size=300)  # down_proj's indices are int32, not uint8
    for criterion in ("activation", "gradient"):
        first = selections(calibrated(wide, criterion, make_batches(seed=10)))  # process 0's data, alone
        second_alone = selections(calibrated(wide, criterion, make_batches(seed=11)))
        assert any(not torch.equal(first[name], second_alone[name]) for name in first)  # the data differ
        for rank in (0, 1):
            got = torch.load(tmp_path / f"{criterion}-{rank}.pt")
            assert got.keys() == first.keys()
            assert all(torch.equal(got[name], first[name]) for name in first), (criterion, rank)
