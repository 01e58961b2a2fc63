"""`hqexport demo`: the whole path on the bundled sample, in under a minute, with nothing downloaded.

Builds a tiny random Llama quantized by hqq (4-bit, group 32), saves it as an hqq folder, converts it, and
generates greedily with onnxruntime (CPU; hqexport's kernels library where it is built) next to the PyTorch
model with hqq's own HQQLinear layers. The sample's weights are random, so the text is gibberish; the point is that both sides
produce the same tokens.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from hqexport.conversion import convert
from hqexport.manifest import read_manifest
from hqexport.sample import build_sample_model, build_tokenizer, save_hqq_pickle
from hqexport.validation.onnx_session import OnnxDecoder

PROMPT = "The old lighthouse keeper"


@torch.inference_mode()
def torch_greedy(model: torch.nn.Module, prompt: list[int], tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens of the PyTorch model through its KV cache, and the logits of every step."""
    ids, cache, generated, logits = torch.tensor([prompt]), None, [], []
    for _ in range(tokens):
        out = model(input_ids=ids, cache=cache, use_cache=True)
        cache, step = out.cache, out.logits[0, -1]
        logits.append(step.float().numpy())
        generated.append(int(step.argmax()))
        ids = torch.tensor([[generated[-1]]])
    return generated, np.stack(logits)


def onnx_greedy(folder: Path, prompt: list[int], tokens: int) -> tuple[list[int], np.ndarray, str]:
    """Greedy tokens of the exported model in onnxruntime through its KV cache, the logits of every step, and
    which onnxruntime ran them."""
    model = read_manifest(folder).model
    decoder = OnnxDecoder(folder, "cpu")
    runtime = "onnxruntime (CPU, hqexport kernels)" if decoder.kernels else "onnxruntime (CPU, stock)"
    past = decoder.empty_cache(1, model.num_key_value_heads, model.head_dim)
    ids, generated, logits = np.array([prompt]), [], []
    for _ in range(tokens):
        step = decoder.step(ids, past)
        past = step.present
        logits.append(step.logits[0, -1])
        generated.append(int(step.logits[0, -1].argmax()))
        ids = np.array([[generated[-1]]])
    return generated, np.stack(logits), runtime


def run_demo(tokens: int = 16, console: Console | None = None) -> bool:
    """Run the demo, print the comparison; True when onnxruntime generated exactly PyTorch's tokens."""
    console = console or Console()
    with tempfile.TemporaryDirectory(prefix="hqexport-demo-") as tmp:
        root = Path(tmp)
        quiet = contextlib.redirect_stderr(io.StringIO())  # hqq's per-layer progress bars
        with console.status("Building the sample: tiny Llama, hqq 4-bit g32 on CPU"), quiet:
            tokenizer = build_tokenizer()
            model = build_sample_model("llama", nbits=4, group_size=32, axis=1, vocab_size=tokenizer.vocab_size)
            source = save_hqq_pickle(model, root / "sample-hqq", tokenizer)
        console.print(f"[green]✓[/green] Saved the sample HQQ model (hqq save_quantized) in {source}")
        summary = convert(source, root / "sample-onnx", progress=True)
        ops = ", ".join(f"{count} as {op}" for op, count in summary.ops.items())
        console.print(
            f"[green]✓[/green] Converted {summary.quantized_layers} HQQ layers ({ops}), {summary.onnx_bytes / 1e3:.0f} kB"
        )
        prompt = tokenizer.encode(PROMPT)
        with console.status("Generating with PyTorch (hqq) and onnxruntime"):
            torch_tokens, torch_logits = torch_greedy(model, prompt, tokens)
            onnx_side = onnx_greedy(summary.out, prompt, tokens)
    return show_comparison(console, tokenizer, (torch_tokens, torch_logits), onnx_side)


def show_comparison(
    console: Console,
    tokenizer: Any,
    torch_side: tuple[list[int], np.ndarray],
    onnx_side: tuple[list[int], np.ndarray, str],
) -> bool:
    """Print both generations side by side; True when the tokens are identical."""
    (torch_tokens, torch_logits), (onnx_tokens, onnx_logits, runtime) = torch_side, onnx_side
    match = torch_tokens == onnx_tokens
    delta = float(np.abs(torch_logits - onnx_logits).max())
    table = Table(title=f"Greedy generation, {len(torch_tokens)} tokens after {PROMPT!r}")
    table.add_column("runtime")
    table.add_column("token ids")
    table.add_column("text")
    table.add_row("PyTorch + hqq HQQLinear", " ".join(map(str, torch_tokens)), repr(tokenizer.decode(torch_tokens)))
    table.add_row(runtime, " ".join(map(str, onnx_tokens)), repr(tokenizer.decode(onnx_tokens)))
    console.print(table)
    console.print(f"max |Δ logit| = {delta:.2e} (max |logit| {float(np.abs(torch_logits).max()):.2f})")
    if match:
        console.print("[bold green]MATCH[/bold green]: onnxruntime generated exactly the PyTorch tokens")
    else:
        console.print("[bold red]MISMATCH[/bold red]: the tokens differ")
    return match
