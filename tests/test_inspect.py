"""`hqexport inspect` on source folders (counts against the fixtures' known composition) and exported folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from hqexport.cli import main
from hqexport.inspect import inspect_path
from tests.conftest import FORMATS, manifest_json

# qwen2 tiny: hidden 64, intermediate 128, 4 heads / 2 KV heads of 16, 2 decoder layers (hqexport.sample._TINY).
# MIXED_CONFIG bytes of packed codes per layer, from the packings' definitions (design.md §3):
MIXED_PACKED = {
    "self_attn.q_proj": 64 * 64 // 2,  # 4-bit: two codes per byte
    "self_attn.k_proj": -(-(32 * 64 // 32) // 10) * 32 * 4,  # 3-bit axis 1: 64 group rows -> 7 int32 rows of 32
    "self_attn.v_proj": 32 * 64 // 4,  # 2-bit
    "self_attn.o_proj": 64 * 64,  # 8-bit
    "mlp.gate_proj": 128 * 64 // 8,  # 1-bit
    "mlp.up_proj": 128 * 64 // 4,  # 1.58-bit in 2-bit storage
}
MIXED_SHAPES = {
    "self_attn.q_proj": [64, 64],
    "self_attn.k_proj": [32, 64],
    "self_attn.v_proj": [32, 64],
    "self_attn.o_proj": [64, 64],
    "mlp.gate_proj": [128, 64],
    "mlp.up_proj": [128, 64],
}


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(main, ["inspect", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


@pytest.mark.parametrize("form", ["pickle", "safetensors", "sharded"])
def test_mixed_source_counts(hqq_source, form):
    report = json.loads(run_cli(str(hqq_source("qwen2", form, mixed=True)), "--json"))
    assert report["kind"] == "source"
    assert report["source_kind"] == ("hqq-pickle" if form == "pickle" else "hqq-safetensors")
    assert report["architecture"] == "Qwen2ForCausalLM" and report["num_hidden_layers"] == 2
    assert report["quantized_linears"] == 12
    counts = {(f["nbits"], f["group_size"], f["axis"]): f["count"] for f in report["formats"]}
    assert counts == {(4, 32, 1): 2, (3, 32, 1): 2, (2, 16, 0): 2, (8, 64, 1): 2, (1, 16, 0): 2, (1.58, 16, 1): 2}
    assert report["bytes"]["packed_weights"] == 2 * sum(MIXED_PACKED.values())
    assert report["bytes"]["fp16_equivalent"] == 2 * sum(2 * n * k for n, k in MIXED_SHAPES.values())
    for layer in report["layers"]:
        tag = layer["name"].split(".", 3)[3]
        assert layer["packed_bytes"] == MIXED_PACKED[tag] and layer["shape"] == MIXED_SHAPES[tag], layer
    assert report["skipped_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    fp_names = {t["name"] for t in report["fp_tensors"]["tensors"]}
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= fp_names
    assert {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"} <= fp_names
    assert report["fp_tensors"]["count"] == 3 + 2 * 2 + 2  # embed, norm, lm_head, 2 norms per layer, 2 down_proj
    assert report["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert report["adapters"] == []


def test_tied_lm_head_bytes_counted_once(hqq_source):
    """gemma ties lm_head to the embedding: one storage, counted once."""
    import torch

    report = inspect_path(hqq_source("gemma", "pickle", nbits=1.58, group_size=16, axis=0, compute_dtype=torch.float16))
    tensors = {t["name"]: t for t in report["fp_tensors"]["tensors"]}
    assert tensors["lm_head.weight"] == {**tensors["model.embed_tokens.weight"], "name": "lm_head.weight"}

    def size(t):
        return torch.tensor([], dtype=getattr(torch, t["dtype"])).element_size() * torch.Size(t["shape"]).numel()

    assert report["fp_tensors"]["bytes"] == sum(size(t) for name, t in tensors.items() if name != "lm_head.weight")


def test_table_output(hqq_source):
    text = run_cli(str(hqq_source("llama", "pickle", **FORMATS["4bit"])))
    assert "LlamaForCausalLM" in text and "hqq-pickle" in text
    assert "4bit g32 axis1" in text and "4bit_u8" in text
    assert "model.layers.*.self_attn.q_proj" in text
    row = next(line for line in text.splitlines() if "4bit g32 axis1" in line and "4bit_u8" in line)
    assert "14" in row  # 2 layers x 7 linears


def test_json_is_the_report(hqq_source):
    folder = hqq_source("llama", "safetensors", **FORMATS["4bit"])
    assert json.loads(run_cli(str(folder), "--json")) == json.loads(json.dumps(inspect_path(folder)))


def test_adapters_next_to_the_source(lora_adapter):
    report = inspect_path(lora_adapter.parent / "model")
    assert [Path(a["path"]) for a in report["adapters"]] == [lora_adapter.resolve()]
    adapter = report["adapters"][0]
    assert (adapter["r"], adapter["lora_alpha"], adapter["peft_type"]) == (4, 8, "LORA")
    assert adapter["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert adapter["base_model_name_or_path"] == str(lora_adapter.parent / "model")
    text = run_cli(str(lora_adapter.parent / "model"))
    assert "Adapters found next to it" in text and "down_proj" in text


def test_adapter_inside_the_source(hqq_source, lora_adapter, tmp_path):
    folder = Path(shutil.copytree(hqq_source("llama", "pickle", **FORMATS["4bit"]), tmp_path / "model"))
    shutil.copytree(lora_adapter, folder / "my-lora")
    report = inspect_path(folder)
    assert [Path(a["path"]).name for a in report["adapters"]] == ["my-lora"]


def _manifest() -> dict:
    layer = {
        "nbits": 4, "group_size": 32, "axis": 1, "shape": [64, 64], "compute_dtype": "float32",
        "op": "hqexport.HQQMatMul", "node": "n0",
        "initializers": {"weight": "w0", "scale": "s0", "zero": "z0", "bias": None},
    }
    manifest = manifest_json({
        "model.layers.0.self_attn.q_proj": layer,
        "model.layers.0.self_attn.k_proj": {**layer, "op": "com.microsoft.MatMulNBits", "shape": [32, 64]},
        "model.layers.0.mlp.down_proj": {**layer, "nbits": 3, "axis": 0, "group_size": 16},
    })
    manifest["adapters"] = {"chat": {"rank": 4, "scaling": 2.0}}
    return manifest


def test_exported_folder(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x" * 100)
    (tmp_path / "model.onnx.data").write_bytes(b"y" * 1000)
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "chat.onnx_adapter").write_bytes(b"z" * 10)
    (tmp_path / "hqexport.json").write_text(json.dumps(_manifest()))
    report = json.loads(run_cli(str(tmp_path), "--json"))
    assert report["kind"] == "export" and report["quantized_linears"] == 3
    assert report["ops"] == {"com.microsoft.MatMulNBits": 1, "hqexport.HQQMatMul": 2}
    assert {f["format"]: f["count"] for f in report["formats"]} == {"4bit g32 axis1": 2, "3bit g16 axis0": 1}
    assert report["adapters"] == {"chat": {"rank": 4, "scaling": 2.0}}
    assert report["files"]["model.onnx.data"] == 1000 and report["files"]["adapters/chat.onnx_adapter"] == 10
    assert report["total_bytes"] == 1110 + (tmp_path / "hqexport.json").stat().st_size
    text = run_cli(str(tmp_path))
    assert "MatMulNBits" in text and "chat" in text and "model.onnx.data" in text
    assert "none (HQQ's exact result)" in text  # the manifest's lossy list is empty; its head is the fp32 one


def test_exported_folder_names_its_head_and_lossy_choices(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    head = {"format": "fp16-exact", "lossy": False, "op": "hqexport.HalfMatMul", "shared_with_embedding": True}
    (tmp_path / "hqexport.json").write_text(json.dumps({**_manifest(), "model": {**_manifest()["model"], "lm_head": head,
                                                                                  "lossy": ["accuracy_level 1"]}}))
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)], env={"COLUMNS": "200"})  # no wrapped cells
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "fp16-exact (hqexport.HalfMatMul, the embedding reads it too)" in text
    assert "accuracy_level 1" in text and "none (HQQ" not in text


@pytest.mark.parametrize("problem", ["no-onnx", "bad-json", "no-layers"])
def test_broken_exported_folder(tmp_path, problem):
    manifest = tmp_path / "hqexport.json"
    if problem != "no-onnx":
        (tmp_path / "model.onnx").write_bytes(b"x")
    manifest.write_text({"bad-json": "{", "no-layers": "{}", "no-onnx": json.dumps(_manifest())}[problem])
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and str(tmp_path) in result.stderr
