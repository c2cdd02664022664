"""The sparse LoRA layer: a Linear (or transformers ``Conv1D``) with an adapter and a keep-mask.

What the layer guarantees, in every mode, on every backend:

* **dtypes**: the base may be fp32, fp16 or bf16 and the adapters in the base dtype or in
  fp32. Outside autocast the layer computes in the base dtype (x must be in it, as for
  ``nn.Linear``); under ``torch.autocast`` it computes in the autocast dtype, as ``nn.Linear``
  plus PEFT's LoRA would. The adapters' gradients arrive in their own dtype.
* **masks** are kept as packed bits (8 per byte) in a plain attribute, not a buffer: DDP
  never broadcasts them, ``model.to(...)`` moves them, and the state dict carries them under
  ``<layer>.weight_mask`` so that they are saved and restored with the model; loading a
  state dict whose mask differs from the layer's is an error.
* **inference** without merging: with autograd off (or nothing requiring gradients) a
  sparse_to_sparse layer keeps its effective weight and rebuilds it only when the base or
  an adapter changes (tensor version counters: in-place ops and optimizer steps count;
  writes through ``.data`` do not, so call ``train()``/``eval()`` or :meth:`clear_cache`
  after those).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops.masks import check_keep_mask, pack_bits, unpack_bits
from ..pruning.targets import is_hf_conv1d as is_conv1d
from .config import SparseLoRAConfig

__all__ = ["SparseLoRALinear", "is_conv1d", "autocast_dtype", "merge_change_from"]

MASK_KEY = "weight_mask"


def merge_change_from(norms: torch.Tensor) -> dict[str, float]:
    """The merge report of one layer from its squared norms ``[‖(s·BA) ⊙ ¬M‖², ‖s·BA‖²,
    ‖W + s·BA‖²]``: ``dropped_update`` and ``relative_change`` (0 where the denominator is)."""
    dropped, update, merged = (float(v) ** 0.5 for v in norms.tolist())
    return {
        "dropped_update": dropped / update if update else 0.0,
        "relative_change": dropped / merged if merged else 0.0,
    }


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or None when autocast is off there."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


class SparseLoRALinear(nn.Module):
    """A Linear layer with a LoRA adapter and an optional keep-mask on its weight.

    The base ``weight`` and ``bias`` are the wrapped layer's own parameters, frozen, so
    parameter names (and mask keys) stay those of the original model; the adapter adds
    ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)``. A transformers ``Conv1D`` keeps its
    ``(in, out)`` weight (and mask) as it is; merging gives a ``Conv1D`` back.
    """

    def __init__(
        self, base: nn.Module, mask: torch.Tensor | None, config: SparseLoRAConfig,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.fan_in_fan_out = is_conv1d(base)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        elif isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            raise TypeError(f"base is a {type(base).__name__}; sparse LoRA wraps nn.Linear and transformers' Conv1D")
        self._base_class = type(base)
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": adapter_dtype or base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling
        self.r = config.r
        self.alpha = config.alpha
        self.sparsity_mode = config.sparsity_mode
        self.preserve_sparsity_on_merge = config.preserve_sparsity_on_merge
        self._mask_bits: torch.Tensor | None = None
        self._cache: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None
        if mask is not None:
            self.set_mask(mask)

    # ----- the mask ---------------------------------------------------------------------

    @property
    def weight_mask(self) -> torch.Tensor | None:
        """The keep-mask as a bool tensor shaped like ``weight`` (a new tensor), or None."""
        return None if self._mask_bits is None else unpack_bits(self._mask_bits, self.weight.shape)

    @property
    def packed_mask(self) -> torch.Tensor | None:
        """The keep-mask as stored: packed bits, ``ceil(n/8)`` uint8 bytes, LSB first."""
        return self._mask_bits

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Replace the keep-mask (bool of the weight's shape, or its packed bits; None: no mask).

        The base weight is not changed; zero it with :func:`~sparselora.ops.apply_mask_`.
        """
        if mask is not None:
            check_keep_mask(mask, self.weight.shape, "mask")
            mask = pack_bits(mask) if mask.dtype == torch.bool else mask.contiguous()
        self._mask_bits = mask
        self._follow_weight()
        self._cache = None

    def _follow_weight(self) -> torch.Tensor | None:
        """The packed bits, moved to the weight's device first. A weight on the meta device
        (a model built there, then ``to_empty``) leaves them where they are: bits moved to
        meta would lose their values. ``fully_shard`` moves parameters without
        ``Module._apply``, so every use of the mask comes through here."""
        bits = self._mask_bits
        device = self.weight.device
        if bits is not None and bits.device != device and device.type != "meta":
            bits = self._mask_bits = bits.to(device)
        return bits

    def _apply(self, fn, recurse: bool = True):
        # the mask is no buffer (DDP would broadcast it every step): it follows the weight's
        # device here; conversions (half(), to(dtype)) leave the uint8 bits as they are
        super()._apply(fn, recurse)
        self._follow_weight()
        self._cache = None
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._mask_bits is not None:
            destination[prefix + MASK_KEY] = self._mask_bits

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + MASK_KEY
        if key in state_dict:
            saved = state_dict.pop(key)
            try:
                check_keep_mask(saved, self.weight.shape, key)
            except (TypeError, ValueError) as exc:
                error_msgs.append(str(exc))
            else:
                saved_bits = pack_bits(saved) if saved.dtype == torch.bool else saved
                if self._mask_bits is None:
                    self.set_mask(saved_bits)
                elif not torch.equal(saved_bits.to(self._mask_bits.device), self._mask_bits):
                    differ = int((unpack_bits(saved_bits.to(self._mask_bits.device), self.weight.shape)
                                  != self.weight_mask).sum())
                    error_msgs.append(
                        f"{key}: the saved mask differs from this layer's in {differ} positions; the weights "
                        "were trained under other masks (wrap the model with those masks, e.g. "
                        "apply_sparse_lora(model, masks_the_checkpoint_was_trained_with, config))"
                    )
        elif strict and self._mask_bits is not None:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._cache = None

    @property
    def masks_delta(self) -> bool:
        """True when the adapter's delta is masked too (sparse_to_sparse with a mask)."""
        return self.sparsity_mode == "sparse_to_sparse" and self._mask_bits is not None

    # ----- forward ----------------------------------------------------------------------

    def _compute_dtype(self, x: torch.Tensor) -> tuple[torch.dtype, bool]:
        """(dtype the layer computes in, whether autocast chose it)."""
        auto = autocast_dtype(x.device.type)
        if auto is not None:
            return auto, True
        if x.dtype != self.weight.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the layer's weight has {self.weight.dtype}; outside torch.autocast "
                "a sparse LoRA layer computes in its weight's dtype, as nn.Linear does (cast x, or use autocast)"
            )
        return self.weight.dtype, False

    def _adapters_for(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_A, self.lora_B
        if a.dtype not in (dtype, torch.float32):
            a, b = a.to(dtype), b.to(dtype)
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self._cache
        if cache is not None and not torch.is_grad_enabled() and not _is_compiling():
            # inference fast path (generate() calls every layer once per token): the cached
            # effective weight while nothing changed, the dtype and autocast state included
            key, w_eff, bias = cache
            if key == self._cache_key(x.dtype, x.device.type):
                if x.dtype != w_eff.dtype:
                    x = x.to(w_eff.dtype)
                return self._stored_linear(x, w_eff, bias)
        if self.masks_delta:
            return self._forward_sparse_to_sparse(x)
        return self._forward_dense_delta(x)

    def _base_linear(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.t() if self.fan_in_fan_out else self.weight
        return F.linear(x, weight, self.bias)

    def _forward_dense_delta(self, x: torch.Tensor) -> torch.Tensor:
        # W⊙M (stored masked) plus a dense adapter, exactly as PEFT's LoRA computes it
        _, by_autocast = self._compute_dtype(x)
        result = self._base_linear(x)
        lora_in = x if by_autocast else x.to(self.lora_A.dtype)
        delta = F.linear(F.linear(self.lora_dropout(lora_in), self.lora_A), self.lora_B) * self.scaling
        return result + delta.to(result.dtype)

    def _stored_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.fan_in_fan_out:
            y = x @ weight
            return y if bias is None else y + bias
        return F.linear(x, weight, bias)

    def _forward_sparse_to_sparse(self, x: torch.Tensor) -> torch.Tensor:
        dtype, by_autocast = self._compute_dtype(x)
        given = (x.dtype, x.device.type)  # the cache key's view of the input
        if by_autocast:
            x = x.to(dtype)
        weight = self.weight.to(dtype)  # no copy unless autocast asks for another dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        lora_A, lora_B = self._adapters_for(dtype)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            # dropout reaches the adapter's input only: (W⊙M) x + ((s·BA) ⊙ M) dropout(x)
            return self._stored_linear(x, weight, bias) + ops.masked_lora_linear(
                self.lora_dropout(x), None, lora_A, lora_B, self.scaling, self._follow_weight(),
                transposed=self.fan_in_fan_out)
        if not _is_compiling() and not (torch.is_grad_enabled() and (
                x.requires_grad or lora_A.requires_grad or lora_B.requires_grad or weight.requires_grad)):
            # nothing needs gradients: keep the effective weight until the base or an adapter changes
            self._cache = None  # free the old one first
            with torch.no_grad():
                w_eff = self._effective(weight, lora_A, lora_B)
            if not torch.is_grad_enabled():
                self._cache = (self._cache_key(*given), w_eff, bias)
            return self._stored_linear(x, w_eff, bias)
        return ops.masked_lora_linear(x, weight, lora_A, lora_B, self.scaling, self._follow_weight(), bias,
                                      transposed=self.fan_in_fan_out)

    def _cache_key(self, x_dtype: torch.dtype, device_type: str) -> tuple:
        # version counters move on every in-place change (optimizer steps, copy_, load_state_dict),
        # data pointers on replaced storage; the autocast state and x's dtype pick the compute dtype
        w, a, b = self.weight, self.lora_A, self.lora_B
        auto = autocast_dtype(device_type)
        return (w._version, a._version, b._version, w.data_ptr(), a.data_ptr(), b.data_ptr(), auto, x_dtype)

    def _effective(self, weight, lora_A, lora_B) -> torch.Tensor:
        """(W + s·BA) ⊙ M in the stored orientation."""
        a, b = self._stored_factors(lora_A, lora_B)
        return ops.masked_lora_weight(weight, a, b, self.scaling, self._follow_weight())

    def clear_cache(self) -> None:
        """Drop the cached effective weight (it is rebuilt on the next inference call)."""
        self._cache = None

    def train(self, mode: bool = True) -> "SparseLoRALinear":
        self._cache = None  # the cached effective weight is for inference only
        return super().train(mode)

    # ----- merge ------------------------------------------------------------------------

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The weight this layer computes with (outside dropout), as a new tensor, stored
        orientation (``(in, out)`` for a ``Conv1D``)."""
        if self.masks_delta:
            return self._effective(self.weight, self.lora_A, self.lora_B).clone()
        return self._merged_weight(None)

    def _merged_weight(self, mask: torch.Tensor | None) -> torch.Tensor:
        return self._merge_into(self.weight.detach().clone(), mask)

    def _stored_factors(self, lora_A: torch.Tensor | None = None,
                        lora_B: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapters (the layer's, or these) as the factors of the stored weight: a Conv1D's
        (in, out) weight takes s·Aᵀ Bᵀ."""
        a = self.lora_A if lora_A is None else lora_A
        b = self.lora_B if lora_B is None else lora_B
        return (b.t(), a.t()) if self.fan_in_fan_out else (a, b)

    def _merge_into(self, target: torch.Tensor, mask: torch.Tensor | None, norms: torch.Tensor | None = None) -> torch.Tensor:
        a, b = self._stored_factors()
        return ops.merge_lora_(target, a, b, self.scaling, mask, norms=norms)

    @torch.no_grad()
    def update_norms(self) -> torch.Tensor:
        """float64 ``[‖(s·BA) ⊙ ¬M‖², ‖s·BA‖², ‖W + s·BA‖²]`` (the first 0 without a mask), in
        one read of the weight and no weight-sized temporary."""
        a, b = self._stored_factors()
        return ops.lora_update_norms(self.weight, a, b, self.scaling, self._follow_weight())

    @torch.no_grad()
    def merge_change(self) -> dict[str, float]:
        """What a masked merge drops: ``dropped_update`` = ‖(s·BA) ⊙ ¬M‖ / ‖s·BA‖ (the share of
        the adapter's update lost) and ``relative_change`` = ‖(s·BA) ⊙ ¬M‖ / ‖W + s·BA‖."""
        if self._mask_bits is None:
            return {"dropped_update": 0.0, "relative_change": 0.0}
        return merge_change_from(self.update_norms())

    @torch.no_grad()
    def merge(self, preserve_sparsity: bool | None = None, *, norms: torch.Tensor | None = None) -> nn.Module:
        """Fold the adapter into the base weight (in place) and return a plain module
        (``nn.Linear``, or ``Conv1D`` for a Conv1D base).

        ``preserve_sparsity`` (default: the config's ``preserve_sparsity_on_merge``) masks
        the merged weight. sparse_to_sparse layers always merge masked: that is the
        function they were trained as. ``norms`` (float64, shape (3,)) receives the squared
        norms :func:`merge_change_from` turns into the merge report, from the merge's own pass.
        """
        if preserve_sparsity is None:
            preserve_sparsity = self.preserve_sparsity_on_merge
        if self.masks_delta and not preserve_sparsity:
            warnings.warn(
                "sparse_to_sparse layers merge as (W + s·BA) ⊙ M regardless of preserve_sparsity=False",
                UserWarning,
                stacklevel=3,
            )
            preserve_sparsity = True
        mask = self._follow_weight() if preserve_sparsity else None
        self._merge_into(self.weight.data, mask, norms)
        self._cache = None
        with torch.device("meta"):
            if self.fan_in_fan_out:
                plain = self._base_class(self.out_features, self.in_features)
            else:
                plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain.weight = self.weight
        plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        sparsity = ""
        if self._mask_bits is not None:
            sparsity = f", sparsity={1 - self.weight_mask.float().mean().item():.2%}"
        kind = ", Conv1D" if self.fan_in_fan_out else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, mode={self.sparsity_mode}{kind}{sparsity}"
        )
