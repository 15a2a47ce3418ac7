"""Offline selection of the trainable connections: k input positions per output neuron.

Everything here is a plain function of a weight tensor (or of a score tensor) laid out as
``[out_features, in_features]`` (one row per output neuron). No model, no data, no gradients: the data-aware
criteria (``DATA_CRITERIA``) compute their scores in :mod:`neuroada.calibration` and select with
:func:`select_top_k_scores`. Results are canonical so that they can be recomputed at load time
and compared across machines: within a row the selected positions are sorted ascending, and ties in the score are
broken by the lower input position.
"""

from __future__ import annotations

import hashlib
import zlib

import torch

WEIGHT_CRITERIA = ("magnitude", "smallest", "random")  # computed from the weights alone, at injection
DATA_CRITERIA = ("activation", "gradient")  # need calibration batches: neuroada.calibrate_selection
SELECTION_CRITERIA = WEIGHT_CRITERIA + DATA_CRITERIA

# Rows are scored in chunks so that selection never holds more than about this many scores (plus their sort
# indices) at once, whatever the size of the weight.
_SELECTION_CHUNK_ELEMENTS = 1 << 24


def index_dtype_for(in_features: int) -> torch.dtype:
    """The smallest integer dtype that holds every position ``0 .. in_features - 1``."""
    if in_features <= 256:
        return torch.uint8
    if in_features <= 2**15:
        return torch.int16
    if in_features <= 2**31:
        return torch.int32
    return torch.int64


def select_per_neuron(
    weight: torch.Tensor,
    k: int,
    criterion: str = "magnitude",
    seed: int = 0,
) -> torch.Tensor:
    """Choose ``k`` input connections for every output neuron (row) of ``weight``.

    Args:
        weight: ``[out_features, in_features]``, any floating dtype and device.
        k: connections per neuron, ``1 <= k <= in_features``.
        criterion: ``"magnitude"`` (largest ``|W[i, j]|``, the paper's default), ``"smallest"`` (smallest
            ``|W[i, j]|``) or ``"random"`` (uniform without replacement, from ``seed``).
        seed: only used by ``"random"``. Drawn on the CPU, so the result is the same on every device.

    Returns:
        ``[out_features, k]`` indices on ``weight``'s device, in :func:`index_dtype_for` ``(in_features)``, each row
        sorted ascending.
    """
    if weight.dim() != 2:
        raise ValueError(f"selection needs a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > in_features:
        raise ValueError(f"k={k} is larger than in_features={in_features}: each neuron has only {in_features} inputs")
    if criterion in DATA_CRITERIA:
        raise ValueError(f"selection criterion {criterion!r} needs calibration data, not only the weight: score the "
                         "layers with neuroada.calibrate_selection(peft_model, batches), or select from your own "
                         "scores with select_top_k_scores")
    if criterion not in WEIGHT_CRITERIA:
        raise ValueError(f"unknown selection criterion {criterion!r}; choose one of {SELECTION_CRITERIA}")

    if criterion == "random":
        generator = torch.Generator(device="cpu").manual_seed(seed)
        scores_all = torch.rand(out_features, in_features, generator=generator)
        chosen = _top_k_rows(scores_all, k, largest=True)
    else:
        if not torch.isfinite(weight).all():
            raise ValueError("the weight holds NaN or inf values; magnitude selection would be meaningless")
        chosen = _top_k_rows(weight, k, largest=(criterion == "magnitude"), use_abs=True)
    return chosen.sort(dim=1).values.to(device=weight.device, dtype=index_dtype_for(in_features))


def select_top_k_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` positions with the largest score in every row of ``scores`` (``[out_features, in_features]``,
    floating), with the conventions of :func:`select_per_neuron`: ties to the lower position, rows sorted ascending,
    :func:`index_dtype_for` ``(in_features)``, on ``scores``' device."""
    if scores.dim() != 2 or not scores.dtype.is_floating_point:
        raise ValueError(f"selection needs 2-D floating scores [out_features, in_features], got shape "
                         f"{tuple(scores.shape)} and dtype {scores.dtype}")
    if not isinstance(k, int) or not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be an integer in 1..{scores.shape[1]} (the inputs per neuron), got {k!r}")
    if not torch.isfinite(scores).all():
        raise ValueError("the selection scores hold NaN or inf values (an overflowing activation or loss?); "
                         "check the calibration batches")
    chosen = _top_k_rows(scores, k, largest=True)
    return chosen.sort(dim=1).values.to(device=scores.device, dtype=index_dtype_for(scores.shape[1]))


def _top_k_rows(scores: torch.Tensor, k: int, largest: bool, use_abs: bool = False) -> torch.Tensor:
    # A stable sort (not torch.topk, whose tie order is unspecified) makes the choice among equal scores the lower
    # position, on every backend.
    rows_per_chunk = max(1, _SELECTION_CHUNK_ELEMENTS // scores.shape[1])
    chunks = []
    for start in range(0, scores.shape[0], rows_per_chunk):
        block = _exact_scores(scores[start : start + rows_per_chunk])
        if use_abs:
            block = block.abs()
        order = torch.sort(block, dim=1, descending=largest, stable=True).indices
        chunks.append(order[:, :k])
    return torch.cat(chunks)


def _exact_scores(block: torch.Tensor) -> torch.Tensor:
    """``block`` in a dtype that holds its values exactly and sorts fast: float32 for 16-bit weights, float64 kept."""
    return block.to(torch.promote_types(block.dtype, torch.float32))


def _boundary(weight: torch.Tensor, indices: torch.Tensor, criterion: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the weakest chosen and the strongest unchosen ``|W|``, as "larger is stronger" scores (negated for
    ``"smallest"``). A row whose selection takes every input gets ``-inf`` as its strongest unchosen score."""
    sign = 1.0 if criterion == "magnitude" else -1.0
    weakest_chosen, strongest_unchosen = [], []
    columns = indices.long()
    rows_per_chunk = max(1, _SELECTION_CHUNK_ELEMENTS // max(weight.shape[1], 1))
    for start in range(0, weight.shape[0], rows_per_chunk):
        scores = _exact_scores(weight[start : start + rows_per_chunk]).abs() * sign
        chosen = columns[start : start + rows_per_chunk].to(scores.device)
        weakest_chosen.append(scores.gather(1, chosen).min(1).values)
        strongest_unchosen.append(scores.scatter(1, chosen, float("-inf")).max(1).values)
    return torch.cat(weakest_chosen), torch.cat(strongest_unchosen)


def is_top_k_selection(weight: torch.Tensor, indices: torch.Tensor, criterion: str) -> bool:
    """Whether ``indices`` is a top-k selection of ``weight`` by ``criterion`` up to ties: in every row each chosen
    ``|W|`` is at least (for ``"smallest"``: at most) each unchosen one, compared in the weight's own dtype. So the
    same weights stored in another precision pass, where exact ties may have been broken another way; another base
    does not. ``"random"`` selections do not depend on the weights, and data-aware ones not on the weights alone, so
    this is False for them: compare the selections themselves."""
    if criterion not in ("magnitude", "smallest"):
        return False
    weakest_chosen, strongest_unchosen = _boundary(weight, indices, criterion)
    return bool((weakest_chosen >= strongest_unchosen).all())


# The precisions a base is commonly loaded in besides the one an adapter was trained on.
_LOAD_PRECISIONS = (torch.bfloat16, torch.float16)


def precision_fragile_rows(weight: torch.Tensor, indices: torch.Tensor, criterion: str) -> torch.Tensor:
    """Rows whose selection recomputed on a bfloat16 or float16 copy of ``weight`` could differ from ``indices``:
    rounding can turn the gap between the weakest chosen and the strongest unchosen weight into a tie (or an exact
    tie exists already). An adapter saved without indices stores these rows' indices, so that it reloads on the same
    base in another precision. Returns a 1-D int64 tensor of row numbers (on the CPU)."""
    if criterion not in ("magnitude", "smallest") or indices.shape[1] == weight.shape[1]:
        return torch.zeros(0, dtype=torch.long)
    weakest_chosen, strongest_unchosen = _boundary(weight, indices, criterion)
    fragile = torch.zeros_like(weakest_chosen, dtype=torch.bool)
    for dtype in _LOAD_PRECISIONS:
        # rounding is monotone and symmetric, so rounding the two boundary values tells what rounding every
        # weight would do to the order between the chosen and the unchosen ones
        fragile |= weakest_chosen.to(dtype) <= strongest_unchosen.to(dtype)
    return fragile.nonzero().flatten().cpu()


def layer_seed(seed: int, module_name: str) -> int:
    """A per-layer seed for random selection, so layers of the same shape get different patterns."""
    return (seed * 1_000_003 + zlib.crc32(module_name.encode())) % (2**63)


def selection_fingerprint(indices: torch.Tensor) -> str:
    """A short, platform-independent hash of a selection; equal selections give equal fingerprints."""
    data = indices.detach().to(device="cpu", dtype=torch.int32).contiguous().numpy().tobytes()
    header = f"{tuple(indices.shape)}".encode()
    return hashlib.blake2b(header + data, digest_size=8).hexdigest()
