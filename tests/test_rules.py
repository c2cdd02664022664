"""One rule, one message: every public entry point that takes a sparsity, an N:M pattern, a
positive count or a LoRA setting refuses the same bad value with the rule's own message
(naming its own argument), whichever layer it lives in: ops, mask generation, mask checks,
one-shot pruning, checkpoints, LoRA, Cerebras configs and the CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import sparselora.ops as ops
from sparselora import rules
from sparselora.cli import main
from sparselora.lora import SparseLoRAConfig
from sparselora.pruning import (
    MaskGenerator,
    compute_masks_for_state_dict,
    compute_nm_mask,
    compute_random_mask,
    compute_structured_mask,
    compute_unstructured_mask,
    owl_sparsities,
    plot_sparsity_histogram,
    prune_model,
    sparsegpt_prune_,
    sparsity_schedule,
    validate_mask,
    validate_nm_mask,
)
from sparselora.pruning.streaming import compute_checkpoint_masks


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def rule_error(rule, *args) -> tuple[type[Exception], str]:
    """The exception type and message the rule itself gives for ``args``."""
    try:
        rule(*args)
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)
    raise AssertionError(f"{rule.__name__}{args} accepted a value this test calls bad")


def assert_refused_like_rule(call, expected: tuple[type[Exception], str]) -> None:
    kind, message = expected
    with pytest.raises(kind) as info:
        call()
    assert message in str(info.value)


def assert_cli_refuses(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


# --- sparsity -----------------------------------------------------------------------------

BAD_SPARSITIES = [
    pytest.param(True, id="True"),
    pytest.param(1.0000001, id="above-one"),
    pytest.param(-0.1, id="negative"),
    pytest.param(float("nan"), id="nan"),
    pytest.param(math.inf, id="inf"),
    pytest.param("0.5", id="string"),
]

SPARSITY_ENTRIES = {
    "ops.prune_count": ("sparsity", lambda v: ops.prune_count(100, v)),
    "compute_unstructured_mask": ("sparsity", lambda v: compute_unstructured_mask(small_model(), v)),
    "compute_structured_mask": ("sparsity", lambda v: compute_structured_mask(small_model(), v)),
    "compute_random_mask": ("sparsity", lambda v: compute_random_mask(small_model(), v)),
    "MaskGenerator": ("sparsity", lambda v: MaskGenerator(small_model(), sparsity=v).generate_masks()),
    "compute_masks_for_state_dict": ("sparsity", lambda v: compute_masks_for_state_dict(small_model().state_dict(), v)),
    "sparsity_schedule": ("final_sparsity", lambda v: sparsity_schedule(v, num_steps=3)),
    "validate_mask": ("expected_sparsity", lambda v: validate_mask(torch.ones(4, dtype=torch.bool), v)),
    "SparseLoRAConfig": ("initial_sparsity", lambda v: SparseLoRAConfig(initial_sparsity=v)),
    "sparsegpt_prune_": ("sparsity", lambda v: sparsegpt_prune_(torch.ones(4, 8), torch.eye(8), v)),
    "prune_model": ("sparsity", lambda v: prune_model(small_model(), None, "magnitude", v)),
    "owl_sparsities": ("target", lambda v: owl_sparsities([0.1, 0.2], v)),
}


@pytest.mark.parametrize("value", BAD_SPARSITIES)
@pytest.mark.parametrize("entry", sorted(SPARSITY_ENTRIES))
def test_every_entry_refuses_a_bad_sparsity_with_the_rule_message(entry, value):
    arg, call = SPARSITY_ENTRIES[entry]
    assert_refused_like_rule(lambda: call(value), rule_error(rules.check_sparsity, value, arg))


@pytest.mark.parametrize("value", BAD_SPARSITIES)
def test_checkpoint_masks_refuse_a_bad_sparsity_before_writing(value, tmp_path):
    out = tmp_path / "masks.safetensors"
    assert_refused_like_rule(lambda: compute_checkpoint_masks(small_model().state_dict(), value, out),
                             rule_error(rules.check_sparsity, value, "sparsity"))
    assert not out.exists()


@pytest.mark.parametrize("text", ["1.0000001", "-0.1", "nan", "inf"])
def test_cli_refuses_a_bad_sparsity_with_the_rule_message(text, tmp_path, capsys):
    _, message = rule_error(rules.check_sparsity, float(text), "--sparsity")
    assert_cli_refuses(["masks", str(tmp_path / "missing"), "--sparsity", text, "-o", str(tmp_path / "m.pt")],
                       message, capsys)


# --- N:M patterns ---------------------------------------------------------------------------

BAD_NM = [
    pytest.param((0, 4), id="n=0"),
    pytest.param((4, 4), id="n=m"),
    pytest.param((5, 4), id="n>m"),
    pytest.param((True, 4), id="bool"),
    pytest.param((2, 4.0), id="float"),
]

NM_ENTRIES = {
    # n and m as arguments of their own: no pair name in the message
    "ops.nm_prune_mask": (None, lambda n, m: ops.nm_prune_mask(torch.rand(4, 8), n, m)),
    "compute_nm_mask": (None, lambda n, m: compute_nm_mask(small_model(), n, m)),
    "validate_nm_mask": (None, lambda n, m: validate_nm_mask(torch.ones(4, 8, dtype=torch.bool), n, m)),
    "sparsegpt_prune_": (None, lambda n, m: sparsegpt_prune_(torch.ones(4, 8), torch.eye(8), n=n, m=m)),
    # one nm=(n, m) argument
    "prune_model": ("nm", lambda n, m: prune_model(small_model(), None, "magnitude", None, nm=(n, m))),
}


@pytest.mark.parametrize("nm", BAD_NM)
@pytest.mark.parametrize("entry", sorted(NM_ENTRIES))
def test_every_entry_refuses_a_bad_nm_with_the_rule_message(entry, nm):
    arg, call = NM_ENTRIES[entry]
    assert_refused_like_rule(lambda: call(*nm), rule_error(rules.check_nm, *nm, arg))


@pytest.mark.parametrize("text", ["0:4", "4:4", "5:4"])
def test_cli_refuses_a_bad_nm_with_the_rule_message(text, tmp_path, capsys):
    n, m = (int(x) for x in text.split(":"))
    _, message = rule_error(rules.check_nm, n, m, "--nm")
    assert_cli_refuses(["prune", str(tmp_path / "missing"), "--nm", text, "-o", str(tmp_path / "out")],
                       message, capsys)


# --- positive counts --------------------------------------------------------------------------

BAD_COUNTS = [pytest.param(0, id="zero"), pytest.param(-1, id="negative"), pytest.param(True, id="True"),
              pytest.param(2.0, id="float")]

COUNT_ENTRIES = {
    "SparseLoRAConfig.r": ("r", lambda v: SparseLoRAConfig(r=v)),
    "sparsegpt_prune_.block_size": ("block_size", lambda v: sparsegpt_prune_(torch.ones(4, 8), torch.eye(8), 0.5,
                                                                              block_size=v)),
    "sparsity_schedule.num_steps": ("num_steps", lambda v: sparsity_schedule(0.5, num_steps=v)),
    "plot_sparsity_histogram.bins": ("bins", lambda v: plot_sparsity_histogram(
        {"w": torch.ones(4, dtype=torch.bool)}, bins=v)),
}


@pytest.mark.parametrize("value", BAD_COUNTS)
@pytest.mark.parametrize("entry", sorted(COUNT_ENTRIES))
def test_every_entry_refuses_a_bad_count_with_the_rule_message(entry, value):
    arg, call = COUNT_ENTRIES[entry]
    assert_refused_like_rule(lambda: call(value), rule_error(rules.check_positive_int, value, arg))


@pytest.mark.parametrize("flag", ["--samples", "--seq-len"])
@pytest.mark.parametrize("text", ["0", "-3"])
def test_cli_refuses_a_bad_count_with_the_rule_message(flag, text, tmp_path, capsys):
    _, message = rule_error(rules.check_positive_int, int(text), flag)
    assert_cli_refuses(["prune", str(tmp_path / "missing"), "--sparsity", "0.5", flag, text,
                        "-o", str(tmp_path / "out")], message, capsys)


# --- the rules themselves -----------------------------------------------------------------------

def test_bool_is_never_a_number():
    for rule, args in ((rules.check_sparsity, (True,)), (rules.check_finite, (False, "alpha")),
                       (rules.check_positive_int, (True, "r")), (rules.check_nm, (True, 4))):
        with pytest.raises(TypeError):
            rule(*args)


def test_accepted_values_come_back_normalised():
    assert rules.check_sparsity(1) == 1.0 and isinstance(rules.check_sparsity(1), float)
    assert rules.check_nm(2, 4) == (2, 4)
    assert rules.check_int(2**64 - 1, "seed", minimum=-(2**63), maximum=2**64 - 1) == 2**64 - 1
    assert rules.check_dropout(0.0) == 0.0
    with pytest.raises(ValueError, match=r"dropout=1\.0 must be a float in \[0, 1\)"):
        rules.check_dropout(1.0)
    with pytest.raises(ValueError, match="mode='x' is unknown; accepted: a, b"):
        rules.check_choice("x", "mode", ("a", "b"))
