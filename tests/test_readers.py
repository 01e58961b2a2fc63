"""The three readers (hqq pickle, HQQ safetensors single or sharded, live model) give the same QuantizedModel,
and that model is hqq's: every layer dequantizes exactly to what HQQLinear.dequantize() gives."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from hqq.core.quantize import HQQLinear

from hqexport.formats import dequantize_torch
from hqexport.model import QuantizedModel
from hqexport.read import read_hqq_pickle, read_hqq_safetensors, read_live_model, read_source
from tests.conftest import FORMATS, FORMS

CASES = [  # mixed=True puts 4, 3, 2 (axis 0), 8, 1 and 1.58 bits in one model (tests/conftest.py MIXED_CONFIG)
    ("llama", FORMATS["4bit"]),
    ("llama", dict(mixed=True)),
    ("qwen2", dict(mixed=True)),
    ("mistral", dict(**FORMATS["2bit-axis0"], compute_dtype=torch.bfloat16)),
    ("gemma", dict(nbits=1.58, group_size=16, axis=0, compute_dtype=torch.float16)),
    ("llama", dict(nbits=3, group_size=16, axis=0, view_as_float=True)),
]
IDS = [f"{arch}-{'-'.join(f'{k}={v}' for k, v in quant.items())}" for arch, quant in CASES]


def assert_same_model(got: QuantizedModel, want: QuantizedModel) -> None:
    assert list(got.linears) == list(want.linears)
    for name, layer in got.linears.items():
        ref = want.linears[name]
        assert (layer.fmt, layer.shape, layer.compute_dtype) == (ref.fmt, ref.shape, ref.compute_dtype), name
        for attr in ("packed", "scale", "zero"):
            a, b = getattr(layer, attr), getattr(ref, attr)
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (name, attr)
        assert (layer.bias is None) == (ref.bias is None), name
        if layer.bias is not None:
            assert layer.bias.dtype == ref.bias.dtype and torch.equal(layer.bias, ref.bias), name
    assert sorted(got.tensors) == sorted(want.tensors)
    for key, tensor in got.tensors.items():
        assert tensor.dtype == want.tensors[key].dtype and torch.equal(tensor, want.tensors[key]), key
    assert got.skipped_modules == want.skipped_modules
    assert got.architecture == want.architecture


@pytest.mark.parametrize(("arch", "quant"), CASES, ids=IDS)
def test_readers_agree_and_match_hqq(arch, quant, hqq_model, hqq_source):
    model = hqq_model(arch, **quant)
    live = read_live_model(model)
    hqq_layers = {name: module for name, module in model.named_modules() if isinstance(module, HQQLinear)}
    assert set(live.linears) == set(hqq_layers)
    for name, layer in live.linears.items():  # the independent reference: hqq's own dequantization
        assert torch.equal(dequantize_torch(layer), hqq_layers[name].dequantize()), name
        assert layer.fmt.nbits == hqq_layers[name].meta["nbits"]
    expected_tensors = {k for k in model.state_dict() if not any(k.startswith(n + ".") for n in hqq_layers)}
    assert set(live.tensors) == expected_tensors
    for form in FORMS:
        assert_same_model(read_source(hqq_source(arch, form, **quant)), live)


def test_live_config_matches_saved(hqq_model, hqq_source):
    live = read_live_model(hqq_model("llama", **FORMATS["4bit"]))
    for form in ("pickle", "safetensors"):
        saved = read_source(hqq_source("llama", form, **FORMATS["4bit"])).config
        for key in ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size"):
            assert saved[key] == live.config[key], (form, key)


def test_dispatch_kind_and_provenance(hqq_source):
    for form, kind, reader in (
        ("pickle", "hqq-pickle", read_hqq_pickle),
        ("safetensors", "hqq-safetensors", read_hqq_safetensors),
        ("sharded", "hqq-safetensors", read_hqq_safetensors),
    ):
        folder = hqq_source("llama", form, **FORMATS["4bit"])
        model = read_source(folder)
        assert model.provenance.kind == kind
        assert model.provenance.path == folder.resolve() and model.provenance.path.is_absolute()
        on_disk = sorted(os.listdir(folder))
        assert sorted(model.provenance.files) == on_disk  # every file there is read or listed
        for name, digest in model.provenance.files.items():
            assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert [p.name for p in model.tokenizer_files] == ["tokenizer.json", "tokenizer_config.json"]
        assert_same_model(reader(folder), model)


def test_sharded_index_lists_three_files(hqq_source):
    model = read_source(hqq_source("llama", "sharded", **FORMATS["4bit"]))
    shards = [name for name in model.provenance.files if name.endswith(".safetensors")]
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert "model.safetensors.index.json" in model.provenance.files


def test_tied_embeddings_give_lm_head(hqq_model, hqq_source):
    """gemma ties lm_head to the embedding; the safetensors file stores it once, the reader restores the name."""
    quant = dict(nbits=1.58, group_size=16, axis=0, compute_dtype=torch.float16)
    model = read_source(hqq_source("gemma", "safetensors", **quant))
    assert hqq_model("gemma", **quant).config.tie_word_embeddings
    assert torch.equal(model.tensors["lm_head.weight"], model.tensors["model.embed_tokens.weight"])
    assert model.skipped_modules == ["lm_head"]


def test_mixed_formats_and_fp_linears(hqq_source):
    model = read_source(hqq_source("qwen2", "safetensors", mixed=True))
    labels = {name.split(".", 3)[3]: layer.fmt.label for name, layer in model.linears.items()}
    assert labels == {
        "self_attn.q_proj": "4bit g32 axis1",
        "self_attn.k_proj": "3bit g32 axis1",
        "self_attn.v_proj": "2bit g16 axis0",
        "self_attn.o_proj": "8bit g64 axis1",
        "mlp.gate_proj": "1bit g16 axis0",
        "mlp.up_proj": "1.58bit g16 axis1",
    }
    assert model.skipped_modules == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    assert all(model.linears[f"model.layers.{i}.self_attn.q_proj"].bias is not None for i in (0, 1))  # qwen2 biases


def test_peft_wrapped_live_model_reads_as_base(lora_adapter):
    """PEFT's HqqLoraLinear wraps the HQQLinear; the live reader sees the base layers under their plain names."""
    import peft

    from hqexport.read.hqq_pickle import read_hqq_pickle as read_pickle
    from hqexport.sample import build_sample_model

    base_folder = lora_adapter.parent / "model"
    base = read_pickle(base_folder)
    model = build_sample_model("llama", vocab_size=base.config["vocab_size"], seed=1, **FORMATS["4bit"])
    wrapped = peft.PeftModel.from_pretrained(model, str(lora_adapter))
    assert any(type(m).__name__ == "HqqLoraLinear" for m in wrapped.modules())
    assert_same_model(read_live_model(wrapped), base)


def test_nbits_158_stored_as_int_1(hqq_source, tmp_path):
    """Encoders that write int(1.58) == 1 still read as 1.58: the 2-bit packing tells it apart from 1-bit."""
    import shutil

    from safetensors.torch import load_file, save_file

    quant = dict(nbits=1.58, group_size=16, axis=0, compute_dtype=torch.float16)
    folder = shutil.copytree(hqq_source("gemma", "safetensors", **quant), tmp_path / "model")
    state = load_file(folder / "model.safetensors")
    keys = [key for key in state if key.endswith(".nbits")]
    assert {round(state[key].item(), 2) for key in keys} == {1.58}
    state.update({key: torch.tensor(1, dtype=torch.int32) for key in keys})
    save_file(state, folder / "model.safetensors")
    assert_same_model(read_source(folder), read_source(hqq_source("gemma", "pickle", **quant)))
    assert {layer.fmt.nbits for layer in read_source(folder).linears.values()} == {1.58}
