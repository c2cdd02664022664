"""Hugging Face ↔ ModelZoo names of the prunable weights, and ModelZoo's LoRA classes.

ModelZoo names llama's weights its own way (``cszoo checkpoint convert`` maps them):
HF ``model.layers.0.self_attn.q_proj.weight`` is ModelZoo
``transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight`` (a trainer's model adds
``model.`` in front). Names here are given without that prefix; matching against a model's
parameters is by suffix. Only the names travel: ``q_proj`` and ``k_proj`` rows are reordered by
the converter (rotary interleaving), so masks reach ModelZoo as zeros in the converted weights,
never as mask tensors under a mapped name.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

__all__ = ["modelzoo_name", "name_map", "HF_PROJECTION_CLASSES", "attention_class", "match_parameter"]

# HF llama (also Mistral/Qwen layouts) -> ModelZoo llama, for the weights sparselora prunes
_LLAMA_RULES = [
    (r"self_attn\.q_proj", "self_attn.proj_q_dense_layer"),
    (r"self_attn\.k_proj", "self_attn.proj_k_dense_layer"),
    (r"self_attn\.v_proj", "self_attn.proj_v_dense_layer"),
    (r"self_attn\.o_proj", "self_attn.proj_output_dense_layer"),
    (r"mlp\.up_proj", "ffn.ffn.0.linear_layer"),
    (r"mlp\.gate_proj", "ffn.ffn.0.linear_layer_for_glu"),
    (r"mlp\.down_proj", "ffn.ffn.1.linear_layer"),
]
_LLAMA = [(re.compile(rf"^(?:model\.)?layers\.(\d+)\.{hf}\.(weight|bias)$"), mz) for hf, mz in _LLAMA_RULES]
_MODELS = {"llama": _LLAMA}

# ModelZoo's LoRA matches module class names: the class enclosing each HF projection
HF_PROJECTION_CLASSES = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "attention",
                         "gate_proj": "FeedForwardNetwork", "up_proj": "FeedForwardNetwork",
                         "down_proj": "FeedForwardNetwork"}
_ATTENTION_CLASSES = {"aiayn_attention": "MultiheadAttention", "multiquery_attention": "MultiQueryAttention"}


def attention_class(model_config: Mapping) -> str:
    """The attention class ModelZoo builds for a model config (``attention_module``,
    ModelZoo's default ``aiayn_attention`` → ``MultiheadAttention``)."""
    module = model_config.get("attention_module", "aiayn_attention")
    if module not in _ATTENTION_CLASSES:
        raise ValueError(f"model.attention_module={module!r} is unknown; accepted: {', '.join(_ATTENTION_CLASSES)}")
    return _ATTENTION_CLASSES[module]


def modelzoo_name(hf_name: str, model: str = "llama") -> str | None:
    """ModelZoo's name (without the trainer's ``model.`` prefix) of an HF weight, or None."""
    for pattern, replacement in _MODELS.get(model, ()):
        found = pattern.match(hf_name)
        if found:
            return f"transformer_decoder.layers.{found.group(1)}.{replacement}.{found.group(2)}"
    return None


def name_map(names: Iterable[str], model: str = "llama") -> dict[str, str]:
    """``{HF name: ModelZoo name}`` for every name the model's rules cover."""
    return {n: m for n in names if (m := modelzoo_name(n, model)) is not None}


def match_parameter(name: str, parameters: Iterable[str]) -> str | None:
    """The one parameter called ``name``, or equal to it up to a leading prefix on either
    side (a trainer's model and its checkpoint differ by ``model.``); None otherwise."""
    parameters = list(parameters)
    if name in parameters:
        return name
    candidates = [p for p in parameters if p.endswith("." + name) or name.endswith("." + p)]
    return candidates[0] if len(candidates) == 1 else None
