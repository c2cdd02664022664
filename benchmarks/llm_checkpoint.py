"""Sequential pruning of a checkpoint larger than one wants in RAM: peak memory stays at one block.

    python benchmarks/llm_checkpoint.py                       # 18-block Llama, 1.06B bf16 weights (2.1 GB)
    python benchmarks/llm_checkpoint.py --layers 4 --method sparsegpt
    python benchmarks/llm_checkpoint.py --json out.json
    python benchmarks/llm_checkpoint.py --reconstruct         # with block reconstruction (2 steps a block)
    python benchmarks/llm_checkpoint.py --moe --layers 6      # a Mixtral: 8 experts a block, top-2

Writes a synthetic checkpoint from a Llama config (hidden 2048, MLP 5632, vocabulary 32000,
untied LM head, random bf16 weights, ~500 MB shards, one tensor generated at a time) in a
temporary folder, then measures in separate processes (peak RSS = the process's VmHWM,
interpreter, torch and transformers included):

* the imports alone;
* ``prune_checkpoint`` (the ``sparselora prune`` engine): blocks read from the shards one
  at a time, pruned, spilled, the output written tensor by tensor;
* the in-memory path: ``from_pretrained`` + ``prune_model`` on the whole model.

Both prune with the same calibration batches (random token ids); the masks and weights of
the two outputs are compared bit for bit. With ``--moe`` the checkpoint is a Mixtral (hidden
1024, 8 experts of MLP 2816, top-2) saved by ``save_pretrained``, experts stored one by one:
the streaming run reads and writes that layout, and the in-memory masks are compared in it. With ``--reconstruct`` every block is also
reconstructed (``reconstruct=``; a few steps: the memory does not grow with them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memory import peak_rss_bytes  # benchmarks/memory.py

HIDDEN, MLP, VOCAB, HEADS = 2048, 5632, 32000, 16


def config(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": MLP, "num_hidden_layers": layers, "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS, "vocab_size": VOCAB, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


MOE = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 1024,
       "intermediate_size": 2816, "num_local_experts": 8, "num_experts_per_tok": 2, "num_attention_heads": 16,
       "num_key_value_heads": 8, "vocab_size": VOCAB, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
       "tie_word_embeddings": False}


def generate_moe(folder: Path, layers: int) -> int:
    """A random bf16 Mixtral saved by transformers (experts stored one by one); its bytes."""
    import torch
    import transformers

    config = transformers.MixtralConfig(**{k: v for k, v in MOE.items() if k not in ("architectures", "model_type")},
                                        num_hidden_layers=layers)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="500MB")
    return sum(p.numel() * 2 for p in model.parameters())


def block_bytes(folder: Path) -> int:
    """Bytes of block 0's tensors as stored."""
    from sparselora.io.checkpoints import Checkpoint

    import torch

    checkpoint = Checkpoint(folder)  # from the headers: nothing is read
    return sum(torch.Size(checkpoint.shape(n)).numel() * checkpoint.dtype(n).itemsize
               for n in checkpoint.names if ".layers.0." in n)


def generate(folder: Path, layers: int, shard_bytes: int = 500 * 2**20) -> int:
    """Write config.json and bf16 shards; returns the bytes of weights written."""
    import torch

    from sparselora.io.safetensors import SafetensorsWriter
    from sparselora.pruning.oneshot import meta_model

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config(layers)))
    layout = [(n, p.shape) for n, p in meta_model(folder, torch.bfloat16).state_dict().items()]
    shards, current, size = [], [], 0
    for name, shape in layout:
        nbytes = 2 * torch.Size(shape).numel()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(folder / file, [(n, torch.bfloat16, tuple(s)) for n, s in shard]) as writer:
            for name, shape in shard:
                tensor = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
                writer.write(name, tensor.to(torch.bfloat16))
                weight_map[name] = file
                total += 2 * tensor.numel()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def child(kind: str, folder: Path, out: Path, method: str, steps: int) -> dict:
    import torch
    import transformers

    from sparselora.pruning.oneshot import prune_checkpoint, prune_model

    options = {"reconstruct": {"steps": steps}} if steps else {}

    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, VOCAB, (4, 128), generator=gen)} for _ in range(2)]
    start = time.perf_counter()
    if kind == "baseline":
        return {"seconds": 0.0, "peak_rss": peak_rss_bytes()}
    if kind == "stream":
        summary = prune_checkpoint(folder, out, method, 0.5, calibration_data=batches, progress=False, overwrite=True,
                                   **options)
        return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss_bytes(), "blocks": summary["blocks"]}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    masks = prune_model(model, batches, method, 0.5, progress=False, **options)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    # compare with the streamed output, outside the timed part
    from sparselora.pruning.mask_ops import load_mask

    from sparselora.io.checkpoints import Checkpoint
    from sparselora.pruning.oneshot.layout import StoredLayout

    streamed = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    disk, _ = load_mask(out / "masks.safetensors")
    # the in-memory masks in the stored layout (the same names for a dense model)
    layout = StoredLayout(model.config.model_type, Checkpoint(out).names, lambda name: None)
    masks = {stored: piece for name, mask in masks.items() for stored, piece in layout.split(name, mask)}
    same_masks = disk.keys() == masks.keys() and all(torch.equal(disk[k], masks[k]) for k in masks)
    same_weights = all(torch.equal(p, streamed.get_parameter(n)) for n, p in model.named_parameters())
    return {"seconds": seconds, "peak_rss": peak, "same_masks": same_masks, "same_weights": same_weights}


def measure(kind: str, folder: Path, out: Path, method: str, steps: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(folder), str(out), method, str(steps)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=18, help="decoder blocks (default 18: 1.06B weights, 2.1 GB)")
    parser.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"], default="wanda")
    parser.add_argument("--reconstruct", action="store_true", help="reconstruct every block after pruning it")
    parser.add_argument("--reconstruct-steps", type=int, default=2, help="steps per block with --reconstruct (default 2)")
    parser.add_argument("--moe", action="store_true", help="a Mixtral (8 experts, top-2) saved by transformers")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, folder, out, method, steps = args.child
        print(json.dumps(child(kind, Path(folder), Path(out), method, int(steps))))
        return
    steps = args.reconstruct_steps if args.reconstruct else 0
    with tempfile.TemporaryDirectory(prefix="sparselora-bench-") as tmp:
        folder = Path(tmp) / "ckpt"
        size = generate_moe(folder, args.layers) if args.moe else generate(folder, args.layers)
        block = block_bytes(folder)
        out = Path(tmp) / "pruned"
        results = {kind: measure(kind, folder, out, args.method, steps) for kind in ("baseline", "stream", "in_memory")}
    mb = lambda b: b / 2**20  # noqa: E731
    base = results["baseline"]["peak_rss"]
    shape = (f"Mixtral (hidden {MOE['hidden_size']}, {MOE['num_local_experts']} experts of MLP "
             f"{MOE['intermediate_size']}, top-{MOE['num_experts_per_tok']})" if args.moe
             else f"Llama (hidden {HIDDEN}, MLP {MLP})")
    print(f"\n{args.layers}-block {shape}, {size / 1e9:.2f} GB of bf16 weights; "
          f"one block {mb(block):.0f} MiB; {args.method} at 50%, 8 x 128 calibration tokens"
          + (f", reconstruction ({steps} steps a block)" if steps else ""))
    print(f"{'':<36}{'time':>9}{'peak RSS':>12}{'above imports':>15}")
    for kind, label in (("baseline", "imports (torch, transformers)"), ("stream", "prune_checkpoint (streaming)"),
                        ("in_memory", "from_pretrained + prune_model")):
        r = results[kind]
        print(f"{label:<36}{r['seconds']:>8.1f}s{mb(r['peak_rss']):>8.0f} MiB{mb(r['peak_rss'] - base):>11.0f} MiB")
    above = results["stream"]["peak_rss"] - base
    print(f"streaming: {above / block:.2f} blocks above the imports; in-memory: "
          f"{(results['in_memory']['peak_rss'] - base) / block:.2f} blocks; same masks: "
          f"{results['in_memory']['same_masks']}, same weights: {results['in_memory']['same_weights']}")
    results.update(layers=args.layers, bytes=size, block_bytes=block, method=args.method, reconstruct_steps=steps,
                   moe=args.moe)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
