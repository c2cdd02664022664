"""The public paths, each timed against its baseline in one run: what users call, not the ops.

    python benchmarks/api.py                        # full sizes, ~4 min on 2 cores
    python benchmarks/api.py --quick                # smaller sizes, ~1 min (what CI runs)
    python benchmarks/api.py --json out.json        # also write every number
    python benchmarks/api.py --quick --check-floors # exit 1 when a ratio is below its floor

Every ratio with a target has a floor at a third of it (a "≤ x" target floors at 3x): coarse
enough not to flake on a shared 2-core machine, fine enough to catch a public function that
pays for work its kernel does not need (a weight-sized temporary, a second pass). Each group
runs in its own process, so that "extra memory" is that group's own peak RSS above its inputs;
inside a group the compared cases run in turn, round after round, and times are medians.

Groups: masks (global, per layer, per row, 2:4, against ``torch.nn.utils.prune`` and the
``torch.sort`` path, and one read of the weights), merge (``merge_all_lora_weights`` in both
modes and dtypes against ``W.addmm_(B, A, alpha=s).mul_(M)``), train (a sparse LoRA step in
fp32 and under bf16 autocast against PEFT's LoRA), inference (unmerged against merged),
prune (``prune_model`` per method against the calibration forward passes it needs), checkpoint
(``sparselora masks`` and ``apply`` on a sharded checkpoint against one read of its files).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from memory import peak_rss_bytes, reset_peak_rss, rss_bytes  # benchmarks/memory.py


def _sibling(name: str):
    """``benchmarks/<name>.py`` loaded by its path under a name of its own: the scripts are no
    package, and a plain name could already belong to an installed module."""
    spec = importlib.util.spec_from_file_location(f"sparselora_benchmarks_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


generate = _sibling("checkpoint").generate
_ops = _sibling("op_kernels")
mask_runner, model, selection_runner, timed_in_turn = _ops.mask_runner, _ops.model, _ops.selection_runner, _ops.timed_in_turn
_stack = _sibling("training_stack")
adapted, bench_inference, in_turn, train_step = _stack.adapted, _stack.bench_inference, _stack.in_turn, _stack.train_step

# (group, key): (target, "min" or "max", what) -- the floor is target / 3 for "min", 3 x target for "max"
TARGETS = {
    ("masks", "global_fraction_of_read"): (0.5, "min", "global 50% mask, share of one read's bandwidth"),
    ("masks", "global_speedup_vs_torch_prune"): (100.0, "min", "global mask vs prune.global_unstructured"),
    ("masks", "global_extra_memory_over_mask"): (1.0, "max", "global mask's extra peak memory / the bool mask"),
    ("masks", "layer_fraction_of_read"): (0.4, "min", "per-layer mask, share of one read's bandwidth"),
    ("masks", "row_fraction_of_read"): (0.4, "min", "per-row mask, share of one read's bandwidth"),
    ("masks", "nm_fraction_of_read"): (0.4, "min", "2:4 mask, share of one read's bandwidth"),
    # the sort-path speed-ups are reported, not floored: 100x the 2:4 sort path (~1.1 s on the
    # 6 x 4096^2 weights here) would be faster than one read of the weights (~15 ms)
    ("merge", "float32_sparse_to_dense_speedup"): (4.0, "min", "merge_all_lora_weights fp32 sparse_to_dense"),
    ("merge", "float32_sparse_to_sparse_speedup"): (4.0, "min", "merge_all_lora_weights fp32 sparse_to_sparse"),
    ("merge", "bfloat16_sparse_to_dense_speedup"): (3.0, "min", "merge_all_lora_weights bf16 sparse_to_dense"),
    ("merge", "bfloat16_sparse_to_sparse_speedup"): (3.0, "min", "merge_all_lora_weights bf16 sparse_to_sparse"),
    ("train", "fp32_sparse_to_sparse_vs_peft"): (1.6, "max", "sparse_to_sparse train step / PEFT LoRA, fp32"),
    ("train", "bf16_sparse_to_sparse_vs_peft"): (1.5, "max", "sparse_to_sparse train step / PEFT LoRA, bf16 autocast"),
    ("inference", "unmerged_vs_merged"): (1.1, "max", "unmerged sparse_to_sparse inference / merged"),
}

SIZES = {  # full, quick
    "masks": {"full": (6, 4096), "quick": (6, 4096)},  # the sort baselines gain on small sizes
    "merge": {"full": 4096, "quick": 4096},
    "train": {"full": (1024, 1024), "quick": (512, 512)},
    "prune": {"full": (512, 6, 32, 256), "quick": (128, 2, 8, 64)},  # hidden, layers, windows, tokens
    "checkpoint": {"full": 8, "quick": 2},  # Linear(4096, 4096) bf16 layers
}


# ----- masks ---------------------------------------------------------------------------------

def _layer_baseline(net: nn.Sequential):
    import torch.nn.utils.prune as prune

    def run():
        masks = []
        for m in net:
            prune.l1_unstructured(m, "weight", amount=0.5)
            masks.append(m.weight_mask.bool())
            prune.remove(m, "weight")
        return masks

    return run


def group_masks(size: str) -> dict:
    from sparselora.pruning.mask_generator import compute_unstructured_mask

    layers, side = SIZES["masks"][size]
    net = model(layers, side)
    weight_bytes = sum(m.weight.numel() * 4 for m in net)
    mask_bytes = weight_bytes // 4
    ours = timed_in_turn({
        "global": lambda: compute_unstructured_mask(net, 0.5, global_pruning=True, progress=False),
        "layer": lambda: compute_unstructured_mask(net, 0.5, progress=False),
        "row": selection_runner("row_50", net),
        "nm": selection_runner("nm_2_4", net),
        "read": mask_runner("torch_sum", net),
    }, repeat=9)
    base = timed_in_turn({
        "torch_prune_global": mask_runner("global_unstructured", net),
        "torch_prune_layer": _layer_baseline(net),
        "row_sort": selection_runner("row_50_sort", net),
        "nm_sort": selection_runner("nm_2_4_sort", net),
    }, repeat=1)
    read = ours["read"]["seconds"]
    ratios = {f"{k}_fraction_of_read": read / ours[k]["seconds"] for k in ("global", "layer", "row", "nm")}
    ratios.update({
        "global_speedup_vs_torch_prune": base["torch_prune_global"]["seconds"] / ours["global"]["seconds"],
        "layer_speedup_vs_torch_prune": base["torch_prune_layer"]["seconds"] / ours["layer"]["seconds"],
        "row_speedup_vs_sort": base["row_sort"]["seconds"] / ours["row"]["seconds"],
        "nm_speedup_vs_sort": base["nm_sort"]["seconds"] / ours["nm"]["seconds"],
        **{f"{k}_extra_memory_over_mask": ours[k]["extra_bytes"] / mask_bytes for k in ("global", "layer", "row", "nm")},
    })
    return {"shape": f"{layers} x Linear({side}, {side}) fp32", "weight_bytes": weight_bytes,
            "cases": {**ours, **base}, "ratios": ratios}


# ----- merge ---------------------------------------------------------------------------------

def _adapted_linear(side: int, dtype: torch.dtype, mode: str, mask: torch.Tensor, weight: torch.Tensor) -> nn.Module:
    from sparselora.lora import SparseLoRAConfig, apply_sparse_lora

    linear = nn.Linear(side, side, bias=False, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    net = apply_sparse_lora(nn.Sequential(linear), {"0.weight": mask},
                            SparseLoRAConfig(r=16, alpha=32, dropout=0.0, sparsity_mode=mode))
    with torch.no_grad():  # a trained update: the masked merge of sparse_to_dense drops part of it
        net[0].lora_B.normal_(generator=torch.Generator().manual_seed(2))
    return net


def _timed_with_setup(cases: dict, repeat: int) -> dict:
    """{name: (setup, run)}: ``run(setup())`` timed, the setup not; in turn, round after round."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat + 1):  # the first round warms up
        for name, (setup, run) in cases.items():
            state = setup()
            time.sleep(0.005)
            start = time.perf_counter()
            run(state)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def group_merge(size: str) -> dict:
    from sparselora.lora import merge_all_lora_weights

    side = SIZES["merge"][size]
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(side, side, generator=gen) > 0.5
    out: dict = {"shape": f"{side} x {side}, r=16", "seconds": {}, "ratios": {}, "warned": {}}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        weight = (torch.randn(side, side, generator=gen) * mask).to(dtype)
        warned: dict[str, bool] = {}

        def merge(mode):
            def run(net):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    merge_all_lora_weights(net, preserve_sparsity=True)
                warned[mode] = any("dropped" in str(w.message) for w in caught)
            return (lambda: _adapted_linear(side, dtype, mode, mask, weight)), run

        def by_hand():
            # the same model in the same state, merged the naive way: what the users' memory sees alike
            layer = _adapted_linear(side, dtype, "sparse_to_dense", mask, weight)[0]
            return layer.weight.data, layer.lora_B.detach().to(dtype), layer.lora_A.detach().to(dtype), layer.scaling

        t = _timed_with_setup({
            "sparse_to_dense": merge("sparse_to_dense"),
            "sparse_to_sparse": merge("sparse_to_sparse"),
            "addmm_mul": (by_hand, lambda s: s[0].addmm_(s[1], s[2], alpha=s[3]).mul_(mask)),
        }, repeat=7)
        out["seconds"][name] = t
        out["warned"][name] = dict(warned)
        for mode in ("sparse_to_dense", "sparse_to_sparse"):
            out["ratios"][f"{name}_{mode}_speedup"] = t["addmm_mul"] / t[mode]
    return out


# ----- train and inference -------------------------------------------------------------------

def group_train(size: str) -> dict:
    side, tokens = SIZES["train"][size]
    x = torch.randn(tokens, side, generator=torch.Generator().manual_seed(1))
    out: dict = {"shape": f"4 x Linear({side}, {side}), {tokens} tokens, r=16, AdamW", "seconds": {}, "ratios": {}}
    for precision, autocast in (("fp32", False), ("bf16", True)):
        steps = {m: train_step(adapted(m, side), x, autocast) for m in ("sparse_to_sparse", "sparse_to_dense", "peft_lora")}
        t = out["seconds"][precision] = in_turn(steps, repeat=9)
        out["ratios"][f"{precision}_sparse_to_sparse_vs_peft"] = t["sparse_to_sparse"] / t["peft_lora"]
        out["ratios"][f"{precision}_sparse_to_dense_vs_peft"] = t["sparse_to_dense"] / t["peft_lora"]
    return out


def group_inference(size: str) -> dict:
    side, _ = SIZES["train"][size]
    r = bench_inference(side, 16, repeat=15)
    return {"shape": f"4 x Linear({side}, {side}), 16 tokens, eval, no_grad", "seconds": r["seconds"],
            "ratios": {"unmerged_vs_merged": r["ratio_unmerged_vs_merged"]}}


# ----- prune_model ---------------------------------------------------------------------------

def group_prune(size: str) -> dict:
    import transformers

    from sparselora.pruning.oneshot import prune_model

    hidden, layers, windows, length = SIZES["prune"][size]
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(config).eval()
    batches = [torch.randint(0, 1024, (1, length), generator=torch.Generator().manual_seed(i)) for i in range(windows)]

    def forward():
        with torch.no_grad():
            for ids in batches:
                dense(input_ids=ids)

    def prune(method):
        def run(net):
            prune_model(net, batches, method, 0.5, progress=False)
        return (lambda: copy.deepcopy(dense)), run

    t = _timed_with_setup({"calibration_forward": ((lambda: None), lambda _: forward()),
                           **{m: prune(m) for m in ("magnitude", "wanda", "sparsegpt")}}, repeat=3)
    return {"shape": f"Llama hidden {hidden}, {layers} layers, {windows} x {length} calibration tokens",
            "seconds": t, "ratios": {f"{m}_vs_calibration_forward": t[m] / t["calibration_forward"]
                                     for m in ("magnitude", "wanda", "sparsegpt")}}


# ----- checkpoint commands -------------------------------------------------------------------

def _read_files(folder: Path) -> None:
    buffer = bytearray(64 * 2**20)
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def _command(argv: list[str]) -> None:
    from sparselora.cli.main import main

    code = main(argv)
    if code != 0:
        raise RuntimeError(f"sparselora {' '.join(argv)} exited with {code}")


def group_checkpoint(size: str) -> dict:
    layers = SIZES["checkpoint"][size]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        generate(folder, layers)
        masks, applied = Path(tmp) / "masks.safetensors", Path(tmp) / "applied"
        largest = 4096 * 4096 * 2
        cases = {
            "read": ((lambda: None), lambda _: _read_files(folder)),
            "masks": ((lambda: None), lambda _: _command(["masks", str(folder), "--sparsity", "0.5", "-o", str(masks),
                                                          "--overwrite", "--no-progress"])),
            "apply": ((lambda: None), lambda _: _command(["apply", str(folder), str(masks), "-o", str(applied),
                                                          "--overwrite", "--no-progress"])),
        }
        extra = {}
        for name, (_, run) in cases.items():  # each case's extra peak memory, from a first run
            reset_peak_rss()
            before = rss_bytes()
            run(None)
            extra[name] = peak_rss_bytes() - before
        t = _timed_with_setup(cases, repeat=3)
    return {"shape": f"{layers} x Linear(4096, 4096) bf16 in shards", "seconds": t, "extra_bytes": extra,
            "ratios": {"masks_vs_read": t["masks"] / t["read"], "apply_vs_read": t["apply"] / t["read"],
                       "masks_extra_memory_over_largest_tensor": extra["masks"] / largest}}


GROUPS = {"masks": group_masks, "merge": group_merge, "train": group_train, "inference": group_inference,
          "prune": group_prune, "checkpoint": group_checkpoint}


# ----- floors, printing, processes -----------------------------------------------------------

def floor_of(target: float, direction: str) -> float:
    return target / 3 if direction == "min" else target * 3


def check_floors(results: dict) -> list[str]:
    """One line per ratio below its floor (or above, for "≤" targets)."""
    failures = []
    for (group, key), (target, direction, what) in TARGETS.items():
        if group not in results:
            continue
        value, floor = results[group]["ratios"][key], floor_of(target, direction)
        if (value < floor) if direction == "min" else (value > floor):
            sign = "≥" if direction == "min" else "≤"
            failures.append(f"{what}: {value:.3g}, floor {sign} {floor:.3g} (target {sign} {target:g})")
    return failures


def print_group(name: str, result: dict) -> None:
    print(f"\n{name}: {result['shape']}")
    for key, value in result["ratios"].items():
        spec = TARGETS.get((name, key))
        note = ""
        if spec:
            target, direction, _ = spec
            sign = "≥" if direction == "min" else "≤"
            note = f"   target {sign} {target:g}, floor {sign} {floor_of(target, direction):.3g}"
        print(f"  {key:<44}{value:>10.3g}{note}")


def run_group(name: str, size: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", name, size], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"group {name} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (CI)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--only", action="append", choices=sorted(GROUPS), help="run this group (repeatable)")
    parser.add_argument("--check-floors", action="store_true", help="exit 1 when a ratio is beyond its floor")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, size = args.child
        print(json.dumps(GROUPS[name](size)))
        return
    size = "quick" if args.quick else "full"
    results: dict = {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__, "size": size}}
    for name in args.only or GROUPS:
        start = time.perf_counter()
        results[name] = run_group(name, size)
        print_group(name, results[name])
        print(f"  ({time.perf_counter() - start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    failures = check_floors(results)
    if failures:
        print("\nbelow the floor (a third of the target):\n  " + "\n  ".join(failures))
    if args.check_floors and failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
