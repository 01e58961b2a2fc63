"""Bad input through the CLI: exit code 2 and one line on stderr naming the file and the problem."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from hqexport.cli import main
from tests.conftest import FORMATS

LAYER = "model.layers.0.self_attn.q_proj"


def inspect_fails(path: Path) -> str:
    """Run `hqexport inspect PATH`; assert a clean exit 2 and return the one stderr line."""
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    print(result.stderr)  # shown by pytest on failure, and with -s
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hqexport: error: ")
    return lines[0]


@pytest.fixture
def st_copy(hqq_source, tmp_path) -> Path:
    """A writable copy of a 4-bit llama HQQ safetensors folder."""
    return Path(shutil.copytree(hqq_source("llama", "safetensors", **FORMATS["4bit"]), tmp_path / "model"))


@pytest.fixture
def pickle_copy(hqq_source, tmp_path) -> Path:
    return Path(shutil.copytree(hqq_source("llama", "pickle", **FORMATS["4bit"]), tmp_path / "model"))


def edit_safetensors(folder: Path, **changes: torch.Tensor | None) -> Path:
    """Rewrite model.safetensors with `LAYER.<key>` replaced (None deletes the key)."""
    path = folder / "model.safetensors"
    state = load_file(path)
    for key, value in changes.items():
        if value is None:
            del state[f"{LAYER}.{key}"]
        else:
            state[f"{LAYER}.{key}"] = value
    save_file(state, path)
    return path


def ascii_tensor(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def test_missing_folder(tmp_path):
    line = inspect_fails(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in line and "no such folder" in line


def test_folder_without_config(tmp_path):
    line = inspect_fails(tmp_path)
    assert str(tmp_path) in line and "no config.json" in line


def test_adapter_folder_given_as_source(lora_adapter):
    line = inspect_fails(lora_adapter)
    assert "no config.json" in line and "PEFT adapter" in line


def test_folder_without_hqq_weights(st_copy):
    os.remove(st_copy / "model.safetensors")
    line = inspect_fails(st_copy)
    assert str(st_copy) in line and "no HQQ weights" in line


def test_safetensors_without_w_q(st_copy):
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, st_copy / "model.safetensors")
    line = inspect_fails(st_copy)
    assert "no HQQ weights" in line and "no .W_q keys" in line


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_damaged_safetensors(st_copy, damage):
    path = st_copy / "model.safetensors"
    data = path.read_bytes()
    new = {"truncated": data[: len(data) // 2], "empty": b"", "random": os.urandom(4096)}[damage]
    path.write_bytes(new)
    line = inspect_fails(st_copy)
    assert str(path) in line and "not a readable safetensors file" in line


def test_missing_shard(hqq_source, tmp_path):
    folder = Path(shutil.copytree(hqq_source("llama", "sharded", **FORMATS["4bit"]), tmp_path / "model"))
    os.remove(folder / "model-00002-of-00003.safetensors")
    line = inspect_fails(folder)
    assert "model.safetensors.index.json" in line and "model-00002-of-00003.safetensors" in line


def test_unknown_packing(st_copy):
    path = edit_safetensors(st_copy, packing=ascii_tensor("5bit_u8"))
    line = inspect_fails(st_copy)
    assert str(path) in line and LAYER in line and "unknown packing '5bit_u8'" in line


def test_unknown_dtype_string_is_not_evaluated(st_copy):
    path = edit_safetensors(st_copy, compute_dtype=ascii_tensor("__import__('os').getcwd()"))
    line = inspect_fails(st_copy)
    assert str(path) in line and "compute_dtype" in line and "unknown dtype" in line


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("shape", torch.tensor([64, 96]), "W_q shape [64, 32] does not match shape [64, 96]"),
        ("group_size", torch.tensor(16, dtype=torch.int32), "W_q shape [64, 32] does not match"),
        ("group_size", torch.tensor(48, dtype=torch.int32), "group_size 48 does not divide"),
        ("W_q", torch.zeros(64, 30, dtype=torch.uint8), "W_q shape [64, 30] does not match"),
        ("scale", torch.ones(100, 1), "scale must hold 128 values"),
    ],
    ids=["shape", "group-rows", "group-divide", "w_q", "scale-count"],
)
def test_inconsistent_shapes(st_copy, key, value, problem):
    path = edit_safetensors(st_copy, **{key: value})
    line = inspect_fails(st_copy)
    assert str(path) in line and LAYER in line and problem in line


@pytest.mark.parametrize("nbits", [7, 16, 0])
def test_nbits_outside_hqq(st_copy, nbits):
    edit_safetensors(st_copy, nbits=torch.tensor(nbits, dtype=torch.int32))
    line = inspect_fails(st_copy)
    assert "model.safetensors" in line and f"nbits={nbits}" in line


def test_nan_in_scale(st_copy):
    scale = load_file(st_copy / "model.safetensors")[f"{LAYER}.scale"].clone()
    scale[3, 0] = float("nan")
    edit_safetensors(st_copy, scale=scale)
    line = inspect_fails(st_copy)
    assert "model.safetensors" in line and "scale contains NaN or Inf" in line


def test_missing_metadata(st_copy):
    edit_safetensors(st_copy, axis=None)
    line = inspect_fails(st_copy)
    assert LAYER in line and "lacks hqq metadata axis" in line


def test_legacy_quant_scale_refused_by_name(pickle_copy):
    path = pickle_copy / "qmodel.pt"
    state = torch.load(path, weights_only=True)
    state[LAYER]["quant_scale"] = True
    torch.save(state, path)
    line = inspect_fails(pickle_copy)
    assert str(path) in line and "quant_scale/quant_zero" in line


class _Payload:
    """Unpickling this calls open(marker, "w"): a file appears only if the pickle is executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_payload_is_refused_not_run(pickle_copy, tmp_path):
    marker = tmp_path / "pwned"
    path = pickle_copy / "qmodel.pt"
    state = torch.load(path, weights_only=True)
    state["model.norm"]["weight"] = _Payload(marker)
    torch.save(state, path)
    line = inspect_fails(pickle_copy)
    assert str(path) in line and "refused" in line
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_damaged_pickle(pickle_copy, damage):
    path = pickle_copy / "qmodel.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    line = inspect_fails(pickle_copy)
    assert str(path) in line and "torch" in line


def test_untied_model_without_lm_head(st_copy):
    config = json.loads((st_copy / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    state = load_file(st_copy / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, st_copy / "model.safetensors")
    line = inspect_fails(st_copy)
    assert "model.safetensors" in line and "no lm_head" in line


def test_symlink_out_of_the_source_is_refused(st_copy, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.move(st_copy / "tokenizer.json", outside)
    (st_copy / "tokenizer.json").symlink_to(outside)
    line = inspect_fails(st_copy)
    assert str(st_copy / "tokenizer.json") in line and "outside the source folder" in line


def test_bad_config_json(st_copy):
    (st_copy / "config.json").write_text("{not json")
    line = inspect_fails(st_copy)
    assert str(st_copy / "config.json") in line and "not valid JSON" in line
