"""The Triton backend on one GPU: correctness first, then speed as ratios to torch baselines.

    python benchmarks/triton_gpu.py --json gpu.json        # one H100/H200: under 5 minutes
    python benchmarks/triton_gpu.py --interpret --checks-only   # no GPU: the checks, on CPU

Checks (each against the reference backend, or against an exact property): every op on odd
shapes in fp32/fp16/bf16; the masked LoRA at rank 200; a tensor of more than 2^31 elements
(mask applied to its last elements, exact count of a threshold over it); gradients equal
bit for bit from run to run under ``torch.use_deterministic_algorithms``; NaN kept by
merges and by bf16 rounding; tensors on a second GPU while the first is current (when
there are two). A failed check stops the run with exit code 1 before anything is timed.

Ratios (``triton.testing.do_bench`` medians):
- exact global 50% threshold over 8 x (4096 x 11008) weights, fp32 and bf16: against one
  read of the weights (``sum``) and against ``torch.topk`` / ``torch.sort`` of the
  concatenated scores;
- 2:4 and per-row 50% masks of one such weight against the ``torch.sort`` formulations;
- merge-with-mask, r=16, bf16, against ``W.addmm_(B, A, alpha=s).mul_(M)``;
- masked LoRA forward, 4096 tokens, against a dense matmul of the same shape (and against
  that matmul plus one pass over W);
- forward + backward of the masked LoRA layer against a dense LoRA layer
  (``x Wᵀ + s (x Aᵀ) Bᵀ``, adapters trained, W frozen).
Without a GPU (and without ``--interpret``) it prints "no GPU" and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CheckFailed(AssertionError):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)
    print(f"  ok  {what}", flush=True)


@contextlib.contextmanager
def _forced(backend: str):
    """SPARSELORA_BACKEND=backend inside the block."""
    old = os.environ.get("SPARSELORA_BACKEND")
    os.environ["SPARSELORA_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SPARSELORA_BACKEND", None)
        else:
            os.environ["SPARSELORA_BACKEND"] = old


def _lora_run(ops, backend, dev, x0, w, a0, b0, mask, dy):
    with _forced(backend):
        x, a, b = (t.to(dev).clone().requires_grad_() for t in (x0, a0, b0))
        y = ops.masked_lora_linear(x, None if w is None else w.to(dev), a, b, 0.5, mask.to(dev))
        y.backward(dy.to(dev))
        return [t.detach().double().cpu() for t in (y, x.grad, a.grad, b.grad)]


def correctness(dev: str, big: bool) -> None:
    """Raise CheckFailed at the first wrong result."""
    from sparselora import ops
    from sparselora.ops import reference

    gen = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        name = str(dtype).replace("torch.", "")
        scores = [torch.randn(333, 71, generator=gen).to(dtype), (torch.randint(-5, 6, (4097,), generator=gen) * 0.25).to(dtype)]
        k = sum(s.numel() for s in scores) // 2
        with _forced("triton"):
            got = ops.select_prune_mask([s.to(dev) for s in scores], k, absolute=True)
        want = reference.select_prune_mask(scores, k, True)
        check(all(torch.equal(g.cpu(), w) for g, w in zip(got, want)), f"global threshold {name}, ties, odd sizes")
        x = (torch.randint(-3, 4, (67, 96), generator=gen) * 0.5).to(dtype)
        with _forced("triton"):
            nm, rows = ops.nm_prune_mask(x.to(dev), 2, 4, absolute=True), ops.row_prune_mask(x.to(dev), 41, absolute=True)
        check(torch.equal(nm.cpu(), reference.nm_prune_mask(x, 2, 4, True)), f"2:4 {name}")
        check(torch.equal(rows.cpu(), reference.row_prune_mask(x, 41, True, None)), f"rows {name}")
        W = torch.randn(131, 77, generator=gen).to(dtype)
        A, B = torch.randn(200, 77, generator=gen).to(dtype) / 14, torch.randn(131, 200, generator=gen).to(dtype) / 14
        M = torch.rand(131, 77, generator=gen) > 0.5
        exact = ((W.double() + 0.5 * B.double() @ A.double()) * M)
        with _forced("triton"):
            merged = ops.merge_lora_(W.to(dev).clone(), A.to(dev), B.to(dev), 0.5, M.to(dev)).cpu()
        with _forced("reference"):
            ref = ops.merge_lora_(W.clone(), A, B, 0.5, M)
        err, ref_err = (merged.double() - exact).abs().max(), (ref.double() - exact).abs().max()
        check(bool(err <= 2 * ref_err + torch.finfo(dtype).eps * exact.abs().max()), f"merge {name}, rank 200")
        x0, dy = torch.randn(3, 41, 77, generator=gen).to(dtype), torch.randn(3, 41, 131, generator=gen).to(dtype)
        got = _lora_run(ops, "triton", dev, x0, W, A, B, M, dy)
        ref = _lora_run(ops, "reference", "cpu", x0, W, A, B, M, dy)
        exact = _lora_run(ops, "reference", "cpu", x0.double(), W.double(), A.double(), B.double(), M, dy.double())
        for what, g, r, e in zip(("y", "dX", "dA", "dB"), got, ref, exact):
            ok = (g - e).abs().max() <= 2 * (r - e).abs().max() + 1e-6 * e.abs().max()
            check(bool(ok), f"masked LoRA {what} {name}, rank 200, within 2x the reference's error")

    with _forced("triton"):
        W = torch.randn(64, 64, device=dev)
        W[3, 5] = float("nan")
        keep = torch.ones(64, 64, dtype=torch.bool, device=dev)
        merged = ops.merge_lora_(W.clone(), torch.zeros(4, 64, device=dev), torch.zeros(64, 4, device=dev), 1.0, keep)
        check(bool(torch.isnan(merged[3, 5])), "merge keeps a NaN in a kept weight")
        from sparselora.ops.triton.masked_lora import effective_weight

        W.view(torch.int32)[7, 9] = 0x7FFFFFFF  # the GPU's canonical NaN
        rounded = effective_weight(W, torch.zeros(4, 64, device=dev), torch.zeros(64, 4, device=dev), 1.0, keep,
                                   False, torch.bfloat16)
        check(bool(torch.isnan(rounded[3, 5])) and bool(torch.isnan(rounded[7, 9])), "fp32 -> bf16 rounding keeps NaN")
        finite = ~torch.isnan(W)
        check(torch.equal(rounded[finite], W[finite].to(torch.bfloat16)), "fp32 -> bf16 rounding equals torch's")

        torch.use_deterministic_algorithms(True)
        try:
            x0, a0, b0 = torch.randn(512, 256, device=dev), torch.randn(8, 256, device=dev), torch.randn(384, 8, device=dev)
            w, m = torch.randn(384, 256, device=dev), torch.rand(384, 256, device=dev) > 0.5
            dy = torch.randn(512, 384, device=dev)
            runs = [_lora_run(ops, "triton", dev, x0, w, a0, b0, m, dy) for _ in range(3)]
            check(all(torch.equal(u, v) for r in runs[1:] for u, v in zip(runs[0], r)), "gradients equal bit for bit over 3 runs")
        finally:
            torch.use_deterministic_algorithms(False)

        if big:
            n = 2**31 + 4099
            w = torch.ones(n, device=dev, dtype=torch.bfloat16)
            keep = torch.ones(n, dtype=torch.bool, device=dev)
            keep[-3:] = False
            ops.apply_mask_(w, keep)
            check(bool((w[-3:] == 0).all()) and bool(w[-4] == 1), "mask applied past element 2^31")
            del keep
            w.copy_(torch.rand(n, device=dev, dtype=torch.float32).to(torch.bfloat16))
            k = n // 3
            (mask,) = ops.select_prune_mask([w], k, absolute=True)
            pruned = int((~mask).sum())
            check(pruned == k, f"threshold over {n} elements prunes exactly k ({pruned} of {k})")
            check(bool(w[~mask].max() <= w[mask].min()), "every pruned score <= every kept score")
            del w, mask
            torch.cuda.empty_cache()

    if dev == "cuda" and torch.cuda.device_count() > 1:
        x = torch.randn(77, 300)
        with _forced("triton"):
            on_second = ops.row_prune_mask(x.to("cuda:1"), 100)
            merged = ops.merge_lora_(torch.ones(40, 50, device="cuda:1"), torch.ones(2, 50, device="cuda:1"),
                                     torch.ones(40, 2, device="cuda:1"), 1.0, None)
        check(on_second.device.index == 1 and torch.equal(on_second.cpu(), reference.row_prune_mask(x, 100, False, None)),
              "row selection on cuda:1 while cuda:0 is current")
        check(bool((merged == 3).all()), "merge on cuda:1 while cuda:0 is current")


def _timer(dev: str):
    if dev == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn)

    def median_ms(fn, repeat: int = 3) -> float:
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return median_ms


def ratios(dev: str, quick: bool) -> dict:
    from sparselora import ops

    bench = _timer(dev)
    out_f, in_f, r, tokens, layers = (64, 96, 16, 64, 2) if quick else (4096, 11008, 16, 4096, 8)
    gen = torch.Generator(device=dev).manual_seed(1)
    results: dict = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        weights = [torch.randn(out_f, in_f, device=dev, generator=gen).to(dtype) for _ in range(layers)]
        n = sum(w.numel() for w in weights)
        k = n // 2

        def sorted_mask():
            flat = torch.cat([w.reshape(-1) for w in weights]).abs()
            keep = torch.ones(n, dtype=torch.bool, device=dev)
            keep[torch.sort(flat, stable=True).indices[:k]] = False
            return keep

        def topk_mask():
            flat = torch.cat([w.reshape(-1) for w in weights]).abs()
            keep = torch.ones(n, dtype=torch.bool, device=dev)
            keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
            return keep

        ours = bench(lambda: ops.select_prune_mask(weights, k, absolute=True))
        read = bench(lambda: [w.sum() for w in weights])
        results[f"threshold_{name}"] = {"sparselora_ms": ours, "read_ms": read, "sort_ms": bench(sorted_mask),
                                       "topk_ms": bench(topk_mask), "fraction_of_read": read / ours,
                                       "GBps": n * weights[0].element_size() / 1e9 / (ours / 1e3)}
        w = weights[0]
        runs = w.reshape(-1, 4).abs()
        nm_sort = lambda: torch.ones_like(runs, dtype=torch.bool).scatter_(1, torch.sort(runs, dim=1, stable=True).indices[:, :2], False)  # noqa: E731
        row_sort = lambda: torch.ones_like(w, dtype=torch.bool).scatter_(1, torch.sort(w.abs(), dim=1, stable=True).indices[:, : in_f // 2], False)  # noqa: E731
        results[f"nm_2_4_{name}"] = {"sparselora_ms": bench(lambda: ops.nm_prune_mask(w, 2, 4, absolute=True)),
                                    "sort_ms": bench(nm_sort), "read_ms": bench(lambda: w.sum())}
        results[f"row_50_{name}"] = {"sparselora_ms": bench(lambda: ops.row_prune_mask(w, in_f // 2, absolute=True)),
                                    "sort_ms": bench(row_sort), "read_ms": results[f"nm_2_4_{name}"]["read_ms"]}
        del weights

    bf16 = torch.bfloat16
    W = torch.randn(out_f, in_f, device=dev, generator=gen).to(bf16)
    A = (torch.randn(r, in_f, device=dev, generator=gen) / r).to(bf16)
    B = (torch.randn(out_f, r, device=dev, generator=gen) / r).to(bf16)
    M = torch.rand(out_f, in_f, device=dev, generator=gen) > 0.5
    results["merge_bf16"] = {"sparselora_ms": bench(lambda: ops.merge_lora_(W, A, B, 0.5, M)),
                             "addmm_mul_ms": bench(lambda: W.addmm_(B, A, alpha=0.5).mul_(M))}
    x = torch.randn(tokens, in_f, device=dev, generator=gen).to(bf16)
    F = torch.nn.functional
    results["masked_lora_forward_bf16"] = {
        "sparselora_ms": bench(lambda: ops.masked_lora_linear(x, W, A, B, 0.5, M)),
        "dense_matmul_ms": bench(lambda: F.linear(x, W)),
        "one_pass_over_W_ms": bench(lambda: W.mul(M)),
    }
    a, b = A.clone().requires_grad_(), B.clone().requires_grad_()
    xg = x.clone().requires_grad_()
    dy = torch.randn(tokens, out_f, device=dev, generator=gen).to(bf16)
    results["train_step_bf16"] = {
        "sparselora_ms": bench(lambda: ops.masked_lora_linear(xg, W, a, b, 0.5, M).backward(dy)),
        "dense_lora_ms": bench(lambda: (F.linear(xg, W) + 0.5 * (xg @ a.t()) @ b.t()).backward(dy)),
    }
    return results


def summary(results: dict) -> list[str]:
    lines = []
    for key, v in results.items():
        if key.startswith("threshold"):
            lines.append(f"{key}: {v['sparselora_ms']:.2f} ms = {v['fraction_of_read']:.0%} of one read "
                         f"({v['GBps']:.0f} GB/s); {v['sort_ms'] / v['sparselora_ms']:.1f}x faster than sort, "
                         f"{v['topk_ms'] / v['sparselora_ms']:.1f}x than topk")
        elif key.startswith(("nm_", "row_")):
            lines.append(f"{key}: {v['sparselora_ms']:.2f} ms = {v['read_ms'] / v['sparselora_ms']:.0%} of one read; "
                         f"{v['sort_ms'] / v['sparselora_ms']:.1f}x faster than sort")
        elif key.startswith("merge"):
            lines.append(f"{key}: {v['sparselora_ms']:.3f} ms, {v['addmm_mul_ms'] / v['sparselora_ms']:.1f}x faster than addmm_+mul_")
        elif key.startswith("masked_lora_forward"):
            dense, one = v["dense_matmul_ms"], v["one_pass_over_W_ms"]
            lines.append(f"{key}: {v['sparselora_ms']:.3f} ms = {v['sparselora_ms'] / dense:.2f}x a dense matmul, "
                         f"{v['sparselora_ms'] / (dense + one):.2f}x (dense matmul + one pass over W)")
        elif key.startswith("train_step"):
            lines.append(f"{key}: {v['sparselora_ms']:.3f} ms = {v['sparselora_ms'] / v['dense_lora_ms']:.2f}x a dense LoRA step")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--quick", action="store_true", help="tiny shapes for the ratios")
    parser.add_argument("--checks-only", action="store_true", help="the correctness checks, no timing")
    parser.add_argument("--interpret", action="store_true",
                        help="no GPU: run the Triton kernels on CPU tensors through Triton's interpreter")
    args = parser.parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
        dev = "cpu"
    elif torch.cuda.is_available():
        os.environ.pop("TRITON_INTERPRET", None)
        dev = "cuda"
    else:
        print("no GPU: CUDA is not available, nothing to measure (--interpret runs the checks on CPU)")
        return 0
    results: dict = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter)"}
    print(f"device: {results['device']}\ncorrectness:", flush=True)
    try:
        correctness(dev, big=dev == "cuda")
    except CheckFailed as failure:
        print(f"  FAILED  {failure}")
        return 1
    results["correct"] = True
    if args.checks_only:
        return 0
    with _forced("triton"):
        results.update(ratios(dev, args.quick))
    print("speed:")
    for line in summary(results):
        print("  " + line)
    if args.json:
        from sparselora.io.atomic import atomic_write_bytes

        atomic_write_bytes(args.json, (json.dumps(results, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
