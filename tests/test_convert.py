"""hqexport convert: tiny models of every supported architecture and several HQQ formats, exported and run in
stock onnxruntime (CPU, default session options, no custom library), compared with the PyTorch model that has
hqq's own HQQLinear layers.

Each case is exported once (module-scoped fixture); the fp16 case goes through the CLI with --json and --force.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from hqq.core.quantize import HQQLinear

from hqexport.cli import main
from hqexport.conversion import convert
from hqexport.errors import HQExportError, UnsupportedModelError
from hqexport.formats import unpack_canonical
from hqexport.read.live import read_live_model
from hqexport.read.source import read_source
from hqexport.sample import build_sample_model
from tests.conftest import FORMATS

PROMPTS = [[5, 17, 42, 9, 100, 7], [260, 3, 11, 64, 2, 88]]
DECODE_STEPS = 8


@dataclass(frozen=True)
class Case:
    arch: str
    form: str
    quant: dict
    dtype: str = "fp32"
    ops: str = "hqq"  # "auto" lowers what MatMulNBits expresses exactly (the CLI case uses the CLI default, auto)


#: the ops a layer lowered by --ops auto runs as (lower/matmulnbits.py; a gate/up node gated by lower/swiglu.py)
LOWERED_OPS = ("com.microsoft.MatMulNBits", "hqexport.HQQMatMulNBits", "hqexport.HQQMatMulNBitsSwiGLU")

CASES = {
    # one format per linear (4, 3, 2 axis 0, 8, 1, 1.58 bits; down_proj fp), tied embeddings, wide enough to measure
    # the file size against the weights
    "llama-tied-mixed-wide": Case(
        "llama", "safetensors", dict(mixed=True, tie_word_embeddings=True, hidden_size=256, intermediate_size=512), ops="auto"
    ),
    "qwen2-3bit": Case("qwen2", "pickle", FORMATS["3bit"]),
    "qwen3-2bit-axis0": Case("qwen3", "sharded", FORMATS["2bit-axis0"]),
    "mistral-8bit": Case("mistral", "safetensors", FORMATS["8bit"]),
    "phi3-4bit": Case("phi3", "safetensors", FORMATS["4bit"], ops="auto"),
    "gemma-4bit": Case("gemma", "pickle", FORMATS["4bit"]),
    "mistral-4bit-fp16-cli": Case("mistral", "pickle", FORMATS["4bit"], dtype="fp16", ops="auto"),
}


@dataclass
class Exported:
    case: Case
    live: torch.nn.Module
    source: Path
    out: Path
    summary: dict
    source_digest_before: str


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, hqq_model, hqq_source, tmp_path_factory) -> Exported:
    case = CASES[request.param]
    live = hqq_model(case.arch, **case.quant)
    source = hqq_source(case.arch, case.form, **case.quant)
    before = folder_digest(source)
    out = tmp_path_factory.mktemp(request.param) / "onnx"
    if case.dtype == "fp32":
        summary = convert(source, out, ops=case.ops, progress=False).to_dict()
    else:  # through the CLI, replacing an earlier output with --force
        out.mkdir()
        (out / "hqexport.json").write_text("{}")
        (out / "stale.txt").write_text("from an earlier export")
        args = ["convert", str(source), "-o", str(out), "--dtype", case.dtype, "--force", "--json"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
    print(f"\nexported {request.param} in {summary['seconds']} s")
    return Exported(case, live, source, out, summary, before)


def _ort_steps(session: ort.InferenceSession, prompts: np.ndarray, steps: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Greedy generation through the graph's KV cache: last-position logits of each step, generated tokens."""
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    batch = prompts.shape[0]
    cache_dtype = np.float16 if past_inputs[0].type == "tensor(float16)" else np.float32
    feeds = {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), cache_dtype) for i in past_inputs}
    ids, total, logits, tokens = prompts, 0, [], []
    for _ in range(steps + 1):
        length = ids.shape[1]
        feeds.update(
            input_ids=ids,
            attention_mask=np.ones((batch, total + length), np.int64),
            position_ids=np.tile(np.arange(total, total + length), (batch, 1)),
        )
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        total += length
        for name in list(feeds):
            if name.startswith("past_key_values."):
                feeds[name] = outputs[name.replace("past_key_values.", "present.")]
        last = outputs["logits"][:, -1].astype(np.float32)
        logits.append(last)
        tokens.append(last.argmax(-1))
        ids = tokens[-1][:, None].astype(np.int64)
    return logits, np.stack(tokens, 1)


@torch.inference_mode()
def _torch_steps(model: torch.nn.Module, prompts: np.ndarray, steps: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The same greedy loop on the PyTorch model with hqq's HQQLinear layers and transformers' own cache."""
    ids, cache, logits, tokens = torch.from_numpy(prompts), None, [], []
    for _ in range(steps + 1):
        out = model(input_ids=ids, cache=cache, use_cache=True)
        cache = out.cache
        last = out.logits[:, -1].float()
        logits.append(last.numpy())
        tokens.append(last.argmax(-1).numpy())
        ids = last.argmax(-1, keepdim=True)
    return logits, np.stack(tokens, 1)


def test_onnxruntime_matches_hqq_through_kv_cache(exported: Exported):
    session = ort.InferenceSession(str(exported.out / "model.onnx"), providers=["CPUExecutionProvider"])
    prompts = np.array(PROMPTS, dtype=np.int64) % exported.live.config.vocab_size
    onnx_logits, onnx_tokens = _ort_steps(session, prompts, DECODE_STEPS)
    torch_logits, torch_tokens = _torch_steps(exported.live, prompts, DECODE_STEPS)
    scale = max(float(np.abs(t).max()) for t in torch_logits)
    worst = max(float(np.abs(o - t).max()) for o, t in zip(onnx_logits, torch_logits))
    if exported.case.dtype == "fp32":
        assert worst <= 1e-4 * scale, f"max |Δ logit| {worst:.3g} vs max |logit| {scale:.3g}"
        np.testing.assert_array_equal(onnx_tokens, torch_tokens)
    else:  # fp16 activations and cache: close to the fp32 reference, not equal
        assert worst <= 2e-2 * scale, f"max |Δ logit| {worst:.3g} vs max |logit| {scale:.3g}"


def test_graph_signature(exported: Exported):
    model = onnx.load(str(exported.out / "model.onnx"), load_external_data=False)
    layers = exported.live.config.num_hidden_layers
    cache = [f"{kind}.{i}.{kv}" for kind in ("past_key_values",) for i in range(layers) for kv in ("key", "value")]
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "position_ids", *cache]
    present = [name.replace("past_key_values", "present") for name in cache]
    assert [o.name for o in model.graph.output] == ["logits", *present]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["past_key_values.0.key"][0] == "batch" and isinstance(dims["past_key_values.0.key"][2], str)
    assert model.ir_version <= 10
    onnx.checker.check_model(str(exported.out / "model.onnx"), full_check=True)


def _budget_bytes(live: torch.nn.Module, dtype: str) -> tuple[int, int]:
    """(hqq's packed W_q + scale + zero + bias of every HQQLinear, every other parameter once) of the live model."""
    packed = 0
    for module in live.modules():
        if isinstance(module, HQQLinear):
            tensors = [module.W_q, module.meta["scale"], module.meta["zero"]] + ([module.bias] if module.bias is not None else [])
            packed += sum(t.numel() * t.element_size() for t in tensors)
    fp_size = 2 if dtype == "fp16" else 4
    fp = sum(p.numel() * fp_size for p in live.parameters() if p.is_floating_point())  # parameters() counts tied once
    config = live.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = 2 * config.max_position_embeddings * (head_dim // 2) * fp_size  # GroupQueryAttention's cos and sin tables
    return packed, fp + rotary


def test_no_fp_copy_of_a_quantized_weight(exported: Exported):
    model = onnx.load(str(exported.out / "model.onnx"))  # with its external data
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    packed, fp = _budget_bytes(exported.live, exported.case.dtype)
    total = sum(array.nbytes for array in arrays.values())
    # canonical 3-bit rows are padded to whole 10-code words per output row; everything else matches hqq byte for byte
    assert total <= 1.05 * (packed + fp) + 4096, (total, packed, fp)
    dequantized = [m.dequantize().float().numpy() for m in exported.live.modules() if isinstance(m, HQQLinear)]
    for name, array in arrays.items():
        if array.dtype.kind != "f" or array.ndim != 2:
            continue
        for weight in dequantized:
            for candidate in (weight, weight.T):
                if candidate.shape == array.shape:
                    assert not np.allclose(array.astype(np.float32), candidate, atol=1e-3), f"{name} is a dequantized weight"


def test_manifest_names_the_packed_weights_of_each_layer(exported: Exported):
    manifest = json.loads((exported.out / "hqexport.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["source"]["path"] == str(exported.source.resolve())
    assert manifest["source"]["kind"] in ("hqq-pickle", "hqq-safetensors")
    assert manifest["model"]["dtype"] == exported.case.dtype and manifest["model"]["uses_position_ids"]
    model = onnx.load(str(exported.out / "model.onnx"))  # with its external data
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    hqq_layers = {name: m for name, m in exported.live.named_modules() if isinstance(m, HQQLinear)}
    assert set(manifest["layers"]) == set(hqq_layers)
    for path, entry in manifest["layers"].items():
        layer = hqq_layers[path]
        node = nodes[entry["node"]]
        if entry["op"] in LOWERED_OPS:
            _check_lowered_weight(node, entry, initializers, layer)
            continue
        assert (node.domain, node.op_type) == ("hqexport", "HQQMatMul")
        names = entry["initializers"]
        assert list(node.input[1:4]) == [names["weight"], names["scale"], names["zero"]]
        n, k = next(a.i for a in node.attribute if a.name == "N"), layer.meta["shape"][1]
        bits = {8: 8, 4: 4, 3: 3, 2: 2, 1.58: 2, 1: 1}[entry["nbits"]]
        codes = torch.from_numpy(unpack_canonical(initializers[names["weight"]], k, bits).astype(np.float32))
        scale = torch.from_numpy(np.array(initializers[names["scale"]]))
        zero = torch.from_numpy(np.array(initializers[names["zero"]]))
        groups = scale.numel()
        grouped = codes.reshape((groups, -1) if entry["axis"] == 1 else (-1, groups))
        assert torch.equal(_layer_rows(((grouped - zero) * scale).reshape(n, k), entry), layer.dequantize()), path


def _layer_rows(weight, entry: dict):
    """The layer's rows of a packed node's weight (the manifest's "rows"), or the whole weight."""
    rows = entry.get("rows")
    return weight[rows[0] : rows[1]] if rows else weight


def _check_lowered_weight(node: onnx.NodeProto, entry: dict, initializers: dict, layer: HQQLinear) -> None:
    """A MatMulNBits layer's weight, (q - zp) * s + correction in float64, is hqq's up to the rounding of the
    activation dtype its scales and correction are stored in."""
    assert f"{node.domain}.{node.op_type}" == entry["op"]
    names = entry["initializers"]
    assert list(node.input[1:4]) == [names["B"], names["scales"], names["zero_points"]]
    if node.op_type == "HQQMatMulNBits":  # the correction is the fused node's own sixth input
        assert node.input[5] == names["zero_correction"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    blocks = k // block
    codes = unpack_canonical(initializers[names["B"]].reshape(n, -1), k, bits).astype(np.float64)
    zero_points = unpack_canonical(initializers[names["zero_points"]].reshape(n, -1), blocks, bits).astype(np.float64)
    weight = (codes.reshape(n, blocks, block) - zero_points[:, :, None]) * initializers[names["scales"]].astype(np.float64).reshape(n, blocks, 1)
    if "zero_correction" in names:
        weight += initializers[names["zero_correction"]].astype(np.float64).T[:, :, None]
    expected = layer.dequantize().double().numpy()
    rounding = max(1e-6, 4 * float(np.finfo(initializers[names["scales"]].dtype).eps))
    assert np.abs(_layer_rows(weight.reshape(n, k), entry) - expected).max() <= rounding * np.abs(expected).max()


def test_lowering_choices_follow_the_formats(exported: Exported):
    manifest = json.loads((exported.out / "hqexport.json").read_text())
    ops = {entry["op"] for entry in manifest["layers"].values()}
    if exported.case.ops == "hqq":
        assert ops == {"hqexport.HQQMatMul"}
        return
    for path, entry in manifest["layers"].items():
        expressible = entry["axis"] == 1 and entry["group_size"] in (16, 32, 64, 128) and entry["nbits"] not in (5, 6)
        assert (entry["op"] in LOWERED_OPS) == expressible, entry
        assert ("kept" in entry["lowering"]) != expressible
        if expressible:  # one fused node where hqq's zeros need the correction, at fp32; MatMulNBits + correction at fp16
            fused = entry["lowering"]["zero_correction"] and exported.case.dtype == "fp32"
            # a SiLU MLP's gate and up in one node (packed, or Phi-3's gate_up_proj) carry the gating
            gate_up = path.endswith("mlp.gate_up_proj") or (path.endswith(("mlp.gate_proj", "mlp.up_proj")) and "rows" in entry)
            gated = fused and gate_up and exported.case.arch != "gemma"
            assert entry["op"] == ("hqexport.HQQMatMulNBitsSwiGLU" if gated else "hqexport.HQQMatMulNBits" if fused else "com.microsoft.MatMulNBits"), entry


def test_output_folder_contents_and_source_untouched(exported: Exported):
    manifest = json.loads((exported.out / "hqexport.json").read_text())
    # the kernels library ships by default where the graph has hqexport ops (it builds on these machines)
    kernels = ["libhqexport_kernels.so"] if any(entry["op"].startswith("hqexport.") for entry in manifest["layers"].values()) else []
    names = sorted(p.name for p in exported.out.iterdir())
    assert names == sorted(
        ["model.onnx", "model.onnx.data", "config.json", "genai_config.json", "hqexport.json", "tokenizer.json",
         "tokenizer_config.json", *kernels]
    )
    assert not [p for p in exported.out.parent.iterdir() if p.name.startswith(".")], "staging folders left behind"
    for name, digest in manifest["outputs"].items():
        assert hashlib.sha256((exported.out / name).read_bytes()).hexdigest() == digest, name
    assert folder_digest(exported.source) == exported.source_digest_before
    genai = json.loads((exported.out / "genai_config.json").read_text())["model"]
    config = exported.live.config
    assert genai["type"] == config.model_type
    assert genai["decoder"]["num_hidden_layers"] == config.num_hidden_layers
    # onnxruntime's default thread count (0); onnxruntime-genai's own default ran a third slower (genai_config.py)
    assert genai["decoder"]["session_options"]["intra_op_num_threads"] == 0
    assert genai["decoder"]["num_key_value_heads"] == config.num_key_value_heads
    written = json.loads((exported.out / "config.json").read_text())  # the architecture, not the quantization
    assert "quantization_config" not in written
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert written[key] == getattr(config, key), key
    assert exported.summary["onnx_bytes"] == sum((exported.out / n).stat().st_size for n in ("model.onnx", "model.onnx.data"))


@pytest.mark.parametrize("exported", ["llama-tied-mixed-wide"], indirect=True)
def test_file_bytes_within_ten_percent_of_packed_plus_fp(exported: Exported, record_property):
    """On the widest case: in the tiny ones the graph itself outweighs the weights."""
    packed, fp = _budget_bytes(exported.live, exported.case.dtype)
    ratio = exported.summary["onnx_bytes"] / (packed + fp)
    record_property("file_bytes_ratio", ratio)
    print(f"\nfile bytes {exported.summary['onnx_bytes']} / (packed {packed} + fp {fp}) = {ratio:.3f}")
    assert ratio <= 1.10


def _genai_tokens(folder: Path, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai, which shares its max_length cache between the graph's past and present
    (genai_config.json's past_present_share_buffer); it stops at the end-of-sequence token."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def _until_eos(tokens: list[int], eos: int | list[int]) -> list[int]:
    ends = [i for i, token in enumerate(tokens) if token in (eos if isinstance(eos, list) else [eos])]
    return tokens[: ends[0] + 1] if ends else tokens


def test_onnxruntime_genai_generates_the_hqq_tokens(exported: Exported):
    """fp32 cases: hqq's greedy tokens; fp16 ones (not equal to hqq's fp32 reference): those of a plain onnxruntime
    session, which feeds each step's present cache back as a new past instead of sharing one buffer."""
    config = exported.live.config
    prompt = [token % config.vocab_size for token in PROMPTS[0]]
    tokens = _genai_tokens(exported.out, prompt, DECODE_STEPS)
    if exported.case.dtype == "fp32":
        _, expected = _torch_steps(exported.live, np.array([prompt], dtype=np.int64), DECODE_STEPS - 1)
    else:
        session = ort.InferenceSession(str(exported.out / "model.onnx"), providers=["CPUExecutionProvider"])
        _, expected = _ort_steps(session, np.array([prompt], dtype=np.int64), DECODE_STEPS - 1)
    assert tokens == _until_eos([int(t) for t in expected[0]], config.eos_token_id)


# ---- errors and the output folder (no export needed) ----


@pytest.fixture(scope="module")
def small_source(hqq_source) -> Path:
    return hqq_source("llama", "pickle", **FORMATS["4bit"])


def test_existing_output_refused_without_force(small_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(HQExportError, match="already exists; pass --force"):
        convert(small_source, out, progress=False)
    with pytest.raises(HQExportError, match="not an hqexport output"):
        convert(small_source, out, force=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(main, ["convert", str(small_source), "-o", str(out)])
    assert result.exit_code == 2 and "already exists" in result.stderr


def test_output_inside_or_around_the_source_refused(small_source):
    with pytest.raises(HQExportError, match="inside the source folder"):
        convert(small_source, small_source / "onnx", progress=False)
    with pytest.raises(HQExportError, match="inside the source folder"):
        convert(small_source, small_source, force=True, progress=False)
    with pytest.raises(HQExportError, match="contains the source folder"):
        convert(small_source, small_source.parent, force=True, progress=False)


def test_failed_export_leaves_no_output(small_source, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("export broke")

    monkeypatch.setattr("hqexport.conversion.build_decoder", fail)
    with pytest.raises(RuntimeError, match="export broke"):
        convert(small_source, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture_names_the_supported_ones(small_source, tmp_path):
    qmodel = read_source(small_source)
    qmodel.config["model_type"] = "gpt_neox"
    qmodel.config["architectures"] = ["GPTNeoXForCausalLM"]
    with pytest.raises(UnsupportedModelError, match=r"GPTNeoXForCausalLM.*supported: LlamaForCausalLM.*Qwen3ForCausalLM"):
        convert(qmodel, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_options_are_user_errors(small_source, tmp_path):
    with pytest.raises(HQExportError, match="dtype"):
        convert(small_source, tmp_path / "a", dtype="bf16", progress=False)
    with pytest.raises(HQExportError, match="opset 12"):
        convert(small_source, tmp_path / "b", opset=12, progress=False)
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "missing"), "-o", str(tmp_path / "c")])
    assert result.exit_code == 2 and "no such folder" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_ops_ort_refuses_an_inexpressible_layer_before_exporting(hqq_source, tmp_path, monkeypatch):
    source = hqq_source("llama", "pickle", **FORMATS["2bit-axis0"])
    monkeypatch.setattr("hqexport.conversion.build_decoder", lambda *a, **k: pytest.fail("exported before refusing"))
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(tmp_path / "out"), "--ops", "ort"])
    assert result.exit_code == 2
    assert "--ops ort: layer model.layers.0.self_attn.q_proj (2bit g16 axis0) cannot run as MatMulNBits" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_decoder_layers_are_fused_and_share_packed_nodes(exported: Exported):
    """One GroupQueryAttention and two Skip norms per layer; layers of one format that read one input (q/k/v,
    gate/up) are one packed node, each layer's rows in it named by the manifest and together covering it."""
    model = onnx.load(str(exported.out / "model.onnx"), load_external_data=False)
    layers = exported.live.config.num_hidden_layers
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("GroupQueryAttention") == layers and ops.count("SkipSimplifiedLayerNormalization") == 2 * layers
    # the norms' statistics are read by no node: left out, so that onnxruntime does not compute them
    norms = [node for node in model.graph.node if node.op_type == "SkipSimplifiedLayerNormalization"]
    assert all(list(node.output[1:3]) == ["", ""] and node.output[0] and node.output[3] for node in norms)
    manifest = json.loads((exported.out / "hqexport.json").read_text())
    by_node: dict[str, list[tuple[int, int, int]]] = {}
    for entry in manifest["layers"].values():
        if "rows" in entry:
            by_node.setdefault(entry["node"], []).append((*entry["rows"], entry["shape"][0]))
    for parts in by_node.values():
        parts.sort()
        assert all(stop - start == n for start, stop, n in parts) and parts[0][0] == 0
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:])), parts  # contiguous
    one_format = len({(e["nbits"], e["group_size"], e["axis"]) for e in manifest["layers"].values()}) == 1
    if one_format and exported.case.quant.get("axis", 1) == 1 and exported.case.arch != "phi3":  # phi3 stores them packed
        assert len(by_node) == 2 * layers  # q/k/v and gate/up in every layer
    elif not one_format or exported.case.quant.get("axis") == 0:
        assert not by_node  # mixed formats and axis-0 groups are never packed


@pytest.mark.parametrize("arch, window", [
    ("mistral", dict(sliding_window=4)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),  # layer 0 full, layer 1 windowed
])
def test_sliding_window_attention_matches_pytorch(arch, window, tokenizer, tmp_path):
    """A window shorter than the prompt: GroupQueryAttention's local window attends what transformers' mask does."""
    live = build_sample_model(arch, vocab_size=tokenizer.vocab_size, **window)
    convert(read_live_model(live), tmp_path / "out", progress=False)
    ids = torch.tensor([[5, 17, 33, 2, 9, 100, 7, 8, 40, 41]])
    with torch.inference_mode():
        expected = live(input_ids=ids).logits
        full = build_sample_model(arch, vocab_size=tokenizer.vocab_size)(input_ids=ids).logits  # same seed, no window
    assert not torch.allclose(expected[:, 4:], full[:, 4:], atol=1e-3)  # the window changes the later positions
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy()), "position_ids": np.arange(10)[None]}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values"):
            feeds[inp.name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), np.float32)
    got = session.run(["logits"], feeds)[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-5)
    # the last token again, decoded through the cache of the first nine
    names = [o.name for o in session.get_outputs()]
    first = {key: value[:, :9] for key, value in feeds.items() if not key.startswith("past")}
    prefill = dict(zip(names, session.run(None, {**feeds, **first})))
    step = {"input_ids": ids.numpy()[:, 9:], "attention_mask": np.ones((1, 10), np.int64), "position_ids": np.array([[9]])}
    step |= {name.replace("present", "past_key_values"): value for name, value in prefill.items() if name.startswith("present")}
    np.testing.assert_allclose(session.run(["logits"], step)[0][:, -1], expected.numpy()[:, -1], rtol=0, atol=1e-5)
    # onnxruntime-genai's shared cache, decoding past the window
    _, torch_tokens = _torch_steps(live, ids.numpy(), 11)
    tokens = _genai_tokens(tmp_path / "out", ids[0].tolist(), 12)
    assert tokens == _until_eos([int(t) for t in torch_tokens[0]], live.config.eos_token_id)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported: its frequencies change"),
    ({"hidden_act": "gelu"}, "LlamaForCausalLM with activation 'gelu' is not supported"),
])
def test_what_the_graph_cannot_compute_is_refused(small_source, tmp_path, change, message):
    qmodel = read_source(small_source)
    qmodel.config.update(change)
    with pytest.raises(UnsupportedModelError, match=message):
        convert(qmodel, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []
