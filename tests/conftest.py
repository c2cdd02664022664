"""Shared fixtures: small models built from code, no downloads."""

from __future__ import annotations

import os

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton kernels are decorated at import: the interpreter must be chosen before sparselora
# is imported. Without a GPU they run on CPU tensors, when a test forces
# SPARSELORA_BACKEND=triton; with one, they are compiled and run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.nn as nn  # noqa: E402


class ThreeLayers(nn.Module):
    """A model with named layers, as in the seed's layer-specific example."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(12, 24)
        self.layer2 = nn.Linear(24, 24)
        self.layer3 = nn.Linear(24, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(torch.relu(self.layer2(torch.relu(self.layer1(x)))))


@pytest.fixture
def three_layers() -> ThreeLayers:
    torch.manual_seed(0)
    return ThreeLayers()


def tiny_bert(seed: int = 0):
    """A 2-layer BERT built from a config (random init)."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32,
    )
    return transformers.BertModel(config).eval()


def tiny_gpt2(seed: int = 0):
    """A 2-layer GPT-2 LM built from a config (random init); uses transformers' Conv1D."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config)


def tiny_llama(seed: int = 0):
    """A 2-layer Llama LM built from a config (random init), nn.Linear projections."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


VOCAB = 300  # of write_llama_checkpoint's models and tokenizers


def write_llama_checkpoint(folder: Path, dtype=torch.float32, layers: int = 3, seed: int = 0) -> Path:
    """A small random Llama checkpoint in ``folder``: sharded safetensors and a BPE tokenizer."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).to(dtype).save_pretrained(folder, max_shard_size="24KB")
    write_tokenizer(folder)
    return folder


def write_tokenizer(folder: Path) -> Path:
    """A small byte-level BPE tokenizer (ids below :data:`VOCAB`) saved in ``folder``."""
    import tokenizers
    import transformers

    trainer = tokenizers.ByteLevelBPETokenizer()
    trainer.train_from_iterator(["sparse weights keep their shape and their zeros"] * 8, vocab_size=280,
                                min_frequency=1, show_progress=False)
    transformers.PreTrainedTokenizerFast(tokenizer_object=trainer._tokenizer).save_pretrained(folder)
    return folder


def token_batches(count: int = 4, seed: int = 1) -> list[dict]:
    """``count`` calibration batches of 2 × 20 random token ids below :data:`VOCAB`."""
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 20), generator=gen)} for _ in range(count)]


# a ModelZoo 2.10 trainer config as the seed document writes it (the base of Cerebras configs)
LLAMA_BASE_CONFIG = {
    "trainer": {
        "init": {
            "backend": {"backend_type": "CSX"},
            "model": {"name": "llama", "hidden_size": 2048, "num_hidden_layers": 16},
            "optimizer": {"AdamW": {"lr": 1e-4}},
            "loop": {"max_steps": 100},
            "checkpoint": {"steps": 50},
        },
        "fit": {"train_dataloader": {"data_processor": "GptHDF5MapDataProcessor", "batch_size": 8}},
    }
}


def cli_exit_code(argv: list[str]) -> int:
    """The exit code of ``sparselora`` run in this process on ``argv``: returned by the command,
    or raised by argparse (SystemExit) for a bad argument."""
    from sparselora.cli import main

    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def train_adapters(model, batches, lr: float = 1e-2) -> list[float]:
    """One AdamW step on the trainable parameters per batch of token ids (labels = inputs);
    the losses, as floats (the DDP and FSDP2 workers compare them across ranks)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"sparselora_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_torchrun(worker: str, out_dir, nproc: int) -> None:
    """Run ``tests/<worker>`` on ``nproc`` local ranks (torchrun, a free port) with ``out_dir``
    as its argument; fail with the workers' stderr if any rank fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        # --standalone: a local rendezvous on a free port (localhost:0)
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(Path(__file__).parent / worker), str(out_dir)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
