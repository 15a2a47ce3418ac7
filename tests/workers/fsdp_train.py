"""Worker for tests/test_fsdp.py: NeuroAda under FSDP2 (fully_shard) on 2 gloo processes, then a single-process
reference on rank 0. Arguments: output folder, tests folder."""

import sys, warnings, torch, torch.distributed as dist
from peft import get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, sys.argv[2])
from conftest import tiny_llama  # noqa: E402

from neuroada import NeuroAdaConfig, NeuroAdaLearningRateWarning  # noqa: E402


def train(model, batches, rank=None):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for batch in batches:
        tokens = batch if rank is None else batch.chunk(2)[rank]  # each rank: half of the global batch
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


out = sys.argv[1]
batches = [torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]
dist.init_process_group("gloo")
rank = dist.get_rank()
model = get_peft_model(tiny_llama(intermediate_size=300), NeuroAdaConfig(k=2))
for block in model.base_model.model.model.layers:
    fully_shard(block)
fully_shard(model)
assert type(model.base_model.model.model.layers[0].self_attn.q_proj.neuroada_delta["default"]).__name__ == "DTensor"
train(model, batches, rank)
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # collective
# (after the state dict is taken) a LoRA rate on the sharded deltas, DTensor Parameters that no forward
# marks, is still warned about
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    low = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    tokens = batches[0].chunk(2)[rank]
    model(tokens, labels=tokens).loss.backward()
    low.step()
    low.zero_grad()
with open(f"{out}/lr_warning_rank{rank}", "w") as handle:
    handle.write(str(any(issubclass(w.category, NeuroAdaLearningRateWarning) for w in caught)))
if rank == 0:
    try:  # the sharded deltas themselves: refused with the way to save (before: a safetensors pointer error)
        model.save_pretrained(f"{out}/sharded")
        refusal = "saved"
    except ValueError as error:
        refusal = str(error)
    with open(f"{out}/sharded_save", "w") as handle:
        handle.write(refusal)
    model.save_pretrained(f"{out}/fsdp", state_dict=full)
    reference = get_peft_model(tiny_llama(intermediate_size=300), NeuroAdaConfig(k=2))
    train(reference, batches)
    reference.save_pretrained(f"{out}/single")
dist.destroy_process_group()
