"""What neuroada relies on in PEFT beyond its public API (see src/neuroada/_peft_integration.py).

When a PEFT release breaks one of these, this file says which, instead of a confusing failure elsewhere."""

import inspect
import tomllib
from pathlib import Path

import peft
from packaging.specifiers import SpecifierSet
from peft import mapping
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType

import neuroada
from neuroada import NeuroAdaConfig, NeuroAdaModel


def test_installed_peft_is_in_the_declared_range():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    declared = next(d for d in pyproject["project"]["dependencies"] if d.startswith("peft"))
    assert peft.__version__ in SpecifierSet(declared.removeprefix("peft"))


def test_method_lookup_dicts_accept_string_keys():
    # PeftType is a str enum: a plain string key is found wherever PEFT looks up a config's peft_type.
    assert issubclass(PeftType, str)
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["NEUROADA"] is NeuroAdaConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["NEUROADA"] is NeuroAdaModel
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["NEUROADA"] == "neuroada_"
    assert NeuroAdaConfig().peft_type.value == "NEUROADA"


def test_registration_is_idempotent():
    neuroada._peft_integration.register(NeuroAdaConfig, NeuroAdaModel)


def test_tuner_hooks_we_override_exist_with_expected_signatures():
    expected = {
        "inject_adapter": ["self", "model", "adapter_name"],
        "_create_and_replace": ["self", "peft_config", "adapter_name", "target", "target_name", "parent",
                                "current_key"],
        "_get_adapter_state_dict": ["model", "config", "adapter_name", "state_dict", "unwanted_adapter_names"],
        "_remap_adapter_state_dict_for_load": ["model", "config", "adapter_name", "state_dict"],
        "_unload_and_optionally_merge": ["self", "merge"],
        "merge_adapter": ["self", "adapter_names", "safe_merge"],
        "unmerge_adapter": ["self"],
    }
    for name, params in expected.items():
        signature = list(inspect.signature(getattr(BaseTuner, name)).parameters)
        assert signature[: len(params)] == params, name


def test_layer_protocol_we_follow():
    for attribute in ("merge", "unmerge", "delete_adapter", "set_adapter", "merged", "disable_adapters"):
        assert hasattr(BaseTunerLayer, attribute), attribute
