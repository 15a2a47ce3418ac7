"""torch.compile sees the bypass ops as single registered nodes: no graph breaks, same results as eager."""

import pytest
import torch
from torch import nn

from neuroada import NeuroAdaConfig, NeuroAdaLinear


def make_layer(backend):
    torch.manual_seed(0)
    base = nn.Linear(24, 10).requires_grad_(False)
    return NeuroAdaLinear(base, "default", NeuroAdaConfig(k=3, init_weights=False, bypass_backend=backend))


def outputs_and_grads(module, layer, x):
    x = x.clone().requires_grad_(True)
    out = module(x)
    return (out,) + torch.autograd.grad(out.square().sum(), (x, layer.neuroada_delta["default"]))


@pytest.mark.parametrize("backend", ["auto", "fused", "gather", "dense"])
def test_full_graph_matches_eager(backend):
    layer = make_layer(backend)
    x = torch.randn(2, 5, 24)
    expected = outputs_and_grads(layer, layer, x)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
    for got, want in zip(outputs_and_grads(compiled, layer, x), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.slow  # inductor compiles C++ kernels: ~20 s
def test_inductor_matches_eager():
    layer = make_layer("auto")
    x = torch.randn(3, 24)
    expected = outputs_and_grads(layer, layer, x)
    compiled = torch.compile(layer, fullgraph=True)
    for got, want in zip(outputs_and_grads(compiled, layer, x), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_compiled_layer_follows_indices_assigned_or_set():
    """A compiled graph keeps the index layouts it was traced with; a new indices tensor (assigned, set_selection,
    loaded) must make it trace again rather than keep the old connections."""
    layer = make_layer("auto").eval()
    x = torch.randn(2, 5, 24)
    compiled = torch.compile(layer, backend="aot_eager")
    with torch.no_grad():
        before = compiled(x)
        indices = layer.neuroada_indices["default"]
        shifted = torch.sort((indices.long() + 1) % 24, dim=1).values.to(indices.dtype)
        layer.neuroada_indices["default"] = shifted
        assigned = compiled(x)
        torch.testing.assert_close(assigned, layer(x))
        assert not torch.allclose(assigned, before)
        layer.set_selection("default", indices)
        torch.testing.assert_close(compiled(x), before)
