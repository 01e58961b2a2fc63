"""convert streams the weights: the exported graph holds none, and each one is computed only when it is written."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
import torch

from hqexport import conversion
from hqexport.conversion import convert
from hqexport.export.config import DEFAULT_OPSET, model_config
from hqexport.export.decoder import decoder_io
from hqexport.export.graph import build_decoder
from hqexport.ops import inputs
from hqexport.read.live import read_live_model
from hqexport.read.source import read_source
from tests.conftest import FORMATS


@pytest.mark.parametrize("tied", [True, False])
def test_built_graph_holds_no_weights_and_computes_the_real_ones(hqq_model, tied):
    """Every initializer of more than a few hundred bytes is lazy; computed, each holds the source's values."""
    qmodel = read_live_model(hqq_model("llama", tie_word_embeddings=tied, **FORMATS["4bit"]))
    config = model_config(qmodel)
    graph = build_decoder(qmodel, config, decoder_io(config, torch.float32), opset=DEFAULT_OPSET)
    initializers = graph.model.graph.initializers
    lazy = {name for name, value in initializers.items() if isinstance(value.const_value, ir.LazyTensor)}
    assert {name for name, value in initializers.items() if value.const_value.nbytes > 512} - {"cos_cache", "sin_cache"} <= lazy
    assert ("lm_head.weight.transposed" in lazy) != tied  # tied: the head reads the embedding itself
    embedding = initializers["model.embed_tokens.weight"].const_value.numpy()
    assert np.array_equal(embedding, qmodel.tensors["model.embed_tokens.weight"].numpy())
    for path, node in graph.layers.items():
        packed = initializers[node.initializers["weight"]].const_value.numpy()
        start, stop = node.rows or (0, packed.shape[0])
        assert np.array_equal(packed[start:stop], inputs.canonical_weight(qmodel.linears[path])), path


@pytest.mark.parametrize("ops, fmt", [("hqq", "3bit"), ("auto", "4bit")])
def test_convert_computes_each_packed_weight_once_while_writing(hqq_source, tmp_path, monkeypatch, ops, fmt):
    """No layer's codes are materialized by the graph build or the lowering: only by the writer, once (a packed
    q/k/v or gate/up node computes each of its layers once)."""
    source = hqq_source("llama", "safetensors", hidden_size=256, intermediate_size=512, **FORMATS[fmt])
    writing = False
    calls: Counter[str] = Counter()
    real_weight, real_write = inputs.canonical_weight, conversion.write_onnx

    def canonical_weight(layer):
        assert writing, f"{layer.name}'s packed codes were computed before the model was written"
        calls[layer.name] += 1
        return real_weight(layer)

    def write_onnx(*args, **kwargs):
        nonlocal writing
        writing = True
        try:
            return real_write(*args, **kwargs)
        finally:
            writing = False

    monkeypatch.setattr(inputs, "canonical_weight", canonical_weight)
    monkeypatch.setattr(conversion, "write_onnx", write_onnx)
    convert(source, tmp_path / "out", ops=ops, progress=False)
    assert calls == Counter(dict.fromkeys(read_source(source).linears, 1))
