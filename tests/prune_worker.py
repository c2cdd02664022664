"""torchrun worker: sequential pruning of a checkpoint with the batches split over ranks.

Usage: torchrun --nproc_per_node=N tests/prune_worker.py OUT_DIR, where OUT_DIR/ckpt holds
the checkpoint and OUT_DIR/batches.pt the calibration batches (every rank gets the full
list; each takes its share). Writes OUT_DIR/distributed.
"""

import sys
from pathlib import Path

import torch

from sparselora.pruning.llm_checkpoint import prune_checkpoint

out = Path(sys.argv[1])
batches = torch.load(out / "batches.pt", weights_only=True)
method = (out / "method.txt").read_text().strip()
prune_checkpoint(out / "ckpt", out / "distributed", method, 0.5, calibration_data=batches, distributed=True,
                 owl=method == "wanda", progress=False)
