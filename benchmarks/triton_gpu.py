"""GPU benchmark of the Triton kernels against torch baselines, at LLM shapes.

    python benchmarks/triton_gpu.py [--json out.json]

Prints "no GPU" and exits 0 when CUDA is unavailable. Times with triton.testing.do_bench:
- threshold: exact global 50% magnitude mask over 8 x (4096 x 11008) bf16 weights, as GB/s
  of weights read, vs topk / kthvalue on the concatenated |W| and vs one read (sum);
- merge-with-mask 4096 x 11008, r=16, bf16, vs W.addmm_(B, A, alpha=s).mul_(M);
- masked LoRA linear (sparse_to_sparse) forward, 4096 tokens, as TFLOP/s, vs a dense matmul
  of the same shape and vs materialise-then-matmul;
- one forward+backward of that layer vs a dense PEFT-style LoRA layer (x W^T + s (x A^T) B^T).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: CUDA is not available, nothing to measure")
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    import triton.testing

    from sparselora import ops

    dev, bf16 = "cuda", torch.bfloat16
    out_f, in_f, r, tokens, layers = 4096, 11008, 16, 4096, 8
    gen = torch.Generator(device=dev).manual_seed(0)
    results: dict[str, dict[str, float]] = {"device": {"name": torch.cuda.get_device_name()}}

    weights = [torch.randn(out_f, in_f, device=dev, generator=gen, dtype=bf16) for _ in range(layers)]
    n = sum(w.numel() for w in weights)
    gb = n * 2 / 1e9
    k = n // 2

    def kthvalue_mask():
        flat = torch.cat([w.abs().reshape(-1) for w in weights]).float()
        t = torch.kthvalue(flat.cpu(), k).values.item() if flat.numel() > 2**31 else torch.kthvalue(flat, k).values
        return [w.abs() > t for w in weights]

    def topk_mask():
        flat = torch.cat([w.abs().reshape(-1) for w in weights])
        idx = torch.topk(flat, k, largest=False).indices
        keep = torch.ones(n, dtype=torch.bool, device=dev)
        keep[idx] = False
        return keep

    t_ours = triton.testing.do_bench(lambda: ops.select_prune_mask(weights, k, absolute=True))
    assert ops.last_backend("select_prune_mask") == "triton"
    t_sum = triton.testing.do_bench(lambda: [w.sum() for w in weights])
    t_kth = triton.testing.do_bench(kthvalue_mask)
    t_topk = triton.testing.do_bench(topk_mask)
    results["threshold"] = {"sparselora_ms": t_ours, "sum_ms": t_sum, "kthvalue_ms": t_kth, "topk_ms": t_topk,
                            "sparselora_GBps": gb / (t_ours / 1e3), "read_GBps": gb / (t_sum / 1e3)}

    W = weights[0].clone()
    A = torch.randn(r, in_f, device=dev, dtype=bf16, generator=gen)
    B = torch.randn(out_f, r, device=dev, dtype=bf16, generator=gen)
    M = torch.rand(out_f, in_f, device=dev, generator=gen) > 0.5
    t_merge = triton.testing.do_bench(lambda: ops.merge_lora_(W, A, B, 0.5, M))
    t_base = triton.testing.do_bench(lambda: W.addmm_(B, A, alpha=0.5).mul_(M))
    results["merge"] = {"sparselora_ms": t_merge, "baseline_ms": t_base, "sparselora_GBps": W.numel() * 5 / 1e9 / (t_merge / 1e3)}

    x = torch.randn(tokens, in_f, device=dev, dtype=bf16, generator=gen)
    flops = 2 * tokens * in_f * out_f
    t_fwd = triton.testing.do_bench(lambda: ops.masked_lora_linear(x, W, A, B, 0.5, M))
    t_dense = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, W))
    t_mat = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, ((W.float() + 0.5 * B.float() @ A.float()) * M).to(bf16)))
    results["masked_lora_forward"] = {"sparselora_ms": t_fwd, "dense_matmul_ms": t_dense, "materialise_then_matmul_ms": t_mat,
                                      "sparselora_TFLOPs": flops / (t_fwd / 1e3) / 1e12}

    a, b = A.clone().requires_grad_(), B.clone().requires_grad_()
    xg = x.clone().requires_grad_()
    dy = torch.randn(tokens, out_f, device=dev, dtype=bf16, generator=gen)
    step_ours = lambda: ops.masked_lora_linear(xg, W, a, b, 0.5, M).backward(dy)  # noqa: E731
    step_dense = lambda: (torch.nn.functional.linear(xg, W) + 0.5 * (xg @ a.t()) @ b.t()).backward(dy)  # noqa: E731
    t_step, t_step_dense = triton.testing.do_bench(step_ours), triton.testing.do_bench(step_dense)
    results["train_step"] = {"sparse_to_sparse_ms": t_step, "dense_lora_ms": t_step_dense, "ratio": t_step / t_step_dense}

    th = results["threshold"]
    print(f"device: {results['device']['name']}")
    print(f"threshold, {n / 1e9:.2f}B bf16 weights: {th['sparselora_ms']:.1f} ms = {th['sparselora_GBps']:.0f} GB/s "
          f"({th['sparselora_GBps'] / th['read_GBps']:.0%} of a read at {th['read_GBps']:.0f} GB/s); "
          f"kthvalue {th['kthvalue_ms']:.1f} ms, topk {th['topk_ms']:.1f} ms")
    print(f"merge {out_f}x{in_f} r={r} bf16: {t_merge:.2f} ms vs addmm_+mul_ {t_base:.2f} ms ({t_base / t_merge:.1f}x)")
    print(f"masked LoRA forward, {tokens} tokens: {t_fwd:.2f} ms ({results['masked_lora_forward']['sparselora_TFLOPs']:.0f} TFLOP/s) "
          f"= {t_fwd / t_dense:.2f}x a dense matmul; materialise-then-matmul {t_mat:.2f} ms")
    print(f"forward+backward: {t_step:.2f} ms vs dense LoRA {t_step_dense:.2f} ms = {t_step / t_step_dense:.2f}x")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
