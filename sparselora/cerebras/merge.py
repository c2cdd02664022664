"""``python -m sparselora.cerebras merge CKPT --config CONFIG.yaml -o OUT``: fold the adapters
of a ModelZoo checkpoint trained with ``SparseLora`` (or ModelZoo's ``Lora``) into its weights.

sparse_to_sparse gives an exactly sparse checkpoint computing what the trained model
computed; a plain ModelZoo config (no LoRA callback) loads it. Needs cerebras-pytorch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io.modelzoo import load_modelzoo_checkpoint, save_modelzoo_checkpoint
from .config import load_config
from .sparse_lora_callback import merge_state_dict

__all__ = ["lora_settings", "merge_checkpoint", "main"]


def lora_settings(config: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(lora_params, sparsity_mode) of the LoRA callback of a trainer config."""
    phases = config["trainer"] if isinstance(config.get("trainer"), list) else [config.get("trainer", {})]
    for phase in phases:
        for entry in (phase.get("init", {}) or {}).get("callbacks", []) or []:
            for name, kwargs in entry.items():
                if name.lower() == "sparselora":
                    return dict(kwargs["lora_params"]), kwargs.get("sparsity_mode", "sparse_to_sparse")
                if name.lower() == "lora":
                    return dict(kwargs["lora_params"]), "sparse_to_dense"
    raise ValueError("the config has no SparseLora or Lora callback; nothing to merge")


def merge_checkpoint(checkpoint: str | os.PathLike, config: Mapping[str, Any] | str | os.PathLike,
                     output: str | os.PathLike) -> Path:
    """Load a ModelZoo checkpoint, merge its adapters, save it (model state only)."""
    params, mode = lora_settings(load_config(config))
    state = load_modelzoo_checkpoint(checkpoint)
    model_state = state["model"] if isinstance(state, Mapping) and "model" in state else state
    save_modelzoo_checkpoint({"model": merge_state_dict(model_state, params, mode)}, output)
    return Path(output)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparselora.cerebras merge", description=__doc__)
    parser.add_argument("checkpoint", help="ModelZoo checkpoint (.mdl) written by a sparse LoRA run")
    parser.add_argument("--config", required=True, help="the trainer config the run used (for r, alpha, mode)")
    parser.add_argument("-o", "--output", required=True, help="merged checkpoint (.mdl)")
    args = parser.parse_args(argv)
    try:
        out = merge_checkpoint(args.checkpoint, args.config, args.output)
    except (ValueError, TypeError, OSError, RuntimeError, KeyError) as exc:
        print(f"{parser.prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"merged checkpoint -> {out}")
    return 0
