"""optimum's ORTModelForCausalLM + generate() on an hqexport folder: the same greedy tokens as the reference.

    python check.py OUT REPORT.json      # REPORT.json: `hqexport validate OUT --json REPORT.json`

Runs in its own environment (optimum-onnx needs transformers < 4.58; hqexport needs transformers 5), so it
imports nothing from hqexport. The reference tokens are those of the validate report's generation check
(PyTorch + hqq). Exit 0 when every prompt's tokens are identical, 1 otherwise.

optimum needs the transformers config.json of the model (to pick the model class and the cache layout). When
OUT has none, the check runs on a view of OUT (symbolic links to its files) plus the source's config.json (the
folder recorded in OUT/hqexport.json) without its quantization_config, and says so.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch
from optimum.onnxruntime import ORTModelForCausalLM
from tokenizers import Tokenizer


def with_config(folder: Path, scratch: Path) -> Path:
    """`folder` itself if it has config.json, else a view of it with the source's config.json."""
    if (folder / "config.json").is_file():
        return folder
    source = Path(json.loads((folder / "hqexport.json").read_text())["source"]["path"])
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)  # the ONNX weights are not transformers-quantized
    view = scratch / folder.name
    view.mkdir()
    for item in folder.iterdir():
        (view / item.name).symlink_to(item.resolve())
    (view / "config.json").write_text(json.dumps(config, indent=2))
    print(f"note: {folder} has no config.json; using {source / 'config.json'} (minus quantization_config)")
    return view


def main(folder: Path, report_file: Path) -> int:
    report = json.loads(report_file.read_text())
    generation = next(c for c in report["checks"] if c["name"] == "generation")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    failures = 0
    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # LoRA parameters are overridable initializers: ORT warns about each one
        model = ORTModelForCausalLM.from_pretrained(
            with_config(folder, Path(scratch)), use_cache=True, use_io_binding=False, session_options=options
        )
        for row in generation["figures"]["prompts"]:
            expected = row["reference_tokens"]
            ids = torch.tensor([tokenizer.encode(row["prompt"]).ids])
            output = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(expected), min_new_tokens=len(expected),
                do_sample=False, pad_token_id=model.config.eos_token_id,
            )
            got = output[0, ids.shape[1]:].tolist()
            same = got == expected
            failures += not same
            print(f"{'MATCH' if same else 'MISMATCH'} {row['prompt']!r}: optimum {got} reference {expected}")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
