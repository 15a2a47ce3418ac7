"""Registration of NeuroAda with PEFT: the one place that relies on PEFT internals.

PEFT has no public plug-in registry: its own ``register_peft_method`` only accepts names that are members of the
closed ``PeftType`` enum (it raises "Unknown PEFT type ... please add an entry to PeftType"), and adding a member
would mean patching PEFT's enum. PEFT looks methods up in four dicts keyed by ``PeftType`` values, and ``PeftType`` is a
``str`` enum, so a plain string key ``"NEUROADA"`` is found by the same lookups (``config.peft_type``, the
``"peft_type"`` read from adapter_config.json). We therefore put our classes into those dicts under that string,
with the checks ``register_peft_method`` does, and never touch the enum. What this relies on is asserted by
``tests/test_peft_contract.py`` for the PEFT versions that ``pyproject.toml`` allows.
"""

from __future__ import annotations


class PeftTypeName(str):
    """A PEFT method name that behaves like a ``PeftType`` member where PEFT uses one: ``.value`` and ``.name`` are
    the name, and ``str()`` reads ``"PeftType.NEUROADA"`` as a member's does (PEFT's ``get_model_status`` takes the
    part after the dot). JSON and comparisons see the plain string ``"NEUROADA"``."""

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:
        return f"PeftType.{self.value}"


NEUROADA_PEFT_TYPE = PeftTypeName("NEUROADA")
NEUROADA_PREFIX = "neuroada_"


def register(config_cls, model_cls) -> None:
    """Make ``get_peft_model``, ``PeftConfig.from_pretrained`` and ``PeftModel.from_pretrained`` know NeuroAda."""
    from peft import mapping

    registries = {
        "config": mapping.PEFT_TYPE_TO_CONFIG_MAPPING,
        "tuner": mapping.PEFT_TYPE_TO_TUNER_MAPPING,
        "prefix": mapping.PEFT_TYPE_TO_PREFIX_MAPPING,
    }
    wanted = {"config": config_cls, "tuner": model_cls, "prefix": NEUROADA_PREFIX}
    for kind, registry in registries.items():
        existing = registry.get(NEUROADA_PEFT_TYPE)
        if existing is not None and _qualname(existing) != _qualname(wanted[kind]):
            raise ImportError(
                f"PEFT already has a method registered as {NEUROADA_PEFT_TYPE!r} ({existing!r}); neuroada cannot "
                "register its own. Use the PEFT version range that neuroada's pyproject.toml allows."
            )
    if NEUROADA_PREFIX in (p for t, p in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items() if t != NEUROADA_PEFT_TYPE):
        raise ImportError(f"another PEFT method already uses the parameter prefix {NEUROADA_PREFIX!r}")
    for kind, registry in registries.items():
        registry[NEUROADA_PEFT_TYPE] = wanted[kind]


def _qualname(obj) -> str:
    # Compare by name, not identity, so that re-importing the module (e.g. importlib.reload) stays idempotent.
    return obj if isinstance(obj, str) else f"{obj.__module__}.{obj.__qualname__}"
