"""A real exported tiny llama with LoRA branches in onnxruntime vs PEFT wrapping the real hqq model.

separate: two adapters (plain LoRA on q/v at rank 4, DoRA on o/up at rank 2) hot-swapped in one session, no
adapter == base; bake: the DoRA adapter as constants. Prefill + one cached decode step each.
"""

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
from peft import LoraConfig, PeftModel, get_peft_model

from hqexport.adapters.apply import apply_adapters
from hqexport.adapters.loading import load_adapters
from hqexport.adapters.runtime import ExportedAdapters
from hqexport.export.config import DEFAULT_OPSET, model_config
from hqexport.export.decoder import decoder_io
from hqexport.export.graph import build_decoder
from hqexport.read.live import read_live_model
from hqexport.write.onnx_file import write_onnx

CONFIGS = {
    "chat": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "style": dict(r=2, lora_alpha=4, use_dora=True, use_rslora=True, target_modules=["o_proj", "up_proj"]),
}
IDS = np.array([[1, 5, 9, 20, 3, 7]], dtype=np.int64)


@pytest.fixture(scope="module")
def setup(hqq_model, tmp_path_factory):
    base = hqq_model("llama", nbits=4, group_size=32, axis=1)
    root = tmp_path_factory.mktemp("adapter-export")
    torch.manual_seed(3)
    for name, config in CONFIGS.items():
        _save_trained_adapter(base, LoraConfig(init_lora_weights=False, **config), root / name)
    qmodel = read_live_model(base)
    specs = load_adapters([f"{n}={root / n}" for n in CONFIGS], {k: v.shape for k, v in qmodel.linears.items()})
    config = model_config(qmodel)
    targets = {module for spec in specs for module in spec.modules}  # each gets its own output, as convert does
    graph = build_decoder(qmodel, config, decoder_io(config, torch.float32), opset=DEFAULT_OPSET, own_outputs=targets)
    proto = ir.to_proto(graph.model)
    return base, root, qmodel, specs, graph.layers, proto


def _save_trained_adapter(base, config: LoraConfig, folder: Path) -> None:
    """A PEFT adapter on `base` with non-zero B (scaled down) and, for DoRA, magnitudes moved off their init."""
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for key, param in peft_model.named_parameters():
            if "lora_B" in key:
                param.mul_(0.3)
            if "lora_magnitude_vector" in key:
                param.mul_(1 + 0.2 * torch.rand_like(param))
    peft_model.save_pretrained(folder)


def _write(export, folder: Path) -> ort.InferenceSession:
    folder.mkdir()
    write_onnx(export.model, folder)
    export.write_files(folder)
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def _onnx_logits(session: ort.InferenceSession, options=None) -> np.ndarray:
    """Prefill IDS[:, :-1], then decode IDS[:, -1] with the returned cache; logits of every position."""
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name: i for i in session.get_inputs()}
    past = {n: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for n, i in inputs.items() if n.startswith("past")}

    def step(ids: np.ndarray, start: int, past: dict) -> dict:
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, start + ids.shape[1]), np.int64), **past}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(start, start + ids.shape[1])[None]
        return dict(zip(names, session.run(names, feeds, options)))

    first = step(IDS[:, :-1], 0, past)
    cache = {n.replace("present", "past_key_values"): v for n, v in first.items() if n.startswith("present")}
    second = step(IDS[:, -1:], IDS.shape[1] - 1, cache)
    return np.concatenate([first["logits"], second["logits"]], axis=1)


def _peft_logits(base, folder: Path | None) -> np.ndarray:
    model = copy.deepcopy(base) if folder is None else PeftModel.from_pretrained(copy.deepcopy(base), folder)
    with torch.no_grad():
        return model.eval()(torch.from_numpy(IDS)).logits.numpy()


def _assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_separate_adapters_hot_swap_in_one_session(setup, tmp_path):
    base, root, qmodel, specs, layers, proto = setup
    export = apply_adapters(ir.from_proto(proto), layers, specs, "separate", base_linears=qmodel.linears)
    session = _write(export, tmp_path / "out")
    adapters = ExportedAdapters(tmp_path / "out")
    base_logits = _peft_logits(base, None)
    _assert_close(_onnx_logits(session), base_logits)
    for name in ("chat", "style", "chat"):
        expected = _peft_logits(base, root / name)
        assert np.abs(expected - base_logits).max() > 0.05 * np.abs(base_logits).max()  # the adapter matters
        _assert_close(_onnx_logits(session, adapters.run_options(name)), expected)
    _assert_close(_onnx_logits(session), base_logits)  # and off again


def test_bake_dora_adapter(setup, tmp_path):
    base, root, qmodel, specs, layers, proto = setup
    export = apply_adapters(ir.from_proto(proto), layers, [specs[1]], "bake", base_linears=qmodel.linears)
    _assert_close(_onnx_logits(_write(export, tmp_path / "out")), _peft_logits(base, root / "style"))


def test_dora_on_packed_biased_layers_matches_peft(hqq_model, tmp_path):
    """Qwen2's q/k/v carry biases and stay one packed node: DoRA on q and v adds to their parts of its output and
    subtracts their rows of the packed bias; onnxruntime matches PEFT through prefill and one cached step."""
    base = hqq_model("qwen2", nbits=4, group_size=32, axis=1)
    torch.manual_seed(5)
    config = LoraConfig(init_lora_weights=False, r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj"])
    _save_trained_adapter(base, config, tmp_path / "dora")
    qmodel = read_live_model(base)
    specs = load_adapters([f"dora={tmp_path / 'dora'}"], {k: v.shape for k, v in qmodel.linears.items()})
    config = model_config(qmodel)
    targets = {module for spec in specs for module in spec.modules}
    graph = build_decoder(qmodel, config, decoder_io(config, torch.float32), opset=DEFAULT_OPSET, own_outputs=targets)
    q = graph.layers["model.layers.0.self_attn.q_proj"]
    assert q.node == graph.layers["model.layers.0.self_attn.k_proj"].node and q.rows and q.initializers["bias"]
    export = apply_adapters(graph.model, graph.layers, specs, "bake", base_linears=qmodel.linears)
    expected = _peft_logits(base, tmp_path / "dora")
    assert np.abs(expected - _peft_logits(base, None)).max() > 0.05 * np.abs(expected).max()  # the adapter matters
    _assert_close(_onnx_logits(_write(export, tmp_path / "out")), expected)


def test_convert_puts_lora_inside_the_kernel_nodes_unless_dora(setup, library, tmp_path):
    """With the kernels library, separate adapters become inputs of the target layers' nodes (no branch nodes);
    a DoRA adapter among them keeps every target on the branch form."""
    from hqexport.conversion import convert

    _, root, qmodel, _, _, _ = setup

    def export(name: str, *adapters: str) -> tuple[dict, list[str]]:
        out = tmp_path / name
        convert(qmodel, out, adapters=[f"{a}={root / a}" for a in adapters], progress=False)
        manifest = json.loads((out / "hqexport.json").read_text())
        nodes = [node.name for node in onnx.load(out / "model.onnx", load_external_data=False).graph.node]
        return manifest, nodes

    manifest, nodes = export("fused", "chat")
    targets = set(manifest["adapters"]["chat"]["targets"])
    assert {manifest["layers"][path]["op"] for path in targets} == {"hqexport.HQQMatMulNBitsLoRA"}
    assert not [name for name in nodes if "/lora/" in name]
    assert "model.layers.0.self_attn.qkv_proj.lora_A.weight" in manifest["adapters"]["chat"]["parameters"]

    manifest, nodes = export("dora", "chat", "style")
    assert {layer["op"] for layer in manifest["layers"].values()} == {"hqexport.HQQMatMulNBits"}
    assert [name for name in nodes if "/lora/" in name]
