"""convert streams the weights: the exported graph holds none, and each one is computed only when it is written."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from hqexport import convert as convert_module
from hqexport.convert import convert
from hqexport.export import rebuild
from hqexport.export.quant_linear import HQQMatMulLinear
from hqexport.read.live import read_live_model
from hqexport.read.source import read_source
from tests.conftest import FORMATS


def _holds_data(tensor: torch.Tensor) -> bool:
    """False for a meta tensor and for a broadcast placeholder (one element seen through zero strides)."""
    return not tensor.is_meta and tensor.untyped_storage().nbytes() >= tensor.numel() * tensor.element_size()


@pytest.mark.parametrize("tied", [True, False])
def test_deferred_rebuild_holds_no_weights_and_its_loaders_give_the_real_ones(hqq_model, tied):
    qmodel = read_live_model(hqq_model("llama", tie_word_embeddings=tied, **FORMATS["4bit"]))
    deferred, loaders = rebuild.rebuild_deferred(qmodel)
    real = rebuild.rebuild_model(qmodel).state_dict()

    state = deferred.state_dict(keep_vars=True)
    empty = {name for name, tensor in state.items() if not _holds_data(tensor)}
    assert empty == set(loaders)
    packed = {f"{path}.weight_packed" for path, module in deferred.named_modules() if isinstance(module, HQQMatMulLinear)}
    assert packed and packed <= empty
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= empty  # tied: two names, one loader
    large_fp = {name for name, tensor in state.items() if tensor.is_floating_point() and tensor.numel() >= rebuild.DEFER_MIN_ELEMENTS}
    assert large_fp <= empty
    for name, load in loaders.items():
        array = load()
        expected = real[name].numpy()
        assert array.dtype == expected.dtype and np.array_equal(array, expected), name


@pytest.mark.parametrize("ops, fmt", [("hqq", "3bit"), ("auto", "4bit")])
def test_convert_computes_each_packed_weight_once_while_writing(hqq_source, tmp_path, monkeypatch, ops, fmt):
    """No layer's codes are materialized by the export, the optimizer or the lowering: only by the writer, once.

    Layers are wide enough that no packed weight is under the 1024 elements the optimizer hashes to merge duplicates.
    """
    source = hqq_source("llama", "safetensors", hidden_size=256, intermediate_size=512, **FORMATS[fmt])
    writing = False
    calls: Counter[str] = Counter()
    real_weight, real_write = rebuild.canonical_weight, convert_module.write_onnx

    def canonical_weight(layer):  # noqa: ANN001, ANN202
        assert writing, f"{layer.name}'s packed codes were computed before the model was written"
        calls[layer.name] += 1
        return real_weight(layer)

    def write_onnx(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        nonlocal writing
        writing = True
        try:
            return real_write(*args, **kwargs)
        finally:
            writing = False

    monkeypatch.setattr(rebuild, "canonical_weight", canonical_weight)
    monkeypatch.setattr(convert_module, "write_onnx", write_onnx)
    convert(source, tmp_path / "out", ops=ops, progress=False)
    assert calls == Counter(dict.fromkeys(read_source(source).linears, 1))
