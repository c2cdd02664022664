"""Masks for checkpoints on disk: streaming equals in-memory, packed files, pruned
checkpoints, the CLI end to end, torch.distributed ranks, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_torchrun
from sparselora.pruning.targets import state_dict_targets
from sparselora.pruning.checkpoint_ops import apply_masks_to_checkpoint, validate_checkpoint_masks
from sparselora.io.checkpoints import Checkpoint
from sparselora.pruning.mask_generator import masks_from_scores
from sparselora.pruning.mask_ops import load_mask, save_mask
from sparselora.pruning.streaming import compute_checkpoint_masks


def make_sharded(tmp_path: Path, integer_valued: bool = False) -> Path:
    """Three shards, mixed dtypes, an index, and non-weight tensors that stay dense."""
    gen = torch.Generator().manual_seed(0)

    def w(*shape, dtype=torch.float32):
        t = torch.randint(-3, 4, shape, generator=gen).float() if integer_valued else torch.randn(shape, generator=gen)
        return t.to(dtype)

    shards = {
        "model-00001-of-00003.safetensors": {"embed.weight": w(50, 16), "layers.0.q.weight": w(16, 16),
                                             "layers.0.q.bias": w(16), "layers.0.up.weight": w(40, 16, dtype=torch.bfloat16)},
        "model-00002-of-00003.safetensors": {"layers.1.q.weight": w(16, 16, dtype=torch.float16),
                                             "layers.1.norm.weight": w(16), "layers.1.up.weight": w(40, 16)},
        "model-00003-of-00003.safetensors": {"layers.1.down.weight": w(16, 40, dtype=torch.bfloat16), "lm_head.weight": w(50, 16)},
    }
    folder = tmp_path / "ckpt"
    folder.mkdir()
    weight_map = {}
    for file, tensors in shards.items():
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    return folder


def in_memory(folder: Path, sparsity: float, global_pruning: bool) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(folder)
    state = {n: ckpt.read(n) for n in ckpt.names}  # checkpoint order
    targets = state_dict_targets(state)
    return masks_from_scores(targets, {t.name: sparsity for t in targets}, None, global_pruning=global_pruning)


@pytest.mark.parametrize("integer_valued", [False, True], ids=["tie-free", "tie-heavy"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_streaming_equals_in_memory(tmp_path, integer_valued, scope):
    folder = make_sharded(tmp_path, integer_valued)
    out = tmp_path / "masks.safetensors"
    summary = compute_checkpoint_masks(folder, 0.6, out, scope=scope, progress=False)
    expected = in_memory(folder, 0.6, scope == "global")
    masks, metadata = load_mask(out)
    assert list(masks) == list(expected)
    assert set(masks) == {"layers.0.q.weight", "layers.0.up.weight", "layers.1.q.weight", "layers.1.up.weight", "layers.1.down.weight"}
    for name in expected:
        assert torch.equal(masks[name], expected[name]), name
    assert metadata["sparsity"] == 0.6 and metadata["scope"] == scope and metadata["source"] == str(folder)
    total = sum(m.numel() for m in masks.values())
    if scope == "global":
        assert summary["total_pruned"] == round(0.6 * total)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_bf16_only_checkpoint_equals_in_memory(tmp_path, scope):
    gen = torch.Generator().manual_seed(4)
    state = {f"l{i}.weight": torch.randn(33, 17, generator=gen).round(decimals=1).to(torch.bfloat16) for i in range(4)}
    save_file(state, tmp_path / "bf16.safetensors")
    compute_checkpoint_masks(tmp_path / "bf16.safetensors", 0.45, tmp_path / "m.safetensors", scope=scope, progress=False)
    masks, _ = load_mask(tmp_path / "m.safetensors")
    expected = in_memory(tmp_path / "bf16.safetensors", 0.45, scope == "global")
    assert all(torch.equal(masks[n], expected[n]) for n in expected)


def test_single_file_and_torch_state_dict_sources(tmp_path):
    state = {"a.weight": torch.randn(30, 20), "b.weight": torch.randn(20, 10).half(), "norm.weight": torch.randn(20)}
    save_file(state, tmp_path / "one.safetensors")
    torch.save(state, tmp_path / "one.pt")
    first = compute_checkpoint_masks(tmp_path / "one.safetensors", 0.3, tmp_path / "m1.safetensors", progress=False)
    second = compute_checkpoint_masks(tmp_path / "one.pt", 0.3, tmp_path / "m2.safetensors", progress=False)
    assert first["pruned"] == second["pruned"]
    m1, _ = load_mask(tmp_path / "m1.safetensors")
    m2, _ = load_mask(tmp_path / "m2.safetensors")
    assert all(torch.equal(m1[n], m2[n]) for n in m1)


def test_packed_round_trip_is_eight_times_smaller(tmp_path):
    masks = {"x.weight": torch.rand(257, 129) > 0.5, "y.weight": torch.rand(7) > 0.5}
    save_mask(masks, tmp_path / "bool.safetensors")
    save_mask(masks, tmp_path / "packed.safetensors", metadata={"note": "p"}, packed=True)
    loaded, meta = load_mask(tmp_path / "packed.safetensors")
    assert meta == {"note": "p"} and all(torch.equal(loaded[n], masks[n]) for n in masks)
    data = lambda p: p.stat().st_size - 8 - int.from_bytes(p.read_bytes()[:8], "little")  # noqa: E731
    assert data(tmp_path / "packed.safetensors") == (257 * 129 + 7) // 8 + 1
    assert data(tmp_path / "bool.safetensors") == 257 * 129 + 7
    with pytest.raises(ValueError, match="packed=True needs format='safetensors'"):
        save_mask(masks, tmp_path / "packed.pt", packed=True)


def test_pruned_checkpoint_keeps_layout_and_zeros_pruned_weights(tmp_path):
    folder = make_sharded(tmp_path)
    masks_path = tmp_path / "masks.safetensors"
    compute_checkpoint_masks(folder, 0.5, masks_path, progress=False)
    assert not validate_checkpoint_masks(folder, masks_path)[0]
    summary = apply_masks_to_checkpoint(folder, masks_path, tmp_path / "pruned", progress=False)
    out = tmp_path / "pruned"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in folder.iterdir())
    ok, report = validate_checkpoint_masks(out, masks_path)
    assert ok and report["global"]["total_pruned"] == summary["pruned"]
    original, pruned = Checkpoint(folder), Checkpoint(out)
    masks, _ = load_mask(masks_path)
    assert pruned.names == original.names
    for name in original.names:
        a, b = original.read(name), pruned.read(name)
        assert a.dtype == b.dtype and a.shape == b.shape
        want = a.masked_fill(~masks[name], 0) if name in masks else a
        assert torch.equal(b, want), name


def run_cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "sparselora", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def test_cli_end_to_end(tmp_path):
    folder = make_sharded(tmp_path)
    masks = tmp_path / "masks.safetensors"
    made = run_cli("masks", folder, "--sparsity", "0.7", "--exclude", "*.down", "-o", masks, "--no-progress")
    assert made.returncode == 0, made.stderr
    assert f"1,792 parameters: {round(0.7 * 1792):,} pruned" in made.stdout
    stats = run_cli("stats", masks, "--plot", tmp_path / "hist.png", "--per-layer")
    assert stats.returncode == 0 and "layers.1.up.weight" in stats.stdout and (tmp_path / "hist.png").is_file()
    assert run_cli("validate", folder, masks).returncode == 1
    applied = run_cli("apply", folder, masks, "-o", tmp_path / "pruned", "--no-progress")
    assert applied.returncode == 0, applied.stderr
    valid = run_cli("validate", tmp_path / "pruned", masks, "--no-progress")
    assert valid.returncode == 0 and valid.stdout.startswith("valid")
    loaded, _ = load_mask(masks)
    assert "layers.1.down.weight" not in loaded


def test_distributed_ranks_equal_one_process(tmp_path):
    folder = make_sharded(tmp_path, integer_valued=True)  # ties cross ranks
    single = tmp_path / "single.safetensors"
    compute_checkpoint_masks(folder, 0.55, single, progress=False)
    out = tmp_path / "dist"
    run_torchrun("pruning/sharded_worker.py", tmp_path, 3)
    shards = [torch.load(tmp_path / f"weights{r}.pt", weights_only=True) for r in range(3)]
    flat = [t for shard in shards for t in shard.values()]
    from sparselora import ops

    expected = ops.select_prune_mask(flat, ops.prune_count(sum(t.numel() for t in flat), 0.55), absolute=True)
    got = [m for r in range(3) for m in load_mask(tmp_path / f"rank{r}.safetensors")[0].values()]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
