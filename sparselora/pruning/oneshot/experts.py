"""Calibration of mixture-of-experts blocks: each expert sees the tokens the router sends to it.

transformers runs a block's experts as one module (``mlp.experts``) holding fused 3-D weights
and its own kernels (a loop, grouped matmuls, ...), so there is no per-expert ``nn.Linear`` to
hook. A forward hook on the experts module sees the block's tokens and the router's choice
(``top_k_index``); from them it recomputes, expert by expert, the inputs of its two matrices:
the routed tokens for ``gate_up_proj`` (``up_proj`` without a gate) and ``act(gate) · up`` for
``down_proj``. That is the expert MLP of Mixtral, Qwen2/Qwen3-MoE and their kin, in the layouts
transformers marks on the module (``has_gate``, ``is_concatenated``, ``is_transposed``).
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

import torch
import torch.nn as nn

__all__ = ["expert_count", "routed_inputs", "watch_experts"]

# the input-side and output-side weights of an expert MLP, by the names transformers gives them
_INPUT_SIDE = ("gate_up_proj", "up_proj")
_OUTPUT_SIDE = "down_proj"


def _matrix(module: nn.Module, name: str, expert: int) -> torch.Tensor:
    """Expert ``expert``'s ``(out, in)`` matrix of fused weight ``name``."""
    weight = getattr(module, name)[expert]
    return weight.t() if getattr(module, "is_transposed", False) else weight


def _hidden(module: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """What expert ``expert``'s ``down_proj`` reads for tokens ``x``: ``act(gate) · up``."""
    act = getattr(module, "act_fn", None)
    if act is None:
        raise ValueError(f"experts module {type(module).__name__} has no act_fn; its expert MLP is not one "
                         "sparselora can follow to calibrate down_proj")
    if not getattr(module, "has_gate", True):
        return act(x @ _matrix(module, "up_proj", expert).t())
    h = x @ _matrix(module, "gate_up_proj", expert).t()
    if getattr(module, "is_concatenated", True):
        gate, up = h.chunk(2, dim=-1)
    else:  # interleaved [gate0, up0, gate1, up1, ...]
        gate, up = h[..., 0::2], h[..., 1::2]
    return act(gate) * up


def expert_count(module: nn.Module) -> int:
    """How many experts an experts module holds (dim 0 of its input-side weight)."""
    for name in _INPUT_SIDE:
        if hasattr(module, name):
            return getattr(module, name).shape[0]
    raise ValueError(f"experts module {type(module).__name__} has none of {', '.join(_INPUT_SIDE)}")


def routed_inputs(module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, *, all_experts: bool,
                  wants_hidden: bool) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """``(expert, tokens it reads, its down_proj inputs or None)`` for every expert: the tokens
    whose ``top_k_index`` row names it (every token with ``all_experts``)."""
    x = hidden.reshape(-1, hidden.shape[-1])
    index = top_k_index.reshape(x.shape[0], -1)
    with torch.no_grad():
        for expert in range(expert_count(module)):
            routed = x if all_experts else x[(index == expert).any(dim=-1)]
            yield expert, routed, (_hidden(module, routed, expert) if wants_hidden and routed.shape[0] else None)


def watch_experts(module: nn.Module, stats: Mapping[tuple[str, int], Callable[[torch.Tensor], None]], *,
                  all_experts: bool = False) -> tuple[torch.utils.hooks.RemovableHandle, list[int]]:
    """Hook ``module`` (an experts module) so that each forward pass hands every expert's inputs
    to ``stats[(weight name, expert)](inputs)`` (``"gate_up_proj"`` / ``"up_proj"`` get the
    routed tokens, ``"down_proj"`` the activations it reads). Returns the hook's handle and
    the list, one entry per expert, that counts the tokens each expert read."""
    tokens = [0] * expert_count(module)
    for name, _expert in stats:
        if name not in (*_INPUT_SIDE, _OUTPUT_SIDE):
            raise ValueError(f"experts module {type(module).__name__} has a fused weight {name!r}; calibrating it "
                             f"per expert knows {', '.join(_INPUT_SIDE)} and {_OUTPUT_SIDE}")
    wants_hidden = any(name == _OUTPUT_SIDE for name, _ in stats)

    def hook(_module, args, kwargs, _output):
        hidden = args[0] if args else kwargs["hidden_states"]
        top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        for expert, routed, inner in routed_inputs(module, hidden, top_k_index, all_experts=all_experts,
                                                   wants_hidden=wants_hidden):
            tokens[expert] += routed.shape[0]
            if not routed.shape[0]:
                continue
            for name in _INPUT_SIDE:
                if (name, expert) in stats:
                    stats[(name, expert)](routed)
            if (_OUTPUT_SIDE, expert) in stats:
                stats[(_OUTPUT_SIDE, expert)](inner)

    return module.register_forward_hook(hook, with_kwargs=True), tokens
