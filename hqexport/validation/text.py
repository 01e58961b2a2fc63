"""Text to token ids for the checks: the exported folder's tokenizer, else the source's, else raw bytes.

Both models see the same ids, so the tokenizer only has to be deterministic; a folder without tokenizer files
(tests may convert without one) falls back to UTF-8 bytes modulo the vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Tokenizer:
    hf: Any | None  # a transformers tokenizer, or None for the byte fallback
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        if self.hf is not None:
            ids = self.hf.encode(text, add_special_tokens=False)
        else:
            ids = [byte % self.vocab_size for byte in text.encode("utf-8")]
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        if self.hf is not None:
            return self.hf.decode(ids)
        return " ".join(str(i) for i in ids)


def load_tokenizer(exported: Path, source: Path, vocab_size: int) -> Tokenizer:
    import transformers

    for folder in (exported, source):
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            try:
                hf = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            except (OSError, ValueError):
                continue
            return Tokenizer(hf, vocab_size)
    return Tokenizer(None, vocab_size)
