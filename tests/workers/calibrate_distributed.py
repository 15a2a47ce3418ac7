"""Worker for tests/test_data_selection.py: calibrate_selection on 2 gloo processes, each on its own batches; each
process saves the selection it ends with. Arguments: output folder, tests folder."""

import sys

import torch
import torch.distributed as dist
from peft import get_peft_model

sys.path.insert(0, sys.argv[2])
from conftest import tiny_llama  # noqa: E402
from test_data_selection import make_batches, selections  # noqa: E402

from neuroada import NeuroAdaConfig, calibrate_selection  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
for criterion in ("activation", "gradient"):
    model = get_peft_model(tiny_llama(intermediate_size=300), NeuroAdaConfig(k=2, selection=criterion))
    calibrate_selection(model, make_batches(seed=10 + rank))  # other data on each process
    torch.save(selections(model), f"{sys.argv[1]}/{criterion}-{rank}.pt")
dist.destroy_process_group()
