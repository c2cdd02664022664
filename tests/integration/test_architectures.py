"""Every common dense decoder family, end to end, from a sharded checkpoint with a tokenizer:
``sparselora masks`` / ``apply`` / ``validate``, ``sparselora prune`` with each method (equal
to :func:`prune_model` in memory, bit for bit), and sparse LoRA with the default targets,
trained one step and merged with every pruned weight still exactly zero.

Each family lists the projections that are pruned, by name: embeddings, norms, biases and
the LM head stay dense (and unchanged) everywhere, Phi-3's fused ``qkv_proj`` /
``gate_up_proj`` are pruned as one matrix each, GPT-2's ``Conv1D`` weights are stored
``(in, out)`` and pruned (and adapted) as such.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from conftest import VOCAB, cli_exit_code, write_tokenizer  # noqa: E402
from sparselora.lora.model import sparse_lora_layers  # noqa: E402
from sparselora.pruning.calibration import calibration_batches  # noqa: E402
from sparselora.pruning.mask_generator import compute_unstructured_mask  # noqa: E402
from sparselora.pruning.mask_ops import load_mask  # noqa: E402
from sparselora.pruning.oneshot import prune_model  # noqa: E402
from sparselora.pruning.sparse_lora import SparseLoRAConfig, apply_sparse_lora, merge_all_lora_weights  # noqa: E402
from sparselora.pruning.targets import is_hf_conv1d  # noqa: E402

SPARSITY = 0.5
METHODS = ("magnitude", "wanda", "sparsegpt")
MODES = ("sparse_to_dense", "sparse_to_sparse")
SAMPLES, SEQ_LEN = 4, 16  # calibration windows of the built checkpoints' tokenizer
LLAMA_LIKE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# the common shape of the tiny decoders: 2 blocks, hidden 32, grouped-query attention
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


@dataclass(frozen=True)
class Family:
    """A decoder family: how to build a tiny one, where its blocks are, what is pruned in a block."""

    name: str
    build: Callable[[], nn.Module]
    blocks: str
    pruned: tuple[str, ...]

    def pruned_names(self, layers: int = 2) -> set[str]:
        """Parameter names of the pruned weights of a ``layers``-block model."""
        return {f"{self.blocks}.{i}.{p}.weight" for i in range(layers) for p in self.pruned}


FAMILIES = [
    Family("llama", lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, tie_word_embeddings=False)),
           "model.layers", LLAMA_LIKE),
    Family("mistral", lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**SIZES)),
           "model.layers", LLAMA_LIKE),
    Family("qwen2", lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SIZES)),  # q/k/v biases
           "model.layers", LLAMA_LIKE),
    Family("qwen3", lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SIZES, head_dim=8)),
           "model.layers", LLAMA_LIKE),
    Family("gemma2", lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**SIZES, head_dim=8)),
           "model.layers", LLAMA_LIKE),
    Family("gemma3", lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**SIZES, head_dim=8)),
           "model.layers", LLAMA_LIKE),
    Family("phi3", lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **SIZES, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
           "model.layers", ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")),
    Family("gpt2", lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)),
           "transformer.h", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    Family("opt", lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=32)),
           "model.decoder.layers", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                    "self_attn.out_proj", "fc1", "fc2")),
]


@dataclass(frozen=True)
class Built:
    """A family's checkpoint on disk (sharded safetensors + tokenizer) and its calibration text."""

    family: Family
    folder: Path
    text: Path

    def load(self) -> nn.Module:
        return transformers.AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32)

    def batches(self) -> list[dict]:
        tokenizer = transformers.AutoTokenizer.from_pretrained(self.folder)
        return calibration_batches(tokenizer, self.text.read_text(encoding="utf-8"), samples=SAMPLES, seq_len=SEQ_LEN)


@pytest.fixture(scope="module", params=FAMILIES, ids=[f.name for f in FAMILIES])
def built(request, tmp_path_factory) -> Built:
    """One checkpoint per family for the whole module: a tiny random model saved in shards."""
    family: Family = request.param
    root = tmp_path_factory.mktemp(family.name)
    torch.manual_seed(0)
    family.build().save_pretrained(root / "ckpt", max_shard_size="24KB")
    write_tokenizer(root / "ckpt")
    assert len(list((root / "ckpt").glob("model-*.safetensors"))) > 1  # sharded
    assert (root / "ckpt" / "model.safetensors.index.json").is_file()
    text = root / "calibration.txt"
    text.write_text("sparse weights keep their shape and their zeros. " * 80, encoding="utf-8")
    return Built(family, root / "ckpt", text)


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``folder``, as ``from_pretrained`` loads it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def assert_zeros_are_the_mask(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """The pruned entries are exactly zero and no kept entry is (random weights have no zeros)."""
    for name, mask in masks.items():
        assert torch.equal(weights[name] != 0, mask), name


def assert_rest_unchanged(weights: dict[str, torch.Tensor], dense: dict[str, torch.Tensor], masks) -> None:
    """Embeddings, norms, biases and the LM head are the dense checkpoint's, bit for bit."""
    assert weights.keys() == dense.keys()
    for name in dense.keys() - masks.keys():
        assert torch.equal(weights[name], dense[name]), name


def test_masks_apply_and_validate_commands(built, tmp_path):
    masks_file, applied = tmp_path / "masks.safetensors", tmp_path / "applied"
    argv = ["--no-progress"]
    assert cli_exit_code(["masks", str(built.folder), "--sparsity", str(SPARSITY), "-o", str(masks_file), *argv]) == 0
    masks, _ = load_mask(masks_file)
    assert set(masks) == built.family.pruned_names()
    # the streaming command and the in-memory API agree on targets and on every bit (one global cut)
    expected = compute_unstructured_mask(built.load(), SPARSITY, global_pruning=True, progress=False)
    assert masks.keys() == expected.keys() and all(torch.equal(masks[k], expected[k]) for k in masks)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(SPARSITY * total)

    assert cli_exit_code(["validate", str(built.folder), str(masks_file), *argv]) == 1  # still dense
    assert cli_exit_code(["apply", str(built.folder), str(masks_file), "-o", str(applied), *argv]) == 0
    assert cli_exit_code(["validate", str(applied), str(masks_file), *argv]) == 0
    weights = weights_of(applied)
    assert_zeros_are_the_mask(weights, masks)
    assert_rest_unchanged(weights, weights_of(built.folder), masks)


def output_rows(weight_or_mask: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """``(out, in)`` view: transformers' Conv1D stores its weight ``(in, out)``."""
    return weight_or_mask.t() if conv1d else weight_or_mask


@pytest.mark.parametrize("method", METHODS)
def test_prune_command_equals_prune_model(built, tmp_path, method):
    out = tmp_path / "out"
    assert cli_exit_code(["prune", str(built.folder), "--method", method, "--sparsity", str(SPARSITY),
                          "--calibration", str(built.text), "--samples", str(SAMPLES), "--seq-len", str(SEQ_LEN),
                          "-o", str(out), "--no-progress"]) == 0
    masks, _ = load_mask(out / "masks.safetensors")
    assert set(masks) == built.family.pruned_names()
    reference = built.load()
    expected = prune_model(reference, built.batches(), method, SPARSITY, progress=False)
    assert masks.keys() == expected.keys() and all(torch.equal(masks[k], expected[k]) for k in masks)
    weights = weights_of(out)  # from_pretrained loads the pruned checkpoint
    for name, param in reference.state_dict().items():  # SparseGPT's updated kept weights included
        assert torch.equal(weights[name], param), name
    assert_zeros_are_the_mask(weights, masks)
    assert_rest_unchanged(weights, weights_of(built.folder), masks)
    modules = dict(reference.named_modules())
    for name, mask in masks.items():
        assert int((~mask).sum()) == round(SPARSITY * mask.numel()), name
        if method == "wanda":  # Wanda's groups are output rows, whatever the storage order
            rows = output_rows(mask, is_hf_conv1d(modules[name.rpartition(".")[0]]))
            assert (rows.sum(dim=1) == rows.shape[1] // 2).all(), name
    assert cli_exit_code(["validate", str(out), str(out / "masks.safetensors"), "--no-progress"]) == 0


def test_sparse_lora_with_default_targets_trains_and_merges_sparse(built):
    pruned = built.load()
    batches = built.batches()
    masks = prune_model(pruned, batches, "wanda", SPARSITY, progress=False)
    dense_keys = list(pruned.state_dict())
    for mode in MODES:
        model = apply_sparse_lora(copy.deepcopy(pruned), masks, SparseLoRAConfig(r=4, sparsity_mode=mode))
        # the default adapts every pruned projection (nn.Linear and Conv1D alike), not the LM head
        assert {f"{n}.weight" for n, _ in sparse_lora_layers(model)} == set(masks), mode
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(
            n.rpartition(".")[2] in ("lora_A", "lora_B") for n, p in model.named_parameters() if p.requires_grad)
        model.train()
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        batch = batches[0]
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        assert all(bool(layer.lora_B.abs().sum() > 0) for _, layer in sparse_lora_layers(model)), mode
        model.eval()
        with torch.no_grad():
            unmerged = model(**batch).logits
        with warnings.catch_warnings():
            # sparse_to_dense: the masked merge drops the update on pruned weights, and says so
            warnings.simplefilter("ignore" if mode == "sparse_to_dense" else "error")
            model = merge_all_lora_weights(model, preserve_sparsity=True)
        assert not sparse_lora_layers(model) and list(model.state_dict()) == dense_keys, mode
        params = dict(model.named_parameters())
        for name, mask in masks.items():
            assert int(params[name].detach()[~mask].count_nonzero()) == 0, (mode, name)
        if mode == "sparse_to_sparse":  # trained as (W + s·BA) ⊙ M: merging changes nothing
            with torch.no_grad():
                torch.testing.assert_close(model(**batch).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_streaming_masks_know_embeddings_by_the_config_not_the_name(tmp_path):
    """GPT-2's ``wte`` / ``wpe`` names say nothing of embeddings: the folder's config.json does, also
    for a checkpoint saved without the model's prefix (``wte.weight``, as the original GPT-2 files)."""
    from safetensors.torch import save_file

    from sparselora.pruning.streaming import compute_checkpoint_masks

    gpt2 = next(f for f in FAMILIES if f.name == "gpt2")
    torch.manual_seed(0)
    model = gpt2.build()
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    folder = tmp_path / "ckpt"
    model.config.save_pretrained(folder)
    save_file(state, folder / "model.safetensors")
    summary = compute_checkpoint_masks(folder, SPARSITY, tmp_path / "masks.safetensors", progress=False)
    assert set(summary["targets"]) == {n.removeprefix("transformer.") for n in gpt2.pruned_names()}
