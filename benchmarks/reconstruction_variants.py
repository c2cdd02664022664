"""What a block reconstruction should train: the kept weights under their masks (what
``reconstruct=`` does) or sparse LoRA adapters in ``sparse_to_sparse`` mode merged exactly
afterwards. Quality per second and the optimizer's memory, on SmolLM2-135M-Instruct.

    python benchmarks/reconstruction_variants.py                 # SparseGPT 70% on blocks 0-9, ~6 min
    python benchmarks/reconstruction_variants.py --blocks 4 --ranks 16,64

The first ``--blocks`` decoder blocks are pruned (the rest stay dense, so perplexity stays
meaningful), each reconstructed towards the dense model's block outputs with the same
windows, steps, batches and cosine schedule; only what trains differs. The adapter variant
replaces the engine's reconstruction step for the run (``apply_sparse_lora`` on the block,
Adam on ``lora_A``/``lora_B``, ``merge_all_lora_weights``), with no held-out guard.
Perplexity is that of ``llm_pruning.py``'s held-out text.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import llm_pruning as llm  # noqa: E402  (benchmarks/llm_pruning.py)

from sparselora.lora import SparseLoRAConfig, apply_sparse_lora, merge_all_lora_weights  # noqa: E402
from sparselora.pruning.calibration_text import stdlib_text  # noqa: E402
from sparselora.pruning.oneshot import Reconstruction, prune_model  # noqa: E402
from sparselora.pruning.oneshot import engine  # noqa: E402
from sparselora.pruning.oneshot.reconstruct import split_batches  # noqa: E402


def adapter_step(rank: int, lr: float, state_sizes: list[int]):
    """A stand-in for the engine's reconstruction: sparse_to_sparse adapters of ``rank``."""

    def reconstruct(block, targets, masks, inputs, goal, extras, options, *, batch_count, block_index, ranks=None,
                    report=None):
        prefix = f"model.layers.{block_index}."  # the parameter names seen from the block
        local = {t.name[len(prefix):]: masks[t.name] for t in targets}
        modules = sorted({t.module_name.rsplit(".", 1)[-1] for t in targets})
        apply_sparse_lora(block, local, SparseLoRAConfig(r=rank, alpha=2 * rank, dropout=0.0,
                                                         sparsity_mode="sparse_to_sparse", target_modules=modules))
        params = [p for p in block.parameters() if p.requires_grad]
        state_sizes.append(2 * sum(p.numel() for p in params))
        optimizer = torch.optim.Adam(params, lr=lr)
        training, _ = split_batches(batch_count, options)
        gen = torch.Generator().manual_seed(options.seed + block_index)
        order = [training[i] for i in torch.randperm(len(training), generator=gen).tolist()]
        with torch.enable_grad():
            for step in range(options.steps):
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / options.steps))
                g = order[step % len(order)]
                args, kwargs = extras[g]
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = block(inputs[g], *args, **kwargs)
                out = (out[0] if isinstance(out, tuple) else out).float()
                (out - goal[g].float()).pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        merge_all_lora_weights(block)
        return {"block": block_index, "before": 0.0, "after": 0.0, "kept": True, "steps": options.steps}

    return reconstruct


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--ranks", default="16,64", help="adapter ranks, comma-separated")
    p.add_argument("--adapter-lr", type=float, default=1e-3)
    args = p.parse_args()
    dense, tokenizer = llm.load_smollm2()
    eval_text, pool_text = llm.split_text(stdlib_text(), 0.2, 0)
    eval_windows = llm.windows(torch.tensor(tokenizer.encode(eval_text, add_special_tokens=False)), 48, 256, None)
    pool = torch.tensor(tokenizer.encode(pool_text, add_special_tokens=False))
    calibration = [{"input_ids": w} for w in llm.windows(pool, 32, 256, 0).split(4)]
    include = [f"model.layers.{i}.*" for i in range(args.blocks)]
    options = Reconstruction(precision="bf16")
    # Adam keeps two moments of every entry of the block's weights, pruned ones included
    block_weights = sum(p.numel() for n, p in dense.named_parameters() if n.startswith("model.layers.0.") and p.dim() == 2)
    print(f"SparseGPT {args.sparsity:.0%} on blocks 0-{args.blocks - 1}; {options.steps} steps a block; "
          f"dense perplexity {llm.perplexity(dense, eval_windows):.2f}")
    print(f"{'variant':<32}{'perplexity':>11}{'seconds':>9}{'optimizer state / block':>26}")
    runs = [("one-shot", None, None), ("kept weights, masked (default)", options, None)]
    runs += [(f"sparse_to_sparse adapters r={r}", options, int(r)) for r in args.ranks.split(",")]
    real = engine.reconstruct_block
    for label, recon, rank in runs:
        model = copy.deepcopy(dense)
        sizes: list[int] = []
        if rank is not None:
            engine.reconstruct_block = adapter_step(rank, args.adapter_lr, sizes)
        start = time.perf_counter()
        try:
            prune_model(model, calibration, "sparsegpt", args.sparsity, include=include, reconstruct=recon,
                        progress=False)
        finally:
            engine.reconstruct_block = real
        seconds = time.perf_counter() - start
        state = sizes[0] if sizes else (2 * block_weights if recon else 0)
        print(f"{label:<32}{llm.perplexity(model, eval_windows):>11.2f}{seconds:>8.0f}s"
              f"{state * 4 / 2**20:>19.1f} MiB fp32", flush=True)


if __name__ == "__main__":
    main()
