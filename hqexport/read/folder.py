"""What every on-disk reader needs from a source folder: safe file access, config, hashes, tokenizer files,
and the finishing step that makes a QuantizedModel look the same whichever form it was read from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from hqexport.errors import HQExportError
from hqexport.model import Provenance, QuantizedLinear, QuantizedModel

#: Files a tokenizer (or generation) needs, copied next to an exported model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)

_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def source_file(root: Path, name: str) -> Path:
    """`root/name`, refusing a symlink that leads outside the source folder."""
    path = root / name
    resolved = path.resolve()
    if resolved != root.resolve() and root.resolve() not in resolved.parents:
        raise HQExportError(f"is a symlink to {resolved}, outside the source folder; copy the file in instead", path)
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_config(root: Path) -> dict[str, Any]:
    path = source_file(root, "config.json")
    if not path.is_file():
        hint = " (it looks like a PEFT adapter folder: pass its base model)" if (root / "adapter_config.json").is_file() else ""
        raise HQExportError(f"no config.json: not a Hugging Face model folder{hint}", root)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HQExportError(f"is not valid JSON ({error})", path) from None
    if not isinstance(config, dict):
        raise HQExportError("must hold a JSON object", path)
    return config


def tokenizer_files(root: Path) -> list[Path]:
    return [source_file(root, name) for name in TOKENIZER_FILES if (root / name).is_file()]


def provenance(kind: str, root: Path, files: list[Path]) -> Provenance:
    """Absolute path plus the sha256 of every file read or listed, by name relative to the folder."""
    return Provenance(
        kind=kind,
        path=root.resolve(),
        files={str(path.relative_to(root)): sha256(path) for path in sorted(set(files))},
    )


def tie_lm_head(config: dict[str, Any], tensors: dict[str, torch.Tensor], linears: dict[str, QuantizedLinear], weights: Path) -> None:
    """Give a tied model its `lm_head.weight` (the embedding) as hqq and live models have; refuse an untied one without it.

    Checkpoints store tied weights once; hqq's pickle and a live state dict hold both names.
    """
    if "lm_head.weight" in tensors or "lm_head" in linears:
        return
    embeddings = [key for key in tensors if key.endswith(_EMBEDDING_SUFFIXES)]
    if config.get("tie_word_embeddings", True) and len(embeddings) == 1:
        tensors["lm_head.weight"] = tensors[embeddings[0]]
    elif not config.get("tie_word_embeddings", True):
        raise HQExportError("has no lm_head weights and config.json says the embeddings are not tied", weights)


def _skeleton(config: dict[str, Any]) -> torch.nn.Module | None:
    """The model built on the meta device from config.json (no memory, no weights); None if transformers can't."""
    import transformers

    settings = {key: value for key, value in config.items() if key != "quantization_config"}
    try:
        hf_config = transformers.AutoConfig.for_model(**settings)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(hf_config)
    except Exception:  # best effort: transformers raises many types for configs it rejects
        return None


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def in_model_order(
    skeleton: torch.nn.Module | None, linears: dict[str, QuantizedLinear], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, QuantizedLinear], dict[str, torch.Tensor]]:
    """Linears and tensors in the order a live model lists them (checkpoints sort keys alphabetically)."""
    if skeleton is None:
        names = sorted([*linears, *tensors], key=_natural)
    else:
        names = [name for name, _ in skeleton.named_modules()] + list(skeleton.state_dict())
    order: dict[str, int] = {}
    for position, name in enumerate(names):
        order.setdefault(name, position)
    last = len(names)
    return (
        {name: linears[name] for name in sorted(linears, key=lambda n: (order.get(n, last), _natural(n)))},
        {name: tensors[name] for name in sorted(tensors, key=lambda n: (order.get(n, last), _natural(n)))},
    )


def skipped_linears(skeleton: torch.nn.Module | None, linears: dict[str, QuantizedLinear], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Linears left in floating point, in model order: the skeleton's nn.Linear modules not quantized."""
    if skeleton is None:  # an architecture transformers does not know: 2-D weights other than embeddings
        return sorted(
            (
                key.removesuffix(".weight")
                for key, value in tensors.items()
                if key.endswith(".weight") and value.dim() == 2 and not key.endswith(_EMBEDDING_SUFFIXES)
            ),
            key=_natural,
        )
    return [name for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear) and name not in linears]


def assemble(
    kind: str,
    root: Path,
    config: dict[str, Any],
    linears: dict[str, QuantizedLinear],
    tensors: dict[str, torch.Tensor],
    weights: Path,
    files_read: list[Path],
) -> QuantizedModel:
    """The common last step of the on-disk readers."""
    if not linears:
        raise HQExportError("holds no HQQ layers (no W_q weights)", weights)
    tie_lm_head(config, tensors, linears, weights)
    tokenizers = tokenizer_files(root)
    skeleton = _skeleton(config)
    linears, tensors = in_model_order(skeleton, linears, tensors)
    return QuantizedModel(
        config=config,
        linears=linears,
        tensors=tensors,
        tokenizer_files=tokenizers,
        provenance=provenance(kind, root, files_read + tokenizers),
        skipped_modules=skipped_linears(skeleton, linears, tensors),
    )
