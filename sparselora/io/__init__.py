"""File formats and checkpoints: the rules for what is read and written live here.

* :mod:`.safetensors` — safetensors read and written one tensor at a time, headers checked
  strictly (byte ranges inside the file and disjoint, integer dims, dtype sizes, metadata);
* :mod:`.checkpoints` — Hugging Face checkpoints (single file, sharded with an index, torch
  state dicts loaded with ``weights_only=True``), every indexed file kept inside its folder;
* :mod:`.mask_files` — the one load/save core of mask files (.pt, .npz, .safetensors, packed)
  and :func:`~.mask_files.convert_mask_file`, used by the pruning API, the CLI and cerebras/;
* :mod:`.packed_masks` — the packed mask file format (8 mask elements per byte) and its index;
* :mod:`.modelzoo` — Cerebras ModelZoo ``.mdl`` checkpoints, read without unpickling;
* :mod:`.atomic` — atomic writes that replace only regular files, and directory swaps;
* :mod:`.paths` — containment of paths named inside files, and outputs kept apart from inputs.
"""

__all__: list[str] = []
