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

from hqexport.convert import convert
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


def test_with_kernels_folder_runs_in_onnxruntime_genai(hqq_source, tmp_path):
    """convert --ops hqq --with-kernels: the library is in the folder and named in genai_config.json, so
    onnxruntime-genai runs the hqexport ops; its greedy tokens equal those of onnxruntime with the library."""
    import json

    import onnxruntime_genai as og

    out = tmp_path / "onnx"
    convert(hqq_source("llama", "pickle", **FORMATS["4bit"]), out, ops="hqq", with_kernels=True, progress=False)
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


def test_with_kernels_needs_ops_hqq(hqq_source, tmp_path):
    with pytest.raises(HQExportError, match="--with-kernels packages the library that runs hqexport ops"):
        convert(hqq_source("llama", "pickle", **FORMATS["4bit"]), tmp_path / "out", with_kernels=True, progress=False)
    assert list(tmp_path.iterdir()) == []
