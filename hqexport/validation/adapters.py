"""Adapter checks: the exported adapter active in onnxruntime vs PEFT with that adapter on the hqq reference.

- separate (adapters/NAME.onnx_adapter): the file is loaded with `ort.LoraAdapter` and activated through
  `RunOptions.add_active_adapter`; the reference is `peft.PeftModel.from_pretrained(reference, source)` where
  source is the adapter folder recorded in the manifest. Logits (prefill + cached decode steps) are held to
  the logits thresholds. The base model (no adapter active) is the plain logits check.
- bake: the adapter is part of the graph, so *every* check compares against the PEFT-wrapped reference
  (`adapt_reference` does that before the checks run).
- merge: the adapter was folded into re-quantized HQQ weights; PEFT's own merge (`merge_and_unload`, hqq's
  quantizer) is the reference for every check, and the manifest's retained-delta figures are reported.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from hqq.core.quantize import HQQLinear

from hqexport.errors import HQExportError
from hqexport.files import MANIFEST_FILE
from hqexport.validation.checks import DECODE_STEPS, Context, compare_logits, judge_logits
from hqexport.validation.metrics import difference
from hqexport.validation.reference import Reference, use_activation_dtype
from hqexport.validation.result import CheckResult
from hqexport.validation.torch_session import returned_cache


def _adapter_source(ctx_folder: Path, name: str, entry: dict[str, Any]) -> Path:
    source = entry.get("source")
    if not source or not Path(source).is_dir():
        raise HQExportError(f"adapter {name}: its source folder {source!r} recorded in the manifest is missing", ctx_folder / MANIFEST_FILE)
    return Path(source)


def _peft(model: torch.nn.Module, source: Path, name: str) -> torch.nn.Module:
    from peft import PeftModel

    try:
        with warnings.catch_warnings():  # peft calls transformers APIs that warn of their own deprecation
            warnings.simplefilter("ignore", FutureWarning)
            return PeftModel.from_pretrained(model, str(source), adapter_name=name, is_trainable=False)
    except Exception as error:  # peft raises many kinds for a bad folder
        raise HQExportError(f"peft cannot load adapter {name}: {error}", source) from None


def adapt_reference(reference: Reference, folder: Path, adapters: dict[str, dict[str, Any]]) -> list[str]:
    """Apply baked or merged adapters to the reference (the export computes with them); returns notes."""
    notes: list[str] = []
    for name, entry in sorted(adapters.items()):
        mode = entry.get("mode")
        if mode not in ("bake", "merge"):
            continue
        wrapped = _peft(reference.model, _adapter_source(folder, name, entry), name)
        if mode == "bake":
            reference.model = wrapped
            notes.append(f"adapter {name} is baked into the graph: the reference runs it through PEFT")
        else:
            reference.model = wrapped.merge_and_unload()
            reference.hqq_layers = {
                path: module for path, module in reference.model.named_modules() if isinstance(module, HQQLinear)
            }
            for module in reference.hqq_layers.values():
                use_activation_dtype(module)
            notes.append(f"adapter {name} is merged: the reference is PEFT's merge_and_unload (hqq re-quantization)")
    return notes


def check_adapter(ctx: Context, name: str) -> CheckResult:
    entry = ctx.exported.adapters[name]
    mode = entry.get("mode", "separate")
    check = f"adapter:{name}"
    if mode == "merge":
        figures = {key: entry[key] for key in ("retained", "retained_delta", "logit_retention") if key in entry}
        return CheckResult(check, None, figures, {}, "merged into the weights: covered by every other check against PEFT's merge")
    if mode == "bake":
        return CheckResult(check, None, {}, {}, "baked into the graph: covered by every other check against the PEFT reference")
    file = ctx.exported.folder / str(entry.get("file", f"adapters/{name}.onnx_adapter"))
    if not file.resolve().is_relative_to(ctx.exported.folder.resolve()) or not file.is_file():
        raise HQExportError(f"adapter {name}: file {entry.get('file')!r} is missing or outside the folder", ctx.exported.folder)
    ctx.progress(f"adapter {name}: onnxruntime LoraAdapter vs PEFT")
    lora = ort.LoraAdapter()
    lora.Load(str(file))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    base_model = ctx.reference.model
    peft_model = _peft(base_model, _adapter_source(ctx.exported.folder, name, entry), name)
    try:
        ref_rows, got_rows, base_rows = _adapter_logits(ctx, peft_model, options)
    finally:
        peft_model.unload()  # restores the base modules for the checks that follow
        ctx.reference.model = base_model
    diff, top1 = compare_logits(ctx, ref_rows, got_rows)
    effect = difference(np.concatenate(base_rows), np.concatenate(ref_rows))
    figures = {
        "max_abs": diff.max_abs,
        "relative": diff.relative,
        "cosine": diff.cosine,
        "top1_agreement": top1.fraction,
        "decisive_top1_mismatches": top1.decisive_mismatches,
        "adapter_effect_relative": effect.relative,  # how much the adapter moves the reference logits
    }
    # factors rounded to fp16 (convert --adapter-dtype fp16) change the adapter: its loss is measured like a lossy
    # export's. A manifest from before factors_rounded was recorded: fp16 factors count as rounded.
    rounded = entry.get("factors_rounded", entry.get("factor_dtype", "fp32") != "fp32")
    lossy = [*ctx.lossy, *([f"{entry['factor_dtype']} factors (rounded)"] if rounded else [])]
    failures, threshold = judge_logits(ctx, diff, top1, lossy=bool(lossy))
    summary = f"relative {diff.relative:.3g}, cosine {diff.cosine:.6f}, top-1 {top1.fraction:.1%}"
    message = f"adapter {name}: " + ("; ".join(failures) if failures else summary) + (f" (lossy: {', '.join(lossy)})" if lossy else "")
    return CheckResult(check, not failures, figures, threshold, message)


@torch.inference_mode()
def _adapter_logits(ctx: Context, peft_model: torch.nn.Module, options: ort.RunOptions) -> tuple[list, list, list]:
    """Prefill + decode logits of the first prompt: PEFT reference, ONNX with the adapter, reference without it."""
    ids = ctx.prompt_ids[0][None, :]
    ref_rows, got_rows, base_rows = [], [], []
    out = peft_model(input_ids=torch.from_numpy(ids), use_cache=True)
    with peft_model.disable_adapter():
        base = peft_model(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()
    cache = returned_cache(out)
    ref = out.logits.float().numpy()
    step = ctx.onnx_model.step(ids, ctx.empty_cache(), options)
    ref_rows.append(ref[0])
    got_rows.append(step.logits[0])
    base_rows.append(base[0])
    sequence = ids
    for _ in range(DECODE_STEPS):
        token = np.array([[int(np.argmax(ref[0, -1]))]], dtype=np.int64)
        sequence = np.concatenate([sequence, token], axis=1)
        out = peft_model(input_ids=torch.from_numpy(token), cache=cache, use_cache=True)
        cache, ref = returned_cache(out), out.logits.float().numpy()
        step = ctx.onnx_model.step(token, step.present, options)
        with peft_model.disable_adapter():
            base = peft_model(input_ids=torch.from_numpy(sequence), use_cache=False).logits.float().numpy()
        ref_rows.append(ref[0])
        got_rows.append(step.logits[0])
        base_rows.append(base[0, -1:])
    return ref_rows, got_rows, base_rows
