"""benchmarks/api.py's floors: a ratio beyond a third of its target fails CI, one within passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_benchmark

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def api():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))  # its siblings (kernels, memory, ...) import by name
        return load_benchmark("api")


def results_at(api, scale: float) -> dict:
    """Every targeted ratio at ``scale`` times its floor (the direction taken into account)."""
    out: dict = {}
    for (group, key), (target, direction, _) in api.TARGETS.items():
        floor = api.floor_of(target, direction)
        value = floor * scale if direction == "min" else floor / scale
        out.setdefault(group, {"ratios": {}})["ratios"][key] = value
    return out


def test_floors_are_a_third_of_the_targets(api):
    assert api.floor_of(4.0, "min") == pytest.approx(4.0 / 3)
    assert api.floor_of(1.6, "max") == pytest.approx(4.8)
    assert ("merge", "float32_sparse_to_dense_speedup") in api.TARGETS
    assert ("masks", "global_fraction_of_read") in api.TARGETS


def test_a_ratio_beyond_its_floor_fails_and_within_passes(api):
    assert api.check_floors(results_at(api, 1.01)) == []
    failing = results_at(api, 1.01)
    failing["merge"]["ratios"]["bfloat16_sparse_to_sparse_speedup"] = 0.9  # floor 1.0
    failing["train"]["ratios"]["fp32_sparse_to_sparse_vs_peft"] = 5.0  # floor 4.8 (a "≤" target)
    lines = api.check_floors(failing)
    assert len(lines) == 2
    assert "bf16 sparse_to_sparse" in lines[0] and "0.9" in lines[0]
    assert "PEFT LoRA, fp32" in lines[1] and "≤ 4.8" in lines[1]


def test_groups_not_run_are_not_judged(api):
    partial = {"merge": results_at(api, 2.0)["merge"]}
    assert api.check_floors(partial) == []
