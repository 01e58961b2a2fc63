"""ORT Mobile's format: a `--no-kernels` folder converted by onnxruntime's own tool decodes PyTorch-hqq's tokens.

The documented step (docs/getting-started.md): `hqexport convert --no-kernels`, then
`python -m onnxruntime.tools.convert_onnx_models_to_ort model.onnx`, which writes model.ort and the operator list
for a reduced onnxruntime build. The .ort model must need only onnxruntime's own ops and decode, greedy, the tokens
that hqq's HQQLinear layers give in PyTorch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from hqexport.conversion import convert
from hqexport.validation.reference import load_reference
from tests.conftest import FORMATS

STEPS = 6


def greedy_onnx(session: ort.InferenceSession, prompt: list[int], layers: int, kv_heads: int, head_dim: int) -> list[int]:
    """Greedy tokens, the whole sequence run each step with an empty cache (no cache handling to get wrong)."""
    ids = list(prompt)
    empty = np.zeros((1, kv_heads, 0, head_dim), np.float32)
    names = {i.name for i in session.get_inputs()}
    for _ in range(STEPS):
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
        feeds.update({f"past_key_values.{i}.{kv}": empty for i in range(layers) for kv in ("key", "value")})
        logits = session.run(["logits"], feeds)[0]
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def greedy_torch(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(STEPS):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_ort_format_model_decodes_the_reference_tokens(hqq_source, tmp_path):
    source = hqq_source("llama", "pickle", **FORMATS["4bit"])
    out = tmp_path / "mobile"
    convert(source, out, with_kernels=False, progress=False)
    done = subprocess.run(
        [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(out / "model.onnx"), "--output_dir", str(out / "ort")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ort_model = out / "ort" / "model.ort"
    operators = (out / "ort" / "model.required_operators.config").read_text()
    assert "com.microsoft;1;" in operators and "MatMulNBits" in operators  # the bodies, inlined: stock ops only
    assert "hqexport" not in operators

    reference = load_reference(Path(source))
    config = reference.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    prompt = [5, 17, 42, 99]
    session = ort.InferenceSession(str(ort_model), providers=["CPUExecutionProvider"])
    tokens = greedy_onnx(session, prompt, config.num_hidden_layers, config.num_key_value_heads, head_dim)
    assert tokens == greedy_torch(reference.model, prompt)
    assert len(set(tokens)) > 1, tokens  # not one token repeated: the check compares real choices
