"""Sparse LoRA in the training stack, measured side by side in one run, printed as ratios.

    python benchmarks/training_stack.py                  # full sizes, ~3 min on 2 cores
    python benchmarks/training_stack.py --quick          # small sizes, seconds
    python benchmarks/training_stack.py --json out.json  # also write the numbers

Cases (4 x Linear(side, side), r=16, AdamW, fp32 base weights as transformers.Trainer keeps them):

* train step under ``torch.autocast("cpu", bfloat16)`` (what ``Trainer(bf16=True)`` does):
  sparse_to_sparse against PEFT's LoRA and against sparse_to_dense under the same autocast;
* ``torch.compile`` against eager, for the sparse_to_sparse train step (fp32);
* inference without merging: a sparse_to_sparse model in eval mode under ``no_grad``
  (effective weights cached) against the merged model, on a small batch where rebuilding
  the effective weight on every call would dominate, and ``generate()`` of a Llama model.

The models of a comparison run in turn, round after round, so that drift in the speed of a
shared machine falls on all of them alike; times are medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn as nn

from sparselora.pruning.mask_generator import compute_unstructured_mask
from sparselora.pruning.sparse_lora import SparseLoRAConfig, apply_sparse_lora, merge_all_lora_weights


def in_turn(fns: dict, repeat: int) -> dict[str, float]:
    """Median seconds of each function, the functions run in turn ``repeat`` times (after one warm-up each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            time.sleep(0.005)  # torch's OpenMP workers spin a moment after an op: let them idle
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def mlp(side: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(side, side) for _ in range(4)))


def adapted(method: str, side: int) -> nn.Module:
    net = mlp(side)
    if method == "peft_lora":
        import peft

        return peft.get_peft_model(net, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                        target_modules=["0", "1", "2", "3"]))
    masks = compute_unstructured_mask(net, 0.5, progress=False)
    net = apply_sparse_lora(net, masks, SparseLoRAConfig(r=16, alpha=32, dropout=0.0, sparsity_mode=method))
    with torch.no_grad():  # trained-looking adapters
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return net


def train_step(net: nn.Module, x: torch.Tensor, autocast: bool):
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
            loss = net(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def bench_autocast(side: int, tokens: int, repeat: int) -> dict:
    x = torch.randn(tokens, side, generator=torch.Generator().manual_seed(1))
    steps = {m: train_step(adapted(m, side), x, autocast=True) for m in ("sparse_to_sparse", "sparse_to_dense", "peft_lora")}
    t = in_turn(steps, repeat)
    return {"seconds": t, "ratio_vs_peft": t["sparse_to_sparse"] / t["peft_lora"],
            "ratio_vs_sparse_to_dense": t["sparse_to_sparse"] / t["sparse_to_dense"]}


def bench_compile(side: int, tokens: int, repeat: int) -> dict:
    x = torch.randn(tokens, side, generator=torch.Generator().manual_seed(1))
    eager = adapted("sparse_to_sparse", side)
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    t = in_turn({"eager": train_step(eager, x, False), "compiled": train_step(compiled, x, False)}, repeat)
    return {"seconds": t, "ratio_compiled_vs_eager": t["compiled"] / t["eager"]}


def bench_inference(side: int, tokens: int, repeat: int) -> dict:
    x = torch.randn(tokens, side, generator=torch.Generator().manual_seed(2))
    unmerged = adapted("sparse_to_sparse", side).eval()
    merged = merge_all_lora_weights(copy.deepcopy(unmerged)).eval()
    rebuilt = copy.deepcopy(unmerged).eval()
    x_grad = x.clone().requires_grad_(True)  # needs gradients: the effective weight is rebuilt per call

    def run(net, inp, grad=False):
        def call():
            with torch.enable_grad() if grad else torch.no_grad():
                net(inp)
        return call

    t = in_turn({"merged": run(merged, x), "unmerged_cached": run(unmerged, x),
                 "unmerged_rebuilt_each_call": run(rebuilt, x_grad, grad=True)}, repeat)
    return {"seconds": t, "ratio_unmerged_vs_merged": t["unmerged_cached"] / t["merged"],
            "ratio_rebuilt_vs_merged": t["unmerged_rebuilt_each_call"] / t["merged"]}


def bench_generate(hidden: int, layers: int, new_tokens: int, repeat: int) -> dict:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4)
    base = transformers.LlamaForCausalLM(config).eval()
    masks = compute_unstructured_mask(base, 0.5, progress=False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    unmerged = apply_sparse_lora(base, masks, SparseLoRAConfig(r=16, alpha=32, dropout=0.0,
                                                                sparsity_mode="sparse_to_sparse",
                                                                target_modules=targets)).eval()
    with torch.no_grad():
        for name, p in unmerged.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    merged = merge_all_lora_weights(copy.deepcopy(unmerged)).eval()
    prompt = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    outs = {}

    def gen(name, net):
        def call():
            with torch.no_grad():
                outs[name] = net.generate(prompt, **kwargs)
        return call

    t = in_turn({"merged": gen("merged", merged), "unmerged": gen("unmerged", unmerged)}, repeat)
    return {"seconds": t, "ratio_unmerged_vs_merged": t["unmerged"] / t["merged"],
            "same_tokens": bool(torch.equal(outs["merged"], outs["unmerged"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    side, tokens, repeat = (256, 256, 3) if args.quick else (1024, 1024, 15)
    results: dict = {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__}}

    r = results["autocast_train_step"] = bench_autocast(side, tokens, repeat)
    print(f"train step under bf16 autocast, 4 x Linear({side}, {side}) fp32, {tokens} tokens, r=16, AdamW")
    for name, s in r["seconds"].items():
        print(f"  {name:<28}{s * 1e3:>9.1f} ms{s / r['seconds']['peft_lora']:>8.2f}x PEFT LoRA")

    r = results["compile"] = bench_compile(side, tokens, repeat)
    print("sparse_to_sparse train step, torch.compile(fullgraph=True) vs eager (fp32)")
    for name, s in r["seconds"].items():
        print(f"  {name:<28}{s * 1e3:>9.1f} ms{s / r['seconds']['eager']:>8.2f}x eager")

    small = 8
    r = results["inference"] = bench_inference(side, small, 5 * repeat)
    print(f"inference, eval + no_grad, {small} tokens (rebuilding the effective weight would dominate)")
    for name, s in r["seconds"].items():
        print(f"  {name:<28}{s * 1e3:>9.3f} ms{s / r['seconds']['merged']:>8.2f}x merged")

    hidden, layers, new = (128, 2, 8) if args.quick else (512, 4, 32)
    r = results["generate"] = bench_generate(hidden, layers, new, max(3, repeat // 3))
    print(f"Llama generate(), hidden {hidden}, {layers} layers, {new} new tokens, sparse_to_sparse 50% "
          f"(same tokens: {r['same_tokens']})")
    for name, s in r["seconds"].items():
        print(f"  {name:<28}{s * 1e3:>9.1f} ms{s / r['seconds']['merged']:>8.2f}x merged")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
