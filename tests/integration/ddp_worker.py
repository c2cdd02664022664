"""torchrun worker for tests/integration/test_ddp.py: sparse LoRA under DistributedDataParallel (gloo).

Every rank builds the same tiny Llama (same seed), the same 60% magnitude masks, wraps it
with sparse LoRA and DDP (``broadcast_buffers=True``, the default), and trains 5 AdamW steps
on data of its own. Per sparsity mode it writes ``<mode>-rank<r>.pt`` to ``argv[1]``: the
final state dict, the losses, the sparsity checks before and after merging, and the bytes
DDP broadcasts as buffers (measured by wrapping DDP's broadcast), next to the bytes it would
broadcast if the masks were buffers. Rank 0 also trains the same model in one process on
both ranks' data together (the reference DDP must reproduce).
"""

import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest
from conftest import tiny_llama, train_adapters  # noqa: E402

from sparselora.lora import (  # noqa: E402
    SparseLoRAConfig,
    SparseLoRALinear,
    apply_sparse_lora,
    broadcast_masks,
    merge_all_lora_weights,
    validate_sparsity_preserved,
)
from sparselora.pruning.mask_generator import compute_random_mask, compute_unstructured_mask  # noqa: E402

STEPS, BATCH, SEQ, VOCAB = 5, 4, 16, 64


def build(mode):
    model = tiny_llama(0)
    masks = compute_unstructured_mask(model, 0.6, progress=False)
    config = SparseLoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["Linear"], sparsity_mode=mode)
    torch.manual_seed(1)  # adapters: same init on every rank
    return apply_sparse_lora(model, masks, config), masks


def rank_data(rank):
    gen = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def record_broadcasts(ddp):
    """Wrap DDP's buffer broadcast to count the bytes it sends (calls made after construction)."""
    sent = []
    original = ddp._distributed_broadcast_coalesced

    def counting(tensors, buffer_size, authoritative_rank=0):
        sent.append(sum(t.numel() * t.element_size() for t in tensors))
        return original(tensors, buffer_size, authoritative_rank)

    ddp._distributed_broadcast_coalesced = counting
    return sent


def bytes_if_masks_were_buffers(mode, ids, as_packed):
    """Per-step buffer-broadcast bytes of DDP when every layer registers its mask as a buffer."""
    model, _ = build(mode)
    for module in model.modules():
        if isinstance(module, SparseLoRALinear):
            module.register_buffer("mask_buffer", module.packed_mask.clone() if as_packed else module.weight_mask)
    ddp = DDP(model)
    sent = record_broadcasts(ddp)
    ddp(input_ids=ids, labels=ids).loss.backward()
    return sent[0]


def main(out_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    batches = rank_data(rank)
    for mode in ("sparse_to_dense", "sparse_to_sparse"):
        model, masks = build(mode)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLoRALinear)}
        initial_adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        ddp = DDP(model)  # broadcast_buffers=True: the default
        assert ddp.broadcast_buffers
        buffers = list(ddp.module.named_buffers())
        synced = [(n, b.numel() * b.element_size()) for n, b in ddp.named_module_buffers.items()]
        sent = record_broadcasts(ddp)
        losses = train_adapters(ddp, batches)
        result = {
            "losses": losses,
            "buffer_names": [n for n, _ in buffers],
            "ddp_synced_buffers": synced,
            "broadcast_bytes_per_step": sent,
            "mask_packed_bytes": sum(m.packed_mask.numel() for m in layers.values()),
            "mask_bool_bytes": sum(m.numel() for m in masks.values()),
            "masks_among_buffers": [
                n for n, b in buffers if b.data_ptr() in {m.packed_mask.data_ptr() for m in layers.values()}
            ],
        }
        if rank == 0:
            ids = batches[0]
            result["bytes_if_bool_mask_buffers"] = bytes_if_masks_were_buffers(mode, ids, as_packed=False)
            result["bytes_if_packed_mask_buffers"] = bytes_if_masks_were_buffers(mode, ids, as_packed=True)
        else:  # the helper builds a DDP model: every rank must take part in its construction
            bytes_if_masks_were_buffers(mode, batches[0], as_packed=False)
            bytes_if_masks_were_buffers(mode, batches[0], as_packed=True)
        module = ddp.module
        result["state_dict"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        result["adapters_changed"] = all(
            not torch.equal(p, initial_adapters[n]) for n, p in module.named_parameters() if n.endswith("lora_B")
        )
        result["base_pruned_max_abs"] = max(
            float(layers[n.rpartition(".")[0]].weight.detach()[~m].abs().max()) for n, m in masks.items()
        )
        ok, report = validate_sparsity_preserved(module, masks, tolerance=0.0)
        result["valid_before_merge"], result["violations_before_merge"] = ok, report["global"]["total_violations"]

        if rank == 0:  # one process, both ranks' data in one batch: what DDP must reproduce
            reference, _ = build(mode)
            everything = [torch.cat([a, b]) for a, b in zip(rank_data(0), rank_data(1))]
            result["reference_losses"] = train_adapters(reference, everything)
            result["reference_state_dict"] = {k: v.detach().clone() for k, v in reference.state_dict().items()}

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = merge_all_lora_weights(module, preserve_sparsity=True)
        result["merge_warnings"] = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        ok, report = validate_sparsity_preserved(merged, masks, tolerance=0.0)
        result["valid_after_merge"], result["violations_after_merge"] = ok, report["global"]["total_violations"]
        params = dict(merged.named_parameters())
        result["merged_pruned_nonzero"] = sum(int((params[n].detach()[~m] != 0).sum()) for n, m in masks.items())
        result["merged_pruned_total"] = sum(int((~m).sum()) for m in masks.values())
        result["merged_has_adapters"] = any(isinstance(m, SparseLoRALinear) for m in merged.modules())
        # masks that differ across ranks (here: seeded by the rank) are made equal once by broadcast_masks
        other = tiny_llama(0)
        rank_masks = compute_random_mask(other, 0.5, seed=rank, progress=False)
        other = apply_sparse_lora(other, rank_masks, SparseLoRAConfig(r=4, dropout=0.0, sparsity_mode=mode))
        broadcast_masks(other, src=0)
        result["broadcast_masks"] = {n: m.packed_mask.clone() for n, m in other.named_modules()
                                     if isinstance(m, SparseLoRALinear)}
        result["own_masks_differed"] = any(
            not torch.equal(rank_masks[n], compute_random_mask(tiny_llama(0), 0.5, seed=0, progress=False)[n])
            for n in rank_masks)
        result["broadcast_base_zero"] = all(
            bool((m.weight.detach()[~m.weight_mask] == 0).all()) for m in other.modules() if isinstance(m, SparseLoRALinear))
        torch.save(result, f"{out_dir}/{mode}-rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
