"""hqexport validate: passes on a converted model, fails naming the right layer or adapter on corrupted exports,
exits 2 on bad input.

The conftest's trained LoRA adapter and its 4-bit llama base are converted once (the adapter as a separate
adapters/chat.onnx_adapter); each corruption works on a copy of that folder. The weight decoder is also checked
on every hqq format with an fp16 compute dtype, through a small graph of HQQMatMul nodes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper, numpy_helper

from hqexport.adapters.onnx_adapter import read_adapter_file, write_adapter_file
from hqexport.cli import main
from hqexport.conversion import convert
from hqexport.errors import HQExportError
from hqexport.formats import unpack_canonical
from hqexport.formats.dequant import tensor_to_numpy
from hqexport.kernels.build import LIBRARY_NAME
from hqexport.lower.lm_head import HEAD_GROUP_SIZE, SHORTLIST
from hqexport.ops import op_inputs
from hqexport.read.live import read_live_model
from hqexport.read.source import read_source
from hqexport.validation import validate
from hqexport.validation.blocks import with_extra_outputs
from hqexport.validation.exported import open_exported
from hqexport.validation.metrics import top1_agreement
from hqexport.validation.onnx_session import OnnxDecoder
from hqexport.validation.reference import load_reference
from hqexport.validation.thresholds import thresholds_for
from hqexport.validation.weights import decode_layers
from tests.conftest import FORMATS, manifest_json

FLIPPED = "model.layers.1.self_attn.q_proj"
SWAPPED = "model.layers.0.mlp.down_proj"  # a node of its own: gate_proj shares its scale and zero with up_proj
ADAPTER = "chat"
QUICK = dict(prompts=["The old man"], tokens=4, progress=None)


@pytest.fixture(scope="module")
def source(lora_adapter) -> Path:
    return lora_adapter.parent / "model"


@pytest.fixture(scope="module")
def exported(source, lora_adapter, tmp_path_factory) -> Path:
    """convert with --ops hqq (every layer an exact hqexport op) and the adapter in separate mode."""
    out = tmp_path_factory.mktemp("validate") / "out"
    convert(source, out, ops="hqq", adapters=[f"{ADAPTER}={lora_adapter}"], progress=False)
    return out


def _copy(exported: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    return out


def _layer_initializer(out: Path, layer: str, role: str) -> tuple[onnx.ModelProto, onnx.TensorProto]:
    name = json.loads((out / "hqexport.json").read_text())["layers"][layer]["initializers"][role]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    return model, next(t for t in model.graph.initializer if t.name == name)


def _checks(report) -> dict:
    return {check.name: check for check in report.checks}


def test_validate_passes_on_converted_model(exported, tmp_path):
    report_file = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["validate", str(exported), "--adapter", "all", "--json", str(report_file)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_file.read_text())
    checks = {check["name"]: check for check in report["checks"]}
    names = ("weights", "per-layer", "logits", "generation", "perplexity", f"adapter:{ADAPTER}")
    assert {name: check["status"] for name, check in checks.items()} == {name: "PASS" for name in names}
    assert checks["weights"]["figures"]["exact"] == checks["weights"]["figures"]["layers"] == 14
    assert checks["per-layer"]["figures"]["located"] == 2
    assert checks["logits"]["figures"]["top1_agreement"] == 1.0
    assert checks["generation"]["figures"]["identical"] == 3 and checks["generation"]["figures"]["tokens"] == 16
    perplexity = checks["perplexity"]
    assert perplexity["figures"]["relative_difference"] <= perplexity["threshold"]["relative_difference"]
    # the adapter really changes the model, and the ONNX adapter follows PEFT far closer than that
    adapter = checks[f"adapter:{ADAPTER}"]["figures"]
    assert adapter["adapter_effect_relative"] > 100 * adapter["relative"]


def test_validate_passes_on_the_default_cli_export(source, lora_adapter, tmp_path):
    """The CLI's defaults: --ops auto (one HQQMatMulNBits node per layer here: hqq's zeros need the correction; the
    packed gate/up node gated, HQQMatMulNBits...SwiGLU) and a separate adapter, inside the target layers' nodes
    (HQQMatMulNBitsLoRA...)."""
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(out), "--adapter", f"{ADAPTER}={lora_adapter}"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "hqexport.json").read_text())
    targets = set(manifest["adapters"][ADAPTER]["targets"])
    ops = {path: entry["op"] for path, entry in manifest["layers"].items()}
    gate_up = {path for path in ops if path.endswith(("mlp.gate_proj", "mlp.up_proj"))}
    assert targets and gate_up
    assert ops == {
        path: "hqexport.HQQMatMulNBits" + ("LoRA" if path in targets else "") + ("SwiGLU" if path in gate_up else "") for path in ops
    }
    assert (out / manifest["adapters"][ADAPTER]["file"]).is_file()
    report_file = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["validate", str(out), "--adapter", "all", "--tokens", "8", "--json", str(report_file)])
    assert result.exit_code == 0, result.output
    checks = {check["name"]: check for check in json.loads(report_file.read_text())["checks"]}
    assert checks["weights"]["figures"]["layers"] == 14 and checks["weights"]["figures"]["exact"] == 0
    assert checks[f"adapter:{ADAPTER}"]["status"] == "PASS"


def test_fp16_adapter_factors_are_recorded_and_judged_as_lossy(source, lora_adapter, tmp_path):
    """--adapter-dtype fp16: the adapter file holds the fp32 export's factors rounded to fp16, the manifest records
    it on the adapter (the base model stays exact), and validate judges that adapter by top-1 agreement."""
    files = {}
    for dtype in ("fp32", "fp16"):
        out = tmp_path / dtype
        result = CliRunner().invoke(main, ["convert", str(source), "-o", str(out), "--adapter", f"{ADAPTER}={lora_adapter}", "--adapter-dtype", dtype])
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / "hqexport.json").read_text())
        entry = manifest["adapters"][ADAPTER]
        assert entry["factor_dtype"] == dtype and entry["factors_rounded"] == (dtype == "fp16") and manifest["model"]["lossy"] == []
        files[dtype] = read_adapter_file(out / entry["file"])
    assert files["fp16"].keys() == files["fp32"].keys()
    rounded = [np.any(files["fp16"][name].astype(np.float32) != files["fp32"][name]) for name in files["fp32"] if files["fp32"][name].size]
    assert any(rounded)  # rounding changed some factors ...
    for name, factors in files["fp32"].items():  # ... and nothing else
        assert files["fp16"][name].dtype == np.float16
        np.testing.assert_array_equal(files["fp16"][name], factors.astype(np.float16))
    report_file = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "fp16"), "--adapter", "all", "--tokens", "8", "--json", str(report_file)])
    assert result.exit_code == 0, result.output
    checks = {check["name"]: check for check in json.loads(report_file.read_text())["checks"]}
    adapter = checks[f"adapter:{ADAPTER}"]
    assert adapter["status"] == "PASS" and adapter["threshold"] == {"top1_agreement": 0.95} and "lossy: fp16 factors" in adapter["message"]
    assert 0 < adapter["figures"]["relative"] < 0.01 * adapter["figures"]["adapter_effect_relative"]  # a rounding, not a new adapter
    assert "relative" in checks["logits"]["threshold"]  # the base model is still held to exactness


def _bfloat16_copy(adapter: Path, folder: Path) -> Path:
    """`adapter` as if trained and saved in bfloat16: its factors rounded to bfloat16 (values below float16's
    normal range set to 0) and stored in that dtype."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, folder)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    half = {name: torch.where(t.abs() < 2.0**-14, 0.0, t).to(torch.bfloat16) for name, t in tensors.items()}
    save_file(half, weights)
    return folder


def test_adapter_factors_that_are_float16_values_are_stored_in_fp16_exactly(source, lora_adapter, tmp_path):
    """--adapter-dtype auto (the default): a bfloat16 adapter's factors (x 2, its scaling) are float16 values, so
    they are stored in fp16, recorded as not rounded, and the export computes exactly what fp32 factors compute:
    validate holds it to exactness and measures the same figures. The trained fp32 adapter keeps fp32 factors."""
    half_adapter = _bfloat16_copy(lora_adapter, tmp_path / "bf16-lora")
    runs = {"auto": (half_adapter, []), "fp32": (half_adapter, ["--adapter-dtype", "fp32"]), "trained": (lora_adapter, [])}
    entries, files, checks = {}, {}, {}
    for run, (adapter, options) in runs.items():
        out = tmp_path / run
        result = CliRunner().invoke(main, ["convert", str(source), "-o", str(out), "--adapter", f"{ADAPTER}={adapter}", *options])
        assert result.exit_code == 0, result.output
        entries[run] = json.loads((out / "hqexport.json").read_text())["adapters"][ADAPTER]
        files[run] = read_adapter_file(out / entries[run]["file"])
        report_file = tmp_path / f"{run}.json"
        result = CliRunner().invoke(main, ["validate", str(out), "--adapter", "all", "--tokens", "8", "--json", str(report_file)])
        assert result.exit_code == 0, result.output
        checks[run] = {check["name"]: check for check in json.loads(report_file.read_text())["checks"]}[f"adapter:{ADAPTER}"]
    assert {run: (entry["factor_dtype"], entry["factors_rounded"]) for run, entry in entries.items()} == {
        "auto": ("fp16", False), "fp32": ("fp32", False), "trained": ("fp32", False)}
    assert files["auto"].keys() == files["fp32"].keys()
    for name, factors in files["fp32"].items():
        assert files["auto"][name].dtype == np.float16
        np.testing.assert_array_equal(files["auto"][name].astype(np.float32), factors)
    assert checks["auto"]["status"] == "PASS" and "lossy" not in checks["auto"]["message"]
    assert "relative" in checks["auto"]["threshold"]  # held to exactness, not to top-1 agreement
    assert checks["auto"]["figures"] == checks["fp32"]["figures"]  # the same logits, bit for bit


def test_accuracy_level_4_is_recorded_and_validate_measures_what_it_costs(source, tmp_path):
    """--accuracy-level 4: every layer's node (HQQMatMulNBits, whose kernel and MatMulNBits body then quantize
    activations) carries the level; the manifest lists it as lossy, the weights still decode within tolerance, and
    validate holds the logits to top-1 agreement instead of exactness."""
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(out), "--accuracy-level", "4"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "hqexport.json").read_text())
    assert {entry["lowering"]["accuracy_level"] for entry in manifest["layers"].values()} == {4}
    assert manifest["model"]["lossy"] == ["accuracy_level 4"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    levels = [onnx.helper.get_attribute_value(a) for n in model.graph.node if n.op_type.startswith(("MatMulNBits", "HQQMatMulNBits"))
              for a in n.attribute if a.name == "accuracy_level"]
    assert levels == [4] * len({entry["node"] for entry in manifest["layers"].values()})  # q/k/v and gate/up share a node
    report = validate(out, **QUICK)
    checks = _checks(report)
    assert checks["weights"].passed
    logits = checks["logits"]  # int8 activations move the logits far past the exact export's tolerance ...
    assert logits.figures["relative"] > 10 * thresholds_for("fp32", "cpu").logits_relative
    assert logits.threshold == {"top1_agreement": 0.95}  # ... so the loss is judged, not exactness
    assert logits.passed == (logits.figures["top1_agreement"] >= 0.95)
    assert checks["generation"].passed is None and "lossy export (accuracy_level 4)" in checks["generation"].message
    assert any("lossy export (accuracy_level 4)" in note for note in report.notes)
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(tmp_path / "hqq"), "--ops", "hqq", "--accuracy-level", "4"])
    assert result.exit_code == 2 and "--ops hqq writes no MatMulNBits node" in result.stderr


@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_int4_is_hqq_quantized_recorded_and_measured(hqq_source, tmp_path, tied):
    """--lm-head int4: the fp head becomes hqq's own 4-bit g64 quantization of it (weights compared with hqq's
    quantizer run here) that draws a shortlist rescored with the fp rows, the manifest calls it lossy, and validate
    judges the logits by top-1 agreement."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    source = hqq_source("llama", "pickle", tie_word_embeddings=tied, **FORMATS["4bit"])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(out), "--lm-head", "int4"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "hqexport.json").read_text())
    qmodel = read_source(source)
    head_entry = {"format": "int4", "lossy": True, "group_size": HEAD_GROUP_SIZE, "op": "hqexport.HQQMatMulNBits", "shortlist": SHORTLIST,
                  "rows": "fp32"}  # random fp32 values: no smaller form holds them
    assert manifest["model"]["lm_head"] == {**head_entry, **({"shared_with_embedding": False} if tied else {})}
    assert manifest["model"]["lossy"] == ["lm_head int4"]
    assert "lm_head" not in manifest["layers"]
    model = onnx.load(str(out / "model.onnx"))
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    head = next(n for n in model.graph.node if n.op_type == "HQQMatMulNBits" and n.input[1].startswith("lm_head"))
    embedding = qmodel.tensors["model.embed_tokens.weight" if tied else "lm_head.weight"].float()
    vocab, hidden = embedding.shape
    linear = torch.nn.Linear(hidden, vocab, bias=False)
    linear.weight.data = embedding.clone()
    expected = HQQLinear(linear, BaseQuantizeConfig(nbits=4, group_size=64, axis=1), compute_dtype=torch.float32, device="cpu")
    blocks = hidden // 64
    codes = unpack_canonical(initializers[head.input[1]].reshape(vocab, -1), hidden, 4).astype(np.float64)
    zero_points = unpack_canonical(initializers[head.input[3]].reshape(vocab, -1), blocks, 4).astype(np.float64)
    weight = (codes.reshape(vocab, blocks, 64) - zero_points[:, :, None]) * initializers[head.input[2]].astype(np.float64).reshape(vocab, blocks, 1)
    weight += initializers["lm_head/HQQMatMul.zero_correction"].astype(np.float64).T[:, :, None]
    reference = expected.dequantize().double().numpy()
    assert np.abs(weight.reshape(vocab, hidden) - reference).max() <= 1e-6 * np.abs(reference).max()
    assert np.abs(reference - embedding.double().numpy()).max() > 1e-3  # really requantized: it is lossy
    # the int4 head draws the shortlist; its SHORTLIST largest logits per position are recomputed from the fp rows,
    # the others stay the int4 head's (both from the head's input, in float64)
    session = OnnxDecoder(out, "cpu", model=with_extra_outputs(onnx.load(str(out / "model.onnx"), load_external_data=False), [head.input[0]], 1))
    step = session.step(np.array([[3, 17, vocab - 1, 5]]), session.empty_cache(1, 2, hidden // 4))
    normed = step.extras[head.input[0]][0].astype(np.float64)
    approximate, exact = normed @ reference.T, normed @ embedding.double().numpy().T
    shortlist = np.argsort(-approximate, axis=-1)[:, :SHORTLIST]
    expected = approximate.copy()
    np.put_along_axis(expected, shortlist, np.take_along_axis(exact, shortlist, axis=-1), axis=-1)
    assert np.abs(step.logits[0] - expected).max() <= 1e-5 * np.abs(expected).max()
    assert np.abs(approximate - exact).max() > 1e-3 * np.abs(exact).max()  # the rescoring changed something
    assert "model.embed_tokens.weight" in initializers  # the fp embedding, which also holds the shortlist's rows when tied
    assert ("lm_head.weight" in initializers) == (not tied)  # else the fp head's, kept for them
    logits = _checks(validate(out, **QUICK))["logits"]
    assert logits.threshold == {"top1_agreement": 0.95} and logits.figures["relative"] > 0


def test_lm_head_int8_with_an_adapter_validates_the_adapter(source, lora_adapter, tmp_path):
    """A quantized head is not a layer of the source: adapters still bind to the source's layers and validate."""
    out = tmp_path / "out"
    args = ["convert", str(source), "-o", str(out), "--adapter", f"chat={lora_adapter}", "--lm-head", "int8", "--accuracy-level", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = validate(out, adapter="chat", **QUICK)
    adapter = _checks(report)["adapter:chat"]
    assert adapter.threshold == {"top1_agreement": 0.95}  # a lossy export: the adapter is judged like the logits
    assert adapter.passed == (adapter.figures["top1_agreement"] >= 0.95) and adapter.figures["adapter_effect_relative"] > 0 and "lm_head" not in json.loads((out / "hqexport.json").read_text())["layers"]


def test_lm_head_choice_for_an_hqq_head_is_refused(source, tmp_path):
    qmodel = read_source(source)
    layer = next(iter(qmodel.linears.values()))
    qmodel.linears["lm_head"] = dataclasses.replace(layer, name="lm_head")  # a source that quantized its head
    with pytest.raises(HQExportError, match="lm_head is HQQ-quantized already"):
        convert(qmodel, tmp_path / "out", lm_head="int4", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_flipped_weight_byte_fails_naming_the_layer(exported, tmp_path):
    out = _copy(exported, tmp_path)
    _, tensor = _layer_initializer(out, FLIPPED, "weight")
    entries = {entry.key: entry.value for entry in tensor.external_data}
    data_file = out / entries["location"]
    data = bytearray(data_file.read_bytes())
    data[int(entries.get("offset", 0))] ^= 0xFF
    data_file.write_bytes(bytes(data))

    result = CliRunner().invoke(main, ["validate", str(out), "--tokens", "4"])
    assert result.exit_code == 1, result.output
    checks = _checks(validate(out, **QUICK))
    assert checks["weights"].figures["differing_layers"] == [FLIPPED]
    assert FLIPPED in checks["weights"].message
    # two changed codes move block 1's output (maybe below the threshold), block 0 stays at float noise
    blocks = checks["per-layer"].figures["blocks"]
    assert blocks[1]["relative"] > 10 * blocks[0]["relative"]


def test_swapped_scale_and_zero_fail_naming_the_layer(exported, tmp_path):
    out = _copy(exported, tmp_path)
    model, scale = _layer_initializer(out, SWAPPED, "scale")
    names = json.loads((out / "hqexport.json").read_text())["layers"][SWAPPED]["initializers"]
    zero = next(t for t in model.graph.initializer if t.name == names["zero"])
    scale.name, zero.name = names["zero"], names["scale"]
    onnx.save(model, str(out / "model.onnx"))

    report = validate(out, **QUICK)
    checks = _checks(report)
    assert not report.passed
    assert checks["weights"].figures["differing_layers"] == [SWAPPED]
    assert SWAPPED in checks["weights"].message
    assert checks["per-layer"].figures["first_divergent_block"] == 0
    assert checks["logits"].passed is False


def test_reference_override_when_source_moved(exported, source, tmp_path):
    out = _copy(exported, tmp_path)
    manifest = json.loads((out / "hqexport.json").read_text())
    manifest["source"]["path"] = str(tmp_path / "gone")
    (out / "hqexport.json").write_text(json.dumps(manifest))
    with pytest.raises(HQExportError, match="no longer exists"):
        validate(out, **QUICK)
    assert validate(out, reference=source, **QUICK).passed


def test_wrong_adapter_scaling_fails_naming_the_adapter(exported, tmp_path):
    out = _copy(exported, tmp_path)
    file = out / "adapters" / f"{ADAPTER}.onnx_adapter"
    params = {name: value.copy() for name, value in read_adapter_file(file).items()}  # copies: the file is mapped
    name = f"{FLIPPED}.lora_B.weight"
    params[name] = params[name] * np.asarray(2, params[name].dtype)
    write_adapter_file(file, params)

    result = CliRunner().invoke(main, ["validate", str(out), "--adapter", ADAPTER, "--tokens", "4"])
    assert result.exit_code == 1, result.output
    checks = _checks(validate(out, adapter=ADAPTER, **QUICK))
    assert [name for name, check in checks.items() if check.passed is False] == [f"adapter:{ADAPTER}"]
    assert f"adapter {ADAPTER}" in checks[f"adapter:{ADAPTER}"].message


def _no_manifest(out: Path) -> list[str]:
    (out / "hqexport.json").unlink()
    return [str(out)]


def _escaping_external_data(out: Path) -> list[str]:
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in tensor.external_data if e.key == "location").value = "../../etc/passwd"
    onnx.save(model, str(out / "model.onnx"))
    return [str(out)]


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda out: [str(out / "missing")], "exported folder not found"),
        (_no_manifest, "hqexport.json"),
        (lambda out: [str(out), "--adapter", "french"], "has no adapter 'french'"),
        (lambda out: [str(out), "--reference", str(out / "nowhere")], "reference source folder not found"),
        (lambda out: [str(out), "--prompts", str(out / "none.txt")], "prompts file not found"),
        (_escaping_external_data, "outside the model folder"),
    ],
    ids=["missing-folder", "no-manifest", "unknown-adapter", "bad-reference", "missing-prompts", "escaping-data"],
)
def test_bad_input_exits_2(exported, tmp_path, make_args, message):
    out = _copy(exported, tmp_path)
    result = CliRunner().invoke(main, ["validate", *make_args(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.parametrize("form", ["pickle", "sharded"])
def test_reference_matches_live_hqq_model(hqq_model, hqq_source, form):
    """The rebuilt reference is the live hqq model: same dequantized weights and (fp32 layers) same logits."""
    live = hqq_model("llama", nbits=4, group_size=32, axis=1)
    reference = load_reference(hqq_source("llama", form, nbits=4, group_size=32, axis=1))
    for name, layer in reference.hqq_layers.items():
        assert torch.equal(layer.dequantize(), live.get_submodule(name).dequantize()), name
    ids = torch.tensor([[1, 7, 42, 99, 3]])
    with torch.inference_mode():
        assert torch.equal(reference.model(input_ids=ids).logits, live(input_ids=ids).logits)
    assert reference.blocks_path == "model.layers" and len(reference.blocks) == 2


def test_top1_mismatch_only_excused_at_a_near_tie():
    ref = np.array([[1.0, 0.99, 0.0], [2.0, 0.0, 0.5]])
    got = np.array([[0.99, 1.0, 0.0], [0.0, 2.0, 0.5]])
    result = top1_agreement(ref, got, tie_tolerance=0.05)
    assert (result.agree, result.total, result.decisive_mismatches) == (0, 2, 1)


def test_weight_decoder_is_exact_for_every_format_in_fp16(hqq_model, tmp_path):
    """HQQMatMul initializers of 4/3/2/8/1/1.58-bit layers, axis 0 and 1, fp16 compute: decoded == hqq's dequantize()."""
    live = hqq_model("llama", mixed=True, compute_dtype=torch.float16)
    layers = read_live_model(live).linears
    nodes, initializers, manifest_layers = [], [], {}
    for name, layer in layers.items():
        tensors, attrs = op_inputs(layer, np.float32)
        names = {role: f"{name}.{role}" for role in ("weight", "scale", "zero")}
        initializers += [numpy_helper.from_array(tensors[role], names[role]) for role in names]
        node = f"{name}/HQQMatMul"
        nodes.append(helper.make_node("HQQMatMul", ["x", *names.values()], [f"{name}.y"], node, domain="hqexport", **attrs))
        manifest_layers[name] = {"shape": list(layer.shape), "group_size": layer.fmt.group_size, "axis": layer.fmt.axis,
                                 "op": "hqexport.HQQMatMul", "node": node, "initializers": names}
    graph = helper.make_graph(nodes, "layers", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(f"{name}.y", onnx.TensorProto.FLOAT, None) for name in layers],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("hqexport", 1)])
    onnx.save(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    (tmp_path / "hqexport.json").write_text(json.dumps(manifest_json(manifest_layers)))

    decoded = decode_layers(open_exported(tmp_path))
    assert {layer.fmt.nbits for layer in layers.values()} == {4, 3, 2, 8, 1, 1.58}
    for name in layers:
        expected = tensor_to_numpy(live.get_submodule(name).dequantize())
        assert decoded[name].exact and decoded[name].weight.dtype == expected.dtype == np.float16, name
        assert np.array_equal(decoded[name].weight, expected), name


def test_merged_adapter_reports_what_survived_and_validates(source, lora_adapter, tmp_path):
    """--adapters merge: convert reports on screen and in the manifest how much of the adapter's delta survived
    re-quantization, and the merged export matches PEFT's own merge_and_unload()."""
    out = tmp_path / "merged"
    args = ["convert", str(source), "-o", str(out), "--adapter", f"{ADAPTER}={lora_adapter}", "--adapters", "merge"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    entry = json.loads((out / "hqexport.json").read_text())["adapters"][ADAPTER]
    assert entry["mode"] == "merge" and 0.0 < entry["retained"] <= 1.05
    assert f"{entry['retained']:.1%} of its weight delta survived re-quantization" in result.stderr
    assert not (out / "adapters").exists()
    report = validate(out, adapter="all", **QUICK)
    assert report.passed, [(c.name, c.message) for c in report.checks if not c.passed]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_default_export_of_a_half_compute_source_validates_exactly(hqq_source, tmp_path, dtype, library):
    """hqq rounds each weight of a float16 / bfloat16 layer to that dtype; the default export's nodes carry the dtype
    (compute_dtype) and their kernels round alike, so validate's fp32 thresholds hold."""
    source = hqq_source("llama", "pickle", compute_dtype=dtype, **FORMATS["4bit"])
    out = tmp_path / "out"
    convert(source, out, progress=False)
    nodes = [n for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node if n.op_type.startswith("HQQMatMulNBits")]
    expected = onnx.TensorProto.FLOAT16 if dtype == torch.float16 else onnx.TensorProto.BFLOAT16
    assert nodes and all(helper.get_node_attr_value(n, "compute_dtype") == expected for n in nodes)
    report = validate(out, **QUICK)
    assert report.passed, [(c.name, c.message) for c in report.checks if not c.passed]


@pytest.mark.parametrize(("dtype", "lossy"), [(torch.float16, ["accuracy_level 1"]), (torch.float32, [])])
def test_accuracy_level_1_is_lossy_only_for_half_compute_layers(hqq_source, tmp_path, dtype, lossy, library):
    """Level 1 drops hqq's rounding of each weight to a float16 / bfloat16 compute dtype: the manifest lists it, and
    validate judges the export as lossy, only for a model with such layers (for float32 ones it is level 0)."""
    out = tmp_path / "out"
    convert(hqq_source("llama", "pickle", compute_dtype=dtype, **FORMATS["4bit"]), out, progress=False, accuracy_level=1)
    assert json.loads((out / "hqexport.json").read_text())["model"]["lossy"] == lossy
    report = validate(out, **QUICK)
    assert report.passed, [(c.name, c.message) for c in report.checks if not c.passed]
    assert any("lossy export (accuracy_level 1)" in note for note in report.notes) == bool(lossy)


@pytest.mark.parametrize("options", [{"ops": "ort"}, {"with_kernels": False}])
@pytest.mark.parametrize(("dtype", "lossy"), [(torch.float16, ["MatMulNBits weights in fp32 for float16 / bfloat16 layers"]), (torch.float32, [])])
def test_matmulnbits_arithmetic_is_lossy_only_for_half_compute_sources(hqq_source, tmp_path, dtype, lossy, options, library):
    """Stock MatMulNBits (--ops ort), and the HQQMatMulNBits function body that a folder without the kernels runs,
    cannot round a float16 layer's weights as hqq does: the manifest lists that as lossy, and validate (which runs
    the folder as shipped, here without the library although it is built) measures it instead of requiring hqq's
    result; for a float32 source it is HQQ's layer."""
    out = tmp_path / "out"
    convert(hqq_source("llama", "pickle", compute_dtype=dtype, **FORMATS["4bit"]), out, progress=False, **options)
    assert json.loads((out / "hqexport.json").read_text())["model"]["lossy"] == lossy
    report = validate(out, **QUICK)
    assert report.passed, [(c.name, c.message) for c in report.checks if not c.passed]
    assert any("lossy export (MatMulNBits weights in fp32" in note for note in report.notes) == bool(lossy)
    if "with_kernels" in options:
        assert "hqexport ops ran as their ONNX function body" in report.notes


def test_validate_runs_the_kernels_the_folder_ships(source, tmp_path, library):
    """validate registers the library in the folder (what its users run), not the one built on this machine."""
    out = tmp_path / "out"
    convert(source, out, progress=False)
    report = validate(out, **QUICK)
    assert f"hqexport ops ran on the compiled kernels {out / LIBRARY_NAME}" in report.notes
    elsewhere = tmp_path / "elsewhere"  # a new path: the process keeps the library it loaded from `out`
    shutil.copytree(out, elsewhere)
    (elsewhere / LIBRARY_NAME).write_bytes(b"not a library")  # as one built for another platform
    with pytest.raises(HQExportError, match="kernels library does not load on this machine"):
        validate(elsewhere, **QUICK)
