"""Whole weights out of sharded ones. Selection must see every input of every neuron, and a merge must write into
the real weight, even when the engine keeps only a shard of it on each process:

- FSDP2 / tensor parallelism: the weight is a ``DTensor``;
- DeepSpeed ZeRO-3: the weight is a partitioned parameter (``ds_id`` set, ``shape`` empty until gathered).

These helpers gather (collectives: every process must call them together, as it does when it builds or merges the
same model).
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.tensor import DTensor


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def is_sharded(param: torch.Tensor) -> bool:
    """Whether this process holds only part of ``param`` (FSDP2 / tensor parallelism, DeepSpeed ZeRO-3): the whole
    of it takes a gather, a collective that one process must not run alone."""
    return isinstance(param, DTensor) or is_zero3_partitioned(param)


def logical_shape(param: torch.Tensor) -> torch.Size:
    """The weight's full shape, also while DeepSpeed ZeRO-3 holds only a partition of it."""
    return param.ds_shape if is_zero3_partitioned(param) else param.shape


def full_copy(param: torch.Tensor) -> torch.Tensor:
    """A detached, whole copy of ``param`` (gathered first when it is sharded)."""
    if isinstance(param, DTensor):
        return param.detach().full_tensor()
    if is_zero3_partitioned(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().clone()
    return param.detach()


def register_with_zero3(module: torch.nn.Module, delta: torch.nn.Parameter, base_weight: torch.Tensor) -> None:
    """Under DeepSpeed ZeRO-3, have ``module``'s forward and backward gather ``delta``.

    ZeRO-3 gathers the parameters a module owns directly when that module runs. The deltas sit in a child
    ParameterDict that is never called, so they are registered as the layer's "external" parameters. (Marking the
    layer a ZeRO-3 leaf instead gathers them for the forward, but the first layer, whose input needs no gradient,
    then fails in backward.) Applies when the base weight is already partitioned (``zero.Init``, as
    ``from_pretrained`` does under an ``HfDeepSpeedConfig``) or transformers reports ZeRO-3 enabled.
    """
    if not (is_zero3_partitioned(base_weight) or _zero3_enabled()):
        return
    import deepspeed

    deepspeed.zero.register_external_parameter(module, delta)


def unregister_from_zero3(module: torch.nn.Module, delta: torch.nn.Parameter) -> None:
    if id(delta) in getattr(module, "_external_params", {}):
        import deepspeed

        deepspeed.zero.unregister_external_parameter(module, delta)


def _zero3_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def writable_whole(params: list[torch.Tensor]):
    """Inside the block each parameter's ``data`` is the whole tensor; what is written into it stays after the block.

    DeepSpeed ZeRO-3: gathered, then re-partitioned from rank 0's copy (every rank writes the same values).
    Unsharded: the weight itself. DTensor weights are rejected with the fix (a DTensor merge would have to write
    only each rank's rows; gathering every weight on every rank defeats the sharding).
    """
    if not any(isinstance(p, DTensor) or is_zero3_partitioned(p) for p in params):
        return contextlib.nullcontext()  # the usual case, without a generator per call (merges run per layer)
    return _writable_sharded(params)


@contextlib.contextmanager
def _writable_sharded(params: list[torch.Tensor]):
    if any(isinstance(p, DTensor) for p in params):
        raise NotImplementedError(
            "merging NeuroAda into a DTensor-sharded (FSDP2 / tensor-parallel) weight is not supported: save the "
            "adapter (get_model_state_dict(..., full_state_dict=True) then save_pretrained(state_dict=...)) and "
            "merge it into an unsharded copy of the base model, e.g. with `neuroada merge`.")
    partitioned = [p for p in params if is_zero3_partitioned(p)]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
            yield
        return
    yield
