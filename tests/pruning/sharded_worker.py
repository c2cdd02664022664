"""torchrun worker for tests/pruning/test_checkpoints.py: masks of this rank's shards, saved for comparison."""

import sys

import torch
import torch.distributed as dist

from sparselora.pruning.mask_ops import save_mask
from sparselora.pruning.streaming import compute_sharded_masks

dist.init_process_group("gloo")
rank = dist.get_rank()
gen = torch.Generator().manual_seed(100 + rank)  # each rank holds different shards
local = {
    "a.weight": torch.randint(-4, 5, (30 + rank, 16), generator=gen).float(),
    "b.weight": torch.randint(-4, 5, (7, 9), generator=gen).to(torch.bfloat16),
}
masks = compute_sharded_masks(local, 0.55)
save_mask(masks, f"{sys.argv[1]}/rank{rank}.safetensors")
torch.save(local, f"{sys.argv[1]}/weights{rank}.pt")
dist.destroy_process_group()
