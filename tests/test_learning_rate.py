"""The learning-rate rule (neuroada.suggested_learning_rate) and the warning for a LoRA rate kept after swapping
LoraConfig for NeuroAdaConfig."""

import warnings

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

from conftest import tiny_llama
from neuroada import NeuroAdaConfig, NeuroAdaLearningRateWarning, suggested_learning_rate


def test_rule_values_and_bad_k():
    assert suggested_learning_rate(1) == pytest.approx(3e-2)
    assert suggested_learning_rate(8) == pytest.approx(3e-2 / 8)  # a language model: 1/k
    assert suggested_learning_rate(8, "CAUSAL_LM") == suggested_learning_rate(8)
    assert suggested_learning_rate(8, "SEQ_CLS") == pytest.approx(3e-2 / 8**0.5)  # a new head: 1/sqrt(k)
    assert suggested_learning_rate(4, "TOKEN_CLS") == pytest.approx(suggested_learning_rate(1) / 2)
    from peft import TaskType

    assert suggested_learning_rate(8, TaskType.SEQ_CLS) == suggested_learning_rate(8, "SEQ_CLS")  # the enum too
    with pytest.raises(ValueError, match="k must be at least 1"):
        suggested_learning_rate(0)


def _model(k=1):
    return get_peft_model(tiny_llama(), NeuroAdaConfig(k=k, target_modules=["q_proj", "down_proj"]))


def _step(model, optimizer, scheduler=None):
    tokens = torch.randint(0, 96, (2, 6))
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad()


def _caught(model, optimizer, steps=2, scheduler=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            _step(model, optimizer, scheduler)
    return [w for w in caught if issubclass(w.category, NeuroAdaLearningRateWarning)]


def test_a_lora_rate_on_neuroada_deltas_warns_once_with_the_fix():
    model = _model(k=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    caught = _caught(model, optimizer, steps=3)
    assert len(caught) == 1  # once per optimizer, not every step
    message = str(caught[0].message)
    assert "k=1" in message and "learning rate 0.0002" in message and "learning_rate=0.03" in message


@pytest.mark.parametrize("k, rate", [(1, 3e-2), (1, 1e-2), (8, 3e-3), (8, 1e-3), (20, 1e-3), (20, 3e-4)])
def test_rates_near_the_rule_do_not_warn(k, rate):
    model = _model(k=k)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=rate)
    assert _caught(model, optimizer) == []


def test_warmup_from_zero_is_judged_by_the_peak_rate():
    """A scheduler starts at lr 0; the rate the user chose is the group's initial_lr."""
    model = _model(k=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=5, num_training_steps=10)
    assert optimizer.param_groups[0]["lr"] == 0
    assert _caught(model, optimizer, scheduler=scheduler) == []


def test_only_groups_holding_neuroada_deltas_are_judged():
    """A LoRA-rate group for other parameters (a head, say) beside a proper delta group is fine."""
    model = _model(k=1)
    deltas = [p for n, p in model.named_parameters() if "neuroada_delta" in n]
    head = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW([{"params": deltas, "lr": 3e-2}, {"params": head.parameters(), "lr": 1e-5}])
    assert _caught(model, optimizer) == []
    plain = torch.optim.SGD(head.parameters(), lr=1e-6)  # an optimizer without deltas never warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        head(torch.ones(1, 3)).sum().backward()
        plain.step()
    assert not [w for w in caught if issubclass(w.category, NeuroAdaLearningRateWarning)]


def test_trainer_with_a_lora_rate_warns(tmp_path):
    """The one-line swap: LoraConfig -> NeuroAdaConfig with the LoRA run's TrainingArguments (lr 2e-4)."""
    model = _model(k=1)
    data = [{"input_ids": torch.randint(0, 96, (6,)).tolist()} for _ in range(8)]
    for row in data:
        row["labels"] = row["input_ids"]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=2e-4, warmup_steps=1, report_to="none", save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    with pytest.warns(NeuroAdaLearningRateWarning, match="150x below"):
        trainer.train()


# Found by an audit: schedules whose first-step rate is not their peak, an optimizer without a rate, and the lower
# rates that data-aware selections train at.


def test_one_cycle_is_judged_by_its_peak():
    """OneCycleLR starts at max_lr / 25 and records its peak as the group's max_lr."""
    model = _model(k=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.5)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-2, total_steps=10)
    assert _caught(model, optimizer, scheduler=scheduler) == []


def test_an_optimizer_without_a_learning_rate_is_not_judged():
    """transformers' Adafactor with relative steps has lr=None (it crashed the check with a TypeError)."""
    from transformers.optimization import Adafactor

    model = _model(k=1)
    optimizer = Adafactor([p for p in model.parameters() if p.requires_grad], lr=None, relative_step=True,
                          scale_parameter=True, warmup_init=True)
    assert _caught(model, optimizer) == []


def _calibrated(selection, k=1):
    from neuroada import calibrate_selection

    model = get_peft_model(tiny_llama(), NeuroAdaConfig(k=k, target_modules=["q_proj", "down_proj"],
                                                        selection=selection))
    tokens = torch.randint(0, 96, (2, 6))
    calibrate_selection(model, [{"input_ids": tokens, "labels": tokens}])
    return model


@pytest.mark.parametrize("selection", ["activation", "gradient"])
def test_data_aware_selections_are_judged_by_the_rates_they_train_at(selection):
    """Their best rates measured 1-10x below the rule (docs/results.md: SmolLM2 arithmetic, activation, k=1: 3e-3):
    the README's advice must not warn, a LoRA rate still does."""
    model = _calibrated(selection)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    assert _caught(model, optimizer) == []
    model = _calibrated(selection)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    caught = _caught(model, optimizer)
    assert len(caught) == 1 and "data-aware" in str(caught[0].message)


def test_a_deep_copy_of_a_calibrated_adapter_is_still_judged_as_data_aware():
    import copy

    model = copy.deepcopy(_calibrated("activation"))  # the copy's deltas are new Parameters, tracked again
    # 2e-3: allowed for a data-aware selection (down to 3e-4 at k=1), warned about for magnitude (below 3e-3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    assert _caught(model, optimizer) == []


def test_deltas_replaced_without_a_forward_are_still_judged():
    """FSDP2 (fully_shard) replaces each Parameter by a sharded DTensor one, which the optimizer then holds and no
    forward ever marks (the forward sees the unsharded one): such deltas are found through the layers that hold
    them. Simulated by replacing the Parameters the same way, by assignment."""
    from neuroada import NeuroAdaLayer

    model = _model(k=1)
    for layer in [m for m in model.modules() if isinstance(m, NeuroAdaLayer)]:
        old = layer.neuroada_delta["default"]
        layer.neuroada_delta["default"] = torch.nn.Parameter(old.detach().clone())
    deltas = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(deltas, lr=2e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deltas[0].grad = torch.zeros_like(deltas[0])
        optimizer.step()  # the first step, before any forward
    assert [w for w in caught if issubclass(w.category, NeuroAdaLearningRateWarning)]


# Found by a second audit (session 8): a scheduler that keeps its peak to itself, and the advice for classifiers.


def test_a_cyclic_schedule_is_judged_by_the_peak_it_reaches():
    """CyclicLR sets the group's rate (and initial_lr) to base_lr and keeps max_lr on the scheduler: judged at the
    first step, a cycle up to the rule's rate was warned about as 300x too low."""
    model = _model(k=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    scheduler = torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=1e-4, max_lr=3e-2, step_size_up=3)
    assert _caught(model, optimizer, steps=8, scheduler=scheduler) == []
    model = _model(k=1)  # a cycle that peaks at a LoRA rate is still warned about, with its peak
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    scheduler = torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=1e-5, max_lr=2e-4, step_size_up=3)
    caught = _caught(model, optimizer, steps=8, scheduler=scheduler)
    assert len(caught) == 1 and "learning rate 0.0002," in str(caught[0].message)


def test_a_constant_schedule_with_a_lora_rate_still_warns():
    model = _model(k=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    assert len(_caught(model, optimizer, steps=3, scheduler=scheduler)) == 1


def test_the_advice_for_a_classifier_names_the_classifier_rate():
    """k=8 with a new classification head trains well at 3e-2 / sqrt(8) = 0.011 (the command line's default for it);
    the warning named the language-model rate, 0.0037, as that default."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=37, num_labels=3))
    model = get_peft_model(base, NeuroAdaConfig(k=8, task_type="SEQ_CLS", target_modules=["query", "value"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model(input_ids=torch.randint(0, 96, (2, 6)), labels=torch.tensor([0, 2])).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    caught = [w for w in caught if issubclass(w.category, NeuroAdaLearningRateWarning)]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"learning_rate={suggested_learning_rate(8, 'SEQ_CLS'):.2g}" in message and "'SEQ_CLS'" in message


def test_a_group_of_several_task_types_names_the_form_it_was_judged_by():
    """Deltas of a causal-LM and a classifier adapter in one group are judged by the lower (language-model) rate,
    and the warning must name that call, not the classifier's."""
    from neuroada import NeuroAdaLayer

    model = _model(k=8)
    for layer in [m for m in model.modules() if isinstance(m, NeuroAdaLayer)][:1]:
        layer._task_types["default"] = "SEQ_CLS"
        layer._track_delta("default")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    caught = _caught(model, optimizer)
    assert len(caught) == 1
    assert f"({suggested_learning_rate(8):.2g} = neuroada.suggested_learning_rate(8))" in str(caught[0].message)
