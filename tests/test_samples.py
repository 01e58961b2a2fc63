"""The samples, run as their READMEs say, on the bundled sample model (tiny Llama, hqq 4-bit g32 + a LoRA adapter).

The module fixture runs samples/finetune_then_export (quantize with hqq, train LoRA with PEFT, `hqexport convert
--adapters separate --ops hqq`, `hqexport validate`). Every sample's greedy tokens must equal the reference's:
for the base model the tokens of `hqexport validate`'s generation check (PyTorch + hqq's HQQLinear), for the
adapter PEFT's LoRA on that same hqq reference (hqexport.validate.reference), computed here.
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
    from hqexport.validate.torch_session import returned_cache

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

    from hqexport.validate.reference import load_reference

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


def test_python_sample_greedy_switches_adapters_between_requests(story, reference):
    out = python("python_generate/generate.py", story / "separate", "--prompt", PROMPT, "--adapter", "base",
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


@pytest.mark.slow
def test_finetune_story_every_adapter_mode(tmp_path):
    """The whole script as its README runs it (default --ops auto): each mode converts and validates."""
    out = python("finetune_then_export/finetune_then_export.py", "--workdir", tmp_path)
    for mode in ("separate", "bake", "merge"):
        assert f"{mode:9} validate PASSED" in out, out
    merged = json.loads((tmp_path / "merge" / "hqexport.json").read_text())["adapters"]["tuned"]
    assert 0 <= merged["retained"] < 0.5, merged  # re-quantization erases most of a fine-tune of ~3% of |W|
    layers = json.loads((tmp_path / "separate" / "hqexport.json").read_text())["layers"]
    assert {layer["op"] for layer in layers.values()} == {"hqexport.HQQMatMulNBits"}
