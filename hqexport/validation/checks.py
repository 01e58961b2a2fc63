"""The checks: one function each, taking the shared Context and returning a CheckResult.

Every comparison puts the reference (PyTorch + hqq, float32 activations) first and the ONNX model second.
Thresholds come from `thresholds.py`; docs/validate.md explains each check and why its threshold is what it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hqexport.formats.dequant import tensor_to_numpy
from hqexport.validation.blocks import find_block_outputs, with_extra_outputs
from hqexport.validation.exported import Exported
from hqexport.validation.metrics import Difference, Top1, difference, negative_log_likelihood, top1_agreement, top2_margin
from hqexport.validation.onnx_session import OnnxDecoder
from hqexport.validation.reference import Reference
from hqexport.validation.result import CheckResult
from hqexport.validation.thresholds import LOSSY_PERPLEXITY_RELATIVE, LOSSY_TOP1_AGREEMENT, Thresholds, lowered_weight_tolerance
from hqexport.validation.torch_session import TorchDecoder
from hqexport.validation.weights import DecodeError, decode_layers

#: decode steps after the prefill in the logits check (each one goes through the KV cache)
DECODE_STEPS = 4
#: the perplexity text is cut to this many tokens (and to the model's max positions)
PERPLEXITY_TOKENS = 512
_LISTED = 5  # names listed in a message before "and N more"


@dataclass
class Context:
    exported: Exported
    reference: Reference
    torch_model: TorchDecoder
    onnx_model: OnnxDecoder
    thresholds: Thresholds
    provider: str
    prompts: list[str]
    prompt_ids: list[np.ndarray]  # one int64 [s] array per prompt
    tokens: int  # greedy tokens per prompt
    corpus_ids: np.ndarray  # the perplexity text's token ids
    kv_heads: int
    head_dim: int
    decode_text: Callable[[list[int]], str]
    progress: Callable[[str], None]
    lossy: list[str] = field(default_factory=list)  # the manifest's lossy choices: losses are measured, not forbidden

    def empty_cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.onnx_model.empty_cache(1, self.kv_heads, self.head_dim)


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _dtype_label(name: str) -> str:
    name = str(name).lower()
    return "bf16" if "bfloat16" in name or "bf16" in name else "fp16" if "16" in name else "fp32"


def check_weights(ctx: Context) -> CheckResult:
    """Each layer's weight implied by the ONNX initializers vs hqq's HQQLinear.dequantize() of the source."""
    ctx.progress("weights: decoding the ONNX initializers")
    decoded = decode_layers(ctx.exported)
    hqq_layers = ctx.reference.hqq_layers
    problems: dict[str, str] = {}
    for name in sorted(set(hqq_layers) - set(decoded)):
        problems[name] = "quantized in the source but not listed in the manifest"
    for name in sorted(set(decoded) - set(hqq_layers)):
        problems[name] = "listed in the manifest but not an HQQ layer of the source"
    exact = lowered = 0
    worst_lowered = 0.0
    for name in sorted(set(decoded) & set(hqq_layers)):
        got = decoded[name]
        if isinstance(got, DecodeError):
            problems[name] = str(got)
            continue
        ref = tensor_to_numpy(hqq_layers[name].dequantize())
        if got.weight.shape != ref.shape:
            problems[name] = f"decodes to shape {list(got.weight.shape)}, hqq's weight is {list(ref.shape)}"
        elif got.exact:
            if got.weight.dtype != ref.dtype:
                problems[name] = f"dequantizes in {got.weight.dtype}, hqq computes in {ref.dtype}"
            elif not np.array_equal(got.weight, ref):
                wrong = int(np.sum(got.weight != ref))
                delta = float(np.max(np.abs(got.weight.astype(np.float64) - ref.astype(np.float64))))
                problems[name] = f"{wrong} of {ref.size} weights differ (max |Δ| {delta:.3g})"
            else:
                exact += 1
        else:
            entry = ctx.exported.layers[name]
            tolerance = lowered_weight_tolerance(_dtype_label(entry.compute_dtype), ctx.exported.dtype)
            relative = difference(ref, got.weight).relative
            worst_lowered = max(worst_lowered, relative)
            if relative > tolerance:
                problems[name] = f"lowered weight off by {relative:.3g} of max|W| (tolerance {tolerance:.3g})"
            else:
                lowered += 1
    figures = {
        "layers": len(hqq_layers),
        "exact": exact,
        "lowered_within_tolerance": lowered,
        "lowered_max_relative": worst_lowered,
        "differing_layers": sorted(problems),
        "problems": problems,
    }
    threshold = {"weights": "bit-exact (MatMulNBits: 4 ulp)"}
    if problems:
        first = sorted(problems)[0]
        count = f"{len(problems)} layer{'s' if len(problems) > 1 else ''}"
        return CheckResult("weights", False, figures, threshold, f"{count} differ: {_names(sorted(problems))}; {first}: {problems[first]}")
    return CheckResult("weights", True, figures, threshold, f"{exact} layers bit-exact, {lowered} lowered layers within tolerance")


def check_blocks(ctx: Context) -> CheckResult:
    """Each decoder block's output, ONNX (extra outputs on a copy of the graph) vs the reference (hooks)."""
    limit = ctx.thresholds.block_relative
    threshold = {"relative": limit}
    count = len(ctx.reference.blocks)
    outputs = find_block_outputs(ctx.exported.graph, count)
    located = [name for name in outputs if name is not None]
    if not located:
        return CheckResult("per-layer", None, {"blocks": count}, threshold,
                           "block outputs cannot be located (the graph has no value named model.layers.N.output)")
    ctx.progress(f"per-layer: running {count} blocks with extra outputs")
    copy = with_extra_outputs(ctx.exported.graph, located, fallback_type=1 if ctx.exported.dtype == "fp32" else 10)
    decoder = OnnxDecoder(ctx.exported.folder, ctx.provider, model=copy)
    ids = ctx.prompt_ids[0][None, :]
    _, ref_blocks = ctx.torch_model.block_outputs(ids)
    extras = decoder.step(ids, ctx.empty_cache()).extras
    rows: list[dict[str, Any]] = []
    first_bad: int | None = None
    for index, (name, ref) in enumerate(zip(outputs, ref_blocks)):
        if name is None:
            rows.append({"block": index, "output": None, "relative": None})
            continue
        got = extras[name]
        if got.size != ref.size:
            rows.append({"block": index, "output": name, "relative": None, "error": f"shape {list(got.shape)} vs {list(ref.shape)}"})
            first_bad = index if first_bad is None else first_bad
            continue
        diff = difference(ref, got.reshape(ref.shape))
        rows.append({"block": index, "output": name, "max_abs": diff.max_abs, "relative": diff.relative, "cosine": diff.cosine})
        if not diff.relative <= limit and first_bad is None:
            first_bad = index
    measured = [row["relative"] for row in rows if row.get("relative") is not None]
    figures = {"blocks": rows, "first_divergent_block": first_bad, "max_relative": max(measured, default=None), "located": len(located)}
    if ctx.lossy:
        return CheckResult("per-layer", None, figures, threshold,
                           f"lossy export ({', '.join(ctx.lossy)}): measured, not required; max relative error {figures['max_relative']:.3g}")
    if first_bad is not None:
        row = rows[first_bad]
        how = row.get("error") or f"relative error {row['relative']:.3g} > {limit:g}"
        where = f"block {first_bad} ({ctx.reference.blocks_path}.{first_bad})"
        return CheckResult("per-layer", False, figures, threshold, f"{where} diverges first: {how}")
    missing = count - len(located)
    note = f"; {missing} block outputs not located" if missing else ""
    return CheckResult("per-layer", True, figures, threshold, f"{len(located)} blocks, max relative error {figures['max_relative']:.3g}{note}")


def compare_logits(ctx: Context, ref_rows: list[np.ndarray], got_rows: list[np.ndarray]) -> tuple[Difference, Top1]:
    """The rows' logits compared all at once; a top-1 mismatch within the logits threshold of the largest reference
    logit is a near-tie, not decisive."""
    ref_all, got_all = np.concatenate(ref_rows), np.concatenate(got_rows)
    diff = difference(ref_all, got_all)
    return diff, top1_agreement(ref_all, got_all, ctx.thresholds.logits_relative * diff.max_ref)


def check_logits(ctx: Context) -> CheckResult:
    """Prefill + DECODE_STEPS cached decode steps per prompt, teacher-forced on the reference's greedy token."""
    ctx.progress("logits: prefill and decode through the KV cache")
    ref_rows: list[np.ndarray] = []
    got_rows: list[np.ndarray] = []
    prefill_rel = decode_rel = 0.0
    for ids in ctx.prompt_ids:
        ref, cache = ctx.torch_model.step(ids[None, :], None)
        step = ctx.onnx_model.step(ids[None, :], ctx.empty_cache())
        prefill_rel = max(prefill_rel, difference(ref[0], step.logits[0]).relative)
        ref_rows.append(ref[0])
        got_rows.append(step.logits[0])
        for _ in range(DECODE_STEPS):
            token = np.array([[int(np.argmax(ref[0, -1]))]], dtype=np.int64)
            ref, cache = ctx.torch_model.step(token, cache)
            step = ctx.onnx_model.step(token, step.present)
            decode_rel = max(decode_rel, difference(ref[0], step.logits[0]).relative)
            ref_rows.append(ref[0])
            got_rows.append(step.logits[0])
    diff, top1 = compare_logits(ctx, ref_rows, got_rows)
    figures = {
        "max_abs": diff.max_abs,
        "max_logit": diff.max_ref,
        "relative": diff.relative,
        "prefill_relative": prefill_rel,
        "decode_relative": decode_rel,
        "cosine": diff.cosine,
        "top1_agreement": top1.fraction,
        "positions": top1.total,
        "decisive_top1_mismatches": top1.decisive_mismatches,
    }
    summary = f"relative {diff.relative:.3g}, cosine {diff.cosine:.6f}, top-1 {top1.agree}/{top1.total}"
    failures, threshold = judge_logits(ctx, diff, top1, lossy=bool(ctx.lossy))
    if ctx.lossy:
        verdict = "; ".join(failures) or f"top-1 agreement {top1.fraction:.1%}"
        return CheckResult("logits", not failures, figures, threshold, f"lossy export ({', '.join(ctx.lossy)}): {verdict}; {summary}")
    return CheckResult("logits", not failures, figures, threshold, "; ".join(failures) if failures else summary)


def judge_logits(ctx: Context, diff: Difference, top1: Top1, *, lossy: bool) -> tuple[list[str], dict[str, Any]]:
    """(failures, threshold) of logits against the reference: exactness, or for a lossy result top-1 agreement."""
    if lossy:
        agree = top1.fraction >= LOSSY_TOP1_AGREEMENT
        return ([] if agree else [f"top-1 agreement {top1.fraction:.1%} < {LOSSY_TOP1_AGREEMENT:.0%}"]), {"top1_agreement": LOSSY_TOP1_AGREEMENT}
    limits = ctx.thresholds
    threshold = {"relative": limits.logits_relative, "cosine": limits.logits_cosine, "decisive_top1_mismatches": 0,
                 "tie_margin": limits.logits_relative * diff.max_ref}
    return logits_failures(diff, top1, limits), threshold


def logits_failures(diff: Difference, top1: Top1, limits: Thresholds) -> list[str]:
    """Why two sets of logits disagree beyond the thresholds (empty when they agree)."""
    failures = []
    if not diff.relative <= limits.logits_relative:
        failures.append(f"relative error {diff.relative:.3g} > {limits.logits_relative:g}")
    if not diff.cosine >= limits.logits_cosine:
        failures.append(f"cosine {diff.cosine:.6f} < {limits.logits_cosine}")
    if top1.decisive_mismatches:
        failures.append(f"{top1.decisive_mismatches} top-1 mismatches outside near-ties")
    return failures


def _greedy(step: Callable[[np.ndarray, Any], tuple[np.ndarray, Any]], ids: np.ndarray, tokens: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits each was chosen from."""
    logits, state = step(ids[None, :], None)
    chosen: list[int] = []
    seen: list[np.ndarray] = []
    for index in range(tokens):
        last = logits[0, -1]
        seen.append(last)
        chosen.append(int(np.argmax(last)))
        if index + 1 < tokens:
            logits, state = step(np.array([[chosen[-1]]], dtype=np.int64), state)
    return chosen, seen


def check_generation(ctx: Context) -> CheckResult:
    """Greedy continuations of every prompt: identical, or diverging only at a near-tie of the reference."""
    ctx.progress(f"generation: {ctx.tokens} greedy tokens x {len(ctx.prompts)} prompts")

    def onnx_step(ids: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
        result = ctx.onnx_model.step(ids, past if past is not None else ctx.empty_cache())
        return result.logits, result.present

    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    for index, (prompt, ids) in enumerate(zip(ctx.prompts, ctx.prompt_ids)):
        ref_tokens, ref_logits = _greedy(ctx.torch_model.step, ids, ctx.tokens)
        got_tokens, _ = _greedy(onnx_step, ids, ctx.tokens)
        first = next((i for i, (a, b) in enumerate(zip(ref_tokens, got_tokens)) if a != b), None)
        row: dict[str, Any] = {
            "prompt": prompt,
            "identical": first is None,
            "first_difference": first,
            "reference_text": ctx.decode_text(ref_tokens),
            "onnx_text": ctx.decode_text(got_tokens),
            "reference_tokens": ref_tokens,
            "onnx_tokens": got_tokens,
        }
        if first is not None:
            logits = ref_logits[first]
            margin = float(top2_margin(logits))
            tie = ctx.thresholds.logits_relative * float(np.max(np.abs(logits)))
            row.update(reference_margin=margin, tie_margin=tie, near_tie=margin <= tie)
            if margin > tie:
                bad.append(index)
        rows.append(row)
    identical = sum(row["identical"] for row in rows)
    figures = {"prompts": rows, "identical": identical, "tokens": ctx.tokens}
    if ctx.lossy:
        return CheckResult("generation", None, figures, {"tokens": "measured (lossy export)"},
                           f"lossy export ({', '.join(ctx.lossy)}): measured, not required; "
                           f"{identical}/{len(rows)} prompts identical over {ctx.tokens} tokens")
    threshold = {"tokens": "identical (near-ties excused)"}
    if bad:
        row = rows[bad[0]]
        return CheckResult("generation", False, figures, threshold,
                           f"{len(bad)} prompts diverge: {row['prompt']!r} differs at token {row['first_difference']} "
                           f"(reference margin {row['reference_margin']:.3g} > {row['tie_margin']:.3g})")
    return CheckResult("generation", True, figures, threshold, f"{identical}/{len(rows)} prompts identical over {ctx.tokens} tokens")


def check_perplexity(ctx: Context) -> CheckResult:
    """Perplexity of both models on the bundled text (one forward pass each)."""
    ids = ctx.corpus_ids
    ctx.progress(f"perplexity: {len(ids)} tokens")
    ref, _ = ctx.torch_model.step(ids[None, :], None)
    got = ctx.onnx_model.step(ids[None, :], ctx.empty_cache()).logits
    ppl_ref = float(np.exp(negative_log_likelihood(ref[0, :-1], ids[1:])))
    ppl_onnx = float(np.exp(negative_log_likelihood(got[0, :-1], ids[1:])))
    relative = abs(ppl_onnx - ppl_ref) / ppl_ref if np.isfinite(ppl_onnx) else float("inf")
    limit = LOSSY_PERPLEXITY_RELATIVE if ctx.lossy else ctx.thresholds.perplexity_relative
    figures = {"tokens": int(len(ids)), "reference": ppl_ref, "onnx": ppl_onnx, "relative_difference": relative}
    passed = relative <= limit
    message = f"reference {ppl_ref:.4f}, onnx {ppl_onnx:.4f} (relative Δ {relative:.3g})"
    return CheckResult("perplexity", passed, figures, {"relative_difference": limit}, message if passed else message + f" > {limit:g}")
