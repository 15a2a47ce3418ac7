import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import examples
from neuroada.selection import index_dtype_for, layer_seed, select_per_neuron, selection_fingerprint


def brute_force_magnitude(weight, k, largest=True):
    """Per row: positions of the k largest (or smallest) |w|, ties to the lower position, sorted."""
    rows = []
    for row in weight.abs().tolist():
        key = (lambda j: (-row[j], j)) if largest else (lambda j: (row[j], j))
        rows.append(sorted(sorted(range(len(row)), key=key)[:k]))
    return torch.tensor(rows)


@settings(max_examples=examples(40))
@given(out_features=st.integers(1, 9), in_features=st.integers(1, 40), data=st.data())
def test_magnitude_and_smallest_match_brute_force(out_features, in_features, data):
    k = data.draw(st.integers(1, in_features))
    # Few distinct values, so that ties are common and the tie rule is exercised.
    values = data.draw(st.lists(st.integers(-3, 3), min_size=out_features * in_features,
                                max_size=out_features * in_features))
    weight = torch.tensor(values, dtype=torch.float32).view(out_features, in_features)
    for criterion, largest in (("magnitude", True), ("smallest", False)):
        chosen = select_per_neuron(weight, k, criterion)
        assert chosen.shape == (out_features, k)
        assert torch.equal(chosen.long(), brute_force_magnitude(weight, k, largest))


def test_every_neuron_gets_k_distinct_connections():
    weight = torch.randn(50, 30)
    chosen = select_per_neuron(weight, 7, "random", seed=3).long()
    for row in chosen:
        assert len(set(row.tolist())) == 7
        assert torch.all(row[1:] > row[:-1])


def test_random_is_reproducible_and_seeded():
    weight = torch.randn(20, 64)
    first = select_per_neuron(weight, 4, "random", seed=1)
    assert torch.equal(first, select_per_neuron(weight, 4, "random", seed=1))
    assert not torch.equal(first, select_per_neuron(weight, 4, "random", seed=2))
    assert layer_seed(0, "a.q_proj") != layer_seed(0, "a.k_proj")


def test_random_does_not_depend_on_weight_values():
    assert torch.equal(select_per_neuron(torch.randn(8, 16), 3, "random", seed=5),
                       select_per_neuron(torch.randn(8, 16), 3, "random", seed=5))


def test_selection_does_not_depend_on_dtype_or_chunking(monkeypatch):
    weight = torch.randn(64, 48)
    expected = select_per_neuron(weight, 5)
    assert torch.equal(select_per_neuron(weight.double(), 5), expected)
    monkeypatch.setattr("neuroada.selection._SELECTION_CHUNK_ELEMENTS", 100)  # two rows per chunk
    assert torch.equal(select_per_neuron(weight, 5), expected)


@pytest.mark.parametrize("in_features, dtype", [(1, torch.uint8), (256, torch.uint8), (257, torch.int16),
                                                (32768, torch.int16), (32769, torch.int32)])
def test_index_dtype_is_the_smallest_that_holds_in_features(in_features, dtype):
    assert index_dtype_for(in_features) == dtype
    assert select_per_neuron(torch.randn(2, in_features), 1).dtype == dtype


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="k=5 is larger than in_features=4"):
        select_per_neuron(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="positive integer"):
        select_per_neuron(torch.randn(3, 4), 0)
    with pytest.raises(ValueError, match="unknown selection criterion"):
        select_per_neuron(torch.randn(3, 4), 1, "biggest")
    with pytest.raises(ValueError, match="needs calibration data"):  # chosen by calibrate_selection instead
        select_per_neuron(torch.randn(3, 4), 1, "gradient")
    with pytest.raises(ValueError, match="NaN or inf"):
        select_per_neuron(torch.tensor([[1.0, float("nan")]]), 1)


def test_fingerprint_tells_selections_apart():
    chosen = select_per_neuron(torch.randn(16, 32), 2)
    assert selection_fingerprint(chosen) == selection_fingerprint(chosen.clone().to(torch.int32))
    changed = chosen.clone()
    changed[3, 0] = (int(changed[3, 0]) + 1) % 32
    assert selection_fingerprint(changed) != selection_fingerprint(chosen)
