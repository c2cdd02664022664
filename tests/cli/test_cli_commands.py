"""The CLI's commands are records: one file each under ``sparselora/cli/commands/``, listed
once, the parser built from them; their argument types are the API's rules."""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import os
import pkgutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sparselora.cli import build_parser, commands, main
from sparselora.cli.command import Command, Input, Output
from sparselora.cli.commands import masks as masks_command
from sparselora.cli.commands import prune as prune_command
from sparselora.pruning.oneshot import MethodRule, Gathers, magnitude_score, mask_and_zero, method_names, register_method, unregister_method
from sparselora.pruning.oneshot.owl import check_lambda
from sparselora.pruning.streaming import compute_checkpoint_masks
from sparselora.rules import check_dropout, check_nm, check_positive_int, check_sparsity

MODULES = sorted(m.name for m in pkgutil.iter_modules(commands.__path__))


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.mark.parametrize("name", MODULES)
def test_every_command_module_defines_one_listed_record(name):
    module = importlib.import_module(f"{commands.__name__}.{name}")
    assert isinstance(module.COMMAND, Command)
    assert module.__all__ == ["COMMAND"]
    assert [c for c in commands.COMMANDS if c is module.COMMAND] == [module.COMMAND]
    assert module.COMMAND.name.replace("-", "_") == name  # the file is named for its command


def test_the_parser_lists_exactly_the_records():
    assert len(commands.COMMANDS) == len(MODULES)
    names = [c.name for c in commands.COMMANDS]
    assert len(set(names)) == len(names)
    assert list(subcommands(build_parser())) == names
    assert list(subcommands(build_parser(commands.COMMANDS[:2]))) == names[:2]


def refused(capsys, argv: list[str]) -> str:
    """The one stderr line of ``sparselora ARGV`` refused by the parser (exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    return err


def rule_message(rule, *args) -> str:
    with pytest.raises((TypeError, ValueError)) as exc_info:
        rule(*args)
    return str(exc_info.value)


# argv after the command, and the rule call the API makes for the same value
REFUSALS = [
    ("prune", ["--samples", "0"], lambda: check_positive_int(0, "--samples")),
    ("prune", ["--seq-len", "0"], lambda: check_positive_int(0, "--seq-len")),
    ("prune", ["--samples", "-3"], lambda: check_positive_int(-3, "--samples")),
    ("prune", ["--nm", "4:4"], lambda: check_nm(4, 4, "--nm")),
    ("prune", ["--nm", "0:4"], lambda: check_nm(0, 4, "--nm")),
    ("prune", ["--sparsity", "1.0000001"], lambda: check_sparsity(1.0000001, "--sparsity")),
    ("prune", ["--owl-lambda", "0.7"], lambda: check_lambda(0.7, "--owl-lambda")),
    ("demo", ["--dense-steps", "0"], lambda: check_positive_int(0, "--dense-steps")),
    ("demo", ["--lora-steps", "0"], lambda: check_positive_int(0, "--lora-steps")),
    ("demo", ["--rank", "0"], lambda: check_positive_int(0, "--rank")),
    ("demo", ["--sparsity", "nan"], lambda: check_sparsity(float("nan"), "--sparsity")),
    ("masks", ["--sparsity", "-0.1"], lambda: check_sparsity(-0.1, "--sparsity")),
    ("cerebras-config", ["--lora-dropout", "1"], lambda: check_dropout(1.0, "--lora-dropout")),
    ("cerebras-config", ["--lora-r", "0"], lambda: check_positive_int(0, "--lora-r")),
]
REQUIRED = {"prune": ["ckpt", "-o", "out"], "masks": ["ckpt", "-o", "out", "--sparsity", "0.5"], "demo": [],
            "cerebras-config": ["base.yaml", "--masks", "m.safetensors", "-o", "out.yaml"]}


@pytest.mark.parametrize("command,argv,rule", REFUSALS, ids=[" ".join([c, *a]) for c, a, _ in REFUSALS])
def test_bad_values_are_refused_as_the_api_refuses_them(capsys, tmp_path, monkeypatch, command, argv, rule):
    monkeypatch.chdir(tmp_path)
    err = refused(capsys, [command, *REQUIRED[command], *argv])
    assert err == f"sparselora {command}: error: {rule_message(rule)} (see: sparselora {command} --help)\n"
    assert os.listdir(tmp_path) == []  # refused before anything is written


@pytest.mark.parametrize("argv,words", [
    (["--samples", "many"], "argument --samples: 'many' is not an integer"),
    (["--seq-len", "1.5"], "argument --seq-len: '1.5' is not an integer"),
    (["--nm", "2-4"], "argument --nm: '2-4' is not N:M"),
    (["--owl-lambda", "x"], "argument --owl-lambda: 'x' is not a number"),
])
def test_unreadable_values_name_the_flag(capsys, argv, words):
    assert words in refused(capsys, ["prune", *REQUIRED["prune"], *argv])


def test_samples_and_seq_len_have_their_own_types():
    prune = subcommands(build_parser())["prune"]
    types = {a.dest: a.type for a in prune._actions}
    assert len({types["samples"], types["seq_len"], types["nm"], types["sparsity"]}) == 4
    args = prune.parse_args(["ckpt", "-o", "out", "--samples", "1", "--seq-len", "1"])
    assert (args.samples, args.seq_len, args.method) == (1, 1, "wanda")


def test_the_method_is_checked_against_the_engine_table_when_parsed(capsys):
    parser = build_parser()
    for method in method_names():
        assert parser.parse_args(["prune", "ckpt", "-o", "out", "--method", method]).method == method
    # a method the engine knows by the time the flag is read is accepted by the same parser
    register_method("toy", MethodRule(Gathers.NOTHING, magnitude_score, mask_and_zero, scopes=("layer",),
                                      default_scope="layer"))
    try:
        assert parser.parse_args(["prune", "ckpt", "-o", "out", "--method", "toy"]).method == "toy"
    finally:
        unregister_method("toy")
    err = refused(capsys, ["prune", "ckpt", "-o", "out", "--method", "toy"])
    assert f"--method='toy' is unknown; accepted: {', '.join(method_names())}" in err


def test_a_directory_output_names_every_entry_streaming_writes(tmp_path):
    weights = {f"layer.{i}.weight": torch.randn(8, 8) for i in range(3)}
    compute_checkpoint_masks(weights, 0.5, tmp_path / "out", progress=False)
    args = argparse.Namespace(output=str(tmp_path / "out"), distributed=False)
    (output,) = masks_command.COMMAND.outputs(args)
    written = os.listdir(tmp_path / "out")
    assert written and all(any(fnmatch.fnmatchcase(n, p) for p in output.new_entries) for n in written)


def test_a_new_command_is_one_record(tmp_path, monkeypatch, capsys):
    """A record added to the list is parsed, has its input checked, its output guarded
    by --overwrite and removed when it fails: nothing else is written for it."""
    def add_arguments(parser):
        parser.add_argument("source", type=Path)
        parser.add_argument("-o", "--output", type=Path, required=True)
        parser.add_argument("--fail", action="store_true")
        parser.add_argument("--overwrite", action="store_true")

    def run(args, outputs):
        args.output.write_text(args.source.read_text().upper())
        if args.fail:
            raise ValueError("it failed")
        print("copied")
        return 0

    shout = Command(name="shout", help="upper-case a file", description="Upper-case SOURCE into OUTPUT.",
                    add_arguments=add_arguments, run=run, inputs=(Input("source", "source"),),
                    outputs=lambda args: [Output("--output", args.output)])
    monkeypatch.setattr(commands, "COMMANDS", (*commands.COMMANDS, shout))
    (tmp_path / "in.txt").write_text("quiet")
    out = tmp_path / "out.txt"
    assert main(["shout", str(tmp_path / "in.txt"), "-o", str(out)]) == 0
    assert out.read_text() == "QUIET" and capsys.readouterr().out == "copied\n"
    assert main(["shout", str(tmp_path / "in.txt"), "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["shout", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "new.txt")]) == 2
    assert capsys.readouterr().err == f"sparselora shout: error: source {str(tmp_path / 'missing.txt')!r} does not exist\n"
    assert main(["shout", str(tmp_path / "in.txt"), "-o", str(tmp_path / "new.txt"), "--fail"]) == 2
    assert capsys.readouterr().err == "sparselora shout: error: it failed\n"
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "out.txt"]  # the failed run's output is gone
    # replacing a record's run function is all it takes to change what the command does
    monkeypatch.setattr(commands, "COMMANDS", tuple(replace(c, run=lambda a, o: 7) for c in commands.COMMANDS))
    assert main(["shout", str(tmp_path / "in.txt"), "-o", str(tmp_path / "x.txt")]) == 7
