"""`hqexport inspect` on a real model: SmolLM2-135M-Instruct quantized by hqq 4-bit g64 (slow: ~3 min the first time)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hqexport.cli import main
from tests.smollm2 import smollm2_hqq

pytestmark = pytest.mark.slow

# SmolLM2-135M (design.md §7): Llama, hidden 576, intermediate 1536, 30 layers, 9 heads / 3 KV heads of 64,
# vocab 49152, tied embeddings.
HIDDEN, INTER, LAYERS, KV, VOCAB = 576, 1536, 30, 3 * 64, 49152
SHAPES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


def test_inspect_smollm2():
    result = CliRunner().invoke(main, ["inspect", str(smollm2_hqq()), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["architecture"] == "LlamaForCausalLM" and report["num_hidden_layers"] == LAYERS
    assert report["quantized_linears"] == LAYERS * 7 == 210
    assert [(f["format"], f["count"]) for f in report["formats"]] == [("4bit g64 axis1", 210)]
    weights = LAYERS * sum(n * k for n, k in SHAPES.values())
    assert report["bytes"]["packed_weights"] == weights // 2
    assert report["bytes"]["fp16_equivalent"] == 2 * weights
    assert report["bytes"]["scale_zero_bias"] == 2 * 4 * weights // 64  # fp32 scale and zero per group of 64
    assert report["skipped_modules"] == ["lm_head"]
    tensors = {t["name"]: t["shape"] for t in report["fp_tensors"]["tensors"]}
    assert tensors["model.embed_tokens.weight"] == tensors["lm_head.weight"] == [VOCAB, HIDDEN]
    assert len(tensors) == 2 * LAYERS + 3  # two norms per layer, final norm, embedding, tied lm_head
    assert report["fp_tensors"]["bytes"] == 4 * (VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN)
    assert "tokenizer.json" in report["tokenizer_files"]
