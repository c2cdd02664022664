"""The CLI's hygiene: every error is one line on stderr (exit 2), Ctrl-C exits 130, a failed
run leaves none of its outputs behind and never removes what was there before, --overwrite
guards every output, and ``masks -o`` writes the format its suffix names.

Commands run as a user runs them (``python -m sparselora`` in a subprocess); independent
runs start together to keep the file fast on few cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sparselora import cli
from sparselora.cli import commands
from sparselora.pruning.mask_ops import load_mask, save_mask


def _argv(args) -> list[str]:
    return [sys.executable, "-m", "sparselora", *map(str, args)]


def run_many(*commands, cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run the CLI commands side by side; their results in order."""
    procs = [subprocess.Popen(_argv(c), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    results = []
    for command, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=180)
        results.append(subprocess.CompletedProcess(_argv(command), proc.returncode, out, err))
    return results


def run(*args, cwd: Path) -> subprocess.CompletedProcess:
    return run_many(args, cwd=cwd)[0]


def error_line(proc: subprocess.CompletedProcess, command: str, *words: str) -> str:
    """The single stderr line of a failed command (exit 2), checked for form and ``words``."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith(f"sparselora {command}: error: "), line
    assert "Traceback" not in proc.stderr and "\x1b" not in proc.stderr
    for word in words:
        assert word in line, (word, line)
    return line


def listing(folder: Path) -> set[str]:
    return set(os.listdir(folder))  # hidden staging entries included


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}.weight": torch.randn(16, 24, generator=gen) for i in range(3)}
    tensors["layer.0.bias"] = torch.randn(16, generator=gen)
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    return path


@pytest.fixture
def masks_file(tmp_path: Path, checkpoint: Path) -> Path:
    gen = torch.Generator().manual_seed(1)
    masks = {f"layer.{i}.weight": torch.rand(16, 24, generator=gen) > 0.5 for i in range(3)}
    path = tmp_path / "masks.safetensors"
    save_mask(masks, path, {"sparsity": 0.5})
    return path


def test_missing_inputs_and_bad_arguments_are_one_line(tmp_path, checkpoint, masks_file):
    before = listing(tmp_path)
    missing, sparsity, missing_masks, tolerance = run_many(
        ["masks", tmp_path / "nope.safetensors", "--sparsity", "0.5", "-o", tmp_path / "out"],
        ["masks", checkpoint, "--sparsity", "1.5", "-o", tmp_path / "out"],
        ["validate", checkpoint, tmp_path / "gone.safetensors"],
        ["validate", checkpoint, masks_file, "--tolerance", "-1"],
        cwd=tmp_path,
    )
    error_line(missing, "masks", "nope.safetensors")
    error_line(sparsity, "masks", "--sparsity")
    error_line(missing_masks, "validate", "gone.safetensors")
    error_line(tolerance, "validate", "--tolerance")
    assert listing(tmp_path) == before


def test_existing_outputs_need_overwrite(tmp_path, checkpoint, masks_file):
    old_file = tmp_path / "old.safetensors"
    old_file.write_bytes(b"old masks")
    old_dir = tmp_path / "olddir"
    old_dir.mkdir()
    (old_dir / "keep.txt").write_text("mine")
    file_refused, dir_refused, apply_refused, replaced = run_many(
        ["masks", checkpoint, "--sparsity", "0.5", "-o", old_file, "--no-progress"],
        ["masks", checkpoint, "--sparsity", "0.5", "-o", old_dir, "--no-progress"],
        ["apply", checkpoint, masks_file, "-o", old_dir, "--no-progress"],
        ["masks", checkpoint, "--sparsity", "0.5", "-o", tmp_path / "again.safetensors", "--no-progress"],
        cwd=tmp_path,
    )
    for proc, command in [(file_refused, "masks"), (dir_refused, "masks"), (apply_refused, "apply")]:
        line = error_line(proc, command, "--overwrite")
        assert "overwrite=True" not in line
    assert old_file.read_bytes() == b"old masks"
    assert listing(old_dir) == {"keep.txt"}
    assert replaced.returncode == 0, replaced.stderr
    first, _ = load_mask(tmp_path / "again.safetensors")

    proc = run("masks", checkpoint, "--sparsity", "0.5", "-o", old_file, "--overwrite", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    masks, _ = load_mask(old_file)
    assert list(masks) == list(first) and all(torch.equal(masks[n], first[n]) for n in first)


def test_mask_output_format_follows_the_suffix(tmp_path, checkpoint):
    before = listing(tmp_path)
    outputs = ["m.safetensors", "m.pt", "m.npz"]
    *made, unknown, distributed = run_many(
        *[["masks", checkpoint, "--sparsity", "0.6", "-o", tmp_path / name, "--no-progress"] for name in outputs],
        ["masks", checkpoint, "--sparsity", "0.6", "-o", tmp_path / "m.txt", "--no-progress"],
        ["masks", checkpoint, "--sparsity", "0.6", "-o", tmp_path / "d.pt", "--distributed", "--no-progress"],
        cwd=tmp_path,
    )
    for name, proc in zip(outputs, made):
        assert proc.returncode == 0, (name, proc.stderr)
        assert proc.stderr == ""
    reference, meta = load_mask(tmp_path / "m.safetensors")
    assert meta["sparsity"] == 0.6
    assert (tmp_path / "m.pt").read_bytes()[:2] == b"PK"  # torch.save's zip
    assert (tmp_path / "m.npz").read_bytes()[:2] == b"PK"
    for name, fmt in [("m.pt", "pt"), ("m.npz", "npz")]:
        masks, metadata = load_mask(tmp_path / name, format=fmt)
        assert list(masks) == list(reference), name
        assert all(torch.equal(masks[n], reference[n]) for n in reference), name
        assert metadata == meta, name
    line = error_line(unknown, "masks", "m.txt", ".safetensors", ".pt", ".npz", "directory")
    assert "Traceback" not in line
    error_line(distributed, "masks", "--distributed")
    # no staging folder or temporary file is left beside the outputs
    assert listing(tmp_path) == before | set(outputs)


def test_stats_plot_respects_overwrite(tmp_path, masks_file):
    plot = tmp_path / "existing.png"
    plot.write_bytes(b"not a plot, keep me")
    refused = run("stats", masks_file, "--plot", plot, cwd=tmp_path)
    line = error_line(refused, "stats", "existing.png", "--overwrite")
    assert "overwrite=True" not in line
    assert refused.stdout == ""  # refused before any work
    assert plot.read_bytes() == b"not a plot, keep me"
    replaced = run("stats", masks_file, "--plot", plot, "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has_open(pid: int, path: Path) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
        except OSError:
            continue
    return False


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see when the command reads")
def test_ctrl_c_exits_130_and_leaves_no_output(tmp_path):
    # many small tensors under one global threshold: seconds of work in a small file
    gen = torch.Generator().manual_seed(2)
    big = tmp_path / "many.safetensors"
    save_file({f"layer.{i}.weight": torch.randn(8, 8, generator=gen) for i in range(1500)}, big)
    before = listing(tmp_path)
    # the command starts with Ctrl-C's default action, as in a terminal: a test run launched in
    # the background of a non-interactive shell inherits SIGINT ignored, and so would the command
    proc = subprocess.Popen(_argv(["masks", big, "--sparsity", "0.5", "-o", tmp_path / "outdir", "--no-progress"]),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # interrupt once the command is reading the checkpoint (imports are over), not before
        deadline = time.monotonic() + 120
        while not _has_open(proc.pid, big.resolve()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the command never opened the checkpoint"
            time.sleep(0.02)
        time.sleep(0.05)
        assert proc.poll() is None, "the command finished before it could be interrupted; give it more work"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err
    assert err.splitlines() == ["sparselora masks: interrupted"], err
    assert listing(tmp_path) == before  # no output directory, no staging folder


def test_failed_masks_leave_no_output(tmp_path):
    gen = torch.Generator().manual_seed(3)
    tensors = {f"layer.{i}.weight": torch.randn(16, 16, generator=gen) for i in range(3)}
    tensors["layer.1.weight"][2, 3] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, bad)
    before = listing(tmp_path)
    as_dir, as_pt, as_file = run_many(
        ["masks", bad, "--sparsity", "0.5", "-o", tmp_path / "outdir", "--no-progress"],
        ["masks", bad, "--sparsity", "0.5", "-o", tmp_path / "out.pt", "--no-progress"],
        ["masks", bad, "--sparsity", "0.5", "-o", tmp_path / "out.safetensors", "--no-progress"],
        cwd=tmp_path,
    )
    for proc in (as_dir, as_pt, as_file):
        error_line(proc, "masks")
    assert listing(tmp_path) == before


def test_validate_exit_codes(tmp_path, checkpoint, masks_file):
    corrupt = {"garbage.pt": b"garbage, not a zip", "empty.pt": b"", "garbage.safetensors": b"garbage, not a header",
               "empty.safetensors": b""}
    for name, content in corrupt.items():
        (tmp_path / name).write_bytes(content)
    violations, *broken = run_many(["validate", checkpoint, masks_file, "--no-progress"],
                                   *[["validate", checkpoint, tmp_path / name, "--no-progress"] for name in corrupt],
                                   cwd=tmp_path)
    assert violations.returncode == 1, violations.stderr
    assert violations.stdout.startswith("INVALID") and violations.stderr == ""
    for name, proc in zip(corrupt, broken):
        error_line(proc, "validate", name)


# In-process checks of the message rules (no subprocess: the handler is replaced)


def _fake_command(monkeypatch, action, name="validate"):
    """The command ``name`` with its run function replaced by ``action``."""
    def handler(args, outputs):
        return action()

    records = tuple(replace(c, run=handler) if c.name == name else c for c in commands.COMMANDS)
    monkeypatch.setattr(commands, "COMMANDS", records)


def test_messages_are_one_plain_line(tmp_path, checkpoint, masks_file, monkeypatch, capsys):
    def fail():
        raise ValueError("\x1b[31mcould not read\x1b[0m masks:\n  line two\r\n\tpass overwrite=True to replace it")

    _fake_command(monkeypatch, fail)
    assert cli.main(["validate", str(checkpoint), str(masks_file)]) == 2
    err = capsys.readouterr().err
    assert err == "sparselora validate: error: could not read masks: line two pass --overwrite to replace it\n"


def test_unexpected_errors_are_one_line_with_their_type(tmp_path, checkpoint, masks_file, monkeypatch, capsys):
    _fake_command(monkeypatch, lambda: {}["missing"])
    assert cli.main(["validate", str(checkpoint), str(masks_file)]) == 2
    assert capsys.readouterr().err == "sparselora validate: error: KeyError: 'missing'\n"


def test_warnings_are_one_line(tmp_path, checkpoint, masks_file, monkeypatch, capsys):
    def warn():
        warnings.warn("first line\nsecond line", UserWarning)
        return 0

    _fake_command(monkeypatch, warn)
    assert cli.main(["validate", str(checkpoint), str(masks_file)]) == 0
    assert capsys.readouterr().err == "sparselora validate: warning: first line second line\n"


def test_interrupt_removes_only_new_outputs(tmp_path, checkpoint, masks_file, monkeypatch, capsys):
    existing = tmp_path / "existing.yaml"
    existing.write_text("keep")
    new = tmp_path / "new.yaml"

    def interrupted(target: Path):
        def action():
            target.write_text("partial")
            raise KeyboardInterrupt

        return action

    base = tmp_path / "base.yaml"
    base.write_text("trainer: {}\n")
    for target, extra in [(new, []), (existing, ["--overwrite"])]:
        _fake_command(monkeypatch, interrupted(target), "cerebras-config")
        code = cli.main(["cerebras-config", str(base), "--masks", str(masks_file), "-o", str(target), *extra])
        assert code == 130
        assert capsys.readouterr().err == "sparselora cerebras-config: interrupted\n"
    assert not new.exists()
    assert existing.exists()  # existed before the command: never removed
