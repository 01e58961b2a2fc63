"""optimum's ORTModelForCausalLM + generate() on an hqexport folder: the same greedy tokens as the reference.

    python check.py OUT REPORT.json      # REPORT.json: `hqexport validate OUT --json REPORT.json`

Runs in its own environment (optimum-onnx needs transformers < 4.58; hqexport needs transformers 5), so it
imports nothing from hqexport. The reference tokens are those of the validate report's generation check
(PyTorch + hqq). Exit 0 when every prompt's tokens are identical, 1 otherwise.

optimum reads the transformers config.json that convert writes next to the ONNX files (to pick the model class
and the cache layout).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnxruntime as ort
import torch
from optimum.onnxruntime import ORTModelForCausalLM
from tokenizers import Tokenizer


def main(folder: Path, report_file: Path) -> int:
    report = json.loads(report_file.read_text())
    generation = next(c for c in report["checks"] if c["name"] == "generation")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    failures = 0
    options = ort.SessionOptions()
    options.log_severity_level = 3  # LoRA parameters are overridable initializers: ORT warns about each one
    model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, use_io_binding=False, session_options=options)
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
