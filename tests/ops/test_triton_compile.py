"""Every Triton kernel compiled ahead of time for A100 (sm_80) and H100/H200 (sm_90) by
Triton's own compiler and ptxas, without a GPU: it compiles, fits the shared memory the
GPU allows, spills no registers, and the GEMM kernels use tensor cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-m", "sparselora.ops.triton.compile_report", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.exists(), run.stdout + run.stderr
    return run, json.loads(out.read_text())


def test_every_kernel_compiles_for_both_architectures(reports):
    from sparselora.ops.triton.compile_report import cases

    _, rows = reports
    names = {case[0] for case in cases()}
    assert {(r["name"], r["arch"]) for r in rows} == {(n, a) for n in names for a in (80, 90)}


def test_no_register_spills_and_shared_memory_fits(reports):
    from sparselora.ops.triton.compile_report import SHARED_LIMIT

    run, rows = reports
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 <= r["shared"] <= SHARED_LIMIT[r["arch"]], r
        assert 0 < r["registers"] <= 255, r
    assert run.returncode == 0, run.stdout + run.stderr


def test_half_precision_gemms_use_tensor_cores(reports):
    _, rows = reports
    gemm = [r for r in rows if r["needs_tensor_core"]]
    assert gemm and all(r["tensor_core"] for r in gemm)
    assert {r["name"].split()[1] for r in gemm} == {"bf16", "fp16"}


def test_interpreter_is_refused():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "sparselora.ops.triton.compile_report", "--arch", "90"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode != 0 and "unset TRITON_INTERPRET" in run.stderr
