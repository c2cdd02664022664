"""``python -m sparselora.cerebras fit CONFIG.yaml [cszoo arguments]``.

Imports ``SparseMaskCallback`` (so ModelZoo's validator finds the class a YAML config
names) and hands the command line over to ModelZoo's own CLI.
"""

from __future__ import annotations

import importlib
import sys

from . import callback, sparse_lora_callback  # noqa: F401,E501 - registers SparseMaskCallback, SparseLora as ModelZoo Callbacks
from .merge import main as merge_main

_ENTRY_POINTS = ("cerebras.modelzoo.cli.main", "cerebras.modelzoo.cli.cszoo")


USAGE = """usage: python -m sparselora.cerebras COMMAND [cszoo arguments]

Runs Cerebras ModelZoo's own CLI (cszoo) after importing sparselora's ModelZoo callbacks
(SparseMaskCallback), so that a trainer YAML written by `sparselora cerebras-config` can name
them. Every argument goes to cszoo unchanged, e.g.:

  python -m sparselora.cerebras fit sparse.yaml --target_device CPU --model_dir out/
  python -m sparselora.cerebras config validate sparse.yaml

and one command of its own: fold the adapters of a sparse LoRA run into an exactly sparse
ModelZoo checkpoint that a plain config loads:

  python -m sparselora.cerebras merge out/checkpoint_4.mdl --config sparse.yaml -o merged.mdl

Needs Cerebras ModelZoo 2.10 (cerebras-pytorch 2.10, torch 2.4.0)."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        if callback.MODELZOO_AVAILABLE and argv:
            print("\ncszoo's own help follows.\n", flush=True)
        else:
            return 0
    if not callback.MODELZOO_AVAILABLE:
        print("sparselora.cerebras: error: Cerebras ModelZoo is not installed (it needs cerebras-pytorch 2.10 "
              "and torch 2.4.0; see the README section 'Training on Cerebras CS-3')", file=sys.stderr)
        return 2
    for module_name in _ENTRY_POINTS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        sys.argv = ["cszoo", *argv]
        result = module.main()
        return int(result or 0)
    print("sparselora.cerebras: error: found ModelZoo but not its CLI entry point", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
