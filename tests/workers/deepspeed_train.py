"""Worker for tests/test_deepspeed.py: NeuroAda under DeepSpeed ZeRO-3 through the HF Trainer, 2 gloo processes on
CPU. Arguments: output folder (holds base/ and data.pt), tests folder. Each rank writes marker files for what it
checked, since the ranks' printed output interleaves."""

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import datasets  # noqa: E402
import deepspeed  # noqa: E402
import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

sys.path.insert(0, sys.argv[2])
from test_deepspeed import ZERO3_CONFIG, training_arguments  # noqa: E402

from neuroada import NeuroAdaConfig  # noqa: E402

out = sys.argv[1]
rank = int(os.environ["RANK"])


def mark(name):
    open(os.path.join(out, f"rank{rank}-{name}"), "w").close()


# the selection an unsharded base gives, before anything DeepSpeed is set up
plain = get_peft_model(LlamaForCausalLM.from_pretrained(f"{out}/base"), NeuroAdaConfig(k=2))
expected_indices = {n: b.clone() for n, b in plain.named_buffers() if "neuroada_indices" in n}
del plain

args = TrainingArguments(**training_arguments(f"{out}/trainer", batch=4), deepspeed=ZERO3_CONFIG)
base = LlamaForCausalLM.from_pretrained(f"{out}/base")  # zero.Init: every weight is partitioned
assert base.model.layers[0].self_attn.q_proj.weight.shape == (0,), "the base should be ZeRO-3 partitioned"
model = get_peft_model(base, NeuroAdaConfig(k=2))
got_indices = {n: b for n, b in model.named_buffers() if "neuroada_indices" in n}
assert got_indices.keys() == expected_indices.keys()
assert all(torch.equal(got_indices[n], expected_indices[n]) for n in got_indices), "selection saw a partition"
mark("selection-ok")

trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(torch.load(f"{out}/data.pt")))
assert trainer.is_deepspeed_enabled and args.world_size == 2
trainer.train()
trainer.save_model(f"{out}/zero3")  # collective: gathers the partitions, rank 0 writes

if rank == 0:  # saving the live (partitioned) parameters must refuse, not write empty deltas
    try:
        model.save_pretrained(f"{out}/partitioned")
    except ValueError as error:
        assert "ZeRO-3" in str(error), error
        mark("partitioned-save-refused")

merged = model.merge_and_unload()  # collective: each merged weight is gathered, written, re-partitioned
weight = merged.model.layers[0].self_attn.q_proj.weight
assert weight.shape == (0,), "the merged weight should be partitioned again"
with deepspeed.zero.GatheredParameters([weight]):
    if rank == 0:
        torch.save(weight.detach().clone(), f"{out}/merged_q_proj.pt")
mark("done")
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # a clean shutdown: a rank exiting with the group alive can abort its peer
