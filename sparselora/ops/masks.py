"""Keep-masks as bool tensors or packed bits, on any device (numpy's packbits on the CPU).

A packed mask of ``n`` elements is ``ceil(n/8)`` uint8 bytes; element ``i`` of the flattened
mask is bit ``i % 8`` of byte ``i // 8`` (least significant bit first), the layout of the
packed mask files and of the C++ kernels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["packed_size", "is_packed_for", "pack_bits", "unpack_bits", "as_bool_keep", "check_keep_mask"]


def packed_size(numel: int) -> int:
    """Bytes of a packed mask of ``numel`` elements."""
    return (numel + 7) // 8


def is_packed_for(mask: torch.Tensor, shape: Sequence[int]) -> bool:
    """True when ``mask`` is the packed form of a mask of ``shape``."""
    numel = 1
    for d in shape:
        numel *= int(d)
    return mask.dtype == torch.uint8 and mask.dim() == 1 and mask.numel() == packed_size(numel)


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask -> packed uint8 bytes on the mask's device."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.detach().reshape(-1).numpy(), bitorder="little"))
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _shifts(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Packed uint8 bytes -> bool mask of ``shape`` on the bytes' device."""
    numel = 1
    for d in shape:
        numel *= int(d)
    if packed.device.type == "cpu":
        bits = np.unpackbits(packed.detach().reshape(-1).numpy(), count=numel, bitorder="little")
        return torch.from_numpy(bits.view(np.bool_)).view(tuple(int(d) for d in shape))
    bits = (packed.reshape(-1, 1) >> _shifts(packed.device)) & 1
    return bits.reshape(-1)[:numel].view(tuple(shape)).bool()


def as_bool_keep(mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The bool form of a keep-mask given bool or packed."""
    return mask if mask.dtype == torch.bool else unpack_bits(mask, shape)


def check_keep_mask(mask: object, shape: Sequence[int], name: str = "mask") -> None:
    """Raise unless ``mask`` is a bool tensor of ``shape`` or its packed uint8 form."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (bool, or packed uint8), got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(mask.shape)}; the weight has {tuple(shape)}")
        return
    if mask.dtype == torch.uint8:
        if not is_packed_for(mask, shape):
            numel = 1
            for d in shape:
                numel *= int(d)
            raise ValueError(
                f"{name} is uint8 with shape {tuple(mask.shape)}; a packed mask for a weight of shape "
                f"{tuple(shape)} is 1-D with {packed_size(numel)} bytes"
            )
        return
    raise TypeError(f"{name} has dtype {mask.dtype}; accepted: torch.bool, or packed torch.uint8 bits")
