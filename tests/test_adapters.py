"""LoRA adapters against real PEFT wrapping real hqq layers: parsing, scaling, DoRA, merge, graph branches, files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from hqq.core.quantize import HQQLinear
from onnx import helper, numpy_helper
from peft import LoraConfig, PeftModel, get_peft_model

from hqexport.adapters.apply import apply_adapters
from hqexport.adapters.arguments import parse_adapter_argument
from hqexport.adapters.loading import load_adapter, load_adapters
from hqexport.adapters.merge import merge_adapter
from hqexport.adapters.onnx_adapter import check_adapter_fits, check_no_overlap, read_adapter_file
from hqexport.adapters.runtime import ExportedAdapters
from hqexport.errors import HQExportError
from hqexport.export.graph import LayerNode
from hqexport.formats.dequant import dequantize_torch
from hqexport.read.live import read_live_model
from hqexport.read.meta import layer_from_meta

ADAPTERS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["o_proj", "down_proj"]),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=r".*\.(q_proj|k_proj|up_proj)",
        rank_pattern={"q_proj": 2, "layers.1.mlp.up_proj": 6},
        alpha_pattern={"k_proj": 3},
    ),
    "layers": dict(r=2, lora_alpha=4, target_modules=["gate_proj", "q_proj"], layers_to_transform=[1]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"]),
}


def _make_adapter(base_model: torch.nn.Module, name: str, folder: Path, b_scale: float = 1.0) -> PeftModel:
    torch.manual_seed(sorted(ADAPTERS).index(name))
    peft_model = get_peft_model(copy.deepcopy(base_model), LoraConfig(init_lora_weights=False, **ADAPTERS[name]))
    with torch.no_grad():
        for module_name, param in peft_model.named_parameters():
            if "lora_B" in module_name:
                param.mul_(b_scale)
            if "lora_magnitude_vector" in module_name:  # move m away from ||W + ΔW|| so the factor matters
                param.mul_(1 + 0.2 * torch.rand_like(param))
    peft_model.save_pretrained(folder / name)
    return peft_model.eval()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def base_model(hqq_model) -> torch.nn.Module:
    """The shared tiny 4-bit llama (conftest); always deep-copied before PEFT wraps it."""
    return hqq_model("llama")


@pytest.fixture(scope="module")
def base(base_model):
    """The base model read as hqexport sees it, and its HQQ layer shapes."""
    model = read_live_model(base_model)
    return model, {name: layer.shape for name, layer in model.linears.items()}


@pytest.fixture(scope="module")
def peft_models(base_model, workdir) -> dict[str, PeftModel]:
    return {name: _make_adapter(base_model, name, workdir) for name in ADAPTERS}


def _peft_layers(peft_model: PeftModel) -> dict[str, torch.nn.Module]:
    prefix = "base_model.model."
    return {
        name[len(prefix) :]: module
        for name, module in peft_model.named_modules()
        if type(module).__name__ == "HqqLoraLinear"
    }


# --- parsing and scaling against PEFT ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_targets_scaling_and_delta_match_peft(name, peft_models, workdir, base):
    spec = load_adapter(workdir / name, name, base[1])
    layers = _peft_layers(peft_models[name])
    assert set(spec.modules) == set(layers)
    for module, weights in spec.modules.items():
        assert weights.scaling == layers[module].scaling["default"]
        assert weights.rank == layers[module].r["default"]
        torch.testing.assert_close(weights.delta(), layers[module].get_delta_weight("default"), rtol=0, atol=0)


def test_patterns_and_layer_selection_really_vary(peft_models, workdir, base):
    patterns = load_adapter(workdir / "patterns", "patterns", base[1]).modules
    assert patterns["model.layers.0.self_attn.q_proj"].rank == 2
    assert patterns["model.layers.1.mlp.up_proj"].rank == 6 and patterns["model.layers.0.mlp.up_proj"].rank == 4
    assert patterns["model.layers.0.self_attn.k_proj"].scaling == 3 / 4
    assert load_adapter(workdir / "rslora", "r", base[1]).modules["model.layers.0.mlp.down_proj"].scaling == 16 / 8**0.5
    assert set(load_adapter(workdir / "layers", "l", base[1]).modules) == {
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.self_attn.q_proj",
    }


def test_dora_factor_matches_peft_forward(peft_models, workdir, base):
    """The graph's per-row DoRA factor reproduces PEFT's DoRA layer output from the base layer output."""
    from hqexport.adapters.values import dora_factor, lora_matmul_weights

    spec = load_adapter(workdir / "dora", "dora", base[1])
    layer = _peft_layers(peft_models["dora"])["model.layers.0.mlp.up_proj"]
    weights = spec.modules["model.layers.0.mlp.up_proj"]
    x = torch.randn(3, weights.lora_A.shape[1])
    with torch.no_grad():
        expected = layer(x)
        base_out = layer.get_base_layer()(x)
    factor = torch.from_numpy(dora_factor(base[0].linears[weights.module], weights, torch.float32))
    a_t, b_t = (torch.from_numpy(t) for t in lora_matmul_weights(weights, np.dtype(np.float32)))
    ours = base_out + (factor - 1) * base_out + factor * ((x @ a_t) @ b_t)
    assert (factor - 1).abs().max() > 0.01
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


# --- merge against PEFT's merge_and_unload ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["plain", "dora"])
def test_merge_matches_peft_merge_and_unload(name, peft_models, workdir, base, base_model):
    model, shapes = base
    spec = load_adapter(workdir / name, name, shapes)
    merged_model, entry = merge_adapter(model, spec)
    reference = PeftModel.from_pretrained(copy.deepcopy(base_model), workdir / name).merge_and_unload()
    references = {n: m for n, m in reference.named_modules() if isinstance(m, HQQLinear)}
    for module in spec.modules:
        ours, theirs = merged_model.linears[module], references[module]
        expected = layer_from_meta(module, theirs.W_q.data, theirs.meta, None)
        assert torch.equal(ours.packed, expected.packed), module
        assert torch.equal(ours.scale, expected.scale) and torch.equal(ours.zero, expected.zero), module
    assert 0 < entry["retained"] <= 1.5 and set(entry["layers"]) == set(spec.modules)
    untouched = "model.layers.0.self_attn.k_proj"
    assert merged_model.linears[untouched] is model.linears[untouched]


def test_merge_retained_delta_is_low_for_a_small_delta(peft_models, workdir, base, base_model):
    model, shapes = base
    _make_adapter(base_model, "plain", workdir / "small", b_scale=0.005)
    spec = load_adapter(workdir / "small" / "plain", "small", shapes)
    weights = spec.modules["model.layers.0.self_attn.q_proj"]
    relative = float(weights.delta().norm() / dequantize_torch(model.linears[weights.module]).norm())
    assert relative < 0.05  # a delta of a few % of ||W||: what fine-tuning usually makes
    small = merge_adapter(model, spec)[1]
    large = merge_adapter(model, load_adapter(workdir / "plain", "plain", shapes))[1]
    assert small["retained"] < 0.5
    assert large["retained"] > small["retained"]


# --- graph pass on a hand-built model -----------------------------------------------------------------------

K, N = 16, 8


def _tiny_graph(with_bias: bool, rng: np.random.Generator) -> tuple[ir.Model, dict[str, LayerNode], np.ndarray, np.ndarray]:
    """X [M, K] -> Gemm (stands in for an HQQMatMul node, bias included) -> Relu."""
    weight = rng.standard_normal((N, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else np.zeros(N, np.float32)
    initializers = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="/layer/HQQMatMul", transB=1),
        helper.make_node("Relu", ["y"], ["out"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["m", K])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["m", N])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    layers = {"m.proj": LayerNode("/layer/HQQMatMul", {"bias": "b" if with_bias else None}, (N, K), "m.proj")}
    return ir.from_proto(model), layers, weight, bias


def _spec(name: str, rank: int, magnitude: bool, rng: np.random.Generator):
    from hqexport.adapters.spec import AdapterSpec, LoraModuleWeights

    a = torch.from_numpy(rng.standard_normal((rank, K)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((N, rank)).astype(np.float32))
    m = torch.from_numpy(rng.uniform(0.5, 1.5, N).astype(np.float32)) if magnitude else None
    weights = LoraModuleWeights("m.proj", rank, 2.0 * rank, 2.0, a, b, m)
    return AdapterSpec(name=name, path=Path("/nowhere") / name, config={"use_dora": magnitude, "r": rank}, modules={"m.proj": weights})


def _run(model: ir.Model, x: np.ndarray, options=None) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["out"], {"x": x}, options)[0]


def test_separate_branches_in_a_tiny_graph(tmp_path):
    rng = np.random.default_rng(0)
    model, layers, weight, bias = _tiny_graph(False, rng)
    x = rng.standard_normal((3, K)).astype(np.float32)
    base_out = _run(model, x)
    specs = [_spec("one", 2, False, rng), _spec("two", 5, False, rng)]
    export = apply_adapters(model, layers, specs, "separate")
    onnx.checker.check_model(ir.to_proto(export.model), full_check=True)
    (tmp_path / "model.onnx").write_bytes(ir.to_proto(export.model).SerializeToString())
    export.write_files(tmp_path)
    adapters = ExportedAdapters(tmp_path)
    assert adapters.names == ["one", "two"]
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(["out"], {"x": x})[0], base_out)
    for spec in specs:  # hot swap in one session
        w = spec.modules["m.proj"]
        expected = np.maximum(x @ (weight + w.delta().numpy()).T, 0)
        got = session.run(["out"], {"x": x}, adapters.run_options(spec.name))[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(HQExportError, match="both set"):
        adapters.run_options("one", "two")


def test_dora_branch_in_a_tiny_graph_with_bias(tmp_path, monkeypatch):
    """Bake and separate reproduce PEFT's DoRA formula (bias excluded from the rescaled part)."""
    import hqexport.adapters.apply as apply_module

    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, K)).astype(np.float32)
    spec = _spec("d", 3, True, rng)
    w = spec.modules["m.proj"]
    factor = rng.uniform(0.5, 1.5, N).astype(np.float32)
    lora = (x @ w.lora_A.numpy().T) @ (w.lora_B.numpy() * w.scaling).T
    monkeypatch.setattr(apply_module, "dora_factor", lambda *args: factor)  # tested against PEFT above
    for mode in ("bake", "separate"):
        model, layers, weight, bias = _tiny_graph(True, rng)
        base_y = x @ weight.T + bias
        expected = np.maximum(base_y + (factor - 1) * (base_y - bias) + factor * lora, 0)
        export = apply_adapters(model, layers, [spec], mode, base_linears={"m.proj": None})
        if mode == "bake":
            np.testing.assert_allclose(_run(export.model, x), expected, rtol=1e-5, atol=1e-5)
            continue
        np.testing.assert_allclose(_run(export.model, x), np.maximum(base_y, 0), rtol=1e-6, atol=1e-6)
        (tmp_path / "model.onnx").write_bytes(ir.to_proto(export.model).SerializeToString())
        export.write_files(tmp_path)
        got = _run(export.model, x, ExportedAdapters(tmp_path).run_options("d"))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# --- bad adapters: one clear HQExportError line -----------------------------------------------------------


def _edited_copy(source: Path, target: Path, **changes) -> Path:
    import shutil

    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config.update(changes)
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"lora_bias": True}, "lora_bias"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"peft_type": "IA3"}, "peft_type IA3"),
        ({"bias": "all"}, "bias='all'"),
        ({"init_lora_weights": "pissa"}, "pissa"),
        ({"r": 8}, "do not fit the base layer"),
        ({"target_modules": ["q_proj", "v_proj", "k_proj"]}, "no weights for targeted module"),
        ({"use_dora": True}, "magnitude vector is missing"),
    ],
)
def test_unsupported_or_inconsistent_config_is_refused(changes, message, peft_models, workdir, base, tmp_path):
    folder = _edited_copy(workdir / "plain", tmp_path / "bad", **changes)
    with pytest.raises(HQExportError, match=message) as error:
        load_adapter(folder, "bad", base[1])
    assert "\n" not in str(error.value) and str(folder) in str(error.value)


def test_weights_for_the_wrong_base_are_refused(peft_models, workdir, base):
    smaller = {name: (shape[0], shape[1] // 2) for name, shape in base[1].items()}
    with pytest.raises(HQExportError, match=r"do not fit the base layer \[64, 32\]"):
        load_adapter(workdir / "plain", "plain", smaller)
    renamed = {name.replace("q_proj", "query"): shape for name, shape in base[1].items()}
    with pytest.raises(HQExportError, match="unknown target module model.layers.0.self_attn.q_proj"):
        load_adapter(workdir / "plain", "plain", renamed)
    with pytest.raises(HQExportError, match="not an HQQ-quantized linear"):
        load_adapter(workdir / "plain", "plain", renamed, other_modules=["model.layers.0.self_attn.q_proj"])


def test_embedding_lora_and_stray_tensors_are_refused(peft_models, workdir, base, tmp_path):
    from safetensors.torch import load_file, save_file

    for extra, message in (
        ("base_model.model.model.embed_tokens.lora_embedding_A", "embedding LoRA"),
        ("base_model.model.model.layers.0.mlp.down_proj.bias", "not a LoRA factor"),
    ):
        folder = _edited_copy(workdir / "plain", tmp_path / extra.rsplit(".", 1)[-1])
        tensors = load_file(folder / "adapter_model.safetensors")
        tensors[extra] = torch.zeros(4, 4)
        save_file(tensors, folder / "adapter_model.safetensors")
        with pytest.raises(HQExportError, match=message):
            load_adapter(folder, "x", base[1])


def test_missing_files_and_bad_names(peft_models, workdir, base, tmp_path):
    with pytest.raises(HQExportError, match="adapter folder not found"):
        load_adapters([str(tmp_path / "nope")], base[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(HQExportError, match="not a PEFT adapter folder"):
        load_adapters([str(tmp_path / "empty")], base[1])
    folder = _edited_copy(workdir / "plain", tmp_path / "noweights")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(HQExportError, match="missing adapter_model.safetensors"):
        load_adapters([str(folder)], base[1])
    for bad in ("../x", "a/b", "..", ".hidden", "a..b", ""):
        with pytest.raises(HQExportError, match="not allowed|nothing after"):
            parse_adapter_argument(f"{bad}={workdir / 'plain'}" if bad else f"={workdir / 'plain'}")
    with pytest.raises(HQExportError, match="used twice"):
        load_adapters([f"same={workdir / 'plain'}", f"same={workdir / 'rslora'}"], base[1])


def test_folder_with_several_named_adapters(peft_models, workdir, base, base_model, tmp_path):
    """PEFT saves the default adapter at the root and the others in sub-folders named after them."""
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model), workdir / "plain")
    peft_model.load_adapter(workdir / "rslora", adapter_name="second")
    peft_model.save_pretrained(tmp_path / "multi")
    specs = load_adapters([str(tmp_path / "multi")], base[1])
    assert [s.name for s in specs] == ["multi", "second"]
    assert set(specs[1].modules) == set(load_adapter(workdir / "rslora", "r", base[1]).modules)
    with pytest.raises(HQExportError, match="holds several adapters"):
        load_adapters([f"one={tmp_path / 'multi'}"], base[1])


def test_base_model_path_is_checked_when_it_resolves(peft_models, workdir, base, tmp_path):
    other = tmp_path / "other_base"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**base[0].config, "hidden_size": 128}))
    folder = _edited_copy(workdir / "plain", tmp_path / "rebased", base_model_name_or_path=str(other))
    with pytest.raises(HQExportError, match="hidden_size=128 differs"):
        load_adapters([str(folder)], base[1], source_config=base[0].config)
    (other / "config.json").write_text(json.dumps(base[0].config))
    assert load_adapters([str(folder)], base[1], source_config=base[0].config)[0].name == "rebased"


# --- .onnx_adapter files ----------------------------------------------------------------------------------


def test_adapter_file_checks(tmp_path):
    rng = np.random.default_rng(2)
    model, layers, _, _ = _tiny_graph(False, rng)
    export = apply_adapters(model, layers, [_spec("one", 2, False, rng)], "separate")
    export.write_files(tmp_path)
    params = read_adapter_file(tmp_path / "adapters" / "one.onnx_adapter")
    assert {k: v.shape for k, v in params.items()} == {"m.proj.lora_A.weight": (K, 2), "m.proj.lora_B.weight": (2, N)}
    check_adapter_fits(export.model, params, "one")
    with pytest.raises(HQExportError, match="not an overridable input"):
        check_adapter_fits(export.model, {"m.other.lora_A.weight": params["m.proj.lora_A.weight"]}, "x")
    with pytest.raises(HQExportError, match=r"expects \[16, 'lora_r_m.proj'\]"):
        check_adapter_fits(export.model, {"m.proj.lora_A.weight": np.zeros((K + 1, 2), np.float32)}, "x")
    with pytest.raises(HQExportError, match="dtype float16"):
        check_adapter_fits(export.model, {"m.proj.lora_A.weight": np.zeros((K, 2), np.float16)}, "x")
    check_no_overlap({"a": {"x.lora_A.weight": 0}, "b": {"y.lora_A.weight": 0}})
    with pytest.raises(HQExportError, match="cannot be active together"):
        check_no_overlap({"a": {"x.lora_A.weight": 0}, "b": {"x.lora_A.weight": 0}})
    (tmp_path / "junk.onnx_adapter").write_bytes(b"not flatbuffers")
    with pytest.raises(HQExportError, match="not an onnxruntime adapter file"):
        read_adapter_file(tmp_path / "junk.onnx_adapter")
