"""convert_mask_file: every mask format rewritten as every other, bit for bit, atomically."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sparselora.io import mask_files
from sparselora.io.mask_files import MASK_FORMATS, convert_mask_file
from sparselora.io.packed_masks import is_packed_file
from sparselora.pruning.mask_ops import load_mask, save_mask
from sparselora.pruning.streaming import compute_checkpoint_masks

# (name, format, packed, suffix): the four ways a mask file is written
KINDS = [("pt", "pt", False, ".pt"), ("npz", "npz", False, ".npz"),
         ("safetensors", "safetensors", False, ".safetensors"), ("packed", "safetensors", True, ".safetensors")]
METADATA = {"sparsity": 0.5, "method": "unstructured", "note": "kept as is", "nested": {"a": [1, 2.5, None]}}


@pytest.fixture
def masks() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    # not in sorted order, sizes that are not multiples of 8, an empty and a 0-d mask
    shapes = {"z.weight": (3, 5), "a.weight": (7,), "m.conv.weight": (4, 3, 2, 2), "empty.weight": (0, 4),
              "scalar": ()}
    return {name: torch.rand(shape, generator=gen) > 0.4 for name, shape in shapes.items()}


def write(masks, folder: Path, kind) -> Path:
    name, fmt, packed, suffix = kind
    path = folder / f"source-{name}{suffix}"
    save_mask(masks, path, METADATA, format=fmt, packed=packed)
    return path


def assert_same(path: Path, masks: dict[str, torch.Tensor], fmt: str) -> None:
    loaded, metadata = load_mask(path, format=fmt)
    assert list(loaded) == list(masks)  # names in the same order
    for name, mask in masks.items():
        assert loaded[name].dtype == torch.bool and torch.equal(loaded[name], mask), name
    assert metadata == METADATA


def test_the_formats_are_the_ones_save_mask_writes():
    assert sorted(MASK_FORMATS) == sorted({fmt for _, fmt, _, _ in KINDS})


@pytest.mark.parametrize("source_kind,target_kind", list(itertools.product(KINDS, KINDS)), ids=lambda k: k[0])
def test_every_pair_round_trips_bit_exactly(tmp_path, masks, source_kind, target_kind):
    source = write(masks, tmp_path, source_kind)
    _, fmt, packed, suffix = target_kind
    target = tmp_path / f"target{suffix}"
    convert_mask_file(source, target, fmt, packed=packed)
    if fmt == "safetensors":
        assert is_packed_file(target) == packed
    else:
        assert target.read_bytes()[:2] == b"PK"  # a zip: torch.save's or numpy's
    assert_same(target, masks, fmt)
    # and back: the file read again is the file first written
    back = tmp_path / f"back{source_kind[3]}"
    convert_mask_file(target, back, source_kind[1], packed=source_kind[2])
    assert_same(back, masks, source_kind[1])
    # the same bytes where a format has one encoding (npz members carry the time they were
    # written, and the safetensors library orders header metadata as it likes)
    if source_kind[0] in ("pt", "packed"):
        assert back.read_bytes() == source.read_bytes()


def test_the_format_follows_the_extension(tmp_path, masks):
    source = write(masks, tmp_path, KINDS[3])
    for name in ("out.pt", "out.pth", "out.npz", "out.safetensors"):
        convert_mask_file(source, tmp_path / name)
        assert_same(tmp_path / name, masks, mask_files.resolve_format(name, None))
    assert not is_packed_file(tmp_path / "out.safetensors")  # packed only when asked


def test_a_folder_of_packed_shards_converts_to_one_file(tmp_path):
    gen = torch.Generator().manual_seed(1)
    weights = {f"layer.{i}.weight": torch.randn(6, 10, generator=gen) for i in range(3)}
    compute_checkpoint_masks(weights, 0.5, tmp_path / "shards", progress=False)
    expected, metadata = load_mask(tmp_path / "shards")
    for name in ("one.pt", "one.npz"):
        convert_mask_file(tmp_path / "shards", tmp_path / name)
        masks, meta = load_mask(tmp_path / name)
        assert list(masks) == list(expected) and all(torch.equal(masks[n], expected[n]) for n in expected)
        assert meta == metadata


def test_an_unknown_format_is_refused_naming_the_accepted_ones(tmp_path, masks):
    source = write(masks, tmp_path, KINDS[0])
    with pytest.raises(ValueError, match=r"format='bin' is unknown; accepted: pt, npz, safetensors"):
        convert_mask_file(source, tmp_path / "out.bin", "bin")
    with pytest.raises(ValueError, match=r"cannot infer the mask format from .*out\.txt.*pt, npz, safetensors"):
        convert_mask_file(source, tmp_path / "out.txt")
    with pytest.raises(ValueError, match=r"packed=True needs format='safetensors'"):
        convert_mask_file(source, tmp_path / "out.pt", packed=True)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        convert_mask_file(tmp_path / "missing.pt", tmp_path / "out.npz")
    assert sorted(os.listdir(tmp_path)) == [source.name]


@pytest.mark.parametrize("fmt", ["pt", "npz"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, masks, monkeypatch, fmt):
    source = write(masks, tmp_path, KINDS[3])
    target = tmp_path / f"old.{fmt}"
    target.write_bytes(b"the previous file")

    def broken(*args, **kwargs):
        handle = args[1] if fmt == "pt" else args[0]  # torch.save(obj, f), np.savez_compressed(f, ...)
        handle.write(b"half a file")
        raise OSError("disk full")

    if fmt == "pt":
        monkeypatch.setattr(torch, "save", broken)
    else:
        monkeypatch.setattr(np, "savez_compressed", broken)
    with pytest.raises(OSError, match="disk full"):
        convert_mask_file(source, target)
    assert target.read_bytes() == b"the previous file"
    assert sorted(os.listdir(tmp_path)) == sorted([source.name, target.name])


def test_a_source_that_is_not_masks_is_refused_before_writing(tmp_path):
    torch.save({"w": torch.tensor([0.0, 0.5, 1.0])}, tmp_path / "weights.pt")
    target = tmp_path / "masks.npz"
    target.write_bytes(b"the previous file")
    with pytest.raises(ValueError, match=r"weights\.pt.*values other than 0 and 1"):
        convert_mask_file(tmp_path / "weights.pt", target)
    assert target.read_bytes() == b"the previous file"
