"""The whole story on CPU at small scale: quantize with hqq, fine-tune a LoRA adapter with PEFT, export, validate.

    python finetune_then_export.py [--workdir DIR] [--modes separate,bake,merge] [--ops auto] [--steps 30]

1. a tiny random Llama (hqexport.sample's config and bundled BPE tokenizer), quantized by hqq (4-bit, group 32,
   axis 1) and saved with hqq's AutoHQQHFModel.save_quantized -> DIR/base;
2. a LoRA adapter (rank 8 on q/k/v/o and the MLP) trained with PEFT on the bundled text -> DIR/tuned;
3. per mode: `hqexport convert DIR/base -o DIR/MODE --adapter tuned=DIR/tuned --adapters MODE`, then
   `hqexport validate DIR/MODE --adapter all --json DIR/MODE-validate.json`.
Prints one line per mode; exits 1 if any validation failed. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import peft
import torch
import transformers
from hqq.core.quantize import BaseQuantizeConfig
from hqq.models.hf.base import AutoHQQHFModel

from hqexport.sample import build_tokenizer, corpus_text, tiny_config

PROMPT = "The old lighthouse keeper"


def quantize_base(folder: Path, tokenizer: transformers.PreTrainedTokenizerFast) -> torch.nn.Module:
    """A tiny random Llama quantized by hqq on CPU, saved as hqq saves it."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", tokenizer.vocab_size), dtype=torch.float32)
    quant = BaseQuantizeConfig(nbits=4, group_size=32, axis=1)
    with contextlib.redirect_stderr(io.StringIO()):  # hqq's per-layer progress bars
        AutoHQQHFModel.quantize_model(model, quant_config=quant, compute_dtype=torch.float32, device="cpu")
    AutoHQQHFModel.save_quantized(model, str(folder))
    tokenizer.save_pretrained(folder)
    return model


def train_adapter(
    model: torch.nn.Module, base: Path, folder: Path, tokenizer: transformers.PreTrainedTokenizerFast, steps: int, lr: float
) -> tuple[float, float, float]:
    """PEFT LoRA on the hqq model (PEFT wraps HQQLinear as HqqLoraLinear).

    Returns the loss before and after, and ‖ΔW‖/‖W‖ over the adapted layers (how big the fine-tune is).
    """
    config = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = peft.get_peft_model(model, config)
    ids = tokenizer(corpus_text(), return_tensors="pt").input_ids[:, :128]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    torch.manual_seed(0)
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(folder)
    with torch.no_grad():
        layers = [m for m in peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
        delta = sum(float(m.get_delta_weight("default").norm() ** 2) for m in layers)
        weight = sum(float(m.get_base_layer().dequantize().norm() ** 2) for m in layers)
    # PEFT records the base's name as given to from_pretrained; point it at the hqq folder we saved
    config_file = folder / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved["base_model_name_or_path"] = str(base.resolve())
    config_file.write_text(json.dumps(saved, indent=2))
    return losses[0], losses[-1], (delta / weight) ** 0.5


def hqexport(*args: str) -> subprocess.CompletedProcess:
    """The hqexport CLI of this Python environment, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "hqexport.cli", *args], capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("finetune-demo"))
    parser.add_argument("--modes", default="separate,bake,merge", help="comma-separated adapter modes")
    parser.add_argument("--ops", default="auto", choices=["auto", "hqq", "ort"])
    parser.add_argument("--steps", type=int, default=30, help="LoRA training steps")
    parser.add_argument("--lr", type=float, default=5e-5, help="learning rate (the default gives a fine-tune of a few %% of ‖W‖)")
    parser.add_argument("--tokens", type=int, default=12, help="greedy tokens per prompt in validate")
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    base = work / "base"
    model = quantize_base(base, tokenizer)
    print(f"quantized a tiny Llama with hqq (4-bit g32) -> {base}")
    before, after, size = train_adapter(model, base, work / "tuned", tokenizer, args.steps, args.lr)
    print(f"trained LoRA r=8 for {args.steps} steps with PEFT: loss {before:.3f} -> {after:.3f}, "
          f"|dW|/|W| = {size:.3f} -> {work / 'tuned'}")
    prompts = work / "prompts.txt"
    prompts.write_text(PROMPT + "\n")

    failed = False
    for mode in args.modes.split(","):
        started = time.perf_counter()
        out = work / mode
        converted = hqexport("convert", str(base), "-o", str(out), "--force", "--ops", args.ops,
                             "--adapter", f"tuned={work / 'tuned'}", "--adapters", mode)
        if converted.returncode != 0:
            print(f"{mode:9} convert FAILED (exit {converted.returncode}): {converted.stderr.strip()}")
            failed = True
            continue
        report_file = work / f"{mode}-validate.json"
        validated = hqexport("validate", str(out), "--adapter", "all", "--prompts", str(prompts),
                             "--tokens", str(args.tokens), "--json", str(report_file))
        report = json.loads(report_file.read_text()) if report_file.is_file() else {"checks": []}
        verdicts = " ".join(f"{c['name']}={c['status']}" for c in report["checks"])
        entry = json.loads((out / "hqexport.json").read_text())["adapters"]["tuned"]
        retained = f", retained {entry['retained']:.0%} of the adapter's delta" if "retained" in entry else ""
        status = "PASSED" if validated.returncode == 0 else f"FAILED (exit {validated.returncode})"
        print(f"{mode:9} validate {status}{retained} [{time.perf_counter() - started:.0f} s]: {verdicts}")
        failed |= validated.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
