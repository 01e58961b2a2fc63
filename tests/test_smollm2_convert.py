"""`hqexport convert` on a real model: SmolLM2-135M-Instruct, hqq 4-bit g64 axis 1 (slow: minutes).

32 greedy tokens from stock onnxruntime (CPU) must equal the PyTorch model with hqq's own HQQLinear layers
(hqexport.validation.reference, which decodes the checkpoint with hqq, not with hqexport's readers) for three
prompts. The convert runs in a child process so its time and peak memory are its own; both are printed.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers

from hqexport.conversion import convert
from hqexport.validation import validate
from hqexport.validation.reference import load_reference
from tests.smollm2 import smollm2_hqq

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea."]
TOKENS = 32


def _ort_greedy(session: ort.InferenceSession, prompt: list[int], layers: int, kv_heads: int, head_dim: int) -> list[int]:
    empty = np.zeros((1, kv_heads, 0, head_dim), np.float32)
    feeds = {f"past_key_values.{i}.{kv}": empty for i in range(layers) for kv in ("key", "value")}
    ids, total, tokens = np.array([prompt], dtype=np.int64), 0, []
    names = [o.name for o in session.get_outputs()]
    for _ in range(TOKENS):
        length = ids.shape[1]
        feeds.update(
            input_ids=ids,
            attention_mask=np.ones((1, total + length), np.int64),
            position_ids=np.arange(total, total + length)[None],
        )
        outputs = dict(zip(names, session.run(None, feeds)))
        total += length
        for name in [n for n in feeds if n.startswith("past_key_values.")]:
            feeds[name] = outputs[name.replace("past_key_values.", "present.")]
        tokens.append(int(outputs["logits"][0, -1].argmax()))
        ids = np.array([[tokens[-1]]], dtype=np.int64)
    return tokens


@torch.inference_mode()
def _torch_greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    ids, cache, tokens = torch.tensor([prompt]), None, []
    for _ in range(TOKENS):
        out = model(input_ids=ids, cache=cache, use_cache=True)
        cache = out.cache
        tokens.append(int(out.logits[0, -1].argmax()))
        ids = torch.tensor([[tokens[-1]]])
    return tokens


def test_smollm2_greedy_tokens_identical(tmp_path):
    source = smollm2_hqq()
    out = tmp_path / "onnx"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hqexport.cli", "convert", str(source), "-o", str(out), "--json"], check=True)
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    manifest = json.loads((out / "hqexport.json").read_text())["model"]
    print(f"\nSmolLM2-135M convert: {seconds:.1f} s, peak RSS {peak_mib:.0f} MiB")

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    reference = load_reference(source).model
    for text in PROMPTS:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(chat, add_special_tokens=False).input_ids
        expected = _torch_greedy(reference, prompt)
        got = _ort_greedy(session, prompt, manifest["num_hidden_layers"], manifest["num_key_value_heads"], manifest["head_dim"])
        print(f"{text!r} -> {tokenizer.decode(got)!r}")
        assert got == expected, (text, tokenizer.decode(got), tokenizer.decode(expected))


def test_smollm2_fp16_compute_validates_exactly(tmp_path):
    """hqq's float16 compute dtype (its default on GPUs): the default export keeps the float16 embedding as the head
    (fp16-exact) and its kernels round every weight as hqq does, so validate's fp32 thresholds hold (computing the
    weights in fp32, as MatMulNBits does, put this model's per-layer error at 3.3e-3, 33x the threshold)."""
    source = smollm2_hqq("float16")
    out = tmp_path / "onnx"
    convert(source, out, progress=False)
    assert json.loads((out / "hqexport.json").read_text())["model"]["lm_head"]["format"] == "fp16-exact"
    report = validate(out, progress=None)
    assert report.passed, [(check.name, check.message) for check in report.checks if not check.passed]
