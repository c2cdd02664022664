"""File safety: what is read stays inside its folder, what is written never replaces an
input or a non-file, a failed write leaves the old output, reads of a checkpoint are
consistent, headers are checked strictly, errors are clean ValueErrors naming the file,
and surprising results are flagged."""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import signal
import stat
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sparselora.ops as ops
from conftest import cli_exit_code, write_llama_checkpoint
from sparselora.io.checkpoints import Checkpoint
from sparselora.io.packed_masks import write_mask_index
from sparselora.io.safetensors import SafetensorsReader
from sparselora.pruning import prune_checkpoint
from sparselora.pruning.checkpoint_ops import apply_masks_to_checkpoint, validate_checkpoint_masks
from sparselora.pruning.mask_generator import compute_random_mask, compute_unstructured_mask
from sparselora.pruning.mask_ops import load_mask, save_mask
from sparselora.pruning.streaming import compute_checkpoint_masks

INDEX = "model.safetensors.index.json"
MASK_INDEX = "masks.safetensors.index.json"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
WEIGHTS = {"layers.0.q.weight": (8, 16), "layers.1.q.weight": (8, 16), "layers.1.up.weight": (12, 8)}


# --- helpers -----------------------------------------------------------------------------


def shard_tensors(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {
        SHARD1: {"layers.0.q.weight": torch.randn(8, 16, generator=gen), "layers.0.q.bias": torch.randn(8, generator=gen)},
        SHARD2: {"layers.1.q.weight": torch.randn(8, 16, generator=gen), "layers.1.up.weight": torch.randn(12, 8, generator=gen)},
    }


def make_checkpoint(folder: Path) -> Path:
    """Two shards, their index, small files and a sub-folder, as sentence-transformers saves."""
    folder.mkdir(parents=True)
    weight_map = {}
    for file, tensors in shard_tensors().items():
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return folder


def some_masks(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape, generator=gen) > 0.5 for name, shape in WEIGHTS.items()}


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root``: bytes of files, targets of links, and folders."""
    entries: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            entries[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            entries[rel] = "dir"
        else:
            entries[rel] = path.read_bytes()
    return entries


def write_raw(path: Path, header: object, data: bytes = b"", length_delta: int = 0) -> Path:
    """A safetensors-like file: 8-byte LE header length, JSON header, data."""
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) + length_delta) + encoded + data)
    return path


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def no_hang():
    """Fail (instead of hanging) if a write opens a FIFO and waits for a reader."""

    def expired(signum, frame):
        raise TimeoutError("the call blocked: it opened the FIFO")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# --- 1. containment: files named by an index stay in its folder ------------------------


@pytest.fixture
def opened(monkeypatch):
    """Real paths of every file opened through open(), io.open() or os.open() (the
    safetensors reader's path) while the test runs."""
    paths: list[str] = []

    def recording(real):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                paths.append(os.path.realpath(os.fsdecode(file)))
            return real(file, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", recording(builtins.open))
    monkeypatch.setattr(io, "open", recording(io.open))
    monkeypatch.setattr(os, "open", recording(os.open))
    return paths


def _escaping_checkpoint(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A checkpoint whose second shard lies outside its folder; returns (folder, entry)."""
    folder = make_checkpoint(tmp_path / "ckpt")
    secret = tmp_path / "secret.safetensors"
    index = json.loads((folder / INDEX).read_text())
    if kind == "non-string":
        index["weight_map"]["layers.1.q.weight"] = 3
        (folder / INDEX).write_text(json.dumps(index))
        return folder, "3"
    (folder / SHARD2).rename(secret)  # a valid file: only its place makes it wrong
    entry = "../secret.safetensors" if kind == "parent" else str(secret)
    index["weight_map"] = {n: (entry if f == SHARD2 else f) for n, f in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))
    return folder, entry


@pytest.mark.parametrize("kind", ["parent", "absolute", "non-string"])
@pytest.mark.parametrize("consumer", ["open", "apply", "compute"])
def test_checkpoint_index_entries_stay_in_folder(tmp_path, request, kind, consumer):
    folder, entry = _escaping_checkpoint(tmp_path, kind)
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / "out"
    opened = request.getfixturevalue("opened")
    with pytest.raises(ValueError) as exc:
        if consumer == "open":
            Checkpoint(folder)
        elif consumer == "apply":
            apply_masks_to_checkpoint(folder, some_masks(), out, progress=False)
        else:
            compute_checkpoint_masks(folder, 0.5, out, progress=False)
    assert os.path.realpath(tmp_path / "secret.safetensors") not in opened
    message = str(exc.value)
    assert INDEX in message, message
    if kind != "non-string":
        assert entry in message, message
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no staging left


def _escaping_mask_index(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A mask folder whose index names a packed shard outside it; returns (folder, entry)."""
    folder = tmp_path / "masks"
    folder.mkdir()
    secret = tmp_path / "secret-masks.safetensors"
    masks = some_masks()
    save_mask(masks, secret, packed=True)  # a valid packed file: only its place makes it wrong
    entry: object
    if kind == "non-string":
        entry = 3
    else:
        entry = "../secret-masks.safetensors" if kind == "parent" else str(secret)
    (folder / MASK_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {n: entry for n in masks}}))
    return folder, str(entry)


@pytest.mark.parametrize("kind", ["parent", "absolute", "non-string"])
@pytest.mark.parametrize("consumer", ["load", "apply", "validate"])
def test_mask_index_entries_stay_in_folder(tmp_path, request, kind, consumer):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    folder, entry = _escaping_mask_index(tmp_path, kind)
    before = sorted(os.listdir(tmp_path))
    opened = request.getfixturevalue("opened")
    with pytest.raises(ValueError) as exc:
        if consumer == "load":
            load_mask(folder)
        elif consumer == "apply":
            apply_masks_to_checkpoint(ckpt, folder, tmp_path / "out", progress=False)
        else:
            validate_checkpoint_masks(ckpt, folder)
    assert os.path.realpath(tmp_path / "secret-masks.safetensors") not in opened
    message = str(exc.value)
    assert MASK_INDEX in message, message
    if kind != "non-string":
        assert entry in message, message
    assert sorted(os.listdir(tmp_path)) == before


def test_mask_index_inside_folder_loads(tmp_path):
    """Control for the above: the same masks with the shard in the folder load."""
    folder = tmp_path / "masks"
    folder.mkdir()
    masks = some_masks()
    save_mask(masks, folder / "m.safetensors", packed=True)
    (folder / MASK_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {n: "m.safetensors" for n in masks}}))
    loaded, _ = load_mask(folder)
    assert list(loaded) == list(masks)
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)


# --- 2. safe replacement: only regular files are replaced, atomically -------------------

SAVE_FORMATS = [
    pytest.param("pt", False, id="pt"),
    pytest.param("npz", False, id="npz"),
    pytest.param("safetensors", False, id="safetensors"),
    pytest.param("safetensors", True, id="packed"),
]


def _node_state(path: Path):
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        return kind, st.st_ino, sorted(os.listdir(path))
    return kind, st.st_ino, st.st_rdev


@pytest.mark.parametrize("fmt,packed", SAVE_FORMATS)
@pytest.mark.parametrize("node", ["char-device", "fifo", "directory"])
def test_save_mask_refuses_to_replace_a_non_file(tmp_path, node, fmt, packed, no_hang):
    parent = tmp_path / "dir"
    parent.mkdir()
    path = parent / f"masks.{fmt}"
    if node == "char-device":
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("mknod is not permitted here")
    elif node == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
        (path / "keep.txt").write_text("kept")
    before = _node_state(path)
    with pytest.raises(ValueError) as exc:
        save_mask(some_masks(), path, format=fmt, packed=packed)
    assert path.name in str(exc.value), str(exc.value)
    assert _node_state(path) == before  # same kind of node, same inode (not replaced)
    assert os.listdir(parent) == [path.name]  # no temporary file left beside it


# --- a save that fails at any step leaves the old target ---------------------------------

STEPS = ("write", "flush", "fsync", "rename")


class Injector:
    """Counts the steps of saves (data writes, flushes, fsyncs, renames) and makes the
    ``fail_at = (step, index)``-th one fail with EIO."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(STEPS, 0)
        self.fail_at: tuple[str, int] | None = None

    def arm(self, fail_at: tuple[str, int] | None) -> None:
        """Count from zero; make the ``fail_at`` step fail (None: none)."""
        self.counts = dict.fromkeys(STEPS, 0)
        self.fail_at = fail_at

    def step(self, kind: str) -> None:
        index = self.counts[kind]
        self.counts[kind] += 1
        if self.fail_at == (kind, index):
            raise OSError(5, f"injected {kind} failure")


class _CountedHandle:
    """A file opened for writing whose writes and flushes pass through the injector."""

    def __init__(self, handle, injector: Injector) -> None:
        self._handle, self._injector = handle, injector

    def write(self, data):
        self._injector.step("write")
        return self._handle.write(data)

    def flush(self) -> None:
        self._injector.step("flush")
        self._handle.flush()

    def __getattr__(self, name: str):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


@pytest.fixture
def injector(monkeypatch) -> Injector:
    """Every writer opens its temporary file with ``os.fdopen``, syncs with ``os.fsync`` and
    moves with ``os.replace`` / ``os.rename``: those report to the injector first."""
    injector = Injector()
    real_fdopen, real_fsync = os.fdopen, os.fsync

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        return _CountedHandle(handle, injector) if "w" in mode else handle

    def fsync(fd) -> None:
        injector.step("fsync")
        real_fsync(fd)

    def counted(real):
        def rename(*args, **kwargs):
            injector.step("rename")
            return real(*args, **kwargs)

        return rename

    monkeypatch.setattr(os, "fdopen", fdopen)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", counted(os.replace))
    monkeypatch.setattr(os, "rename", counted(os.rename))
    return injector


@pytest.fixture(scope="module")
def save_inputs(tmp_path_factory) -> dict[str, Path]:
    """What the folder writers read: a sharded checkpoint, a single file, a small Llama."""
    root = tmp_path_factory.mktemp("inputs")
    single = root / "single" / "model.safetensors"
    single.parent.mkdir()
    save_file(shard_tensors()[SHARD2], single, metadata={"format": "pt"})
    return {"checkpoint": make_checkpoint(root / "ckpt"), "single": single,
            "llama": write_llama_checkpoint(root / "llama", layers=2)}


def _save_mask(fmt: str, packed: bool):
    def save(inputs: dict[str, Path], target: Path, seed: int) -> None:
        save_mask(some_masks(seed), target, format=fmt, packed=packed, metadata={"seed": seed})

    return save


def _mask_index(inputs: dict[str, Path], target: Path, seed: int) -> None:
    write_mask_index(target.parent, {name: "masks.safetensors" for name in WEIGHTS}, {"seed": seed})


def _cli_masks(inputs: dict[str, Path], target: Path, seed: int) -> None:
    """``sparselora masks -o MASKS.pt``: packed masks in a staging folder, converted to .pt."""
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        code = cli_exit_code(["masks", str(inputs["checkpoint"]), "--sparsity", str(0.3 + 0.1 * seed), "-o",
                              str(target), "--overwrite", "--no-progress"])
    if code != 0:
        raise OSError(errors.getvalue())


def _apply(inputs: dict[str, Path], target: Path, seed: int) -> None:
    apply_masks_to_checkpoint(inputs["checkpoint"], some_masks(seed), target, overwrite=True, progress=False)


def _apply_single(inputs: dict[str, Path], target: Path, seed: int) -> None:
    """From a single file: the output also gets the checkpoint index json written for it."""
    masks = {n: m for n, m in some_masks(seed).items() if n.startswith("layers.1.")}
    apply_masks_to_checkpoint(inputs["single"], masks, target, overwrite=True, progress=False)


def _masks_folder(inputs: dict[str, Path], target: Path, seed: int) -> None:
    compute_checkpoint_masks(inputs["checkpoint"], 0.3 + 0.1 * seed, target, overwrite=True, progress=False)


def _prune(inputs: dict[str, Path], target: Path, seed: int) -> None:
    prune_checkpoint(inputs["llama"], target, "magnitude", 0.3 + 0.1 * seed, overwrite=True, progress=False)


# writer -> (target name, save(inputs, target, seed)); files first, then folders
FILE_WRITERS = {
    "pt": ("masks.pt", _save_mask("pt", False)),
    "npz": ("masks.npz", _save_mask("npz", False)),
    "safetensors": ("masks.safetensors", _save_mask("safetensors", False)),
    "packed": ("masks.safetensors", _save_mask("safetensors", True)),
    "mask-index": (MASK_INDEX, _mask_index),
    "cli-masks-pt": ("masks.pt", _cli_masks),
}
FOLDER_WRITERS = {
    "apply": ("out", _apply),
    "apply-single-file": ("out", _apply_single),
    "masks-folder": ("masks", _masks_folder),
    "prune": ("out", _prune),
}
# a folder's renames (moving the old one aside, the new one in, back on failure) are
# test_folder_swap_failure_keeps_the_old_output's
SAVE_FAILURES = [pytest.param(w, s, id=f"{w}-{s}") for w in FILE_WRITERS for s in STEPS] + [
    pytest.param(w, s, id=f"{w}-{s}") for w in FOLDER_WRITERS for s in STEPS if s != "rename"]


@pytest.mark.parametrize("writer,step", SAVE_FAILURES)
def test_a_failed_save_leaves_the_old_target(tmp_path, save_inputs, request, writer, step):
    """The save fails at the first, then at the last ``step`` of its run: each time the
    old target is byte-identical and nothing is left beside it."""
    name, save = {**FILE_WRITERS, **FOLDER_WRITERS}[writer]
    (tmp_path / "dir").mkdir()
    (tmp_path / "probe").mkdir()
    target = tmp_path / "dir" / name
    save(save_inputs, target, 1)  # the old target (and every lazy import done before counting)
    before = snapshot(tmp_path / "dir")
    injector = request.getfixturevalue("injector")
    save(save_inputs, tmp_path / "probe" / name, 2)  # how many of each step a save to it takes
    count = injector.counts[step]
    assert count >= 1, f"{writer} never does a {step}: {injector.counts}"
    for index in sorted({0, count - 1}):
        injector.arm((step, index))
        with pytest.raises((OSError, RuntimeError)) as exc:
            save(save_inputs, target, 2)
        assert f"injected {step} failure" in str(exc.value), (index, str(exc.value))
        assert snapshot(tmp_path / "dir") == before, (step, index)


@pytest.mark.parametrize("writer", sorted(FOLDER_WRITERS))
def test_a_folder_is_synced_before_it_replaces_the_old_one(tmp_path, monkeypatch, save_inputs, writer):
    """When the new folder is renamed into place, every file and folder in it has been
    fsynced: copied side files, moved mask files and the folders' entries included."""
    name, save = FOLDER_WRITERS[writer]
    out = tmp_path / name
    out.mkdir()
    (out / "marker.txt").write_text("old output")
    synced: set[tuple[int, int]] = set()
    unsynced: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd) -> None:
        real_fsync(fd)
        info = os.fstat(fd)
        synced.add((info.st_dev, info.st_ino))

    def rename(src, dst, *args, **kwargs):
        if Path(dst) == out and os.path.isdir(src):
            for root, _dirs, files in os.walk(src):
                for entry in [root, *(os.path.join(root, f) for f in files)]:
                    info = os.lstat(entry)
                    if (info.st_dev, info.st_ino) not in synced:
                        unsynced.append(os.path.relpath(entry, src))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    save(save_inputs, out, 2)
    monkeypatch.undo()
    assert not (out / "marker.txt").exists()  # the new folder is in place
    assert unsynced == []


# --- 3. source protection and complete outputs ------------------------------------------


@pytest.mark.parametrize("where", ["same", "inside", "containing", "symlink-to-checkpoint"])
def test_apply_output_must_not_overlap_the_checkpoint(tmp_path, where):
    root = tmp_path / "a"
    ckpt = make_checkpoint(root / "ckpt")
    output = {"same": ckpt, "inside": ckpt / "sub", "containing": root, "symlink-to-checkpoint": tmp_path / "link"}[where]
    if where == "symlink-to-checkpoint":
        output.symlink_to(ckpt, target_is_directory=True)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError):
        apply_masks_to_checkpoint(ckpt, some_masks(), output, overwrite=True, progress=False)
    assert snapshot(tmp_path) == before  # checkpoint byte-identical, nothing created


@pytest.mark.parametrize("layout", ["directory", "single-file"])
def test_compute_masks_output_must_not_be_the_checkpoint(tmp_path, layout):
    if layout == "directory":
        ckpt = make_checkpoint(tmp_path / "ckpt")
    else:
        ckpt = tmp_path / "model.safetensors"
        save_file(shard_tensors()[SHARD2], ckpt)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError):
        compute_checkpoint_masks(ckpt, 0.5, ckpt, overwrite=True, progress=False)
    assert snapshot(tmp_path) == before
    assert Checkpoint(ckpt).names  # still opens


def _assert_pruned_copy(ckpt: Path, out: Path, masks) -> None:
    source, result = Checkpoint(ckpt), Checkpoint(out)
    assert result.names == source.names
    valid, _ = validate_checkpoint_masks(out, masks)
    assert valid


@pytest.mark.parametrize("failing_call", [1, 2, 3])
@pytest.mark.parametrize("writer", sorted(FOLDER_WRITERS))
def test_folder_swap_failure_keeps_the_old_output(tmp_path, monkeypatch, save_inputs, writer, failing_call):
    """The ``failing_call``-th rename of a directory fails. Either the save fails and the
    old output is intact, or (the failing call never came) the new output is complete; no
    staging or backup folder is left either way."""
    name, save = FOLDER_WRITERS[writer]
    (tmp_path / "dir").mkdir()
    (tmp_path / "probe").mkdir()
    save(save_inputs, tmp_path / "probe" / name, 2)
    expected = snapshot(tmp_path / "probe" / name)
    out = tmp_path / "dir" / name
    out.mkdir()
    (out / "marker.txt").write_text("old output")
    (out / "model.safetensors").write_bytes(b"old weights")
    before = snapshot(out)
    calls = []
    real_replace, real_rename = os.replace, os.rename

    def wrap(real):
        def renamer(src, dst, *args, **kwargs):
            if os.path.isdir(src):
                calls.append((src, dst))
                if len(calls) == failing_call:
                    raise OSError("swap refused")
            return real(src, dst, *args, **kwargs)

        return renamer

    monkeypatch.setattr(os, "replace", wrap(real_replace))
    monkeypatch.setattr(os, "rename", wrap(real_rename))
    failed = False
    try:
        save(save_inputs, out, 2)
    except OSError:
        failed = True
    monkeypatch.undo()
    if failing_call == 1:
        assert failed, f"{writer} replaced the output without renaming a directory"
    if failed:
        assert snapshot(out) == before
    else:
        assert len(calls) < failing_call
        assert snapshot(out) == expected
    assert os.listdir(tmp_path / "dir") == [name]


def test_apply_copies_small_files_and_sub_folders(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    masks = some_masks()
    apply_masks_to_checkpoint(ckpt, masks, out, progress=False)
    for rel in ["config.json", "tokenizer.json", INDEX, "1_Pooling/config.json"]:
        assert (out / rel).read_bytes() == (ckpt / rel).read_bytes(), rel
    assert set(snapshot(ckpt)) <= set(snapshot(out))  # every file and folder of the source
    _assert_pruned_copy(ckpt, out, masks)


def test_apply_to_a_single_file_writes_a_loadable_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_file(shard_tensors()[SHARD2], src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text('{"model_type": "bert"}')
    masks = {n: m for n, m in some_masks().items() if n.startswith("layers.1.")}
    out = tmp_path / "out"
    apply_masks_to_checkpoint(src / "model.safetensors", masks, out, progress=False)
    assert out.is_dir()
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (out / "model.safetensors").is_file()
    _assert_pruned_copy(src / "model.safetensors", out / "model.safetensors", masks)


# --- 4. consistent reads ------------------------------------------------------------------


def _rewrite_shard(path: Path, how: str) -> None:
    if how == "replaced":  # a new file (new inode) with other values of the same shapes
        tensors = shard_tensors(seed=99)[SHARD2]
        save_file(tensors, path, metadata={"format": "pt"})
    else:  # the same file overwritten in place, same size
        (length,) = struct.unpack("<Q", path.read_bytes()[:8])
        with open(path, "r+b") as handle:
            handle.seek(8 + length)
            handle.write(struct.pack("<8f", *[1e3] * 8))


@pytest.mark.parametrize("how", ["replaced", "in-place"])
@pytest.mark.parametrize("when", ["after-pass-1", "before-mask-pass"])
def test_shard_changed_between_passes(tmp_path, monkeypatch, how, when):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    shard = ckpt / SHARD2
    past = time.time_ns() - 10 * 10**9  # an in-place write then shows in mtime whatever its granularity
    os.utime(shard, ns=(past, past))
    out = tmp_path / "masks.safetensors"
    rewritten = []

    def rewrite_once():
        if not rewritten:
            _rewrite_shard(shard, how)
            rewritten.append(True)

    if when == "after-pass-1":
        real = ops.key_histogram
        calls = []

        def key_histogram(*args, **kwargs):
            result = real(*args, **kwargs)
            calls.append(1)
            if len(calls) == len(WEIGHTS):  # the first pass has read every weight
                rewrite_once()
            return result

        monkeypatch.setattr(ops, "key_histogram", key_histogram)
    else:
        real = ops.streaming_threshold

        def streaming_threshold(*args, **kwargs):
            result = real(*args, **kwargs)
            rewrite_once()
            return result

        monkeypatch.setattr(ops, "streaming_threshold", streaming_threshold)
    with pytest.raises(ValueError) as exc:
        compute_checkpoint_masks(ckpt, 0.5, out, progress=False)
    assert rewritten
    assert SHARD2 in str(exc.value), str(exc.value)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no mask file, no temporary file


def test_failed_open_closes_its_descriptor_once(tmp_path):
    """A reader that fails to open must not close, when collected, a descriptor number the
    process has reused meanwhile (here: the next file opened)."""
    bad = write_raw(tmp_path / "bad.safetensors", [1, 2])
    other_file = tmp_path / "other.bin"
    other_file.write_bytes(b"other")

    def open_other_after_failure() -> int:
        try:
            SafetensorsReader(bad)
        except ValueError:
            return os.open(other_file, os.O_RDONLY)  # gets the lowest free number
        raise AssertionError("the broken file was accepted")

    other = open_other_after_failure()  # the failed reader is collected on return
    try:
        assert os.pread(other, 5, 0) == b"other"
    finally:
        with contextlib.suppress(OSError):
            os.close(other)


# --- 5. strict headers ---------------------------------------------------------------------


def _entry(shape, begin, end, dtype):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _header_case(case: str, dtype: str, size: int, meta: dict | None):
    """(header, data, header-length delta) of a file broken in one way; ``size`` is the
    item size of ``dtype``, ``meta`` the ``__metadata__`` a valid file would carry."""
    s = size
    tensors: dict[str, object] = {"a": _entry([4], 0, 4 * s, dtype)}
    data = bytes(4 * s)
    delta = 0
    metadata: object = dict(meta or {})
    if case == "overlapping-ranges":
        tensors = {"a": _entry([4], 0, 4 * s, dtype), "b": _entry([4], 2 * s, 6 * s, dtype)}
        data = bytes(6 * s)
    elif case == "range-beyond-data":
        data = bytes(2 * s)
    elif case == "negative-dim":
        tensors = {"a": _entry([-2, -2], 0, 4 * s, dtype)}
    elif case == "fractional-dim":
        tensors = {"a": _entry([2.9, 2], 0, 4 * s, dtype)}
    elif case == "bool-dim":
        tensors = {"a": _entry([True, 4], 0, 4 * s, dtype)}
    elif case == "dtype-size-mismatch":
        tensors = {"a": _entry([4], 0, 4 * s, "F64")}
    elif case == "metadata-list":
        metadata = ["format", "pt"]
    elif case == "metadata-non-string":
        metadata = {**dict(meta or {}), "version": 3}
    elif case == "length-beyond-file":
        delta = 64
    elif case == "non-object-header":
        return [1, 2], b"", 0
    else:
        assert case == "valid"
    header = dict(tensors)
    if metadata:
        header["__metadata__"] = metadata
    return header, data, delta


def _packed_meta(names) -> dict[str, str]:
    return {"format": "sparselora-packed-masks", "bit_order": "little",
            "shapes": json.dumps({n: [32] for n in names}), "order": json.dumps(list(names)),
            "__sparselora_metadata__": "{}"}


HEADER_CASES = ["overlapping-ranges", "range-beyond-data", "negative-dim", "fractional-dim", "bool-dim",
                "dtype-size-mismatch", "metadata-list", "metadata-non-string", "length-beyond-file",
                "non-object-header"]


@pytest.mark.parametrize("reader", ["SafetensorsReader", "Checkpoint", "load_mask-packed"])
@pytest.mark.parametrize("case", HEADER_CASES + ["valid"])
def test_strict_headers(tmp_path, case, reader):
    path = tmp_path / "broken.safetensors"
    if reader == "load_mask-packed":  # 4 packed bytes = a 32-element mask each
        names = ["a", "b"] if case == "overlapping-ranges" else ["a"]
        header, data, delta = _header_case(case, "U8", 1, _packed_meta(names))
    else:
        header, data, delta = _header_case(case, "F32", 4, {"format": "pt"})
    write_raw(path, header, data, delta)
    calls = {
        "SafetensorsReader": lambda: SafetensorsReader(path).names,
        "Checkpoint": lambda: Checkpoint(path).names,
        "load_mask-packed": lambda: list(load_mask(path)[0]),
    }
    if case == "valid":  # control: the builder makes good files
        assert calls[reader]() == ["a"]
        return
    with pytest.raises(ValueError) as exc:
        calls[reader]()
    assert path.name in str(exc.value), str(exc.value)


# --- 6. clean errors -------------------------------------------------------------------------


class NotATensor:
    """A custom class: unpickling it needs weights_only=False."""

    def __init__(self) -> None:
        self.value = 1


def test_npz_with_a_string_array(tmp_path):
    path = tmp_path / "masks.npz"
    np.savez(path, **{"a.weight": np.array(["kept", "pruned"])})
    with pytest.raises(ValueError) as exc:
        load_mask(path)
    assert path.name in str(exc.value)


def test_pt_with_a_non_tensor_value(tmp_path):
    path = tmp_path / "masks.pt"
    torch.save({"a.weight": "not a tensor"}, path)
    with pytest.raises(ValueError) as exc:
        load_mask(path)
    assert path.name in str(exc.value)


@pytest.mark.parametrize("file", ["good", "damaged"])
def test_load_mask_bad_device(tmp_path, file):
    """``device`` is checked before the file is read: a damaged file still gets the device error."""
    path = tmp_path / "masks.pt"
    if file == "good":
        save_mask(some_masks(), path)
    else:
        path.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="device"):
        load_mask(path, device="nonsense")


def test_random_mask_seed_out_of_range(three_layers):
    with pytest.raises(ValueError, match="seed"):
        compute_random_mask(three_layers, 0.5, seed=2**64)


def test_pickled_object_in_torch_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"a.weight": torch.ones(2, 2), "extra": NotATensor()}, path)
    with pytest.raises(ValueError) as exc:
        Checkpoint(path)
    message = str(exc.value)
    assert "\n" not in message.strip(), message
    assert "\x1b[" not in message
    assert "weights_only=False" not in message
    assert path.name in message


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_nan_in_checkpoint_names_tensor_and_file(tmp_path, scope):
    gen = torch.Generator().manual_seed(0)
    bad = torch.randn(8, 8, generator=gen)
    bad[2, 3] = float("nan")
    ckpt = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.randn(8, 8, generator=gen), "b.weight": bad}, ckpt)
    with pytest.raises(ValueError) as exc:
        compute_checkpoint_masks(ckpt, 0.5, tmp_path / "masks.safetensors", scope=scope, progress=False)
    message = str(exc.value)
    assert "b.weight" in message and ckpt.name in message, message
    assert sorted(os.listdir(tmp_path)) == [ckpt.name]


# --- 7. surprises ----------------------------------------------------------------------------


def _warnings_about(record, name: str) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UserWarning) and name in str(w.message)]


def test_global_pruning_warns_about_an_emptied_layer(three_layers):
    with torch.no_grad():
        three_layers.layer3.weight.mul_(1e-6)  # 144 of 1008 weights: global 50% takes them all
    with pytest.warns(UserWarning) as record:
        masks = compute_unstructured_mask(three_layers, 0.5, global_pruning=True)
    assert float((~masks["layer3.weight"]).float().mean()) > 0.95
    messages = _warnings_about(record, "layer3.weight")
    assert messages and "95%" in messages[0], [str(w.message) for w in record]


def test_global_pruning_without_emptied_layer_does_not_warn(three_layers):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compute_unstructured_mask(three_layers, 0.5, global_pruning=True)
    assert not [w for w in record if "95%" in str(w.message)]


def test_checkpoint_masks_warn_about_an_emptied_layer(tmp_path):
    gen = torch.Generator().manual_seed(0)
    ckpt = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.randn(16, 16, generator=gen), "b.weight": torch.randn(16, 16, generator=gen),
               "c.weight": torch.randn(8, 16, generator=gen) * 1e-6}, ckpt)
    out = tmp_path / "masks.safetensors"
    with pytest.warns(UserWarning) as record:
        compute_checkpoint_masks(ckpt, 0.5, out, progress=False)
    masks, _ = load_mask(out)
    assert float((~masks["c.weight"]).float().mean()) > 0.95
    messages = _warnings_about(record, "c.weight")
    assert messages and "95%" in messages[0], [str(w.message) for w in record]


def _bert_config():
    import transformers

    return transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=32, num_labels=3)


def _hf_model(kind: str):
    import transformers

    from conftest import tiny_bert

    torch.manual_seed(0)
    if kind == "bert":
        return tiny_bert()
    if kind == "bert-classifier":
        return transformers.BertForSequenceClassification(_bert_config())
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(config)


@pytest.mark.parametrize("kind,head", [("bert", "pooler"), ("bert-classifier", "classifier"), ("llama-classifier", "score")])
def test_task_heads_stay_dense(kind, head):
    masks = compute_unstructured_mask(_hf_model(kind), 0.5)
    assert any("attn" in n or "attention" in n for n in masks)  # the body is pruned
    assert not [n for n in masks if head in n]


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("fmt,packed", SAVE_FORMATS)
def test_save_mask_permissions_follow_umask(tmp_path, umask_022, fmt, packed):
    path = tmp_path / f"masks.{fmt}"
    save_mask(some_masks(), path, packed=packed)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_apply_permissions_follow_umask(tmp_path, umask_022):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    apply_masks_to_checkpoint(ckpt, some_masks(), out, progress=False)
    modes = _modes(out)
    expected = {rel: (0o755 if (out / rel).is_dir() else 0o644) for rel in modes}
    assert modes == expected
    assert "1_Pooling" in modes and SHARD1 in modes


@pytest.mark.parametrize("output", ["masks.safetensors", "masks"])
def test_compute_masks_permissions_follow_umask(tmp_path, umask_022, output):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / output
    compute_checkpoint_masks(ckpt, 0.5, out, progress=False)
    modes = _modes(out)
    expected = {rel: (0o755 if (out / rel).is_dir() else 0o644) for rel in modes}
    assert modes == expected
