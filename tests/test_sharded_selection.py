"""Selection on a sharded weight (a DTensor split over two gloo processes, as under FSDP2) sees the full weight;
merging into it is refused with the fix and changes nothing."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # two torchrun processes: ~10 s

WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from neuroada import NeuroAdaConfig, NeuroAdaLinear, select_per_neuron

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    full = nn.Linear(40, 30)
    expected = select_per_neuron(full.weight.detach(), 3)
    for dim in (0, 1):  # rows split (FSDP's default) and columns split (tensor-parallel style)
        sharded = nn.Linear(40, 30)
        sharded.weight = nn.Parameter(distribute_tensor(full.weight.detach(), mesh, [Shard(dim)]),
                                      requires_grad=False)
        assert sharded.weight.to_local().shape[dim] == (15 if dim == 0 else 20)
        layer = NeuroAdaLinear(sharded, "default", NeuroAdaConfig(k=3))
        indices = layer.neuroada_indices["default"]
        assert type(indices) is torch.Tensor and torch.equal(indices, expected), (dim, dist.get_rank())
        assert layer.neuroada_delta["default"].shape == (30, 3)
        before = sharded.weight.to_local().clone()
        try:
            layer.merge()
            raise AssertionError("merging into a DTensor weight should be refused")
        except NotImplementedError as error:
            assert "neuroada merge" in str(error)
        assert torch.equal(sharded.weight.to_local(), before) and not layer.merged
    open(f"{sys.argv[1]}/ok-{dist.get_rank()}", "w").close()  # files, not prints: two ranks' output interleaves
    dist.destroy_process_group()
""")


def test_selection_gathers_a_sharded_weight_and_merge_refuses_it(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--standalone", str(script), str(tmp_path)],
                            capture_output=True, text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (tmp_path / "ok-0").exists() and (tmp_path / "ok-1").exists()
