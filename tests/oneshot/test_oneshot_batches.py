"""One-shot pruning never lets a KV cache reach a decoder block: tensor, tuple, list and dict
batches give the same masks and weights, bit for bit."""

from __future__ import annotations

import pytest
import torch

from sparselora.pruning import prune_model

transformers = pytest.importorskip("transformers")

from conftest import tiny_gpt2, tiny_llama  # noqa: E402

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def token_windows(count: int = 3, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 20), generator=gen) for _ in range(count)]


def batch_forms(ids: list[torch.Tensor]) -> dict[str, list]:
    """The same calibration data in every form ``prune_model`` accepts."""
    return {
        "dict": [{"input_ids": x} for x in ids],
        "tensor": list(ids),
        "tuple": [(x,) for x in ids],
        "list": [[x] for x in ids],
        # a batch that asks for a cache itself gets none either
        "dict-use_cache": [{"input_ids": x, "use_cache": True} for x in ids],
    }


def pruned(arch: str, data: list, method: str, level: dict) -> tuple[dict, dict]:
    model = BUILDERS[arch]()
    masks = prune_model(model, data, method, progress=False, **level)
    return masks, {name: param.detach().clone() for name, param in model.named_parameters()}


CASES = [("wanda", {"sparsity": 0.5}), ("wanda", {"nm": (2, 4)}), ("wanda", {"sparsity": 0.5, "owl": True}),
         ("sparsegpt", {"sparsity": 0.5}), ("sparsegpt", {"nm": (2, 4)})]


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("method,level", CASES, ids=[f"{m}-{'-'.join(map(str, k.values()))}" for m, k in CASES])
def test_every_batch_form_gives_bit_identical_masks_and_weights(arch, method, level):
    forms = batch_forms(token_windows())
    masks, weights = pruned(arch, forms.pop("dict"), method, level)
    for form, data in forms.items():
        got_masks, got_weights = pruned(arch, data, method, level)
        assert got_masks.keys() == masks.keys(), form
        for name in masks:
            assert torch.equal(got_masks[name], masks[name]), f"{form}: mask of {name}"
        for name in weights:
            assert torch.equal(got_weights[name], weights[name]), f"{form}: {name}"


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("form", ["tensor", "tuple", "dict", "dict-use_cache"])
def test_no_block_is_ever_called_with_a_cache(arch, form):
    from transformers.cache_utils import Cache

    model = BUILDERS[arch]()
    seen: list[str] = []

    def record(_module, args, kwargs):
        for i, value in enumerate(args):
            if isinstance(value, Cache):
                seen.append(f"positional {i}: {type(value).__name__}")
        for key, value in kwargs.items():
            if isinstance(value, Cache):
                seen.append(f"{key}={type(value).__name__}")

    blocks = model.model.layers if arch == "llama" else model.transformer.h
    # registered before prune_model's own capture hook: it sees every call, the first one too
    handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in blocks]
    try:
        prune_model(model, batch_forms(token_windows())[form], "wanda", 0.5, owl=True, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == []
