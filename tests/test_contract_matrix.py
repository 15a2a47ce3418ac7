"""PEFT's contract, checked for NeuroAda the way PEFT's own tests/test_custom_models.py checks every method.

Every check below runs on every case of the matrix: NeuroAda configurations (k, each selection criterion, each
backend, save_indices on and off, modules_to_save) x models (a small MLP, a stack of GPT-2 ``Conv1D`` layers with
non-zero biases, tiny Llama, tiny GPT-2 with non-zero biases). Each configuration runs on the two small custom
models; a representative subset runs on the tiny language models. A new check is one more test function taking
``case``; it then runs on every case.

A check that a known, filed defect breaks can mark the cases it applies to ``xfail(strict=True)`` through
``matrix(xfail=...)``, with the reason, so that the mark has to go when the defect is fixed (the issue-10 defects
were marked so, and their marks went with the fixes).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from typing import Callable

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from neuroada import AdapterLoadError, NeuroAdaConfig, NeuroAdaLayer, triton_backend
from neuroada.selection import selection_fingerprint
from conftest import tiny_gpt2, tiny_llama

# ------------------------------------------------------------------------------------------------------ models


class MLP(nn.Module):
    """Three adaptable linear layers (two of the same shape) and a head."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(16, 24)
        self.lin1 = nn.Linear(24, 24)
        self.lin2 = nn.Linear(24, 24)
        self.head = nn.Linear(24, 6)

    def forward(self, x):
        return self.head(torch.tanh(self.lin2(torch.tanh(self.lin1(torch.tanh(self.lin0(x)))))))


class Conv1DStack(nn.Module):
    """GPT-2's Conv1D (weight stored [in, out]) with non-zero biases: GPT-2's own init zeroes them, which hides a
    path that drops the bias."""

    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(24, 16)  # Conv1D(out, in)
        self.c_mid = Conv1D(24, 24)
        self.c_proj = Conv1D(24, 24)
        self.head = nn.Linear(24, 6)
        for layer in (self.c_fc, self.c_mid, self.c_proj):
            nn.init.normal_(layer.weight, std=0.3)
            nn.init.normal_(layer.bias, std=0.5)

    def forward(self, x):
        return self.head(torch.tanh(self.c_proj(torch.tanh(self.c_mid(torch.tanh(self.c_fc(x)))))))


def gpt2_with_biases(seed: int = 0):
    model = tiny_gpt2(seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Conv1D):
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.2)
    return model


@dataclasses.dataclass(frozen=True)
class ModelCase:
    name: str
    build: Callable[[], nn.Module]  # seeded: two calls give the same weights
    targets: object  # target_modules
    saved_module: str  # what modules_to_save names in the configurations that use it
    language_model: bool
    tiny_shapes: bool  # small enough for the Triton interpreter

    def inputs(self):
        generator = torch.Generator().manual_seed(1)
        if self.language_model:
            return torch.randint(0, 96, (2, 9), generator=generator)
        return torch.randn(2, 5, 16, generator=generator)


def seeded(factory):
    def build():
        torch.manual_seed(0)
        return factory().eval()
    return build


MODELS = {
    "mlp": ModelCase("mlp", seeded(MLP), ["lin0", "lin1", "lin2"], "head", False, True),
    "conv1d": ModelCase("conv1d", seeded(Conv1DStack), ["c_fc", "c_mid", "c_proj"], "head", False, True),
    "llama": ModelCase("llama", tiny_llama, None, "lm_head", True, False),
    "gpt2": ModelCase("gpt2", gpt2_with_biases, None, "ln_f", True, False),
}

# ----------------------------------------------------------------------------------------------- configurations

# name: (NeuroAdaConfig arguments, whether modules_to_save names the model's saved module)
CONFIGS = {
    "k1-magnitude-auto": (dict(k=1), False),
    "k3-smallest-gather": (dict(k=3, selection="smallest", bypass_backend="gather"), False),
    "k2-random-dense-noindices": (dict(k=2, selection="random", seed=3, bypass_backend="dense", save_indices=False),
                                  False),
    "k4-magnitude-fused-noindices": (dict(k=4, bypass_backend="fused", save_indices=False), False),
    "k2-magnitude-fused-saved-module": (dict(k=2, bypass_backend="fused"), True),
    "k2-random-gather-saved-module": (dict(k=2, selection="random", seed=5, bypass_backend="gather"), True),
    "k2-smallest-triton": (dict(k=2, selection="smallest", bypass_backend="triton"), False),
}
LANGUAGE_MODEL_CONFIGS = ["k1-magnitude-auto", "k2-random-dense-noindices", "k2-magnitude-fused-saved-module"]


@dataclasses.dataclass(frozen=True)
class Case:
    model: ModelCase
    config_name: str

    @property
    def id(self) -> str:
        return f"{self.model.name}-{self.config_name}"

    def config(self, with_saved_module: bool = True, **overrides) -> NeuroAdaConfig:
        arguments, saved_module = CONFIGS[self.config_name]
        arguments = dict(dict(arguments, target_modules=self.model.targets), **overrides)
        if saved_module and with_saved_module:
            arguments["modules_to_save"] = [self.model.saved_module]
        return NeuroAdaConfig(**arguments)

    @property
    def arguments(self) -> dict:
        return CONFIGS[self.config_name][0]

    @property
    def saves_module(self) -> bool:
        return CONFIGS[self.config_name][1]

    @property
    def backend(self) -> str:
        return self.arguments.get("bypass_backend", "auto")


def all_cases() -> list[Case]:
    cases = []
    for model in MODELS.values():
        for config_name in CONFIGS if not model.language_model else LANGUAGE_MODEL_CONFIGS:
            if CONFIGS[config_name][0].get("bypass_backend") == "triton" and not model.tiny_shapes:
                continue  # the Triton interpreter is slow: tiny shapes only
            cases.append(Case(model, config_name))
    return cases


def triton_runs_here() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return triton_backend.available(torch.device("cpu")) or torch.cuda.is_available()


def matrix(xfail: dict[str, tuple[Callable[[Case], bool], type]] | None = None):
    """The cases as pytest params; ``xfail`` maps an issue-10 reason to (the cases that it makes fail today, the
    exception they fail with: any other exception is a real failure)."""
    params = []
    for case in all_cases():
        marks = []
        if case.backend == "triton" and not triton_runs_here():
            marks.append(pytest.mark.skip(reason="Triton cannot run here (no GPU, TRITON_INTERPRET unset)"))
        for reason, (applies, raises) in (xfail or {}).items():
            if applies(case):
                marks.append(pytest.mark.xfail(strict=True, reason=reason, raises=raises))
        params.append(pytest.param(case, id=case.id, marks=marks))
    return pytest.mark.parametrize("case", params)


# ------------------------------------------------------------------------------------------------------ helpers


def adapted(case: Case, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k capped at a layer's width: warned, and expected here
        return get_peft_model(case.model.build(), case.config(**overrides))


def run(case: Case, model, inputs=None) -> torch.Tensor:
    inputs = case.model.inputs() if inputs is None else inputs
    if inputs.is_floating_point():
        inputs = inputs.to(next(model.parameters()).dtype)
    with torch.no_grad():
        out = model(input_ids=inputs) if case.model.language_model else model(inputs)
    return out.logits if case.model.language_model else out


def layers(model) -> dict[str, NeuroAdaLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, NeuroAdaLayer)}


def randomize(model, adapter_name: str = "default", scale: float = 0.5, seed: int = 0) -> None:
    """Deltas large enough to change every output visibly (init gives zeros)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model).values():
            delta = layer.neuroada_delta[adapter_name]
            delta.copy_(torch.randn(delta.shape, generator=generator) * scale)


def same_targets(model) -> list[str]:
    return [name.removeprefix("base_model.model.") for name in layers(model)]


def base_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "neuroada_" not in name}


def assert_bitwise_equal(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name


def snapshot(model):
    """What a refused load must leave untouched: module names and types, state, trainability."""
    return ([(name, type(m).__name__) for name, m in model.named_modules()],
            {name: t.detach().clone() for name, t in model.state_dict().items()},
            {name: p.requires_grad for name, p in model.named_parameters()})


def assert_unchanged(model, before) -> None:
    after = snapshot(model)
    assert after[0] == before[0]
    assert_bitwise_equal(before[1], after[1])
    assert after[2] == before[2]


def scale_of(out: torch.Tensor) -> float:
    return max(1.0, out.abs().max().item())


# ------------------------------------------------------------------------------------------------------- checks


@matrix()
def test_identity_at_init(case):
    expected = run(case, case.model.build())
    out = run(case, adapted(case))
    if case.backend == "fused":  # one matmul on W + 0 instead of the base layer's own kernel: equal up to rounding
        torch.testing.assert_close(out, expected, atol=1e-6 * scale_of(expected), rtol=1e-6)
    else:  # the base layer's output plus an exact zero
        assert torch.equal(out, expected)


@matrix()
def test_selection_is_per_neuron_and_per_layer(case):
    model = adapted(case)
    selections = {}
    for name, layer in layers(model).items():
        indices = layer.neuroada_indices["default"].long()
        k = min(case.arguments["k"], layer.in_features)
        assert indices.shape == (layer.out_features, k)
        assert bool((indices[:, 1:] > indices[:, :-1]).all()), "rows must hold k distinct, sorted positions"
        assert 0 <= indices.min() and indices.max() < layer.in_features
        rows = layer.weight_rows().float().abs()
        selection = case.arguments.get("selection", "magnitude")
        if selection != "random":  # brute force: every chosen |W| beats every unchosen one in its row
            chosen = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, indices, True)
            chosen_values = torch.where(chosen, rows, torch.nan)
            other_values = torch.where(chosen, torch.nan, rows)
            if k < layer.in_features:
                if selection == "magnitude":
                    assert (chosen_values.nan_to_num(torch.inf).amin(1) >= other_values.nan_to_num(-1).amax(1)).all()
                else:
                    assert (chosen_values.nan_to_num(-1).amax(1) <= other_values.nan_to_num(torch.inf).amin(1)).all()
        selections.setdefault((layer.out_features, layer.in_features), []).append(indices)
    if case.arguments.get("selection") == "random":
        same_shape = [group for group in selections.values() if len(group) > 1]
        assert same_shape, "the model should have layers of the same shape"
        for group in same_shape:  # a per-layer seed: same-shape layers get different random connections
            assert not torch.equal(group[0], group[1])
        again = adapted(case)
        for (name, layer), other in zip(layers(model).items(), layers(again).values()):
            assert torch.equal(layer.neuroada_indices["default"], other.neuroada_indices["default"]), name


@matrix()
def test_forward_equals_the_merged_weights(case):
    model = adapted(case)
    randomize(model)
    out = run(case, model)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not layers(merged)
    expected = run(case, merged)
    assert not torch.allclose(expected, run(case, case.model.build()), atol=1e-3)
    torch.testing.assert_close(out, expected, atol=1e-5 * scale_of(expected), rtol=1e-5)


@matrix()
def test_disable_adapter_with_merging(case):
    model = adapted(case)
    randomize(model)
    base_out = run(case, case.model.build())
    adapted_out = run(case, model)
    model.merge_adapter()
    torch.testing.assert_close(run(case, model), adapted_out, atol=1e-5 * scale_of(adapted_out), rtol=1e-5)
    with model.disable_adapter():
        assert torch.equal(run(case, model), base_out)
    torch.testing.assert_close(run(case, model), adapted_out, atol=1e-5 * scale_of(adapted_out), rtol=1e-5)


@matrix()
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_refuses_non_finite_deltas(case, bad):
    model = adapted(case)
    randomize(model)
    last = list(layers(model).values())[-1]
    with torch.no_grad():
        last.neuroada_delta["default"][0, 0] = bad
    with pytest.raises(ValueError, match="NaN/inf"):
        model.merge_adapter(safe_merge=True)
    assert not last.merged
    assert all(torch.isfinite(p).all() for name, p in model.named_parameters() if "neuroada_" not in name)


@matrix()
def test_safe_merge_of_finite_deltas_equals_merge(case):
    first, second = adapted(case), adapted(case)
    randomize(first)
    randomize(second)
    first.merge_adapter(safe_merge=True)
    second.merge_adapter()
    assert_bitwise_equal(base_weights(first), base_weights(second))


@matrix()
def test_merge_is_idempotent(case):
    model = adapted(case)
    randomize(model)
    model.merge_adapter()
    once = base_weights(model)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    assert_bitwise_equal(once, base_weights(model))


@matrix()
@pytest.mark.parametrize("order", ["default,other", "other;default"])
def test_merge_unmerge_several_adapters_restores_bits(case, order):
    """Two adapters of the same configuration select the same positions, so unmerging in the wrong order leaves
    one adapter's delta in the weight. The deltas are large (much larger than the weights): subtracting them again
    would not give back the original bits either. ',' merges in one call, ';' one call per adapter."""
    model = adapted(case)
    # The same layers (all-linear would also match the saved module's copy), without a saved module: PEFT activates
    # one saved module at a time.
    model.add_adapter("other", case.config(with_saved_module=False, target_modules=same_targets(model)))
    randomize(model, "default", scale=300.0, seed=0)
    randomize(model, "other", scale=300.0, seed=1)
    model.base_model.set_adapter(["default", "other"])
    both = run(case, model)
    original = base_weights(model)
    if "," in order:
        model.merge_adapter(order.split(","))
    else:
        for name in order.split(";"):
            model.merge_adapter([name])
    assert all(layer.merged for layer in layers(model).values())
    torch.testing.assert_close(run(case, model), both, atol=1e-4 * scale_of(both), rtol=1e-4)
    model.unmerge_adapter()
    assert_bitwise_equal(original, base_weights(model))
    assert torch.equal(run(case, model), both)


@matrix()
def test_adapter_added_while_merged_selects_on_the_base_weight(case):
    model = adapted(case)
    with torch.no_grad():  # merged, the selected entries become 0 (or huge, for "smallest"): W + delta ranks them last
        for layer in layers(model).values():
            original = layer.weight_rows().gather(1, layer.neuroada_indices["default"].long()).float()
            huge = case.arguments.get("selection") == "smallest"
            layer.neuroada_delta["default"].copy_(original.sign() * 1e3 if huge else -original)
    model.merge_adapter()
    model.add_adapter("other", case.config(target_modules=same_targets(model)))
    fresh = adapted(case)
    for (name, layer), clean in zip(layers(model).items(), layers(fresh).values()):
        assert torch.equal(layer.neuroada_indices["other"], clean.neuroada_indices["default"]), name


@matrix()
def test_delete_adapter(case):
    model = adapted(case)
    randomize(model)
    keys_before = set(model.state_dict())
    expected = run(case, model)
    model.add_adapter("other", case.config(with_saved_module=False, target_modules=same_targets(model)))
    randomize(model, "other", seed=3)
    model.base_model.set_adapter(["default", "other"])
    run(case, model)  # builds the op's caches for both
    model.set_adapter("default")
    model.delete_adapter("other")
    assert set(model.state_dict()) == keys_before
    assert "other" not in model.peft_config
    for layer in layers(model).values():
        for attribute in ("neuroada_delta", "neuroada_indices", "bypass_backend", "_patterns", "_merged_originals"):
            assert "other" not in getattr(layer, attribute), attribute
    assert torch.equal(run(case, model), expected)


@matrix()
def test_save_load_round_trip(case, tmp_path):
    model = adapted(case)
    randomize(model)
    expected = run(case, model)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    kinds = {key.rsplit(".", 1)[-1] for key in tensors if ".neuroada_" in key}
    # without indices: the rows a bf16/fp16 copy of the base could select differently are stored (often none), the
    # selection's fingerprint and the base weights at the selection of a few rows
    pinned = {"neuroada_pinned_rows", "neuroada_pinned_indices", "neuroada_selection_fingerprint",
              "neuroada_base_sample"}
    assert kinds == ({"neuroada_delta", "neuroada_indices", "neuroada_base_values"} if case.config().save_indices
                     else {"neuroada_delta"} | pinned)
    assert any(case.model.saved_module in key for key in tensors) == case.saves_module
    loaded = PeftModel.from_pretrained(case.model.build(), tmp_path)
    assert torch.equal(run(case, loaded), expected)
    for name, layer in layers(loaded).items():
        assert layer.bypass_backend["default"] == case.backend, name


@matrix()
def test_load_several_adapters(case, tmp_path):
    model = adapted(case)
    randomize(model, seed=0)
    model.add_adapter("other", case.config())
    randomize(model, "other", seed=1)
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = run(case, model)
    assert not torch.equal(expected["default"], expected["other"])
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.model.build(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    for name in ("other", "default"):
        loaded.set_adapter(name)
        assert torch.equal(run(case, loaded), expected[name]), name


def damage(path, kind: str) -> None:
    """Damage a saved adapter the way a wrong or corrupt file would, keeping the config's fingerprints in step
    with the damaged indices so that only the check aimed at ``kind`` can catch it."""
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    config = json.loads((path / "adapter_config.json").read_text())
    suffix = "neuroada_delta" if kind == "wrong_shape" else "neuroada_indices"
    key = next(k for k in sorted(tensors) if k.endswith(suffix))
    value = tensors[key].clone()
    if kind == "wrong_shape":
        value = torch.cat([value, value[:1]])
    else:
        if kind == "out_of_range":
            value[0, -1] = 255  # uint8 holds it; no adapted layer here is that wide
        else:
            value[0, 1] = value[0, 0]
        layer_name = key.removeprefix("base_model.model.").removesuffix(".neuroada_indices")
        config["selection_fingerprints"][layer_name] = selection_fingerprint(value)
    tensors[key] = value.contiguous()
    save_file(tensors, file)
    (path / "adapter_config.json").write_text(json.dumps(config))


DAMAGE_MESSAGES = {"wrong_shape": "other shapes", "out_of_range": "outside", "duplicate": "repeat|duplicate",
                   "other_base": "selection recomputed from this base model's weights differs"}


def shift_inputs(model, layer_names) -> None:
    """Another base: each adapted weight's input positions rotated by one, so magnitude selection differs."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in layer_names:
            weight = modules[name].weight
            weight.copy_(torch.roll(weight, 1, dims=0 if isinstance(modules[name], Conv1D) else 1))


def not_applicable(case, kind):
    """Why ``kind`` of refusal cannot happen for ``case`` (None when it can)."""
    if kind == "other_base":
        if case.config().save_indices or case.arguments.get("selection") == "random":
            return "only an adapter without indices, whose selection depends on the weights, checks the base"
    elif kind != "wrong_shape" and not case.config().save_indices:
        return "save_indices=False: the file holds no indices to damage"
    elif kind == "duplicate" and case.arguments["k"] < 2:
        return "k=1: a row has no second position to repeat the first in"
    return None


# A load that is not refused fails pytest.raises; one that leaves a trace fails an assertion.
NOT_REFUSED_OR_TRACE_LEFT = (pytest.fail.Exception, AssertionError)


@matrix()
@pytest.mark.parametrize("kind", ["wrong_shape", "out_of_range", "other_base", "duplicate"])
def test_refused_load_of_a_first_adapter_leaves_no_trace(case, kind, tmp_path):
    if not_applicable(case, kind):
        pytest.skip(not_applicable(case, kind))
    model = adapted(case)
    randomize(model)
    model.save_pretrained(tmp_path)
    base = case.model.build()
    if kind == "other_base":
        shift_inputs(base, same_targets(model))
    else:
        damage(tmp_path, kind)
    before = snapshot(base)
    with pytest.raises(AdapterLoadError, match=DAMAGE_MESSAGES[kind]):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)


@matrix()
@pytest.mark.parametrize("kind", ["wrong_shape", "out_of_range", "duplicate"])
def test_refused_load_of_a_second_adapter_leaves_no_trace(case, kind, tmp_path):
    if not_applicable(case, kind):
        pytest.skip(not_applicable(case, kind))
    model = adapted(case)
    randomize(model)
    model.save_pretrained(tmp_path)
    damage(tmp_path, kind)
    target = adapted(case)
    randomize(target, seed=4)
    expected = run(case, target)
    before = snapshot(target)
    with pytest.raises(AdapterLoadError, match=DAMAGE_MESSAGES[kind]):
        target.load_adapter(tmp_path, adapter_name="second")
    assert set(target.peft_config) == {"default"}
    assert_unchanged(target, before)
    assert torch.equal(run(case, target), expected)


@matrix()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_merge_and_unmerge(case, dtype):
    model = adapted(case)
    randomize(model, scale=0.2)
    reference = run(case, model)
    model = model.to(dtype)
    out = run(case, model)
    assert out.dtype == dtype
    # a few roundings of the dtype at the output's scale (measured worst over the cases: 0.7 and 1.3 of them)
    tolerance = 4 * (2**-10 if dtype == torch.float16 else 2**-8) * scale_of(reference)
    torch.testing.assert_close(out.float(), reference, atol=tolerance, rtol=0)
    original = base_weights(model)
    model.merge_adapter()
    torch.testing.assert_close(run(case, model).float(), reference, atol=tolerance, rtol=0)
    model.unmerge_adapter()
    assert_bitwise_equal(original, base_weights(model))


@matrix()
def test_merged_model_cast_to_half_still_unmerges(case):
    model = adapted(case)
    randomize(model, scale=0.2)
    base_out = run(case, case.model.build().half())
    model.merge_adapter()
    model = model.half()
    with model.disable_adapter():
        assert torch.equal(run(case, model), base_out)


@matrix()
def test_training_changes_only_the_deltas(case):
    model = adapted(case)
    model.train()
    frozen = {name: t.detach().clone() for name, t in model.state_dict().items()
              if ".neuroada_delta." not in name and "modules_to_save" not in name}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".neuroada_delta." in n or ".modules_to_save." in n for n in trainable)
    assert any(".modules_to_save." in n for n in trainable) == case.saves_module
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = case.model.inputs()
    for _ in range(2):
        out = model(input_ids=inputs).logits if case.model.language_model else model(inputs)
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    for name, value in frozen.items():
        assert torch.equal(after[name], value), name
    for name, layer in layers(model).items():
        assert layer.neuroada_delta["default"].abs().sum() > 0, f"{name}: its deltas did not train"


# ------------------------------------------------------------------------------------- single-case contract checks


def test_peft_introspection_reports_the_method():
    model = adapted(Case(MODELS["llama"], "k1-magnitude-auto"))
    assert model.get_model_status().peft_types == {"default": "NEUROADA"}


def test_meta_device_base_is_adapted_or_refused_with_a_clear_message():
    with torch.device("meta"):
        model = MLP()
    try:
        get_peft_model(model, NeuroAdaConfig(k=1, target_modules=["lin0"]))
    except (ValueError, RuntimeError) as error:  # refused by NeuroAda itself, saying why
        message = str(error).lower()
        assert "meta" in message and ("neuroada" in message or "selection" in message), message
