"""torchrun worker for tests/lora/test_fsdp2.py: sparse LoRA under FSDP2 (``fully_shard``), 2 gloo ranks.

Per sparsity mode every rank builds the same tiny Llama (same seed), the same 60% magnitude
masks and the same adapters, shards each decoder layer and the root with ``fully_shard``
on a CPU mesh and trains STEPS AdamW steps on its half of every batch. Rank 0 also trains
the unsharded model on the whole batches (what FSDP2 must reproduce), takes the full state
dict, loads it into a fresh unsharded sparse LoRA model and merges there. A second sharded
model (other adapters) is restored from the full state dict, every rank holding it.
``<mode>-rank<r>.pt`` in ``argv[1]`` holds what each rank saw.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest
from conftest import tiny_llama, train_adapters  # noqa: E402

from sparselora.lora import SparseLoRAConfig, apply_sparse_lora, merge_all_lora_weights  # noqa: E402
from sparselora.pruning.mask_generator import compute_unstructured_mask  # noqa: E402

MODES = ("sparse_to_dense", "sparse_to_sparse")
STEPS, BATCH, SEQ, VOCAB = 4, 4, 16, 64  # BATCH rows per step, half on each rank


def build(mode: str, adapter_seed: int = 1):
    """The tiny Llama with 60% magnitude masks and sparse LoRA (default targets); same on every rank."""
    model = tiny_llama(0)
    masks = compute_unstructured_mask(model, 0.6, progress=False)
    torch.manual_seed(adapter_seed)
    config = SparseLoRAConfig(r=4, alpha=8, dropout=0.0, sparsity_mode=mode)
    return apply_sparse_lora(model, masks, config), masks


def shard(model, mesh):
    """FSDP2: each decoder layer is a unit of its own, the root holds the rest (embeddings, norm, head)."""
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def eval_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=eval_ids()).logits.detach().clone()


def local_sizes(model) -> dict[str, tuple[int, int]]:
    """``{parameter: (numel held by this rank, full numel)}``; DTensors are sharded parameters."""
    return {n: (p.to_local().numel() if isinstance(p, DTensor) else p.numel(), p.numel())
            for n, p in model.named_parameters()}


def merge_on_rank0(mode: str, full: dict[str, torch.Tensor]) -> dict:
    """What rank 0 does with the full state dict: a fresh unsharded model, loaded, merged."""
    fresh, _ = build(mode, adapter_seed=99)
    fresh.load_state_dict(full)  # strict: the masks must be in it and equal the model's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse_to_dense: the masked merge drops the pruned part of the update
        merged = merge_all_lora_weights(fresh, preserve_sparsity=True)
    return {"merged_state_dict": {k: v.detach().clone() for k, v in merged.state_dict().items()},
            "merged_logits": logits(merged)}


def run_mode(mode: str, rank: int, mesh) -> dict:
    model, masks = build(mode)
    shard(model, mesh)
    rows = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    result = {"sizes": local_sizes(model), "losses": train_adapters(model, [ids[rows] for ids in batches()])}
    result["logits"] = logits(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result["full_state_dict_keys"] = len(full)  # cpu_offload: only rank 0 holds it

    # restore into another sharded model, every rank passing the whole state dict
    everywhere = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    restored = shard(build(mode, adapter_seed=5)[0], mesh)
    set_model_state_dict(restored, everywhere, options=StateDictOptions(full_state_dict=True))
    result["restored_logits"] = logits(restored)

    if rank == 0:
        reference, _ = build(mode)
        result["reference_losses"] = train_adapters(reference, batches())
        result["reference_state_dict"] = {k: v.detach().clone() for k, v in reference.state_dict().items()}
        result["reference_logits"] = logits(reference)
        result.update(masks=masks, full_state_dict=full, **merge_on_rank0(mode, full))
    return result


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for mode in MODES:
        torch.save(run_mode(mode, rank, mesh), f"{out_dir}/{mode}-rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
