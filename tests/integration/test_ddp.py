"""Sparse LoRA under DistributedDataParallel: 2 gloo ranks (torchrun, tests/integration/ddp_worker.py),
different data per rank, 5 AdamW steps, both sparsity modes.

Checked here on what the ranks wrote: identical parameters on every rank (and equal to one
process training on both ranks' data), exact sparsity, and that the masks are not among
the buffers DDP broadcasts before every forward.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_torchrun

MODES = ("sparse_to_dense", "sparse_to_sparse")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_torchrun("integration/ddp_worker.py", out, 2)
    results = {mode: [torch.load(out / f"{mode}-rank{r}.pt", weights_only=True) for r in range(2)] for mode in MODES}
    summary = {
        mode: {k: results[mode][0][k] for k in ("broadcast_bytes_per_step", "ddp_synced_buffers", "mask_packed_bytes",
                                                "mask_bool_bytes", "bytes_if_bool_mask_buffers",
                                                "bytes_if_packed_mask_buffers")}
        for mode in MODES
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))  # shown with pytest -s
    return results


@pytest.mark.parametrize("mode", MODES)
def test_ranks_end_identical(ddp_results, mode):
    rank0, rank1 = ddp_results[mode]
    assert rank0["losses"] != rank1["losses"]  # the ranks did see different data
    assert rank0["adapters_changed"] and rank1["adapters_changed"]
    sd0, sd1 = rank0["state_dict"], rank1["state_dict"]
    assert list(sd0) == list(sd1)
    assert any(k.endswith("lora_A") for k in sd0) and any(k.endswith(".weight_mask") for k in sd0)
    different = [k for k in sd0 if not torch.equal(sd0[k], sd1[k])]
    assert not different


@pytest.mark.parametrize("mode", MODES)
def test_ddp_equals_one_process_on_all_data(ddp_results, mode):
    rank0, rank1 = ddp_results[mode]
    # equal batch sizes and token counts: the mean of the ranks' losses is the full batch's loss
    mean_losses = torch.tensor([(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"])])
    torch.testing.assert_close(mean_losses, torch.tensor(rank0["reference_losses"]), atol=1e-4, rtol=0)
    sd, ref = rank0["state_dict"], rank0["reference_state_dict"]
    assert list(sd) == list(ref)
    for k in sd:  # one AdamW step moves an adapter entry by about lr = 1e-2
        torch.testing.assert_close(sd[k], ref[k], atol=5e-4, rtol=0, msg=k)


@pytest.mark.parametrize("mode", MODES)
def test_sparsity_exact_after_ddp(ddp_results, mode):
    for result in ddp_results[mode]:
        assert result["base_pruned_max_abs"] == 0.0  # the frozen base weights stay masked
        if mode == "sparse_to_sparse":  # the weight the layer computes with is sparse while training
            assert result["valid_before_merge"] and result["violations_before_merge"] == 0
            assert result["merge_warnings"] == []
        else:  # the dense adapter lands on pruned weights until a masked merge
            assert not result["valid_before_merge"]
            assert len(result["merge_warnings"]) == 1 and "preserve_sparsity" in result["merge_warnings"][0]
        assert not result["merged_has_adapters"]
        assert result["valid_after_merge"] and result["violations_after_merge"] == 0
        assert result["merged_pruned_total"] > 0 and result["merged_pruned_nonzero"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_masks_are_not_ddp_buffers(ddp_results, mode):
    for result in ddp_results[mode]:
        assert result["buffer_names"], "the tiny Llama has rotary buffers: DDP did sync buffers"
        assert not any("mask" in name for name in result["buffer_names"])
        assert result["masks_among_buffers"] == []
        synced = dict(result["ddp_synced_buffers"])
        assert not any("mask" in name for name in synced)
        # broadcast_buffers=True: DDP broadcast the buffers before each of the 5 forwards, no masks among them
        sent = result["broadcast_bytes_per_step"]
        assert len(sent) == 5 and all(b == sum(synced.values()) for b in sent)
        assert sent[0] < result["mask_packed_bytes"] < result["mask_bool_bytes"]
    rank0 = ddp_results[mode][0]
    # the same DDP with each layer's mask registered as a buffer sends the masks every step
    assert rank0["bytes_if_bool_mask_buffers"] == rank0["broadcast_bytes_per_step"][0] + rank0["mask_bool_bytes"]
    assert rank0["bytes_if_packed_mask_buffers"] == rank0["broadcast_bytes_per_step"][0] + rank0["mask_packed_bytes"]


@pytest.mark.parametrize("mode", MODES)
def test_broadcast_masks_makes_rank_masks_equal(ddp_results, mode):
    rank0, rank1 = ddp_results[mode]
    assert rank1["own_masks_differed"] and not rank0["own_masks_differed"]  # rank 1 started from other masks
    assert rank0["broadcast_masks"].keys() == rank1["broadcast_masks"].keys()
    for name, bits in rank0["broadcast_masks"].items():
        assert torch.equal(bits, rank1["broadcast_masks"][name]), name
    assert rank0["broadcast_base_zero"] and rank1["broadcast_base_zero"]
