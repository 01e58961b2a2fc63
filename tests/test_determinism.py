"""Converting the same source twice gives byte-identical output folders, and the manifest's checksums are true.

One convert runs in this process, the other in a child process with a fixed PYTHONHASHSEED, so an output that
depended on set/dict iteration order of hashed strings, on time, or on the staging folder's random name would
differ. The tiny model carries a LoRA adapter (separate mode), so adapters/NAME.onnx_adapter is compared too.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hqexport.cli import main

REPO = Path(__file__).resolve().parents[1]


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def two_outputs(lora_adapter, tmp_path_factory) -> tuple[Path, Path, Path]:
    source = lora_adapter.parent / "model"
    options = ["--adapter", f"chat={lora_adapter}", "--json"]
    first = tmp_path_factory.mktemp("run1") / "onnx"
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(first), *options])
    assert result.exit_code == 0, result.output
    second = tmp_path_factory.mktemp("run2") / "onnx"
    env = {**os.environ, "PYTHONHASHSEED": "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"}
    child = subprocess.run(
        [sys.executable, "-m", "hqexport.cli", "convert", str(source), "-o", str(second), *options],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return source, first, second


def test_two_converts_are_byte_identical(two_outputs):
    _, first, second = two_outputs
    one, two = files_of(first), files_of(second)
    assert {"model.onnx", "model.onnx.data", "hqexport.json", "adapters/chat.onnx_adapter"} <= set(one)
    assert sorted(one) == sorted(two)
    different = [name for name in one if one[name] != two[name]]
    assert different == [], f"files differ between two converts: {different}"


def test_manifest_checksums_match_inputs_and_outputs(two_outputs):
    source, first, _ = two_outputs
    manifest_text = (first / "hqexport.json").read_text()
    manifest = json.loads(manifest_text)
    written = files_of(first)
    expected_outputs = {name: hashlib.sha256(data).hexdigest() for name, data in written.items() if name != "hqexport.json"}
    assert manifest["outputs"] == expected_outputs
    assert manifest["source"]["path"] == str(source.resolve())
    read = manifest["source"]["files"]
    assert {"config.json", "qmodel.pt"} <= set(read)
    assert read == {name: hashlib.sha256((source / name).read_bytes()).hexdigest() for name in read}
    assert ".partial-" not in manifest_text and str(first) not in manifest_text  # no staging or output paths
