"""The learning rate NeuroAda trains well at without a sweep, and a warning when an optimizer runs NeuroAda deltas
far below it.

Adam moves every trainable entry by about the learning rate per step, whatever its gradient's scale. A NeuroAda
neuron has only ``k`` trainable connections, so it needs far larger steps than LoRA's ``A``/``B`` (which move a
whole row of the weight at once) to change its output as much: every sweep in docs/results.md put NeuroAda's best
rate 10-30x above LoRA r=8's, and at LoRA's usual rates (1e-4 to 3e-4) the deltas barely move. The rule below
(3e-2 at k=1, falling as 1/k for language models and as 1/sqrt(k) with a new classification head) is fitted to
those sweeps; see ``suggested_learning_rate``.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Optional

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

# Fitted to the sweeps in docs/results.md (all-MiniLM-L6-v2 with a new 3-class head, width 384; SmolLM2-135M as a
# language model, width 576; 70-150 steps of AdamW with linear decay): 3e-2 at k=1 on every task; at k=8 1e-2 with
# the classification head, 3e-3 for the language model.
RATE_AT_K1 = 3e-2
# PEFT task types that put a new, randomly initialised head on the model (trained at the same rate, in full)
CLASSIFICATION_TASK_TYPES = frozenset({"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"})
# A rate this many times below the rule is LoRA's range, not a choice: warn.
LOW_RATE_FACTOR = 10.0

# Set on each delta Parameter, so that the optimizer hook finds NeuroAda deltas by it: (k, data_aware, task_type),
# the record the check judges by (whether its selection was chosen from data; its adapter's PEFT task type, which
# form of the rule applies)
_RECORD_ATTRIBUTE = "_neuroada_rate_record"
# Data-aware selections put connections on inputs with large activations, and train best at rates up to 10x below
# the rule (docs/results.md): their check allows that much more.
DATA_AWARE_RATE_FACTOR = 10.0
_checked_optimizers: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
# Optimizers whose low rate is not judged yet because a scheduler may still raise it (CyclicLR keeps its peak on the
# scheduler, not in the group): group index -> (highest rate seen, k, data_aware, task types), until the rate stops
# rising.
_rising: "weakref.WeakKeyDictionary[torch.optim.Optimizer, dict]" = weakref.WeakKeyDictionary()
# Objects (the NeuroAda layers) whose ``current_deltas()`` yields (parameter, k, data_aware, task_type) for the deltas
# they hold now: asked at each optimizer's first step, so that a delta whose Parameter object was replaced without being
# marked (FSDP2's sharded DTensor parameters, a user's assignment) is still judged.
_delta_holders: "weakref.WeakSet" = weakref.WeakSet()
_hook_handle = None


class NeuroAdaLearningRateWarning(UserWarning):
    """NeuroAda deltas are being trained at a learning rate far below the one they need (a LoRA rate, usually)."""


def suggested_learning_rate(k: int, task_type: Optional[str] = None) -> float:
    """The peak AdamW learning rate for NeuroAda deltas with ``k`` connections per neuron.

    - a language model (``task_type`` ``"CAUSAL_LM"``, ``None`` and every other PEFT task type): ``3e-2 / k``
      (k=1: 3e-2, k=8: 3.75e-3, k=20: 1.5e-3);
    - with a new classification head trained alongside (``"SEQ_CLS"``, ``"TOKEN_CLS"``, ``"QUESTION_ANS"``):
      ``3e-2 / sqrt(k)`` (k=8: 1.06e-2, k=20: 6.7e-3).

    Fitted on two small models (widths 384 and 576), short runs (70-150 steps) with linear decay and warmup: one
    model per form, so which of the head, the model or the task makes the difference is not known. The paper's
    LLaMA-7B rates fall about as 1/k too (9e-3 at k=1, 7e-4 at k=20), about 3x lower. A starting point, not a
    guarantee: sweep when it matters (docs/results.md shows what each task lost against its swept best)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if task_type is not None and str(task_type).rsplit(".", 1)[-1] in CLASSIFICATION_TASK_TYPES:
        return RATE_AT_K1 / math.sqrt(k)
    return RATE_AT_K1 / k


def track_delta(parameter: torch.nn.Parameter, k: int, data_aware: bool = False,
                task_type: Optional[str] = None) -> None:
    """Mark ``parameter`` as a NeuroAda delta with ``k`` connections per neuron (chosen from data, with
    ``data_aware``; of an adapter of PEFT ``task_type``), and make sure optimizers are checked (once each, at their
    first steps) for rates far below ``suggested_learning_rate(k, task_type)``."""
    global _hook_handle
    setattr(parameter, _RECORD_ATTRIBUTE, (k, data_aware, task_type))
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_pre_hook(_check_learning_rate)


def is_tracked(parameter: torch.nn.Parameter) -> bool:
    return hasattr(parameter, _RECORD_ATTRIBUTE)


def watch_holder(holder) -> None:
    """Ask ``holder.current_deltas()`` for its deltas at each optimizer's first step (see ``_delta_holders``)."""
    _delta_holders.add(holder)


def _held_deltas() -> dict[int, tuple[int, bool, Optional[str]]]:
    """id of each delta Parameter the watched holders hold now -> (k, data_aware, task_type)."""
    held = {}
    for holder in list(_delta_holders):
        for parameter, k, data_aware, task_type in holder.current_deltas():
            held[id(parameter)] = (k, data_aware, task_type)
    return held


def _check_learning_rate(optimizer, args, kwargs) -> None:
    if optimizer in _rising:
        _recheck_rising(optimizer)
        return
    if optimizer in _checked_optimizers:  # the only cost on every later step
        return
    _checked_optimizers.add(optimizer)
    held = None
    for index, group in enumerate(optimizer.param_groups):
        rate = _peak_rate(group)
        if rate is None:
            continue
        if held is None:
            held = _held_deltas()
        records = (getattr(p, _RECORD_ATTRIBUTE, None) or held.get(id(p)) for p in group["params"])
        deltas = [record for record in records if record is not None]
        if not deltas:
            continue
        k = max(k for k, _, _ in deltas)
        data_aware = any(aware for _, aware, _ in deltas)
        task_types = {task_type for _, _, task_type in deltas}
        if _too_low(rate, k, data_aware, task_types):
            if "initial_lr" in group:  # a scheduler runs this group and may raise the rate yet: judge its peak
                _rising.setdefault(optimizer, {})[index] = (rate, k, data_aware, task_types)
                continue
            _warn(rate, k, data_aware, task_types, stacklevel=4)
            return


def _recheck_rising(optimizer) -> None:
    """A step after the first, with low rates waiting to be judged: wait while they rise; judge each at its peak."""
    pending = _rising[optimizer]
    for index, (highest, k, data_aware, task_types) in list(pending.items()):
        rate = _peak_rate(optimizer.param_groups[index]) if index < len(optimizer.param_groups) else None
        if rate is not None and rate > highest:
            pending[index] = (rate, k, data_aware, task_types)
            if not _too_low(rate, k, data_aware, task_types):
                del pending[index]
            continue
        del _rising[optimizer]
        _warn(highest, k, data_aware, task_types, stacklevel=5)
        return
    if not pending:
        del _rising[optimizer]


def _rule_form(k: int, task_types: set) -> Optional[str]:
    """The task type whose form of the rule a group of deltas is judged by: the language-model form unless every
    adapter in it classifies (the lower rate of the two, so the check warns only where both forms agree)."""
    return min(task_types or {None}, key=lambda task_type: suggested_learning_rate(k, task_type))


def _suggested(k: int, task_types: set) -> float:
    return suggested_learning_rate(k, _rule_form(k, task_types))


def _too_low(rate: float, k: int, data_aware: bool, task_types: set) -> bool:
    floor = _suggested(k, task_types) / (DATA_AWARE_RATE_FACTOR if data_aware else 1.0)
    return rate * LOW_RATE_FACTOR < floor


def _warn(rate: float, k: int, data_aware: bool, task_types: set, stacklevel: int) -> None:
    form = _rule_form(k, task_types)
    suggested = suggested_learning_rate(k, form)
    call = f"neuroada.suggested_learning_rate({k}{'' if form is None else ', ' + repr(form)})"
    floor = suggested / DATA_AWARE_RATE_FACTOR
    advice = (f"Sweep learning_rate between {floor:.2g} and {suggested:.2g}: data-aware selections (activation, "
              "gradient) trained best up to 10x below the rule, and the rule's rate can be too high for them"
              if data_aware else f"Use learning_rate={suggested:.2g} (the neuroada command line's default)")
    warnings.warn(
        f"NeuroAda deltas (k={k}) are trained at learning rate {rate:g}, {suggested / max(rate, 1e-30):.0f}x "
        f"below the rate they train well at ({suggested:.2g} = {call}). "
        "Sparse deltas need much larger rates than LoRA: at LoRA's usual 1e-4..3e-4 they barely move and the "
        f"model stays close to the base. {advice}, or silence this with warnings.filterwarnings('ignore', "
        "category=neuroada.NeuroAdaLearningRateWarning) if the low rate is intended.",
        NeuroAdaLearningRateWarning, stacklevel=stacklevel)


def _peak_rate(group: dict) -> Optional[float]:
    """The highest rate a parameter group is scheduled to reach, as far as the group tells: a warmup starts near 0
    and keeps the rate the user chose as ``initial_lr``; OneCycleLR keeps its peak as ``max_lr``. None where the
    optimizer has no rate (transformers' Adafactor with relative steps)."""
    rates = [group.get(key) for key in ("initial_lr", "max_lr", "lr")]
    rates = [float(rate) for rate in rates if rate is not None]
    if not rates or group.get("relative_step"):
        return None
    return max(rates)
