"""Whole models exported with every layer as hqexport.HQQMatMul (convert ops="hqq") and run in onnxruntime with the
compiled kernels library registered: they match the PyTorch model with hqq's HQQLinear layers through prefill and
the KV cache, and onnxruntime keeps the weights packed (no fp copy of a quantized weight in the optimized graph),
unlike the same model without the library, whose function bodies are constant-folded to fp32 weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from hqexport.conversion import convert
from hqexport.errors import HQExportError
from hqexport.kernels import register
from hqexport.ops.schema import DOMAIN, OP_TYPE
from tests.conftest import FORMATS
from tests.test_convert import _ort_steps, _torch_steps

PROMPTS = [[5, 17, 42, 9, 100, 7], [260, 3, 11, 64, 2, 88]]
DECODE_STEPS = 4
#: the HQQ+ releases' 2-bit layout (axis 0, group 8) and a 3-bit one
CASES = {"2bit-g8-axis0": dict(nbits=2, group_size=8, axis=0), "3bit": FORMATS["3bit"]}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


@dataclass
class Exported:
    live: torch.nn.Module
    model: Path


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, hqq_model, hqq_source, tmp_path_factory) -> Exported:
    quant = CASES[request.param]
    out = tmp_path_factory.mktemp(f"kernels-{request.param}") / "onnx"
    convert(hqq_source("llama", "pickle", **quant), out, ops="hqq", progress=False)
    return Exported(hqq_model("llama", **quant), out / "model.onnx")


def _session(model: Path, with_library: bool, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if with_library:
        assert register(options, build=True) is not None
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def _quantized_shapes(model: onnx.ModelProto) -> set[tuple[int, int]]:
    """[N, K] and [K, N] of every HQQMatMul node of the exported graph."""
    shapes = set()
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            attrs = {a.name: a.i for a in node.attribute}
            shapes |= {(attrs["N"], attrs["K"]), (attrs["K"], attrs["N"])}
    return shapes


def _float_weights(model: onnx.ModelProto, shapes: set[tuple[int, int]]) -> list[str]:
    """Float initializers (graph or Constant nodes) of a quantized layer's full weight shape."""
    found = [t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES and tuple(t.dims) in shapes]
    for node in model.graph.node:
        for attr in node.attribute:
            tensor = attr.t if attr.type == onnx.AttributeProto.TENSOR else None
            if tensor is not None and tensor.data_type in FLOAT_TYPES and tuple(tensor.dims) in shapes:
                found.append(node.name)
    return found


def test_kernel_session_matches_hqq_through_kv_cache(exported: Exported):
    session = _session(exported.model, True)
    prompts = np.array(PROMPTS, dtype=np.int64) % exported.live.config.vocab_size
    onnx_logits, onnx_tokens = _ort_steps(session, prompts, DECODE_STEPS)
    torch_logits, torch_tokens = _torch_steps(exported.live, prompts, DECODE_STEPS)
    scale = max(float(np.abs(t).max()) for t in torch_logits)
    worst = max(float(np.abs(o - t).max()) for o, t in zip(onnx_logits, torch_logits))
    assert worst <= 1e-4 * scale, f"max |Δ logit| {worst:.3g} vs max |logit| {scale:.3g}"
    np.testing.assert_array_equal(onnx_tokens, torch_tokens)


def test_kernel_session_keeps_weights_packed(exported: Exported, tmp_path: Path):
    source = onnx.load(str(exported.model), load_external_data=False)
    shapes = _quantized_shapes(source)
    assert shapes, "the export has no HQQMatMul node"
    layers = sum(1 for n in source.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE)

    _session(exported.model, True, tmp_path / "kernel.onnx")
    optimized = onnx.load(str(tmp_path / "kernel.onnx"), load_external_data=False)
    kept = [n for n in optimized.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]
    assert len(kept) == layers
    initializers = {t.name: t for t in optimized.graph.initializer}
    packed = {TensorProto.UINT8, TensorProto.UINT32}
    assert all(initializers[n.input[1]].data_type in packed for n in kept)
    assert _float_weights(optimized, shapes) == []

    # the same model without the library: the function bodies are folded into fp32 weights
    _session(exported.model, False, tmp_path / "plain.onnx")
    plain = onnx.load(str(tmp_path / "plain.onnx"), load_external_data=False)
    assert not any(n.domain == DOMAIN and n.op_type == OP_TYPE for n in plain.graph.node)
    assert len(_float_weights(plain, shapes)) >= layers


@pytest.mark.parametrize("ops", ["auto", "hqq"])
def test_kernels_folder_runs_in_onnxruntime_genai(hqq_source, tmp_path, ops):
    """convert (by default, where the library builds) puts the library into the folder and names it in
    genai_config.json, so onnxruntime-genai runs the hqexport ops (HQQMatMulNBits with --ops auto, HQQMatMul with
    --ops hqq) on it; its greedy tokens equal those of onnxruntime with the library."""
    import json

    import onnxruntime_genai as og

    out = tmp_path / "onnx"
    convert(hqq_source("llama", "pickle", **FORMATS["4bit"]), out, ops=ops, progress=False)
    library = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["session_options"]["custom_ops_library"]
    assert (out / library).is_file() and library in json.loads((out / "hqexport.json").read_text())["outputs"]
    prompt, steps = PROMPTS[0], 6
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt])
    genai = []
    while not generator.is_done():
        generator.generate_next_token()
        genai.append(int(generator.get_next_tokens()[0]))
    session = _session(out / "model.onnx", with_library=True)
    ids, expected = list(prompt), []
    for _ in range(len(genai)):  # no cache: each step reruns the whole sequence
        feeds = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64), "position_ids": np.arange(len(ids))[None]}
        for inp in session.get_inputs():
            if inp.name.startswith("past_key_values"):
                feeds[inp.name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), np.float32)
        token = int(session.run(["logits"], feeds)[0][0, -1].argmax())
        expected.append(token)
        ids.append(token)
    assert genai == expected and len(genai) == steps


def test_with_kernels_is_refused_with_ops_ort(hqq_source, tmp_path):
    with pytest.raises(HQExportError, match="--with-kernels packages the library that runs hqexport ops; --ops ort writes none"):
        convert(hqq_source("llama", "pickle", **FORMATS["4bit"]), tmp_path / "out", ops="ort", with_kernels=True, progress=False)
    assert list(tmp_path.iterdir()) == []


def _shipped_library(out) -> str | None:
    import json

    return json.loads((out / "genai_config.json").read_text())["model"]["decoder"].get("session_options", {}).get("custom_ops_library")


def test_no_kernels_writes_a_portable_folder(hqq_source, tmp_path):
    """--no-kernels: no library in the folder or genai_config.json; the same graph as the default export."""
    source = hqq_source("llama", "pickle", **FORMATS["4bit"])
    convert(source, tmp_path / "default", progress=False)
    convert(source, tmp_path / "portable", with_kernels=False, progress=False)
    assert _shipped_library(tmp_path / "default") is not None and _shipped_library(tmp_path / "portable") is None
    assert not list((tmp_path / "portable").glob("*.so"))
    assert (tmp_path / "portable" / "model.onnx").read_bytes() == (tmp_path / "default" / "model.onnx").read_bytes()


def test_default_export_goes_without_kernels_that_cannot_be_built(hqq_source, tmp_path, monkeypatch, capsys):
    """Where the library does not build, the default convert writes the folder without it and says why;
    --with-kernels makes that an error (and leaves no folder)."""
    import hqexport.kernels

    def unbuildable(build: bool = False):
        raise hqexport.kernels.KernelBuildError("no C++ compiler (g++) on PATH")

    monkeypatch.setattr(hqexport.kernels, "library_path", unbuildable)
    source = hqq_source("llama", "pickle", **FORMATS["4bit"])
    summary = convert(source, tmp_path / "out", progress=True)
    assert summary.kernels is None and _shipped_library(tmp_path / "out") is None
    assert "No compiled kernels in the folder (no C++ compiler (g++) on PATH)" in capsys.readouterr().err
    with pytest.raises(HQExportError, match="no C\\+\\+ compiler"):
        convert(source, tmp_path / "insisted", with_kernels=True, progress=False)
    assert not (tmp_path / "insisted").exists()
