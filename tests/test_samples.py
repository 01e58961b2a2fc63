"""The samples, run as their READMEs say, on the bundled sample model (tiny Llama, hqq 4-bit g32 + a LoRA adapter).

The module fixture runs samples/finetune_then_export (quantize with hqq, train LoRA with PEFT, `hqexport convert
--adapters separate --ops hqq`, `hqexport validate`). Every sample's greedy tokens must equal the reference's:
for the base model the tokens of `hqexport validate`'s generation check (PyTorch + hqq's HQQLinear), for the
adapter PEFT's LoRA on that same hqq reference (hqexport.validation.reference), computed here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration  # a converted + validated story, then each sample: minutes (.ci/run step)

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
PROMPT = "The old lighthouse keeper"  # the finetune script validates with this prompt
TOKENS = 12


def run(*args: str | Path) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def python(script: str, *args: str | Path) -> str:
    return run(sys.executable, SAMPLES / script, *args)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def story(tmp_path_factory) -> Path:
    """The finetune_then_export workdir: base/ (hqq), tuned/ (PEFT), separate/ (export), separate-validate.json."""
    work = tmp_path_factory.mktemp("story")
    out = python("finetune_then_export/finetune_then_export.py", "--workdir", work, "--modes", "separate",
                 "--ops", "hqq", "--tokens", str(TOKENS))
    assert "separate  validate PASSED" in out, out
    return work


@torch.inference_mode()
def _greedy(model: torch.nn.Module, prompt: list[int], tokens: int) -> list[int]:
    from hqexport.validation.torch_session import returned_cache

    ids, cache, chosen = torch.tensor([prompt]), None, []
    for _ in range(tokens):
        out = model(input_ids=ids, cache=cache, use_cache=True)
        cache = returned_cache(out)
        chosen.append(int(out.logits[0, -1].argmax()))
        ids = torch.tensor([[chosen[-1]]])
    return chosen


@pytest.fixture(scope="module")
def reference(story) -> dict:
    """Prompt ids and the reference's greedy tokens: base from validate's report, tuned from PEFT on the hqq reference."""
    from peft import PeftModel

    from hqexport.validation.reference import load_reference

    report = json.loads((story / "separate-validate.json").read_text())
    assert report["passed"], report
    generation = next(c for c in report["checks"] if c["name"] == "generation")
    (row,) = generation["figures"]["prompts"]
    assert row["prompt"] == PROMPT
    prompt_ids = [int(i) for i in run(sys.executable, SAMPLES / "cpp_generate/tokenize_ids.py", story / "separate", PROMPT).strip().split(",")]
    ref = load_reference(story / "base")
    assert _greedy(ref.model, prompt_ids, TOKENS) == row["reference_tokens"]  # the tokenizers agree on the prompt
    tuned = _greedy(PeftModel.from_pretrained(ref.model, str(story / "tuned")).eval(), prompt_ids, TOKENS)
    assert tuned != row["reference_tokens"], "the adapter should change the continuation, else the test proves little"
    return {"prompt_ids": prompt_ids, "base": row["reference_tokens"], "tuned": tuned}


@pytest.fixture(params=["shared cache", "copied cache"])
def python_sample_folder(request, story, tmp_path) -> Path:
    """The export as convert wrote it (genai_config.json's past_present_share_buffer: one cache bound as past and
    present), and a copy that says otherwise (each present fed back as the next past, as before that setting)."""
    if request.param == "shared cache":
        return story / "separate"
    folder = Path(shutil.copytree(story / "separate", tmp_path / "separate"))
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"]
    config["search"]["past_present_share_buffer"] = False
    (folder / "genai_config.json").write_text(json.dumps(config))
    return folder


def test_python_sample_greedy_switches_adapters_between_requests(python_sample_folder, reference):
    out = python("python_generate/generate.py", python_sample_folder, "--prompt", PROMPT, "--adapter", "base",
                 "--adapter", "tuned", "--adapter", "base", "--max-new-tokens", str(TOKENS), "--ignore-eos", "--token-ids")
    records = json_lines(out)
    assert [r["adapter"] for r in records] == ["base", "tuned", "base"]
    assert all(r["prompt_ids"] == reference["prompt_ids"] for r in records)
    assert records[0]["tokens"] == reference["base"]
    assert records[1]["tokens"] == reference["tuned"]
    assert records[2]["tokens"] == reference["base"]  # deactivating the adapter gives the base model back


def test_python_sample_streams_the_greedy_text(story, reference):
    from tokenizers import Tokenizer

    out = python("python_generate/generate.py", story / "separate", "--prompt", PROMPT, "--max-new-tokens",
                 str(TOKENS), "--ignore-eos")
    text = Tokenizer.from_file(str(story / "separate" / "tokenizer.json")).decode(reference["base"])
    assert out == f"[base] {PROMPT}{text}\n"


def test_python_sample_sampling_is_seeded(story, reference):
    def sample(*extra: str) -> list[int]:
        out = python("python_generate/generate.py", story / "separate", "--prompt", PROMPT, "--max-new-tokens",
                     str(TOKENS), "--ignore-eos", "--token-ids", "--sample", *extra)
        return json_lines(out)[0]["tokens"]

    first = sample("--seed", "5", "--temperature", "1.5", "--top-p", "1.0")
    assert first == sample("--seed", "5", "--temperature", "1.5", "--top-p", "1.0")
    assert first != reference["base"]  # at temperature 1.5 over a random model, 12 greedy picks in a row are unlikely
    assert sample("--seed", "5", "--top-k", "1") == reference["base"]  # top-1 sampling is greedy


@pytest.fixture(scope="module")
def cpp_program(tmp_path_factory) -> Path:
    out = python("cpp_generate/build.py", "--build-dir", tmp_path_factory.mktemp("cpp-build"))
    program = Path(out.strip().splitlines()[-1])
    assert program.is_file()
    return program


def test_cpp_sample_base_adapter_and_kernels(story, reference, cpp_program):
    from hqexport.kernels import library_path

    folder = story / "separate"
    ids = ",".join(map(str, reference["prompt_ids"]))

    def generate(*extra: str | Path) -> list[int]:
        return [int(t) for t in run(cpp_program, folder, "--ids", ids, "--tokens", str(TOKENS), *extra).split()]

    assert generate() == reference["base"]  # hqexport ops as their ONNX function body
    assert generate("--adapter", folder / "adapters" / "tuned.onnx_adapter") == reference["tuned"]
    kernels = library_path(build=True)
    assert generate("--kernels", kernels) == reference["base"]
    assert generate("--kernels", kernels, "--adapter", folder / "adapters" / "tuned.onnx_adapter") == reference["tuned"]


def test_cpp_sample_reports_a_missing_adapter_file(story, cpp_program):
    done = subprocess.run([cpp_program, story / "separate", "--ids", "1,2", "--adapter", story / "nope.onnx_adapter"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "nope.onnx_adapter: adapter file not found" in done.stderr


def test_genai_sample_switches_adapters(story, reference):
    eos = json.loads((story / "separate" / "genai_config.json").read_text())["model"]["eos_token_id"]
    out = python("genai/generate_genai.py", story / "separate", "--prompt", PROMPT, "--adapter", "tuned",
                 "--adapter", "base", "--max-new-tokens", str(TOKENS), "--token-ids")
    records = json_lines(out)

    def until_eos(tokens: list[int]) -> list[int]:  # onnxruntime-genai stops at EOS
        return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens

    assert records[0]["prompt_ids"] == reference["prompt_ids"]
    assert records[0]["tokens"] == until_eos(reference["tuned"])
    assert records[1]["tokens"] == until_eos(reference["base"])


def test_genai_sample_with_the_kernels_library(story, reference, tmp_path):
    """onnxruntime-genai takes a custom-op library only from inside the model folder (samples/genai/README.md)."""
    from hqexport.kernels import library_path

    folder = tmp_path / "with-kernels"
    shutil.copytree(story / "separate", folder)
    library = shutil.copy(library_path(build=True), folder)
    config_file = folder / "genai_config.json"
    config = json.loads(config_file.read_text())
    config["model"]["decoder"]["session_options"]["custom_ops_library"] = Path(library).name
    config_file.write_text(json.dumps(config))
    out = python("genai/generate_genai.py", folder, "--prompt", PROMPT, "--adapter", "tuned",
                 "--max-new-tokens", str(TOKENS), "--token-ids")
    eos = config["model"]["eos_token_id"]
    tokens = reference["tuned"]
    assert json_lines(out)[0]["tokens"] == (tokens[: tokens.index(eos) + 1] if eos in tokens else tokens)


@pytest.fixture(scope="module")
def fused_export(story, tmp_path_factory) -> Path:
    """The story's base and adapter converted with the defaults: the adapter inside the layers' kernel nodes."""
    out = tmp_path_factory.mktemp("fused") / "out"
    run(sys.executable, "-m", "hqexport.cli", "convert", story / "base", "-o", out, "--adapter", f"tuned={story / 'tuned'}")
    ops = {layer["op"] for layer in json.loads((out / "hqexport.json").read_text())["layers"].values()}
    assert "hqexport.HQQMatMulNBitsLoRA" in ops, ops
    return out


def test_genai_switches_adapters_inside_the_kernel_nodes(fused_export, reference):
    """og.Adapters sets the fused nodes' LoRA inputs per request; the folder's kernels library runs them."""
    eos = json.loads((fused_export / "genai_config.json").read_text())["model"]["eos_token_id"]
    out = python("genai/generate_genai.py", fused_export, "--prompt", PROMPT, "--adapter", "tuned",
                 "--adapter", "base", "--max-new-tokens", str(TOKENS), "--token-ids")
    records = json_lines(out)

    def until_eos(tokens: list[int]) -> list[int]:
        return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens

    assert records[0]["tokens"] == until_eos(reference["tuned"])
    assert records[1]["tokens"] == until_eos(reference["base"])


def test_genai_and_onnxruntime_agree_on_fp16_adapter_factors(story, tmp_path):
    """--adapter-dtype fp16: og.Adapters binds the fp16 factors to the kernel nodes and decodes what onnxruntime's
    Python API decodes with the same file (the rounding may move both away from the fp32 reference)."""
    out = tmp_path / "fp16-factors"
    run(sys.executable, "-m", "hqexport.cli", "convert", story / "base", "-o", out, "--adapter", f"tuned={story / 'tuned'}",
        "--adapter-dtype", "fp16")
    assert json.loads((out / "hqexport.json").read_text())["adapters"]["tuned"]["factor_dtype"] == "fp16"
    args = ("--prompt", PROMPT, "--adapter", "tuned", "--max-new-tokens", str(TOKENS), "--token-ids")
    (genai,) = json_lines(python("genai/generate_genai.py", out, *args))
    (onnxruntime,) = json_lines(python("python_generate/generate.py", out, *args))
    eos = json.loads((out / "genai_config.json").read_text())["model"]["eos_token_id"]

    def until_eos(tokens: list[int]) -> list[int]:
        return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens

    assert until_eos(genai["tokens"]) == until_eos(onnxruntime["tokens"]) and genai["tokens"]


def test_cpp_sample_with_adapters_inside_the_kernel_nodes(fused_export, reference, cpp_program):
    ids = ",".join(map(str, reference["prompt_ids"]))
    library = fused_export / json.loads((fused_export / "genai_config.json").read_text())["model"]["decoder"]["session_options"]["custom_ops_library"]
    adapter = fused_export / "adapters" / "tuned.onnx_adapter"
    for extra, expected in (((), reference["base"]), (("--adapter", adapter), reference["tuned"])):
        for kernels in ((), ("--kernels", library)):  # the kernel, and the function body of stock onnxruntime
            out = run(cpp_program, fused_export, "--ids", ids, "--tokens", str(TOKENS), *kernels, *extra)
            assert [int(t) for t in out.split()] == expected, (extra, kernels)


JS = SAMPLES / "js"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """samples/js's packages, installed by `npm ci` there (.ci/run does it)."""
    if shutil.which("node") is None or not (JS / "node_modules" / "onnxruntime-web").is_dir():
        pytest.fail("the JavaScript samples need Node.js and `npm ci` in samples/js (see samples/js/README.md)")
    return JS / "node_modules"


def test_node_sample_matches_the_reference(story, reference, node_modules):
    out = run("node", JS / "generate.mjs", story / "separate", "--prompt", PROMPT, "--max-new-tokens", str(TOKENS),
              "--ignore-eos", "--token-ids")
    (record,) = json_lines(out)
    assert record["prompt"] == reference["prompt_ids"]  # tokenizers.js reads tokenizer.json as the Rust tokenizer does
    assert record["tokens"] == reference["base"]


def test_node_sample_refuses_a_separate_adapter(story, node_modules):
    done = subprocess.run(["node", JS / "generate.mjs", story / "separate", "--prompt", PROMPT, "--adapter", "tuned"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1  # a user mistake: one line, as the hqexport CLI
    assert "cannot activate separate LoRA adapters" in done.stderr and "--adapters bake" in done.stderr
    assert "this folder's separate adapters: tuned" in done.stderr


def _in_chromium(folder: Path, **query: str) -> dict:
    """The web sample's run over `folder` in headless Chromium: window.hqexportRun."""
    if not CHROMIUM.is_file():
        pytest.fail(f"the web sample test needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    server = subprocess.Popen(["node", JS / "serve.mjs", folder, "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://"), url
        from urllib.parse import urlencode

        out = run("node", JS / "browser_run.mjs", f"{url}?{urlencode({'autorun': 1, **query})}", "--chromium", CHROMIUM)
    finally:
        server.terminate()
        server.wait()
    return json_lines(out)[0]


def test_web_sample_decodes_the_reference_tokens_in_chromium(story, reference, node_modules):
    result = _in_chromium(story / "separate", prompt=PROMPT, tokens=str(TOKENS), ignore_eos="1", backend="wasm")
    assert result["backend"] == "wasm"
    assert result["promptIds"] == reference["prompt_ids"]
    assert result["tokens"] == reference["base"]


def test_web_sample_runs_a_baked_adapter_through_the_function_bodies(story, reference, node_modules, tmp_path):
    """The default export baked: HQQMatMulNBitsLoRA nodes, which onnxruntime-web runs as their ONNX function body."""
    out = tmp_path / "baked"
    run(sys.executable, "-m", "hqexport.cli", "convert", story / "base", "-o", out, "--adapter", f"tuned={story / 'tuned'}",
        "--adapters", "bake")
    assert "hqexport.HQQMatMulNBitsLoRA" in {layer["op"] for layer in json.loads((out / "hqexport.json").read_text())["layers"].values()}
    result = _in_chromium(out, prompt=PROMPT, tokens=str(TOKENS), ignore_eos="1")
    assert result["backend"] == "wasm"  # "auto" in headless Chromium: no hardware WebGPU adapter
    assert result["tokens"] == reference["tuned"]


def test_js_samples_run_an_fp16_export_as_onnxruntime_python_does(story, node_modules, tmp_path):
    """--dtype fp16 (fp16 activations, KV cache and logits): Node.js and the page decode what onnxruntime's Python
    API decodes from the same folder (fp16 rounding moves the tokens away from the fp32 reference)."""
    out = tmp_path / "fp16"
    run(sys.executable, "-m", "hqexport.cli", "convert", story / "base", "-o", out, "--dtype", "fp16", "--no-kernels")
    (python_run,) = json_lines(python("python_generate/generate.py", out, "--prompt", PROMPT, "--max-new-tokens",
                                      str(TOKENS), "--ignore-eos", "--token-ids"))
    (node,) = json_lines(run("node", JS / "generate.mjs", out, "--prompt", PROMPT, "--max-new-tokens", str(TOKENS),
                             "--ignore-eos", "--token-ids"))
    assert node["tokens"] == python_run["tokens"]
    web = _in_chromium(out, prompt=PROMPT, tokens=str(TOKENS), ignore_eos="1", backend="wasm")
    assert web["tokens"] == python_run["tokens"]


@pytest.mark.slow
def test_js_samples_on_smollm2_match_pytorch_hqq(node_modules, tmp_path):
    """SmolLM2-135M exported as samples/js/README.md advises for the browser (--ops hqq --no-kernels): Node.js and
    the page in Chromium (WASM) decode PyTorch-hqq's greedy tokens."""
    from hqexport.validation.reference import load_reference
    from tests.smollm2 import smollm2_hqq

    source, out, prompt, tokens = smollm2_hqq(), tmp_path / "web", "What is the capital of France?", 16
    run(sys.executable, "-m", "hqexport.cli", "convert", source, "-o", out, "--ops", "hqq", "--no-kernels")
    (node,) = json_lines(run("node", JS / "generate.mjs", out, "--prompt", prompt, "--max-new-tokens", str(tokens),
                             "--ignore-eos", "--token-ids"))
    expected = _greedy(load_reference(source).model, node["prompt"], tokens)
    assert node["tokens"] == expected
    web = _in_chromium(out, prompt=prompt, tokens=str(tokens), ignore_eos="1", backend="wasm")
    assert web["promptIds"] == node["prompt"] and web["tokens"] == expected


@pytest.mark.slow
def test_finetune_story_every_adapter_mode(tmp_path):
    """The whole script as its README runs it (default --ops auto): each mode converts and validates."""
    out = python("finetune_then_export/finetune_then_export.py", "--workdir", tmp_path)
    for mode in ("separate", "bake", "merge"):
        assert f"{mode:9} validate PASSED" in out, out
    merged = json.loads((tmp_path / "merge" / "hqexport.json").read_text())["adapters"]["tuned"]
    assert 0 <= merged["retained"] < 0.5, merged  # re-quantization erases most of a fine-tune of ~3% of |W|
    manifest = json.loads((tmp_path / "separate" / "hqexport.json").read_text())
    targets = set(manifest["adapters"]["tuned"]["targets"])
    ops = {path: layer["op"] for path, layer in manifest["layers"].items()}
    # the adapter inside the kernel's nodes; the packed gate/up node also gates the MLP
    gated = {path: path.endswith(("mlp.gate_proj", "mlp.up_proj")) for path in targets}
    assert {path: ops[path] for path in targets} == {path: "hqexport.HQQMatMulNBitsLoRA" + ("SwiGLU" if gated[path] else "") for path in targets}
    assert any(gated.values())
    assert {op for path, op in ops.items() if path not in targets} <= {"hqexport.HQQMatMulNBits"}  # the story adapts every layer
