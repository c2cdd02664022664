"""Kernel benchmarks, measured side by side in one run, printed as a ratio table.

    python benchmarks/op_kernels.py                  # full sizes (~100M weights), ~2.5 min
    python benchmarks/op_kernels.py --quick          # small sizes, seconds
    python benchmarks/op_kernels.py --json out.json  # also write the numbers
    python benchmarks/op_kernels.py --only selection # only the 2:4 and row-scope table

Each group of cases runs in its own subprocess. Inside it, "extra memory" is the peak RSS
of a case's first run minus the RSS with the inputs already in memory; then the cases that
are compared by a ratio (the mask and one read of the weights; the merge and its
baselines; the train steps) run in turn, round after round, so that drift in the speed of a
shared machine falls on all of them alike, with 5 ms of idle before each (torch's OpenMP
workers spin for a moment after an op). Times are medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from memory import peak_rss_bytes, reset_peak_rss, rss_bytes  # benchmarks/memory.py

LAYERS, SIDE = 6, 4096  # 6 Linear(4096, 4096): 100.7M fp32 weights


def timed_in_turn(fns: dict, repeat: int) -> dict:
    """``timed`` for several functions in one process: each one's extra peak RSS from its
    first run, then ``repeat`` rounds that run them in turn, so that drift in the speed of
    a shared machine falls on all of them alike, each one starting from an idle machine
    as it would alone. {name: {"seconds", "extra_bytes"}}."""
    extra = {}
    for name, fn in fns.items():
        reset_peak_rss()
        before = rss_bytes()
        fn()
        extra[name] = peak_rss_bytes() - before
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            time.sleep(0.005)  # torch's OpenMP workers spin a moment after an op: let them idle
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"seconds": statistics.median(times[name]), "extra_bytes": extra[name]} for name in fns}


def model(layers: int, side: int, dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    torch.manual_seed(0)
    with torch.no_grad():
        return torch.nn.Sequential(*(torch.nn.Linear(side, side, bias=False, dtype=dtype) for _ in range(layers)))


# --- cases: each returns {"seconds": ..., "extra_bytes": ...} measured in this process ---


def mask_runner(method: str, net: torch.nn.Sequential):
    weights = [m.weight for m in net]
    if method == "sparselora":
        from sparselora.pruning.mask_generator import compute_unstructured_mask

        return lambda: compute_unstructured_mask(net, 0.5, global_pruning=True, progress=False)
    if method in SELECTION_CASES:
        return selection_runner(method, net)
    if method == "torch_sum":
        return lambda: sum(float(w.detach().sum()) for w in weights)
    if method == "kthvalue":

        def run():
            flat = torch.cat([w.detach().abs().reshape(-1) for w in weights])
            k = round(0.5 * flat.numel())
            threshold = torch.kthvalue(flat, k).values
            return [w.detach().abs() > threshold for w in weights]

        return run
    if method == "global_unstructured":
        import torch.nn.utils.prune as prune

        def run():
            params = [(m, "weight") for m in net]
            prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.5)
            masks = [m.weight_mask.bool() for m in net]
            for m in net:
                prune.remove(m, "weight")
            return masks

        return run
    raise ValueError(method)


# N:M 2:4 and row-scope 50% magnitude masks: ours, and the torch.sort path they replaced
SELECTION_CASES = ("nm_2_4", "nm_2_4_sort", "row_50", "row_50_sort")


def _sorted_prune(key: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning the first ``k`` of each row's stable ascending sort (the old path)."""
    keep = torch.ones(key.shape, dtype=torch.bool)
    keep.scatter_(1, torch.sort(key, dim=1, stable=True).indices[:, :k], False)
    return keep


def _sorted_rows(weight: torch.Tensor, k: int, chunk_elements: int = 1 << 22) -> torch.Tensor:
    key = weight.detach().abs().float()
    rows = max(1, chunk_elements // key.shape[1])  # as before: bounded int64 sort indices
    return torch.cat([_sorted_prune(key[i : i + rows], k) for i in range(0, key.shape[0], rows)])


def selection_runner(method: str, net: torch.nn.Sequential):
    from sparselora.pruning.mask_generator import compute_nm_mask

    weights = [m.weight for m in net]
    if method == "nm_2_4":
        return lambda: compute_nm_mask(net, 2, 4, progress=False)
    if method == "nm_2_4_sort":
        return lambda: [_sorted_prune(w.detach().abs().reshape(-1, 4).float(), 2).view(w.shape) for w in weights]
    if method == "row_50":
        from sparselora.pruning.mask_generator import compute_unstructured_mask

        return lambda: compute_unstructured_mask(net, 0.5, scope="row", progress=False)
    return lambda: [_sorted_rows(w, w.shape[1] // 2) for w in weights]


def case_mask(methods: str, dtype_name: str, layers: int, side: int, repeat: int) -> dict:
    """Comma-separated methods, timed in turn in this process."""
    net = model(layers, side, getattr(torch, dtype_name))
    weights = [m.weight for m in net]
    results = timed_in_turn({m: mask_runner(m, net) for m in methods.split(",")}, repeat)
    for r in results.values():
        r.update(weight_bytes=sum(w.numel() * w.element_size() for w in weights), numel=sum(w.numel() for w in weights))
    return results


def case_merge(dtype_name: str, side: int, repeat: int) -> dict:
    """Ours and both baselines, each on its own copy of W, timed in turn in this process."""
    from sparselora import ops

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(side, side, generator=gen).to(dtype)
    A = torch.randn(16, side, generator=gen).to(dtype)
    B = torch.randn(side, 16, generator=gen).to(dtype)
    M = torch.rand(side, side, generator=gen) > 0.5
    F = M.to(dtype)  # the baseline's mask kept as floats in W's dtype
    w_ours, w_bool, w_float = W.clone(), W.clone(), W.clone()
    return timed_in_turn({
        "sparselora": lambda: ops.merge_lora_(w_ours, A, B, 0.5, M),
        "baseline": lambda: w_bool.addmm_(B, A, alpha=0.5).mul_(M),
        "float_mask": lambda: w_float.addmm_(B, A, alpha=0.5).mul_(F),
    }, repeat)


def train_model(method: str, side: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(*(torch.nn.Linear(side, side) for _ in range(4)))
    if method == "peft_lora":
        import peft

        net = peft.get_peft_model(net, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["0", "1", "2", "3"]))
    else:
        from sparselora.pruning.mask_generator import compute_unstructured_mask
        from sparselora.pruning.sparse_lora import SparseLoRAConfig, apply_sparse_lora

        masks = compute_unstructured_mask(net, 0.5, progress=False)
        net = apply_sparse_lora(net, masks, SparseLoRAConfig(r=16, alpha=32, dropout=0.0, sparsity_mode=method))
    return net, torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)


def case_train_step(methods: str, side: int, tokens: int, repeat: int) -> dict:
    """Steps of several models timed in turn in one process, so that drift in the machine's
    speed falls on all of them alike; median per model."""
    x = torch.randn(tokens, side, generator=torch.Generator().manual_seed(1))
    models = {m: train_model(m, side) for m in methods.split(",")}

    def step(net, opt):
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {m: [] for m in models}
    for m, (net, opt) in models.items():  # warm-up
        step(net, opt)
    for _ in range(repeat):
        for m, (net, opt) in models.items():
            start = time.perf_counter()
            step(net, opt)
            times[m].append(time.perf_counter() - start)
    return {m: {"seconds": statistics.median(t)} for m, t in times.items()}


def child(argv: list[str]) -> None:
    kind, *args = argv
    fn = {"mask": case_mask, "merge": case_merge, "train": case_train_step}[kind]
    converted = [int(a) if a.isdigit() else a for a in args]
    print(json.dumps(fn(*converted)))


def measure(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def selection_table(layers: int, side: int, repeat: int) -> dict:
    """2:4 and row-scope 50% magnitude masks: time, the torch.sort path, % of one read."""
    ours = measure("mask", "nm_2_4,row_50,torch_sum", "float32", layers, side, 3 * repeat)
    old = measure("mask", "nm_2_4_sort,row_50_sort", "float32", layers, side, 3)
    read = ours["torch_sum"]["seconds"]
    print(f"\n2:4 and row-scope 50% magnitude masks, {layers} x Linear({side}, {side}) float32; "
          f"one read of the weights {read * 1e3:.1f} ms")
    print(f"{'mask':<12}{'sparselora':>12}{'% of read':>11}{'torch.sort':>12}{'speed-up':>10}{'extra peak RSS':>17}")
    table = {}
    for name in ("nm_2_4", "row_50"):
        r, s = ours[name], old[f"{name}_sort"]
        table[name] = {"sparselora": r, "torch_sort": s, "read_seconds": read,
                       "bandwidth_fraction_of_read": read / r["seconds"], "speedup_vs_sort": s["seconds"] / r["seconds"]}
        print(f"{name:<12}{r['seconds'] * 1e3:>10.1f}ms{read / r['seconds']:>10.0%}{s['seconds'] * 1e3:>10.1f}ms"
              f"{s['seconds'] / r['seconds']:>9.1f}x{r['extra_bytes'] / 1e9:>14.2f} GB")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--skip-global-unstructured", action="store_true", help="skip the slow torch.prune baseline")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--only", choices=["selection"], help="run one table only")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    from sparselora.ops import cpp

    layers, side = (2, 1024) if args.quick else (LAYERS, SIDE)
    merge_side = 1024 if args.quick else 4096
    repeat = 7
    results: dict = {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpp_backend": cpp.available()}}
    gb = lambda b: b / 1e9  # noqa: E731

    if args.only == "selection":
        results["selection_masks"] = selection_table(layers, side, repeat)
        if args.json:
            with open(args.json, "w") as out:
                json.dump(results, out, indent=2)
        return

    results["global_mask"] = {}
    for dtype in ("float32", "bfloat16"):
        mask = measure("mask", "sparselora,torch_sum", dtype, layers, side, 3 * repeat)
        mask["kthvalue"] = measure("mask", "kthvalue", dtype, layers, side, repeat)["kthvalue"]
        if not args.skip_global_unstructured:
            mask["global_unstructured"] = measure("mask", "global_unstructured", dtype, layers, side, 1)["global_unstructured"]
        ours = mask["sparselora"]
        weight_bytes, mask_bytes = ours["weight_bytes"], ours["numel"]
        print(f"\nglobal 50% magnitude mask, {layers} x Linear({side}, {side}) {dtype} = {ours['numel'] / 1e6:.1f}M weights")
        print(f"{'method':<24}{'time':>10}{'extra peak RSS':>18}{'sparselora speed-up':>22}")
        for name, r in mask.items():
            print(f"{name:<24}{r['seconds'] * 1e3:>8.1f}ms{gb(r['extra_bytes']):>15.2f} GB{r['seconds'] / ours['seconds']:>21.1f}x")
        bandwidth = weight_bytes / ours["seconds"] / 1e9
        read_bandwidth = weight_bytes / mask["torch_sum"]["seconds"] / 1e9
        print(f"sparselora reads the weights at {bandwidth:.1f} GB/s = {bandwidth / read_bandwidth:.0%} of one read "
              f"({read_bandwidth:.1f} GB/s); extra memory {ours['extra_bytes'] / mask_bytes:.2f}x the bool mask ({gb(mask_bytes):.2f} GB)")
        summary = {
            "bandwidth_fraction_of_read": bandwidth / read_bandwidth,
            "extra_memory_over_mask": ours["extra_bytes"] / mask_bytes,
            "speedup_vs_kthvalue": mask["kthvalue"]["seconds"] / ours["seconds"],
        }
        if "global_unstructured" in mask:
            summary["speedup_vs_global_unstructured"] = mask["global_unstructured"]["seconds"] / ours["seconds"]
        results["global_mask"][dtype] = {"cases": mask, "summary": summary}

    results["selection_masks"] = selection_table(layers, side, repeat)

    print(f"\nmerge-with-mask {merge_side}x{merge_side}, r=16 (baseline: W.addmm_(B, A, alpha=s).mul_(M))")
    print(f"{'dtype':<10}{'sparselora':>12}{'bool mask':>12}{'speed-up':>10}{'float mask':>12}{'speed-up':>10}"
          f"{'extra RSS ours / bool baseline':>34}")
    results["merge"] = {}
    for dtype in ("float32", "bfloat16"):
        merged = measure("merge", dtype, merge_side, 3 * repeat)
        o, b, f = merged["sparselora"], merged["baseline"], merged["float_mask"]
        results["merge"][dtype] = {"sparselora": o, "baseline_bool_mask": b, "baseline_float_mask": f,
                                   "speedup": b["seconds"] / o["seconds"], "speedup_float_mask": f["seconds"] / o["seconds"]}
        print(f"{dtype:<10}{o['seconds'] * 1e3:>10.1f}ms{b['seconds'] * 1e3:>10.1f}ms{b['seconds'] / o['seconds']:>9.1f}x"
              f"{f['seconds'] * 1e3:>10.1f}ms{f['seconds'] / o['seconds']:>9.1f}x"
              f"{gb(o['extra_bytes']) * 1e3:>20.0f} MB / {gb(b['extra_bytes']) * 1e3:.0f} MB")

    tside, tokens = (256, 256) if args.quick else (1024, 1024)
    steps = measure("train", "sparse_to_sparse,sparse_to_dense,peft_lora", tside, tokens, 3 * repeat)
    ratio = steps["sparse_to_sparse"]["seconds"] / steps["sparse_to_dense"]["seconds"]
    results["train_step"] = {**steps, "ratio_vs_sparse_to_dense": ratio,
                             "ratio_vs_peft": steps["sparse_to_sparse"]["seconds"] / steps["peft_lora"]["seconds"]}
    print(f"\ntrain step, 4 x Linear({tside}, {tside}), {tokens} tokens, r=16, AdamW:")
    for name, r in steps.items():
        print(f"  {name:<18}{r['seconds'] * 1e3:>8.1f}ms{r['seconds'] / steps['sparse_to_dense']['seconds']:>8.2f}x")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
