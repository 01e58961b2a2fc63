"""hqexport.json as typed values: the file round-trips through Manifest, and a damaged one is one clear error."""

from __future__ import annotations

import json

import click
import pytest

from hqexport import options
from hqexport.cli import main
from hqexport.conversion import convert
from hqexport.errors import HQExportError
from hqexport.export.config import DTYPES
from hqexport.lower import LOWERINGS
from hqexport.manifest import Manifest, read_manifest
from hqexport.validation.onnx_session import ORT_PROVIDERS
from tests.conftest import FORMATS, manifest_json


@pytest.fixture(scope="module")
def exported(hqq_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("manifest") / "out"
    convert(hqq_source("qwen2", "pickle", **FORMATS["4bit"]), out, ops="auto", progress=False)
    return out


def test_an_export_reads_back_to_the_same_file(exported):
    text = (exported / "hqexport.json").read_text()
    manifest = read_manifest(exported)
    assert json.dumps(manifest.to_json(), indent=2) == text
    packed = manifest.layers["model.layers.0.self_attn.k_proj"]  # qwen2's q/k/v share one node, k in the middle
    assert packed.rows is not None and 0 < packed.rows[0] < packed.rows[1] == packed.rows[0] + packed.shape[0]
    assert manifest.model.dtype == "fp32" and manifest.source.kind and manifest.layers


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: m["model"].pop("dtype"), "model has no dtype"),
        (lambda m: m.update(format_version=2), "format_version 2"),
        (lambda m: m["layers"]["a"].pop("node"), "layers.a has no node"),
        (lambda m: m["layers"]["a"].update(shape=[1, 2, 3]), "layers.a.shape is not a pair"),
        (lambda m: m.update(layers=[]), "layers is not a JSON object"),
        (lambda m: m["source"].update(sha="x"), "source has unknown keys sha"),
    ],
    ids=["missing-key", "newer-format", "layer-without-node", "bad-shape", "layers-not-an-object", "unknown-key"],
)
def test_a_damaged_manifest_is_one_error_naming_the_file(tmp_path, damage, message):
    data = manifest_json({"a": {"shape": [4, 4], "op": "hqexport.HQQMatMul", "node": "n"}})
    assert Manifest.from_json(json.loads(json.dumps(data))).layers["a"].shape == (4, 4)  # intact, it parses
    damage(data)
    (tmp_path / "hqexport.json").write_text(json.dumps(data))
    with pytest.raises(HQExportError, match=message) as error:
        read_manifest(tmp_path)
    assert str(tmp_path / "hqexport.json") in str(error.value) and "\n" not in str(error.value)


def test_every_choice_has_one_source():
    """The CLI's choices, the API's checks and the registries name the same options."""
    assert tuple(LOWERINGS) == options.OPS and tuple(DTYPES) == options.DTYPES and tuple(ORT_PROVIDERS) == options.PROVIDERS
    convert_params = {param.name: param for param in main.commands["convert"].params}
    choices = {name: tuple(convert_params[name].type.choices) for name in ("ops", "dtype", "lm_head", "adapter_mode")}
    assert choices == {"ops": options.OPS, "dtype": options.DTYPES, "lm_head": options.LM_HEADS, "adapter_mode": options.ADAPTER_MODES}
    assert isinstance(convert_params["accuracy_level"].type, click.Choice)
    assert tuple(map(int, convert_params["accuracy_level"].type.choices)) == options.ACCURACY_LEVELS
