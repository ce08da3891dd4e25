"""Run under ``torchrun --nproc_per_node 2``: saves one safetensors checkpoint's weights
as a torch.distributed.checkpoint, every 2-D tensor sharded by rows across the two
ranks (gloo, CPU), with an optimizer state beside the model, as FSDP training does."""

import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor


def main(source: str, out: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    weights = load_file(f"{source}/model.safetensors")
    model = {
        name: distribute_tensor(t, mesh, [Shard(0) if t.dim() == 2 else Replicate()])
        for name, t in weights.items()
    }
    optim = {f"state.{name}.exp_avg": torch.ones(4) for name in list(model)[:2]}
    dcp.save({"model": model, "optim": optim}, checkpoint_id=out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
