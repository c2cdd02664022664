"""One-shot pruning of decoder LLMs, block by block: magnitude, Wanda, SparseGPT, OWL.

``plan`` holds the plan and the table of per-method rules (what a method gathers, how it
scores, how it updates the weights); ``blocks`` the block sources (in memory, or read from a
checkpoint into a meta skeleton); ``activations`` the block inputs; ``engine`` the block loop
and OWL's pass, which know no method by name; ``model`` and ``checkpoint`` the two entry
points; ``sparsegpt`` and ``owl`` the algorithms' pure functions; ``reconstruct`` the
training of a pruned block's kept weights towards the dense block's outputs.
"""

from .blocks import (BlockSource, CheckpointBlocks, InMemoryBlocks, block_targets, decoder_targets,
                     find_decoder_blocks, meta_model)
from .checkpoint import MASKS_FILE, prune_checkpoint
from .engine import run_sequential
from .model import prune_model
from .owl import OWL_LAMBDA, OWL_THRESHOLD, outlier_ratio, owl_sparsities
from . import plan
from .plan import *  # noqa: F401,F403 - the plan and the method table, listed in plan.__all__
from .reconstruct import Reconstruction, reconstruct_block
from .sparsegpt import GramAccumulator, sparsegpt_prune_

__all__ = [
    "prune_model",
    "prune_checkpoint",
    *plan.__all__,
    "run_sequential",
    "BlockSource",
    "InMemoryBlocks",
    "CheckpointBlocks",
    "find_decoder_blocks",
    "block_targets",
    "decoder_targets",
    "Reconstruction",
    "reconstruct_block",
    "meta_model",
    "MASKS_FILE",
    "sparsegpt_prune_",
    "GramAccumulator",
    "owl_sparsities",
    "outlier_ratio",
    "OWL_THRESHOLD",
    "OWL_LAMBDA",
]
