"""Masks for a sharded checkpoint larger than what one wants in RAM.

    python benchmarks/checkpoint.py                # ~1.07B bf16 weights (2.1 GB) in 8 shards
    python benchmarks/checkpoint.py --layers 8     # smaller
    python benchmarks/checkpoint.py --json out.json

Generates the checkpoint in a temporary directory (removed afterwards), then measures in
separate processes: one plain read of the shard files, the streaming mask command, and
loading the whole state dict followed by the in-memory path. Peak RSS is each process's
high-water mark (VmHWM), interpreter and torch included. Files are read from a warm
page cache in every case.
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

SIDE = 4096


def generate(folder: Path, layers: int) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    per_shard = 8
    shards = (layers + per_shard - 1) // per_shard
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for i in range(s * per_shard, min(layers, (s + 1) * per_shard)):
            tensors[f"layers.{i}.proj.weight"] = torch.randn(SIDE, SIDE, generator=gen).to(torch.bfloat16)
            tensors[f"layers.{i}.norm.weight"] = torch.ones(SIDE, dtype=torch.bfloat16)
        save_file(tensors, folder / file)
        weight_map.update({n: file for n in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def child(kind: str, folder: Path, out: Path) -> dict:
    if kind != "read":  # imports are not part of the work measured
        import safetensors.torch  # noqa: F401

        import sparselora.pruning.streaming  # noqa: F401
    start = time.perf_counter()
    if kind == "read":
        buffer = bytearray(64 * 2**20)
        total = 0
        for file in sorted(folder.glob("*.safetensors")):
            with open(file, "rb", buffering=0) as handle:
                while n := handle.readinto(buffer):
                    total += n
        return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss_bytes(), "bytes": total}
    if kind == "baseline":
        return {"seconds": 0.0, "peak_rss": peak_rss_bytes()}
    if kind == "stream":
        from sparselora.pruning.streaming import compute_checkpoint_masks

        summary = compute_checkpoint_masks(folder, 0.5, out, progress=False, overwrite=True)
        return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss_bytes(), "pruned": summary["total_pruned"]}
    from safetensors.torch import load_file

    from sparselora.pruning.targets import state_dict_targets
    from sparselora.pruning.mask_generator import masks_from_scores

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    targets = state_dict_targets(state)
    masks = masks_from_scores(targets, {t.name: 0.5 for t in targets}, None, global_pruning=True)
    return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss_bytes(), "pruned": sum(int((~m).sum()) for m in masks.values())}


def measure(kind: str, folder: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(folder), str(out)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=64, help="4096x4096 bf16 weights (default 64: 1.07B weights)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, folder, out = args.child
        print(json.dumps(child(kind, Path(folder), Path(out))))
        return
    with tempfile.TemporaryDirectory(prefix="sparselora-bench-") as tmp:
        folder = Path(tmp) / "ckpt"
        folder.mkdir()
        generate(folder, args.layers)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        largest = SIDE * SIDE * 2
        out = Path(tmp) / "masks.safetensors"
        measure("read", folder, out)  # warm the page cache
        results = {kind: measure(kind, folder, out) for kind in ("read", "stream", "in_memory", "baseline")}
        assert results["stream"]["pruned"] == results["in_memory"]["pruned"]
    bound = 2 * largest + 300 * 2**20
    mb = lambda b: b / 2**20  # noqa: E731
    print(f"\n{args.layers} x {SIDE}x{SIDE} bf16 weights = {args.layers * SIDE * SIDE / 1e9:.2f}B weights, "
          f"{size / 1e9:.2f} GB in {len(list(range(0, args.layers, 8)))} shards; largest tensor {mb(largest):.0f} MiB")
    print(f"{'':<34}{'time':>9}{'peak RSS':>12}  (python + torch alone: {mb(results['baseline']['peak_rss']):.0f} MiB)")
    labels = {"read": "one plain read of the files", "stream": "sparselora masks (streaming)",
              "in_memory": "load whole state dict + in-memory"}
    for kind, label in labels.items():
        r = results[kind]
        print(f"{label:<34}{r['seconds']:>8.1f}s{mb(r['peak_rss']):>9.0f} MiB")
    stream = results["stream"]
    above = stream["peak_rss"] - results["baseline"]["peak_rss"]
    print(f"streaming: {stream['seconds'] / results['read']['seconds']:.2f}x one read (target <= 3x), "
          f"{results['in_memory']['seconds'] / stream['seconds']:.2f}x faster than in-memory; peak RSS "
          f"{mb(stream['peak_rss']):.0f} MiB ({mb(above):.0f} MiB above python + torch) vs bound 2 x largest + 300 MiB = {mb(bound):.0f} MiB")
    results.update(layers=args.layers, bytes=size, largest_tensor_bytes=largest, rss_bound=bound)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
