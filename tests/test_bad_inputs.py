"""The catalogue of bad inputs (issue 8), each through the real CLI: exit code 2, one error line on stderr that
names the file and the problem, no traceback, no output folder or staging folder left behind, the inputs
byte-identical afterwards. The full catalogue, with the cases tested elsewhere, is in docs/reliability.md.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from hqexport.cli import main
from hqexport.write.folder import MANIFEST_FILE
from tests.conftest import FORMATS, manifest_json

LAYER = "model.layers.0.self_attn.q_proj"
REPO = Path(__file__).resolve().parents[1]


def folder_digest(folder: Path) -> str:
    """Names, symlink targets and bytes of everything under `folder`."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def one_error_line(result) -> str:
    """Exit code 2, no traceback, exactly one `hqexport: error:` line on stderr and it is the last line."""
    print(result.stderr)  # shown by pytest when the test fails
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("hqexport: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def convert_fails(source: Path, out: Path, *options: str, inputs: tuple[Path, ...] = ()) -> str:
    """Run `hqexport convert SOURCE -o OUT OPTIONS`; assert the clean failure, nothing left, inputs untouched."""
    watched = [source, *inputs]
    before = {folder: folder_digest(folder) for folder in watched if folder.is_dir()}
    out_before = folder_digest(out) if out.is_dir() else None
    siblings = set(os.listdir(out.parent)) if out.parent.is_dir() else None
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(out), *options])
    line = one_error_line(result)
    if out_before is None:
        assert not out.exists() or out.is_file(), f"{out} was created"
    else:
        assert folder_digest(out) == out_before, f"{out} was changed"
    if siblings is not None:
        assert set(os.listdir(out.parent)) == siblings, "a staging folder was left next to OUT"
    for folder, digest in before.items():
        assert folder_digest(folder) == digest, f"{folder} was modified"
    return line


@pytest.fixture
def st_copy(hqq_source, tmp_path) -> Path:
    return Path(shutil.copytree(hqq_source("llama", "safetensors", **FORMATS["4bit"]), tmp_path / "src" / "model"))


@pytest.fixture
def pickle_copy(hqq_source, tmp_path) -> Path:
    return Path(shutil.copytree(hqq_source("llama", "pickle", **FORMATS["4bit"]), tmp_path / "src" / "model"))


@pytest.fixture
def out(tmp_path) -> Path:
    (tmp_path / "outs").mkdir()
    return tmp_path / "outs" / "onnx"


# --- safetensors containers that lie ------------------------------------------------------------------------


def rewrite_header(path: Path, edit: Callable[[dict, bytes], tuple[dict, bytes, int | None]]) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8 : 8 + length]), data[8 + length :]
    header, body, prefix = edit(header, body)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if prefix is None else prefix) + text + body)


def _length_beyond_file(header, body):
    return header, body, 1 << 40


def _offsets_beyond_file(header, body):
    start, end = header[f"{LAYER}.W_q"]["data_offsets"]
    header[f"{LAYER}.W_q"]["data_offsets"] = [start, len(body) + 4096]
    return header, body, None


def _offsets_overlap(header, body):
    header[f"{LAYER}.zero"]["data_offsets"] = header[f"{LAYER}.scale"]["data_offsets"]
    return header, body, None


def _dtype_with_a_forged_line(header, body):
    header[f"{LAYER}.W_q"]["dtype"] = "U8\nhqexport: error: forged by the file"
    return header, body, None


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (_length_beyond_file, "not a readable safetensors file"),
        (_offsets_beyond_file, "not a readable safetensors file"),
        (_offsets_overlap, "not a readable safetensors file"),
        (_dtype_with_a_forged_line, "not a readable safetensors file"),  # the quoted newline stays on one line
    ],
    ids=["length-prefix-beyond-file", "offsets-beyond-file", "overlapping-offsets", "newline-in-dtype"],
)
def test_safetensors_header_lies_about_offsets(st_copy, out, edit, problem):
    path = st_copy / "model.safetensors"
    rewrite_header(path, edit)
    line = convert_fails(st_copy, out)
    assert str(path) in line and problem in line


def test_safetensors_header_not_json(st_copy, out):
    path = st_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"{\x00\xff" * 10 + b"}}"
    path.write_bytes(bytes(data))
    line = convert_fails(st_copy, out)
    assert str(path) in line and "not a readable safetensors file" in line


def _relabel(key: str, dtype: str, shape: list[int]):
    def edit(header, body):
        header[f"{LAYER}.{key}"].update(dtype=dtype, shape=shape)
        return header, body, None

    return edit


@pytest.mark.parametrize(
    ("key", "dtype", "shape", "problem"),
    [
        ("scale", "I32", [128, 1], "scale has dtype torch.int32"),  # same byte size: safetensors cannot tell
        ("W_q", "I16", [64, 16], "W_q has dtype torch.int16"),
        ("zero", "F16", [256, 1], "zero must hold 128 values"),
    ],
    ids=["scale-as-int32", "w_q-as-int16", "zero-as-fp16-pairs"],
)
def test_safetensors_header_lies_about_dtypes(st_copy, out, key, dtype, shape, problem):
    path = st_copy / "model.safetensors"
    rewrite_header(path, _relabel(key, dtype, shape))
    line = convert_fails(st_copy, out)
    assert str(path) in line and LAYER in line and problem in line


# --- hqq metadata ------------------------------------------------------------------------------------------


def edit_layer(folder: Path, **changes: torch.Tensor) -> Path:
    path = folder / "model.safetensors"
    state = load_file(path)
    state.update({f"{LAYER}.{key}": value for key, value in changes.items()})
    save_file(state, path)
    return path


def _ascii(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"nbits": torch.tensor(2, dtype=torch.int32)}, "nbits=2 is not stored with packing '4bit_u8'"),
        ({"axis": torch.tensor(2, dtype=torch.int32)}, "axis=2; hqq uses 0 or 1"),
        ({"group_size": torch.tensor(0, dtype=torch.int32)}, "group_size 0 does not divide"),
        ({"shape": torch.tensor([0, 64])}, "both sizes must be positive"),
        ({"compute_dtype": _ascii("torch.int8")}, "compute dtype torch.int8"),
        ({"zero": torch.full((128, 1), float("inf"))}, "zero contains NaN or Inf"),
        ({"bias": torch.zeros(63)}, "bias is torch.float32 [63]; expected a float vector of 64 values"),
        ({"packing": _ascii("4bit_\u00e9")}, "metadata 'packing' is malformed"),
    ],
    ids=["nbits-vs-packing", "axis-2", "group-size-0", "shape-zero", "int-compute-dtype", "inf-in-zero",
         "bias-length", "non-ascii-packing"],
)
def test_hqq_metadata(st_copy, out, changes, problem):
    path = edit_layer(st_copy, **changes)
    line = convert_fails(st_copy, out)
    assert str(path) in line and LAYER in line and problem in line


# --- qmodel.pt: never executed ------------------------------------------------------------------------------


class _System:
    """Unpickling this imports os and calls os.system: the marker file appears only if the pickle runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_imports_and_calls_is_refused_unrun(pickle_copy, out, tmp_path):
    marker = tmp_path / "pwned"
    path = pickle_copy / "qmodel.pt"
    state = torch.load(path, weights_only=True)
    state[LAYER]["W_q"] = _System(marker)
    torch.save(state, path)
    line = convert_fails(pickle_copy, out)
    assert str(path) in line and "refused" in line and "system" in line and "not executed" in line
    assert not marker.exists()


def test_raw_pickle_instead_of_torch_archive_is_refused_unrun(pickle_copy, out, tmp_path):
    marker = tmp_path / "pwned"
    path = pickle_copy / "qmodel.pt"
    path.write_bytes(pickle.dumps(_System(marker)))
    line = convert_fails(pickle_copy, out)
    assert str(path) in line and "not a torch.save zip archive" in line
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (lambda path: path.write_bytes(b""), "not a torch.save zip archive"),
        (lambda path: torch.save([1, 2, 3], path), "not an hqq save_quantized file"),
        (lambda path: torch.save({LAYER: {"W_q": "codes"}}, path), "W_q and bias must be tensors"),
    ],
    ids=["zero-length", "a-list", "string-w_q"],
)
def test_qmodel_pt_content(pickle_copy, out, content, problem):
    path = pickle_copy / "qmodel.pt"
    content(path)
    line = convert_fails(pickle_copy, out)
    assert str(path) in line and problem in line


# --- config.json --------------------------------------------------------------------------------------------


def edit_config(folder: Path, **changes) -> Path:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return path


def test_config_not_an_object(st_copy, out):
    (st_copy / "config.json").write_text("[1, 2]")
    line = convert_fails(st_copy, out)
    assert str(st_copy / "config.json") in line and "must hold a JSON object" in line


def test_unsupported_architecture(st_copy, out):
    path = edit_config(st_copy, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    line = convert_fails(st_copy, out)
    assert str(path) in line and "GPTNeoXForCausalLM" in line and "not supported" in line


def test_remote_code_architecture_is_refused(st_copy, out):
    path = edit_config(st_copy, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (st_copy / "modeling_evil.py").write_text(f"open({str(out.parent / 'pwned')!r}, 'w')\n")
    line = convert_fails(st_copy, out)
    assert str(path) in line and "custom model code" in line and "trust_remote_code" in line
    assert not (out.parent / "pwned").exists()


def test_config_disagrees_with_the_weights(st_copy, out):
    edit_config(st_copy, hidden_size=128)
    line = convert_fails(st_copy, out)
    assert str(st_copy) in line and "model.layers.0" in line and "has shape" in line


def test_config_with_nonsense_values(st_copy, out):
    path = edit_config(st_copy, num_attention_heads="four")
    line = convert_fails(st_copy, out)
    assert str(path) in line and "num_attention_heads" in line


# --- the source folder itself --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_symlink_out_of_the_source(st_copy, out, tmp_path, name):
    outside = tmp_path / f"outside-{name}"
    shutil.move(st_copy / name, outside)
    (st_copy / name).symlink_to(outside)
    line = convert_fails(st_copy, out)
    assert str(st_copy / name) in line and "outside the source folder" in line


def test_source_is_a_file(st_copy, out):
    line = convert_fails(st_copy / "config.json", out)
    assert str(st_copy / "config.json") in line and "is not a folder" in line


# --- adapters (--adapter [NAME=]PATH, --adapters MODE) --------------------------------------------------------


@pytest.fixture
def lora(lora_adapter, tmp_path) -> SimpleNamespace:
    """The fixture adapter's base (read in place) and a writable copy of the adapter."""
    copy = Path(shutil.copytree(lora_adapter, tmp_path / "adapters" / "lora"))
    return SimpleNamespace(base=lora_adapter.parent / "model", adapter=copy)


def edit_adapter(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_adapter_weights(folder: Path, edit: Callable[[dict], None]) -> Path:
    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)
    return path


def _wider_lora_a(state):
    key = next(k for k in state if k.endswith("q_proj.lora_A.weight"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] * 2)


def _missing_module(state):
    key = next(k for k in state if "layers.0.self_attn.q_proj.lora_A" in k)
    state[key.replace("layers.0.", "layers.9.")] = state.pop(key)


def _nan_in_b(state):
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key] = torch.full_like(state[key], float("nan"))


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (_wider_lora_a, "do not fit the base layer"),
        (_missing_module, "unknown target module model.layers.9.self_attn.q_proj"),
        (_nan_in_b, "contains NaN or Inf"),
    ],
    ids=["another-base", "missing-module", "nan-weights"],
)
def test_adapter_weights(lora, out, edit, problem):
    path = edit_adapter_weights(lora.adapter, edit)
    line = convert_fails(lora.base, out, "--adapter", f"chat={lora.adapter}", inputs=(lora.adapter,))
    assert str(path) in line and problem in line


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"peft_type": "IA3"}, "peft_type IA3 is not supported"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"target_modules": "q_proj("}, "target_modules must be a regular expression"),
    ],
    ids=["peft-type", "feature", "bad-regex"],
)
def test_adapter_config(lora, out, changes, problem):
    edit_adapter(lora.adapter, **changes)
    line = convert_fails(lora.base, out, "--adapter", str(lora.adapter), inputs=(lora.adapter,))
    assert str(lora.adapter / "adapter_config.json") in line and problem in line


def test_adapter_pickle_only(lora, out):
    marker = out.parent / "pwned"
    (lora.adapter / "adapter_model.safetensors").unlink()
    (lora.adapter / "adapter_model.bin").write_bytes(pickle.dumps(_System(marker)))
    line = convert_fails(lora.base, out, "--adapter", str(lora.adapter), inputs=(lora.adapter,))
    assert str(lora.adapter) in line and "adapter_model.bin is a pickle" in line
    assert not marker.exists()


def test_two_adapters_with_the_same_name(lora, out, tmp_path):
    other = Path(shutil.copytree(lora.adapter, tmp_path / "other" / "lora"))
    line = convert_fails(lora.base, out, "--adapter", str(lora.adapter), "--adapter", str(other), inputs=(lora.adapter, other))
    assert "adapter name 'lora' is used twice" in line and str(other) in line
    line = convert_fails(lora.base, out, "--adapter", f"a={lora.adapter}", "--adapter", f"a={other}")
    assert "adapter name 'a' is used twice" in line


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "a\\b"])
def test_adapter_name_with_path_parts(lora, out, name):
    line = convert_fails(lora.base, out, "--adapter", f"{name}={lora.adapter}", inputs=(lora.adapter,))
    assert f"adapter name {name!r} is not allowed" in line


def test_adapter_folder_missing(lora, out, tmp_path):
    line = convert_fails(lora.base, out, "--adapter", str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in line and "adapter folder not found" in line


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (("--adapters", "bake"), "needs at least one --adapter"),
        (("--adapters", "merge", "--adapter", "x={a}", "--adapter", "y={a}"), "one model per adapter"),
        (("--adapter-dtype", "fp16"), "--adapter-dtype fp16 sets how --adapter factors are stored; there are none to store"),
        (("--adapter-dtype", "fp16", "--adapter", "x={a}", "--adapters", "merge"), "(--adapters merge folds them into the weights)"),
        (("--adapter-dtype", "fp16", "--adapter", "x={a}", "--ops", "hqq"), "--adapter-dtype fp16 needs the adapters inside the layers' nodes"),
    ],
    ids=["mode-without-adapter", "merge-two", "dtype-without-adapter", "dtype-with-merge", "dtype-without-fused-nodes"],
)
def test_adapter_usage(lora, out, options, problem):
    line = convert_fails(lora.base, out, *(o.format(a=lora.adapter) for o in options))
    assert problem in line


# --- the output folder ---------------------------------------------------------------------------------------


def test_output_parent_is_a_file(st_copy, out):
    blocker = out.parent / "file"
    blocker.write_text("not a folder")
    line = convert_fails(st_copy, blocker / "onnx")
    assert str(blocker / "onnx") in line and "cannot create the output folder" in line


def test_output_on_a_location_that_refuses_folders(st_copy):
    target = Path("/sys/hqexport-test-out")  # sysfs: no one, not even root, creates folders there
    line = convert_fails(st_copy, target)
    assert str(target) in line and "cannot create the output folder" in line


def test_output_is_an_existing_file(st_copy, out):
    out.write_text("mine")
    line = convert_fails(st_copy, out, "--force")
    assert str(out) in line and "exists and is not a folder" in line
    assert out.read_text() == "mine"


def _fake_export(monkeypatch) -> None:
    """Skip building the graph (not under test here): the writer gets an empty graph."""
    monkeypatch.setattr("hqexport.conversion.build_decoder", lambda *args, **kwargs: SimpleNamespace(model=None, layers={}))


def _disk_full_writer(written: list[Path]):
    def write_onnx(model, folder):
        partial = folder / "model.onnx.data"
        partial.write_bytes(b"\0" * 4096)
        written.append(partial)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial))

    return write_onnx


def test_disk_full_while_writing(st_copy, out, monkeypatch):
    written: list[Path] = []
    _fake_export(monkeypatch)
    monkeypatch.setattr("hqexport.conversion.write_onnx", _disk_full_writer(written))
    line = convert_fails(st_copy, out, "--ops", "hqq")
    assert str(out) in line and "No space left on device" in line and "nothing was written" in line
    assert written and not written[0].exists()  # the staging folder went away with its partial file


def test_disk_full_while_replacing_keeps_the_old_output(st_copy, out, monkeypatch):
    out.mkdir()
    (out / MANIFEST_FILE).write_text('{"earlier": "export"}')
    (out / "model.onnx").write_bytes(b"earlier model")
    _fake_export(monkeypatch)
    monkeypatch.setattr("hqexport.conversion.write_onnx", _disk_full_writer([]))
    line = convert_fails(st_copy, out, "--ops", "hqq", "--force")  # also asserts OUT is byte-identical
    assert "No space left on device" in line


def test_interrupt_removes_the_staging_folder(st_copy, out, monkeypatch):
    """Ctrl-C (SIGINT -> KeyboardInterrupt) mid-write: click aborts, the staging folder is gone, no OUT."""

    def interrupted(model, folder):
        (folder / "model.onnx.data").write_bytes(b"\0" * 4096)
        raise KeyboardInterrupt

    _fake_export(monkeypatch)
    monkeypatch.setattr("hqexport.conversion.write_onnx", interrupted)
    result = CliRunner().invoke(main, ["convert", str(st_copy), "-o", str(out), "--ops", "hqq"])
    assert result.exit_code == 1 and "Aborted" in result.stderr and "Traceback" not in result.output
    assert os.listdir(out.parent) == []


#: the real CLI in a child process whose writer stops half-way (the torch export is skipped: not under test)
KILLED_CONVERT = """
import sys, time
from types import SimpleNamespace
import hqexport.conversion as conversion
def write_half_then_hang(model, folder):
    (folder / "model.onnx.data").write_bytes(bytes(1 << 16))
    print("writing", flush=True)
    time.sleep(600)
conversion.build_decoder = lambda *args, **kwargs: SimpleNamespace(model=None, layers={})
conversion.write_onnx = write_half_then_hang
from hqexport.cli import main
main(["convert", sys.argv[1], "-o", sys.argv[2], "--ops", "hqq"])
"""


def _stop_convert_mid_write(source: Path, out: Path, signum: int) -> tuple[int, str, list[Path]]:
    """Run KILLED_CONVERT in a child and send it `signum` while it writes: (exit code, stderr, staging folders then)."""
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CONVERT, str(source), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, text=True,
    )
    try:
        assert child.stdout.readline().strip() == "writing"
        staging = [p for p in out.parent.iterdir() if p.name.startswith(".onnx.partial-")]
    finally:
        child.send_signal(signum)
        _, stderr = child.communicate(timeout=60)
    return child.returncode, stderr, staging


def test_sigkill_mid_write_leaves_no_output_and_the_next_convert_cleans_up(hqq_source, out):
    """SIGKILL cannot be caught: the staging folder stays, OUT never appears; the next convert removes it."""
    source = hqq_source("llama", "pickle", **FORMATS["4bit"])
    _, _, staging = _stop_convert_mid_write(source, out, signal.SIGKILL)
    assert len(staging) == 1 and (staging[0] / "model.onnx.data").is_file()
    assert not out.exists() and staging[0].exists()
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(out), "--ops", "hqq", "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out.parent)) == ["onnx"]
    assert (out / MANIFEST_FILE).is_file()


def test_sigterm_mid_write_removes_the_staging_folder(hqq_source, out):
    """SIGTERM (a CI timeout, `kill`) stops convert like Ctrl-C: exit 143, one line, nothing left behind."""
    source = hqq_source("llama", "pickle", **FORMATS["4bit"])
    code, stderr, staging = _stop_convert_mid_write(source, out, signal.SIGTERM)
    assert len(staging) == 1
    assert code == 128 + signal.SIGTERM
    assert stderr.strip().splitlines()[-1] == "hqexport: stopped by SIGTERM"  # after the progress lines
    assert os.listdir(out.parent) == []


def test_running_convert_keeps_its_staging_folder(out):
    """A staging folder whose convert is alive (its lock held) is not removed by another convert to OUT."""
    from hqexport.write.folder import _lock, remove_stale_staging

    out.parent.joinpath(".onnx.partial-live").mkdir()
    out.parent.joinpath(".onnx.partial-dead").mkdir()
    lock = _lock(out.parent / ".onnx.partial-live")
    try:
        assert remove_stale_staging(out) == [out.parent / ".onnx.partial-dead"]
    finally:
        os.close(lock)
    assert sorted(os.listdir(out.parent)) == [".onnx.partial-live"]


# --- validate on a foreign export -----------------------------------------------------------------------------


def foreign_export(folder: Path, location: str) -> Path:
    """A folder that looks exported: a manifest and a model.onnx whose one initializer lives at `location`."""
    folder.mkdir(parents=True)
    tensor = onnx.TensorProto(name="w", dims=[4], data_type=onnx.TensorProto.FLOAT)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        tensor.external_data.add(key=key, value=value)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["w"], ["y"])], "g", [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])], [tensor],
    )
    (folder / "model.onnx").write_bytes(onnx.helper.make_model(graph).SerializeToString())
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest_json()))
    return folder


def validate_fails(folder: Path) -> str:
    before = folder_digest(folder)
    line = one_error_line(CliRunner().invoke(main, ["validate", str(folder)]))
    assert folder_digest(folder) == before
    return line


def test_validate_refuses_absolute_external_data(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\1" * 16)
    folder = foreign_export(tmp_path / "export", str(secret))
    line = validate_fails(folder)
    assert str(folder / "model.onnx") in line and "outside the model folder" in line


def test_validate_refuses_external_data_through_a_symlink(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\1" * 16)
    folder = foreign_export(tmp_path / "export", "model.onnx.data")
    (folder / "model.onnx.data").symlink_to(secret)
    line = validate_fails(folder)
    assert str(folder / "model.onnx") in line and "outside the model folder" in line


def test_validate_refuses_a_model_that_is_not_onnx(tmp_path):
    folder = foreign_export(tmp_path / "export", "model.onnx.data")
    (folder / "model.onnx").write_bytes(os.urandom(256))
    line = validate_fails(folder)
    assert str(folder / "model.onnx") in line and "cannot be parsed as ONNX" in line
