"""torchrun worker: sequential pruning of a checkpoint with the batches split over ranks.

Usage: torchrun --nproc_per_node=N tests/oneshot/prune_worker.py OUT_DIR, where OUT_DIR/ckpt holds
the checkpoint, OUT_DIR/method.txt the method ("cli": run ``sparselora prune`` instead),
OUT_DIR/batches.pt the calibration batches (every rank gets the full list; each takes its
share) and OUT_DIR/options.json, when there, the other keyword arguments. Writes
OUT_DIR/distributed.
"""

import json
import sys
from pathlib import Path

import torch

from sparselora.cli import main
from sparselora.pruning.oneshot import prune_checkpoint

out = Path(sys.argv[1])
method = (out / "method.txt").read_text().strip()
if method == "cli":  # the command line, built-in calibration text, the checkpoint's tokenizer
    sys.exit(main(["prune", str(out / "ckpt"), "--method", "sparsegpt", "--samples", "16", "--seq-len", "16",
                   "--distributed", "--no-progress", "-o", str(out / "distributed")]))
batches = torch.load(out / "batches.pt", weights_only=True)
options = json.loads((out / "options.json").read_text()) if (out / "options.json").exists() else {"owl": method == "wanda"}
prune_checkpoint(out / "ckpt", out / "distributed", method, 0.5, calibration_data=batches, distributed=True,
                 progress=False, **options)
