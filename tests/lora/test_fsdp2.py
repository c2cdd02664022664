"""Sparse LoRA under FSDP2: ``fully_shard`` per decoder layer and at the root, 2 gloo ranks on CPU
(torchrun, tests/lora/fsdp2_worker.py), each rank training on half of every batch, both modes.

Checked on what the ranks wrote: every parameter (frozen masked base and adapters) is sharded;
the training equals one process on the whole batches; the full state dict carries the masks
bit for bit; rank 0 loads it into a fresh unsharded model and merges with every pruned weight
exactly zero; a sharded model restored from it computes what the trained one computes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.fsdp

from conftest import run_torchrun, tiny_llama
from sparselora.lora import SparseLoRAConfig, SparseLoRALinear, apply_sparse_lora
from sparselora.ops.masks import unpack_bits

pytest.importorskip("transformers")
if not hasattr(torch.distributed.fsdp, "fully_shard"):  # public from torch 2.6 on
    pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)", allow_module_level=True)

MODES = ("sparse_to_dense", "sparse_to_sparse")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp2")
    run_torchrun("lora/fsdp2_worker.py", out, 2)
    return {mode: [torch.load(out / f"{mode}-rank{r}.pt", weights_only=True) for r in range(2)] for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_every_parameter_is_sharded_across_the_ranks(ranks, mode):
    sizes0, sizes1 = ranks[mode][0]["sizes"], ranks[mode][1]["sizes"]
    assert any(n.endswith("lora_A") for n in sizes0) and any(n.endswith("q_proj.weight") for n in sizes0)
    for name, (local, full) in sizes0.items():
        assert local + sizes1[name][0] == full and 0 < local < full, name


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_equal_one_process_on_all_data(ranks, mode):
    rank0, rank1 = ranks[mode]
    assert rank0["losses"] != rank1["losses"]  # the ranks saw different halves
    # equal halves, equal token counts: the mean of the ranks' losses is the whole batch's loss
    mean = torch.tensor([(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"])])
    torch.testing.assert_close(mean, torch.tensor(rank0["reference_losses"]), atol=1e-5, rtol=0)
    full, reference = rank0["full_state_dict"], rank0["reference_state_dict"]
    assert list(full) == list(reference)
    for key, value in reference.items():  # an AdamW step moves an adapter entry by about lr = 1e-2
        if key.endswith(("lora_A", "lora_B")):
            torch.testing.assert_close(full[key], value, atol=1e-5, rtol=0, msg=key)
        else:  # frozen: the masked base, norms, embeddings and the masks themselves
            assert torch.equal(full[key], value), key
    for logits in (rank0["logits"], rank1["logits"]):
        torch.testing.assert_close(logits, rank0["reference_logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_full_state_dict_carries_the_masks(ranks, mode):
    rank0, rank1 = ranks[mode]
    full, masks = rank0["full_state_dict"], rank0["masks"]
    assert rank1["full_state_dict_keys"] == 0 and rank0["full_state_dict_keys"] == len(full)
    assert {k for k in full if k.endswith(".weight_mask")} == {f"{n}_mask" for n in masks}
    for name, mask in masks.items():
        assert torch.equal(unpack_bits(full[f"{name}_mask"], mask.shape), mask), name
        assert int(full[name][~mask].count_nonzero()) == 0, name  # the base stayed masked
    # a fresh model wrapped without masks takes them from the state dict
    fresh = apply_sparse_lora(tiny_llama(0), {}, SparseLoRAConfig(r=4, alpha=8, dropout=0.0, sparsity_mode=mode))
    fresh.load_state_dict(full)
    layers = {f"{n}.weight": m for n, m in fresh.named_modules() if isinstance(m, SparseLoRALinear)}
    assert layers.keys() == masks.keys()
    assert all(torch.equal(layers[n].weight_mask, m) for n, m in masks.items())


@pytest.mark.parametrize("mode", MODES)
def test_merge_on_rank0_keeps_sparsity_exact(ranks, mode):
    rank0 = ranks[mode][0]
    merged, masks = rank0["merged_state_dict"], rank0["masks"]
    assert not any(k.endswith(("lora_A", "lora_B", "weight_mask")) for k in merged)
    for name, mask in masks.items():
        assert int(merged[name][~mask].count_nonzero()) == 0, name
        assert int(merged[name][mask].count_nonzero()) == int(mask.sum()), name
    if mode == "sparse_to_sparse":  # trained as (W + s·BA) ⊙ M: the merge changes nothing
        torch.testing.assert_close(rank0["merged_logits"], rank0["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_a_sharded_model_restored_from_the_full_state_dict_computes_the_same(ranks, mode):
    for rank in ranks[mode]:
        assert torch.equal(rank["restored_logits"], rank["logits"])
