"""Checkpoints and mask folders laid out as the Hugging Face hub cache keeps them.

``models--org--name/snapshots/<rev>/`` holds every file as a symlink to
``../../blobs/<sha256>`` (``../../../blobs/...`` one folder down), and ``refs/main`` holds
the revision. Every command and API reading such a folder gives what it gives on a plain
copy of the same files (masks and tensors compared with ``torch.equal``, files byte for
byte), the outputs of ``apply`` and ``prune`` hold real files only, and an index entry that
is not a plain relative name is still refused, naming the index and the entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sparselora.io.checkpoints import Checkpoint
from sparselora.pruning import prune_checkpoint
from sparselora.pruning.checkpoint_ops import apply_masks_to_checkpoint, validate_checkpoint_masks
from sparselora.pruning.mask_ops import load_mask
from sparselora.pruning.streaming import compute_checkpoint_masks

from conftest import cli_exit_code, token_batches, write_llama_checkpoint

REV = "5f0d3c1e9a7b2c4d6e8f0a1b3c5d7e9f1a2b4c6d"
INDEX = "model.safetensors.index.json"
MASK_INDEX = "masks.safetensors.index.json"
CALIBRATION = "sparse weights keep their shape and their zeros; pruning removes the smallest ones. " * 20


# --- the layout ---------------------------------------------------------------------------


def hub_layout(plain: Path, cache: Path, repo: str) -> Path:
    """Lay the files of ``plain`` out as the hub cache does; returns ``snapshots/<rev>``."""
    root = cache / repo
    blobs, snapshot = root / "blobs", root / "snapshots" / REV
    blobs.mkdir(parents=True)
    for file in sorted(p for p in plain.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(plain)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REV)
    return snapshot


def files_of(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def assert_real_files(folder: Path) -> None:
    """No symlink anywhere under ``folder`` (nor ``folder`` itself); every file regular."""
    assert not folder.is_symlink()
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            assert not path.is_symlink(), f"{path} is a link to {os.readlink(path)}"
            assert path.is_dir() or path.is_file(), path


def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    source = Checkpoint(checkpoint)
    return {name: source.read(name).clone() for name in source.names}


def assert_equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def assert_same_output(hub_out: Path, plain_out: Path) -> None:
    """The two outputs hold the same files, byte for byte, and the same tensors; the one
    made from the hub cache holds no links."""
    assert_real_files(hub_out)
    assert files_of(hub_out) == files_of(plain_out)
    for rel in files_of(plain_out):
        assert (hub_out / rel).read_bytes() == (plain_out / rel).read_bytes(), rel
    assert_equal_tensors(tensors(hub_out), tensors(plain_out))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """(plain copy, hub snapshot) of a sharded 2-block Llama with a tokenizer and a file one
    folder down."""
    root = tmp_path_factory.mktemp("model")
    plain = write_llama_checkpoint(root / "plain", layers=2)
    (plain / "extra").mkdir()
    (plain / "extra" / "notes.md").write_text("a file one folder down\n")
    snapshot = hub_layout(plain, root / "cache", "models--org--tiny")
    assert len(Checkpoint(plain).files) > 1  # sharded, with an index
    return plain, snapshot


@pytest.fixture(scope="module")
def masks(model, tmp_path_factory) -> tuple[Path, Path]:
    """(plain, hub snapshot) of a folder of packed masks with its index, for ``model``."""
    root = tmp_path_factory.mktemp("masks")
    compute_checkpoint_masks(model[0], 0.5, root / "plain", progress=False)
    return root / "plain", hub_layout(root / "plain", root / "cache", "models--org--tiny-masks")


def test_the_layout_is_all_links_into_blobs(model, masks):
    for snapshot in (model[1], masks[1]):
        blobs = (snapshot.parent.parent / "blobs").resolve()
        for rel in files_of(snapshot):
            link = snapshot / rel
            assert link.is_symlink() and link.resolve().parent == blobs, rel
        assert (snapshot.parent.parent / "refs" / "main").read_text() == REV
    assert_equal_tensors(tensors(model[1]), tensors(model[0]))
    assert [p.name for p in Checkpoint(model[1]).files] == [p.name for p in Checkpoint(model[0]).files]


# --- every command and API gives what it gives on a plain copy ------------------------------


def _masks(checkpoint: Path, output: Path, via: str) -> None:
    if via == "cli":
        assert cli_exit_code(["masks", str(checkpoint), "--sparsity", "0.6", "-o", str(output), "--no-progress"]) == 0
    else:
        compute_checkpoint_masks(checkpoint, 0.6, output, progress=False)


@pytest.mark.parametrize("output", ["masks.safetensors", "masks"])
@pytest.mark.parametrize("via", ["cli", "api"])
def test_masks(model, tmp_path, via, output):
    for name, checkpoint in (("plain", model[0]), ("hub", model[1])):
        (tmp_path / name).mkdir()
        _masks(checkpoint, tmp_path / name / output, via)
    from_hub, _ = load_mask(tmp_path / "hub" / output)
    from_plain, _ = load_mask(tmp_path / "plain" / output)
    assert_equal_tensors(from_hub, from_plain)
    assert_real_files(tmp_path / "hub")


def test_stats(masks, capsys):
    lines = {}
    for name, folder in zip(("plain", "hub"), masks):
        assert cli_exit_code(["stats", str(folder), "--per-layer"]) == 0
        lines[name] = capsys.readouterr().out.splitlines()
    assert lines["hub"][1:] == lines["plain"][1:]  # the first line names the folder
    assert len(lines["hub"]) > 3
    assert_equal_tensors(load_mask(masks[1])[0], load_mask(masks[0])[0])


@pytest.mark.parametrize("via", ["cli", "api"])
def test_apply(model, masks, tmp_path, via):
    outputs = {}
    for name, checkpoint, mask_folder in (("plain", model[0], masks[0]), ("hub", model[1], masks[1])):
        out = outputs[name] = tmp_path / name
        if via == "cli":
            assert cli_exit_code(["apply", str(checkpoint), str(mask_folder), "-o", str(out), "--no-progress"]) == 0
        else:
            apply_masks_to_checkpoint(checkpoint, mask_folder, out, progress=False)
    assert_same_output(outputs["hub"], outputs["plain"])
    assert files_of(outputs["hub"]) == files_of(model[0])  # shards under their names, side files, sub-folder
    assert (outputs["hub"] / "extra" / "notes.md").read_text() == "a file one folder down\n"
    assert validate_checkpoint_masks(outputs["hub"], masks[1])[0]


def test_validate(model, masks, tmp_path, capsys):
    # the dense checkpoint violates the masks (exit 1), its pruned copy does not (exit 0)
    apply_masks_to_checkpoint(model[1], masks[1], tmp_path / "pruned", progress=False)
    printed = {}
    for name, checkpoint, mask_folder in (("plain", model[0], masks[0]), ("hub", model[1], masks[1])):
        assert cli_exit_code(["validate", str(checkpoint), str(mask_folder), "--no-progress"]) == 1
        printed[name] = capsys.readouterr().out
        assert cli_exit_code(["validate", str(tmp_path / "pruned"), str(mask_folder), "--no-progress"]) == 0
        assert capsys.readouterr().out.startswith("valid: 0 of ")
    assert printed["hub"] == printed["plain"] and "INVALID" in printed["hub"]
    hub_report = validate_checkpoint_masks(model[1], masks[1])[1]
    assert hub_report == validate_checkpoint_masks(model[0], masks[0])[1]
    assert hub_report["global"]["total_violations"] > 0


@pytest.mark.parametrize("via", ["cli", "api"])
def test_prune(model, tmp_path, via):
    text = tmp_path / "calibration.txt"
    text.write_text(CALIBRATION)
    outputs = {}
    for name, checkpoint in (("plain", model[0]), ("hub", model[1])):
        out = outputs[name] = tmp_path / name
        if via == "cli":  # the tokenizer is read from the checkpoint, through its links
            argv = ["prune", str(checkpoint), "--calibration", str(text), "--samples", "2", "--seq-len", "16",
                    "-o", str(out), "--no-progress"]
            assert cli_exit_code(argv) == 0
        else:
            prune_checkpoint(checkpoint, out, "wanda", 0.5, calibration_data=token_batches(2), progress=False)
    assert_same_output(outputs["hub"], outputs["plain"])
    assert_equal_tensors(load_mask(outputs["hub"] / "masks.safetensors")[0],
                         load_mask(outputs["plain"] / "masks.safetensors")[0])


def test_a_whole_file_checkpoint_as_a_link(tmp_path):
    """``model.safetensors`` alone (no index) as a link, given as its folder or as the file."""
    plain = tmp_path / "plain"
    plain.mkdir()
    gen = torch.Generator().manual_seed(3)
    save_file({"a.weight": torch.randn(8, 16, generator=gen), "b.weight": torch.randn(16, 8, generator=gen)},
              plain / "model.safetensors", metadata={"format": "pt"})
    (plain / "config.json").write_text('{"model_type": "bert"}')
    snapshot = hub_layout(plain, tmp_path / "cache", "models--org--single")
    for given in ("folder", "file"):
        hub_in = snapshot if given == "folder" else snapshot / "model.safetensors"
        plain_in = plain if given == "folder" else plain / "model.safetensors"
        masks = {}
        for name, source in (("plain", plain_in), ("hub", hub_in)):
            compute_checkpoint_masks(source, 0.5, tmp_path / f"{name}-{given}.safetensors", progress=False)
            masks[name] = load_mask(tmp_path / f"{name}-{given}.safetensors")[0]
            apply_masks_to_checkpoint(source, masks[name], tmp_path / f"{name}-{given}", progress=False)
        assert_equal_tensors(masks["hub"], masks["plain"])
        assert_same_output(tmp_path / f"hub-{given}", tmp_path / f"plain-{given}")
        assert "model.safetensors" in files_of(tmp_path / f"hub-{given}")  # the link's name, not the blob's
        assert "config.json" in files_of(tmp_path / f"hub-{given}")


def test_an_output_holding_the_blobs_is_refused(model, tmp_path):
    """The snapshot lies apart from ``blobs/``, but its shards are read from there: an output
    equal to or containing that folder could replace them."""
    blobs = model[1].parent.parent / "blobs"
    before = files_of(blobs)
    for output in (blobs, model[1].parent.parent):
        with pytest.raises(ValueError, match="overlaps the input"):
            apply_masks_to_checkpoint(model[1], {}, output, overwrite=True, progress=False)
        with pytest.raises(ValueError, match="overlaps the input"):
            compute_checkpoint_masks(model[1], 0.5, output, overwrite=True, progress=False)
    assert files_of(blobs) == before


@pytest.mark.parametrize("link", ["to-nothing", "to-a-folder"])
def test_a_side_file_link_that_names_no_file_is_refused(model, masks, tmp_path, link):
    """A link whose blob is gone, or that leads to a folder, has no content to copy: apply
    names it instead of writing an output without it (or with a link in it)."""
    snapshot = hub_layout(model[0], tmp_path / "cache", "models--org--broken")
    side = snapshot / "extra" / "notes.md"
    if link == "to-nothing":
        side.resolve().unlink()
    else:
        side.unlink()
        os.symlink(os.path.relpath(snapshot.parent.parent / "refs", side.parent), side)
    with pytest.raises(ValueError, match="outputs hold real files only") as exc:
        apply_masks_to_checkpoint(snapshot, masks[0], tmp_path / "out", progress=False)
    assert str(side) in str(exc.value)
    assert sorted(os.listdir(tmp_path)) == ["cache"]


# --- index entries are plain relative names -------------------------------------------------

BAD_ENTRIES = {
    "parent": "../../blobs/{blob}",
    "absolute": "{blobs}/{blob}",
    "drive": "C:{shard}",
    "backslash": "..\\..\\blobs\\{blob}",
    "backslash-inside": "extra\\{shard}",
    "empty-component": "extra//{shard}",
    "dot": "./{shard}",
    "empty": "",
}


def _relink_index(snapshot: Path, index_name: str, entry: str) -> str:
    """Point the first index entry of ``snapshot`` to ``entry`` (filled in with the first
    shard's blob), as a new blob with the index linked to it; returns the entry written."""
    link = snapshot / index_name
    content = json.loads(link.read_text())
    first = next(iter(content["weight_map"]))
    shard = content["weight_map"][first]
    blobs = snapshot.parent.parent / "blobs"
    entry = entry.format(blob=(snapshot / shard).resolve().name, blobs=blobs.resolve(), shard=shard)
    content["weight_map"][first] = entry
    data = json.dumps(content).encode()
    blob = blobs / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    link.unlink()
    os.symlink(os.path.relpath(blob, link.parent), link)
    return entry


@pytest.mark.parametrize("kind", sorted(BAD_ENTRIES))
@pytest.mark.parametrize("consumer", ["checkpoint", "masks", "cli-apply", "prune"])
def test_bad_index_entries_are_refused(model, masks, tmp_path, capsys, kind, consumer):
    target = model if consumer != "masks" else masks
    snapshot = hub_layout(target[0], tmp_path / "cache", "models--org--bad")
    index = INDEX if consumer != "masks" else MASK_INDEX
    entry = _relink_index(snapshot, index, BAD_ENTRIES[kind])
    out = tmp_path / "out"
    if consumer == "cli-apply":
        assert cli_exit_code(["apply", str(snapshot), str(masks[0]), "-o", str(out), "--no-progress"]) == 2
        message = capsys.readouterr().err
    else:
        with pytest.raises(ValueError) as exc:
            if consumer == "checkpoint":
                Checkpoint(snapshot)
            elif consumer == "masks":
                load_mask(snapshot)
            else:
                prune_checkpoint(snapshot, out, "magnitude", 0.5, progress=False)
        message = str(exc.value)
    assert f"index {str(snapshot / index)!r}" in message, message
    assert f"names {entry!r}" in message, message
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["cache"]  # no output, no staging folder
