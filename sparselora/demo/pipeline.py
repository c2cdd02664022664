"""The main job on a built-in default: train, prune, measure, recover with sparse LoRA, merge.

Every number it prints is measured in the run. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..pruning.calibration_text import stdlib_text
from ..pruning.mask_generator import compute_unstructured_mask
from ..pruning.mask_ops import apply_masks_to_model, compute_sparsity_stats, plot_sparsity_histogram, save_mask
from ..lora import SparseLoRAConfig, apply_sparse_lora, merge_all_lora_weights, validate_sparsity_preserved
from .corpus import batches, byte_dataset
from .model import TinyLM, TinyLMConfig

__all__ = ["DemoSettings", "run_demo"]


@dataclass
class DemoSettings:
    sparsity: float = 0.7
    dense_steps: int = 400
    lora_steps: int = 200
    lora_rank: int = 16
    batch_size: int = 32
    seed: int = 0
    output_dir: Path = Path("sparselora-demo")
    progress: bool | None = None


@torch.no_grad()
def _val_loss(model: TinyLM | torch.nn.Module, val: torch.Tensor, context: int, n_batches: int = 8) -> float:
    gen = torch.Generator().manual_seed(1234)  # the same windows for every stage
    was_training = model.training
    model.eval()
    losses = [_loss(model, batches(val, 32, context, gen)).item() for _ in range(n_batches)]
    model.train(was_training)
    return sum(losses) / len(losses)


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _train(model, params, data, steps, lr, settings, desc, gen) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    context = model.config.context if hasattr(model, "config") else 64
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step", disable=None if settings.progress is None else not settings.progress)
    for _ in bar:
        loss = _loss(model, batches(data, settings.batch_size, context, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def run_demo(settings: DemoSettings = DemoSettings(), echo: Callable[[str], None] = print) -> dict:
    """Run the whole pipeline and return the measured numbers."""
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = TinyLMConfig()
    train, val = byte_dataset(stdlib_text(), config.context)
    gen = torch.Generator().manual_seed(settings.seed)
    model = TinyLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    echo(f"[1/5] dense training: TinyLM {n_params/1e6:.2f}M params on {len(train)/1e3:.0f} kB of stdlib docstrings")
    result = {"loss_initial": _val_loss(model, val, config.context)}
    _train(model, model.parameters(), train, settings.dense_steps, 3e-3, settings, "dense", gen)
    result["loss_dense"] = _val_loss(model, val, config.context)

    echo(f"[2/5] global magnitude pruning to {settings.sparsity:.0%}")
    masks = compute_unstructured_mask(model, settings.sparsity, importance_metric="magnitude", global_pruning=True)
    stats = compute_sparsity_stats(masks)
    mask_path, plot_path = out / "masks.safetensors", out / "sparsity_hist.png"
    save_mask(masks, mask_path, metadata={"sparsity": settings.sparsity, "method": "unstructured", "importance": "magnitude", "scope": "global"})
    plot_sparsity_histogram(masks, save_path=plot_path)
    echo(f"      {stats['global']['total_pruned']:,} of {stats['global']['total_params']:,} weights pruned "
         f"({stats['global']['sparsity']:.2%}); per layer {stats['global']['min_layer_sparsity']:.0%}"
         f"–{stats['global']['max_layer_sparsity']:.0%}; masks -> {mask_path}, histogram -> {plot_path}")
    apply_masks_to_model(model, masks)
    result["loss_pruned"] = _val_loss(model, val, config.context)

    echo(f"[3/5] sparse_to_sparse LoRA recovery (r={settings.lora_rank}, {settings.lora_steps} steps)")
    lora_config = SparseLoRAConfig(r=settings.lora_rank, alpha=2 * settings.lora_rank, dropout=0.0,
                                   sparsity_mode="sparse_to_sparse", target_modules=["Linear"])
    model = apply_sparse_lora(model, masks, lora_config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    _train(model, trainable, train, settings.lora_steps, 2e-3, settings, "sparse LoRA", gen)
    result["loss_lora"] = _val_loss(model, val, config.context)

    echo("[4/5] merging adapters into the sparse weights")
    unmerged = copy.deepcopy(model)
    model = merge_all_lora_weights(model, preserve_sparsity=True)
    probe = batches(val, 8, config.context, torch.Generator().manual_seed(99))[:, :-1]
    with torch.no_grad():
        result["merge_max_abs_diff"] = (model(probe) - unmerged(probe)).abs().max().item()
    result["loss_merged"] = _val_loss(model, val, config.context)

    echo("[5/5] validating sparsity")
    ok, report = validate_sparsity_preserved(model, masks, tolerance=0.0)
    result.update(sparsity_preserved=ok, violations=report["global"]["total_violations"],
                  sparsity=stats["global"]["sparsity"], seconds=time.perf_counter() - start)
    echo("")
    echo("stage                         validation loss (nats/byte)")
    for label, key in (("random init", "loss_initial"), ("dense, trained", "loss_dense"),
                       (f"pruned {settings.sparsity:.0%}, no recovery", "loss_pruned"),
                       ("sparse LoRA, before merge", "loss_lora"), ("merged (plain Linear)", "loss_merged")):
        echo(f"  {label:<28}{result[key]:.4f}")
    echo(f"merged vs unmerged outputs: max |diff| = {result['merge_max_abs_diff']:.2e}")
    echo(f"sparsity preserved: {ok} ({result['violations']} non-zero pruned weights; "
         f"{report['global']['total_pruned']:,} checked); total {result['seconds']:.0f} s")
    return result
