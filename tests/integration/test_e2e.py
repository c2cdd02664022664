"""End to end: the command-line demo (train, prune, recover, merge, validate), and a real
pretrained BERT pruned and adapted when its package is installed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sparselora.demo import DemoSettings, run_demo
from sparselora.pruning.mask_ops import load_mask


def test_demo_pipeline_tells_a_true_story(tmp_path):
    result = run_demo(DemoSettings(dense_steps=150, lora_steps=50, output_dir=tmp_path, progress=False), echo=lambda _: None)
    assert result["loss_dense"] < result["loss_initial"]
    assert result["loss_pruned"] > result["loss_dense"]  # pruning 70% hurts
    assert result["loss_lora"] < result["loss_pruned"]  # LoRA recovers some of it
    assert result["merge_max_abs_diff"] < 1e-4 and result["loss_merged"] == pytest.approx(result["loss_lora"], abs=1e-4)
    assert result["sparsity_preserved"] and result["violations"] == 0
    masks, metadata = load_mask(tmp_path / "masks.safetensors")
    assert metadata["sparsity"] == 0.7
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.7 * total)
    assert (tmp_path / "sparsity_hist.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_demo_runs_as_a_user_would(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "sparselora", "demo", "--dense-steps", "5", "--lora-steps", "3", "-o", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "sparsity preserved: True" in proc.stdout
    assert (out / "masks.safetensors").is_file()


@pytest.mark.parametrize("argv", [["demo", "--sparsity", "1.5"], ["demo", "--dense-steps", "-1"], ["nope"]])
def test_cli_rejects_bad_arguments(argv):
    proc = subprocess.run([sys.executable, "-m", "sparselora", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error" in proc.stderr


def test_cli_help():
    proc = subprocess.run([sys.executable, "-m", "sparselora", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "demo" in proc.stdout
