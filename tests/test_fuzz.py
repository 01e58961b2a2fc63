"""Property-based fuzzing of what hqexport reads from untrusted folders (issue 8).

Property: a mutated input is either read with consistent results or refused with an HQExportError; never any
other exception (a crash would be a traceback in the CLI). Targets:
- the HQQ safetensors reader (`read_source`): byte-level damage, lies in the safetensors header (dtype, shape,
  offsets, length prefix) and hostile values in the hqq metadata tensors of a valid one-layer model;
- the adapter reader (`load_adapter`): random adapter_config.json objects next to valid LoRA weights, and
  `--adapter [NAME=]PATH` arguments.

Bounded for CI (HQEXPORT_FUZZ_EXAMPLES, default 200 per test); a longer run is in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from hqexport.adapters.arguments import parse_adapter_argument
from hqexport.adapters.loading import load_adapter
from hqexport.errors import HQExportError
from hqexport.formats import STORAGE_BITS
from hqexport.formats.codes import unpack_codes
from hqexport.read.source import read_source
from hqexport.sample import build_sample_model

EXAMPLES = int(os.environ.get("HQEXPORT_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 200,  # CI: the same examples every run; longer runs explore
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
LAYER = "model.layers.0.self_attn.q_proj"
SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "F8_E4M3", "Q4", ""]
META_KEYS = [
    "W_q", "scale", "zero", "shape", "nbits", "group_size", "axis", "packing", "compute_dtype",
    "unpack_view_dtype", "view_as_float", "quant_scale", "quant_zero", "bias",
]
TEXTS = ["4bit_u8", "3bit_32", "2bit_u8", "1bit_u8", "8bit_u8", "torch.float16", "torch.float32", "torch.uint8",
         "torch.int32", "torch.bfloat16", "__import__('os')", "", "\u00e9"]


class _Valid(tuple):
    def __repr__(self) -> str:  # hypothesis prints fixture arguments with a failing example
        return f"<valid one-layer model in {self[0]}>"


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> tuple[Path, bytes]:
    """A one-layer HQQ safetensors folder (4-bit g16; config + model.safetensors) and the file's bytes."""
    model = build_sample_model(
        "llama", vocab_size=64, nbits=4, group_size=16, axis=1, num_hidden_layers=1, hidden_size=32,
        intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
    )
    folder = tmp_path_factory.mktemp("fuzz-st")
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    config = {**model.config.to_dict(), "quantization_config": {"quant_method": "hqq"}}
    (folder / "config.json").write_text(json.dumps(config, default=str))
    return _Valid((folder, (folder / "model.safetensors").read_bytes()))


def check_read(folder: Path) -> None:
    """The property: read_source gives a consistent model or an HQExportError, nothing else."""
    try:
        model = read_source(folder)
    except HQExportError as error:
        assert str(error).strip() and "\n" not in str(error)
        return
    for name, layer in model.linears.items():
        codes = unpack_codes(layer.packed.numpy(), layer.out_features, layer.in_features, layer.fmt)
        assert codes.shape == (layer.out_features, layer.in_features), name
        assert int(codes.max(initial=0)) < 2 ** STORAGE_BITS[layer.fmt.nbits], name
        groups = layer.out_features * layer.in_features // layer.fmt.group_size
        for tensor in (layer.scale, layer.zero):
            assert tensor.is_floating_point() and tensor.numel() == groups, name
            assert torch.isfinite(tensor.float()).all(), name
        assert layer.bias is None or tuple(layer.bias.shape) == (layer.out_features,), name


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_safetensors(header: dict, body: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


def written(folder: Path, data: bytes) -> Path:
    """A fresh source folder: the valid config.json and `data` as model.safetensors."""
    case = Path(tempfile.mkdtemp(dir=folder.parent))
    (case / "config.json").write_bytes((folder / "config.json").read_bytes())
    (case / "model.safetensors").write_bytes(data)
    return case


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**66), 2**66), st.floats(), st.text(max_size=8))

header_edit = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(SAFETENSORS_DTYPES)),
    st.tuples(st.just("shape"), st.lists(st.integers(-3, 1 << 40), max_size=4)),
    st.tuples(st.just("data_offsets"), st.lists(st.integers(-3, 1 << 20), max_size=3)),
    st.tuples(st.sampled_from(["dtype", "shape", "data_offsets"]), json_scalars),
    st.tuples(st.just("delete"), st.sampled_from(["dtype", "shape", "data_offsets"])),
)


@FUZZ
@given(data=st.data())
def test_safetensors_header_lies(valid_file, data):
    folder, original = valid_file
    header, body = split_safetensors(original)
    keys = sorted(k for k in header if k != "__metadata__")
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        key = data.draw(st.sampled_from(keys), label="tensor")
        field, value = data.draw(header_edit, label="edit")
        if field == "delete":
            header[key].pop(value, None)
        else:
            header[key][field] = value
    lie_about_length = data.draw(st.integers(0, 7), label="lie about the header length") == 0
    length = data.draw(st.integers(0, 2**64 - 1), label="length prefix") if lie_about_length else None
    check_read(written(folder, join_safetensors(header, body, length)))


@FUZZ
@given(
    cut=st.integers(0, 1 << 20),
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), max_size=6),
    tail=st.binary(max_size=64),
)
def test_safetensors_byte_damage(valid_file, cut, flips, tail):
    folder, original = valid_file
    damaged = bytearray(original[: cut % (len(original) + 1)] if cut % 3 == 0 else original)
    for position, mask in flips:
        if damaged:
            damaged[position % len(damaged)] ^= mask
    check_read(written(folder, bytes(damaged) + tail))


def _ascii(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


@st.composite
def hostile_tensor(draw) -> torch.Tensor:
    """A value for one hqq metadata key: plausible strings, numbers (NaN, Inf, huge), odd dtypes and shapes."""
    kind = draw(st.sampled_from(["text", "number", "array"]))
    if kind == "text":
        return _ascii(draw(st.one_of(st.sampled_from(TEXTS), st.text(max_size=12))))
    dtype = draw(st.sampled_from([torch.uint8, torch.int32, torch.int64, torch.float32, torch.float16, torch.bool]))
    if kind == "number":
        value = draw(st.one_of(st.sampled_from([0, 1, 1.58, 2, 3, 4, 8, 16, 32, 64, -1]), st.floats(allow_nan=True)))
        shape: list[int] = []
    else:
        shape = draw(st.lists(st.sampled_from([0, 1, 2, 16, 32, 64]) | st.integers(0, 70), min_size=1, max_size=2))
        value = draw(st.sampled_from([0.0, 1.0, 7.0, float("nan"), float("inf"), 300.0, -4.0]))
    array = np.full(shape, value, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return torch.from_numpy(array).to(dtype)


@FUZZ
@given(data=st.data())
def test_hqq_metadata_values(valid_file, data):
    folder, _ = valid_file
    state = load_file(folder / "model.safetensors")
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        key = data.draw(st.sampled_from(META_KEYS), label="key")
        if data.draw(st.booleans(), label="delete") and key != "W_q":
            state.pop(f"{LAYER}.{key}", None)
        else:
            state[f"{LAYER}.{key}"] = data.draw(hostile_tensor(), label=key)
    case = Path(tempfile.mkdtemp(dir=folder.parent))
    save_file(state, str(case / "model.safetensors"))
    (case / "config.json").write_bytes((folder / "config.json").read_bytes())
    check_read(case)


BASE_LAYERS = {"model.layers.0.self_attn.q_proj": (8, 6), "model.layers.0.self_attn.v_proj": (4, 6)}
CONFIG_KEYS = [
    "peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "bias", "init_lora_weights", "fan_in_fan_out",
    "modules_to_save", "lora_dropout", "task_type", "base_model_name_or_path",
]
MODULE_NAMES = ["q_proj", "v_proj", "k_proj", "self_attn.q_proj", "model.layers.0.self_attn.v_proj", "layers", "0"]
json_values = st.recursive(
    json_scalars | st.sampled_from(MODULE_NAMES + [".*q_proj", "(", "all-linear", "LORA", "none", 2, 4, 0.5]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(MODULE_NAMES) | st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def adapter_weights(tmp_path_factory) -> Path:
    """adapter_model.safetensors with rank-2 factors for the two BASE_LAYERS."""
    folder = tmp_path_factory.mktemp("fuzz-adapter")
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (out_features, in_features) in BASE_LAYERS.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(2, in_features, generator=generator)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, 2, generator=generator)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder / "adapter_model.safetensors"


@FUZZ
@given(
    config=st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(max_size=5), json_values, max_size=4),
    base=st.fixed_dictionaries({"r": st.just(2), "lora_alpha": st.just(4), "target_modules": st.just(["q_proj", "v_proj"])}),
    keep_base=st.integers(0, 3).map(bool),
)
def test_adapter_config(adapter_weights, config, base, keep_base):
    folder = Path(tempfile.mkdtemp(dir=adapter_weights.parent.parent))
    (folder / "adapter_model.safetensors").symlink_to(adapter_weights)
    (folder / "adapter_config.json").write_text(json.dumps({**base, **config} if keep_base else config))
    try:
        spec = load_adapter(folder, "fuzz", BASE_LAYERS)
    except HQExportError as error:
        assert str(error).strip() and "\n" not in str(error)
        return
    for module, weights in spec.modules.items():
        out_features, in_features = BASE_LAYERS[module]
        assert weights.rank > 0 and np.isfinite(weights.scaling) and weights.scaling > 0
        assert tuple(weights.delta().shape) == (out_features, in_features)


@FUZZ
@given(argument=st.text(max_size=20) | st.sampled_from(["../x=p", "a/b=p", "..=p", "ok=", "=p", ".hidden=p", "a\\b=p"]))
def test_adapter_argument(argument):
    try:
        name, path = parse_adapter_argument(argument)
    except HQExportError:
        return
    if name is not None:  # an accepted name is one plain file name inside adapters/
        assert Path(name).name == name and ".." not in name and not name.startswith(".") and "\\" not in name
        assert str(path)
